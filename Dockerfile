# syntax=docker/dockerfile:1
# Feature Map Service image. Two stages: the builder installs the pinned dependencies into a venv; the slim
# runtime gets that venv, the code and the trained weights, and runs as a non-root user.
#
#   docker build -t featuremap-service .                      # CPU-only torch (the default)
#   docker build -t featuremap-service:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch, for GPU hosts
#
# The CUDA build needs no CUDA base image: torch's CUDA wheels bring their own CUDA libraries, and the host's
# NVIDIA Container Toolkit mounts the driver (docker run --gpus all, compose's gpu profile, k8s nvidia.com/gpu).
# Both stages use the same base (written out twice so that hadolint can check its tag and registry).

FROM python:3.11-slim-bookworm AS builder
# The torch wheel index: /whl/cpu (CPU-only wheels, a few hundred MB) or /whl/cu1xx (CUDA, several GB). It is an
# *extra* index: pip takes the other pins from PyPI and, for torch==2.13.0, prefers this index's local version
# (2.13.0+cpu or 2.13.0+cu128 sorts above PyPI's plain 2.13.0).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
# Dependencies before code: this layer is rebuilt only when requirements.txt (or the index) changes.
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

FROM python:3.11-slim-bookworm AS runtime
ENV VIRTUAL_ENV=/opt/venv
# Workers: WEB_CONCURRENCY when set (uvicorn's convention), else one per CPU the container may use (its cgroup
# quota), at most 4, each with its share of compute slots and torch threads: on small predictions a process's
# event loop saturates before torch does (bench/serve.py: 2 workers on 2 cores served 1.9x one).
ENV PATH=${VIRTUAL_ENV}/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and volumes can be granted to it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Code and weights stay owned by root: the service reads them and writes nothing but temporary upload files
# (to /tmp), so the root filesystem can be mounted read-only. Bytecode is compiled here, not at run time.
COPY service ./service
COPY models ./models
RUN python -m compileall -q service
USER 10001:10001
EXPOSE 8000
# Liveness without curl: urlopen raises (exit 1) on a refused connection, a timeout or a non-2xx answer.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
# Exec form: python is PID 1 and gets SIGTERM itself (readiness 503, FEATUREMAP_SHUTDOWN_DELAY_S, then uvicorn
# drains for up to 30 s). Timeouts and limits are set in service/__main__.py.
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
