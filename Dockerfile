# syntax=docker/dockerfile:1
# One image for both halves of ncserve, on a CUDA-capable PyTorch base so the trainer
# uses the GPUs of the nodes it lands on (it falls back to CPU/gloo without them):
#   docker build -t ncserve:0.1.0 .                      # target "service" (default)
#   docker build --target trainer -t ncserve-trainer .   # ENTRYPOINT nclaunch
# Both targets hold the same files; the Helm chart runs one image with explicit commands.
# No secret, token, certificate, dataset or database is copied in (.dockerignore
# admits only the package sources); they are mounted at run time.

# --- base: PyTorch with CUDA 12.8 and cuDNN 9 (conda Python 3.11) ----------------------
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime AS base

# --- build: a wheel of this repository -------------------------------------------------
FROM base AS build
# Must satisfy requires-python in pyproject.toml (a test keeps the two in step).
ARG PYTHON_MIN=3.10
RUN python -c "import sys; need = tuple(int(p) for p in '${PYTHON_MIN}'.split('.')); sys.exit(f'python {sys.version_info[:2]} < {need}' if sys.version_info[:2] < need else 0)"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY ncserve/ ncserve/
COPY launcher/ launcher/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: the package and its dependencies, a non-root user --------------------------
FROM base AS runtime
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
# torch comes from the base image (it satisfies the package's torch requirement, so pip
# keeps the CUDA build); the other dependencies come from PyPI.
COPY --from=build /wheels/ /tmp/wheels/
RUN python -m pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -c "import torch, ncserve, launcher" \
    && ncserve --help >/dev/null \
    && nclaunch --help >/dev/null
COPY --chmod=0755 deploy/docker/ncserve-healthcheck /usr/local/bin/ncserve-healthcheck
RUN mkdir -p /var/lib/ncserve /runs /data \
    && chown ncserve:ncserve /var/lib/ncserve /runs
WORKDIR /home/ncserve
USER 10001:10001

# --- trainer: nclaunch ... -----------------------------------------------------------------
FROM runtime AS trainer
ENTRYPOINT ["nclaunch"]
CMD ["--help"]

# --- service: ncserve serve (default target) --------------------------------------------
FROM runtime AS service
EXPOSE 50051 9464
VOLUME ["/var/lib/ncserve"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["ncserve-healthcheck", "--target", "127.0.0.1:50051", "--timeout", "5"]
ENTRYPOINT ["ncserve"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--metrics-port", "9464", "--metrics-host", "0.0.0.0", \
     "--db", "/var/lib/ncserve/ncserve.db"]
