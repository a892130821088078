# The kontinue image: the trainer that pods run (`kontinue train`) and the operator (`kontinue operator`).
# Pinned like the test environment: requirements/constraints.txt holds every version.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/kontinue
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY kontinue/ kontinue/
COPY crds/ crds/
RUN pip install -c requirements/constraints.txt . \
 && useradd --uid 1000 --user-group --no-create-home --home-dir /scratch/home kontinue

# Pods run with a read-only root filesystem: everything writable lives on the /scratch emptyDir.
USER 1000:1000
ENV HOME=/scratch/home HF_HOME=/scratch/huggingface TORCH_HOME=/scratch/torch
ENTRYPOINT ["kontinue"]
CMD ["--help"]
