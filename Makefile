# geodiff4d: make setup, make demo, make test, make bench, make lint
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_OUT ?= demo_out

.PHONY: setup test test-slow demo bench lint clean

setup: $(VENV)/.installed

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

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/geodiff4d demo --out $(DEMO_OUT)

bench: setup
	@for script in bench/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
