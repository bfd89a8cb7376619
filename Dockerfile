# syntax=docker/dockerfile:1
#
# llem-serve server image: CUDA runtime, torch from the CUDA wheel index, llem-client + llem-server.
#
#   docker build -t llem-serve .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t llem-serve:cu126 .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 -v /srv/models:/models:ro llem-serve
#
# Extra server flags go after the image name; they replace the default CMD
# (--metrics-port 9400), e.g. `... llem-serve --metrics-port 9400 --auth-token-file /run/secrets/tokens`.
# The HEALTHCHECK speaks plaintext gRPC to port 50051: with --tls-* or another --port,
# override it (docker run --health-cmd ...) or rely on your orchestrator's probes.

# The runtime flavour (cudart, cuBLAS, NCCL), not cudnn: the torch cu12x wheels bring their
# own cuDNN as pip packages, so a cudnn base would ship it twice (~1 GB).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------- build
FROM ${CUDA_IMAGE} AS build

# Match the CUDA of the wheel index to the base image's (cu128 <-> 12.8).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Empty: the newest torch on that index. Pin for reproducible images, e.g. 2.8.0.
ARG TORCH_VERSION=

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip setuptools wheel

# torch first, alone, from the CUDA index: its own layer (GBs) stays cached across code
# changes, and the server's unpinned `torch>=2.4` is then already satisfied, so pip does
# not swap in another build from PyPI.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch${TORCH_VERSION:+==${TORCH_VERSION}}"

WORKDIR /src
COPY client/ client/
COPY server/ server/
RUN pip install ./client ./server \
 && python -c "import torch, llem_server, llem.v1.llem_pb2; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# -------------------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE}

LABEL org.opencontainers.image.title="llem-serve" \
      org.opencontainers.image.description="gRPC LLM inference with per-request GPU energy"

# gcc, libc6-dev and python3-dev: Triton (torch.compile on GPU) builds a small C launcher
# at run time and inductor compiles CPU kernels; without them torch_compile requests
# fail (the server then serves uncompiled with a COMPILE_FAILED warning).
# tini: PID 1 that forwards SIGTERM (the server drains on it) and reaps the worker
# processes' children (compile workers) so no zombies pile up.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv

# A fixed non-root uid/gid, so Kubernetes runAsUser and volume ownership can name it.
RUN groupadd --system --gid 10001 llem \
 && useradd --system --uid 10001 --gid llem --home-dir /home/llem --create-home --shell /usr/sbin/nologin llem \
 && mkdir -p /models /cache \
 && chown llem:llem /cache

# Caches (hub downloads with --allow-hub, Triton and inductor kernels) in one writable
# place: mount a volume at /cache to keep compiled kernels across restarts.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    XDG_CACHE_HOME=/cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER llem
WORKDIR /home/llem

# 50051: gRPC (LlemService, health, reflection). 9400: Prometheus /metrics.
EXPOSE 50051 9400

# Workers start (CUDA init, capability probe) before the server reports SERVING: allow
# for it. `llem-client health` exits 0 only when the server answers SERVING.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["llem-client", "health", "--server", "127.0.0.1:50051"]

# The server drains on SIGTERM (--grace-seconds, default 30 s): give `docker stop -t 40`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "llem-server", "--host", "0.0.0.0", "--model-root", "/models"]
CMD ["--metrics-port", "9400"]
