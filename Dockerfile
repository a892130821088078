# The kontinue image: the trainer that pods run (`kontinue train`) and the operator (`kontinue operator`).
# Pinned like the test environment: requirements/constraints.txt holds every version.

# mmcv (MMDetection's compiled ops) has no wheel for our torch: built here, once per image build.
# The ops are compiled for the CPU; GPU detection needs them built with CUDA (a CUDA "devel" base
# image and FORCE_CUDA=1 as build arguments).
ARG BASE=python:3.11.7-slim-bookworm
FROM ${BASE} AS mmcv
ARG FORCE_CUDA=0
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY requirements/constraints.txt scripts/mmcv-wheel.sh ./
RUN pip install --no-cache-dir -c constraints.txt torch torchvision \
 && FORCE_CUDA=${FORCE_CUDA} KONTINUE_WHEEL_CACHE=/wheels ./mmcv-wheel.sh python

FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/kontinue
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY kontinue/ kontinue/
COPY crds/ crds/
COPY --from=mmcv /wheels /wheels
# opencv (MMDetection's image library) needs libGL and glib at import time
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/* \
 && pip install -c requirements/constraints.txt torch torchvision \
 && pip install --no-deps /wheels/*/mmcv-*.whl && rm -rf /wheels \
 && pip install -c requirements/constraints.txt '.[detection]' \
 && useradd --uid 1000 --user-group --no-create-home --home-dir /scratch/home kontinue

# Pods run with a read-only root filesystem: everything writable lives on the /scratch emptyDir.
USER 1000:1000
ENV HOME=/scratch/home HF_HOME=/scratch/huggingface TORCH_HOME=/scratch/torch
ENTRYPOINT ["kontinue"]
CMD ["--help"]
