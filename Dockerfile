# syntax=docker/dockerfile:1
# asvp-backend images, one Dockerfile, three targets (docker/docker-compose.yml builds them):
#   api         the HTTP API Label Studio calls. No torch: it serves cached rankings and starts in seconds.
#               Needs REDIS_URL (the jobs run on the workers); `asvp-backend serve` refuses to start without it.
#   worker      rq worker with CUDA PyTorch (the wheels bring the CUDA runtime; the host needs the NVIDIA driver
#               and the NVIDIA Container Toolkit)
#   worker-cpu  the same worker with CPU-only PyTorch (a laptop, or the cpu queue beside a GPU worker)
#   rq-dashboard  rq's web dashboard with the workers' own rq version (docker-compose.yml, port 9181)
#
#   docker build --target api -t asvp-backend:api .
#   docker build --target worker -t asvp-backend:worker .
#   docker build --target worker-cpu -t asvp-backend:worker-cpu .
#
# Build arguments: PYTHON_VERSION, TORCH_INDEX_CUDA (default cu128; pick the CUDA your driver supports, see
# https://pytorch.org/get-started/locally/), TORCH_INDEX_CPU.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/data/models \
    HOST=0.0.0.0 \
    PORT=9090 \
    WORKERS=1
# non-root; uid 1000 so that a bind-mounted MODEL_DIR owned by the first user of a Linux host is writable
RUN useradd --create-home --uid 1000 --user-group asvp \
    && mkdir -p /data/models \
    && chown -R asvp:asvp /data
WORKDIR /app

# ---------------------------------------------------------------------------------------------------- api
FROM base AS api
COPY requirements-api.txt ./
RUN pip install -r requirements-api.txt
COPY pyproject.toml README.md ./
COPY asvp_backend ./asvp_backend
RUN pip install --no-deps . && python -c "import asvp_backend.server.factory"
USER asvp
EXPOSE 9090
# /health answers 200 at once (basic auth skips it); DEGRADED in its body while Redis is down
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=3)"]
CMD ["asvp-backend", "serve"]

# ------------------------------------------------------------------------------------------- rq-dashboard
FROM api AS rq-dashboard
USER root
RUN pip install rq-dashboard==0.9.0
USER asvp
EXPOSE 9181
HEALTHCHECK NONE
CMD ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181"]

# ------------------------------------------------------------------------------------ PyTorch, two kinds
FROM base AS torch-cuda
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu128
COPY requirements.txt ./
# torch and torchvision first, from PyTorch's index, with the versions requirements.txt allows
RUN grep -E '^torch(vision)?[<>=]' requirements.txt > /tmp/torch.txt \
    && pip install --index-url "$TORCH_INDEX_CUDA" -r /tmp/torch.txt && rm /tmp/torch.txt

FROM base AS torch-cpu
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
COPY requirements.txt ./
RUN grep -E '^torch(vision)?[<>=]' requirements.txt > /tmp/torch.txt \
    && pip install --index-url "$TORCH_INDEX_CPU" -r /tmp/torch.txt && rm /tmp/torch.txt
ENV DEVICE=cpu

# ------------------------------------------------------------------------------------------------ workers
FROM torch-cuda AS worker
COPY requirements-api.txt requirements.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY asvp_backend ./asvp_backend
RUN pip install --no-deps . && python -c "import torch, timm, asvp_backend.jobs.tasks"
USER asvp
# --in-process: jobs run in the worker itself (CUDA cannot be re-initialised in a forked work-horse, and
# the backbone stays loaded between jobs)
CMD ["asvp-backend", "worker", "--queues", "gpu,cpu", "--in-process"]

FROM torch-cpu AS worker-cpu
COPY requirements-api.txt requirements.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY asvp_backend ./asvp_backend
RUN pip install --no-deps . && python -c "import torch, timm, asvp_backend.jobs.tasks"
USER asvp
CMD ["asvp-backend", "worker", "--queues", "cpu,gpu"]
