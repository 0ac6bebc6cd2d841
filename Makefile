# geodiff4d: make setup, make demo, make test, make bench, make lint
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_OUT ?= demo_out

.PHONY: setup system-libs test test-slow test-cluster demo ablations bench lint clean image

setup: system-libs $(VENV)/.installed

# System libraries the wheels link against (libusb for open3d): installed with apt-get as root, else named
system-libs:
	@bash scripts/system_libs.sh

$(VENV)/.installed: requirements.txt requirements.lock requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -r requirements.txt -c requirements.lock
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# A real two-node Ray cluster on this machine, and the image's install script in a fresh virtualenv
test-cluster: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -s -m slow tests/test_multinode.py tests/test_deploy.py

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/geodiff4d demo --out $(DEMO_OUT)

# The paper's ablations on procedural data, held-out subjects (about 95 min on 2 idle cores; reruns resume):
# the table is RUN/ablations/ablations.{md,html}
ABLATIONS_OUT ?= runs/ablations
ablations: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/geodiff4d benchmark configs/ablations.yaml --out $(ABLATIONS_OUT)

bench: setup
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# Images on the official rayproject/ray image of the pinned Ray: a CPU one and a CUDA one (Dockerfile)
IMAGE ?= geodiff4d
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RAY_VERSION := $(shell sed -n 's/^ray==//p' requirements.lock)
image:
	@docker info > /dev/null 2>&1 || { echo "make image needs Docker: no running Docker engine found"; exit 1; }
	docker build -t $(IMAGE):$(IMAGE_VERSION)-cpu --build-arg RAY_IMAGE=rayproject/ray:$(RAY_VERSION)-py311-cpu .
	docker build -t $(IMAGE):$(IMAGE_VERSION)-gpu --build-arg RAY_IMAGE=rayproject/ray:$(RAY_VERSION)-py311-gpu .

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
