# geodiff4d on the official Ray image of the pinned Ray (requirements.lock: ray==2.60.0, Python 3.11).
# CPU image (pack, verify, eval, synth):  docker build -t geodiff4d:0.1.0-cpu .
# CUDA image (train, sample, recon):      docker build -t geodiff4d:0.1.0-gpu --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu .
# `make image` builds both. Nodes of one cluster must all run the same image tag (same code, same Ray).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /home/ray/geodiff4d
COPY --chown=ray:users . .
# configs/ stays here for `--config configs/...`; the package itself is installed into the image's Python
RUN bash cluster/deploy/install.sh && rm -rf build *.egg-info
