# GPU image for reproducible sara runs: torch 2.14.1 (CUDA 13.0 build) on Ubuntu 24.04.
#
# Build, from the repository root:
#   docker build -t sara .
# Print the training flags (the default command):
#   docker run --rm sara
# Train on 8 GPUs: prepared data read-only at /data, checkpoints and logs back on the host in
# ./runs, downloaded weights (DINOv2, SD-VAE, Inception) kept across runs in ~/.cache/sara:
#   mkdir -p runs ~/.cache/sara
#   docker run --rm --gpus all --ipc=host \
#     -v /path/to/prepared-imagenet:/data:ro -v "$PWD/runs:/app/runs" -v ~/.cache/sara:/cache \
#     sara torchrun --nproc_per_node=8 train.py --align sara --data-dir /data
#
# --ipc=host (or --shm-size=64g) is required for torchrun: DataLoader workers and NCCL pass
# tensors through /dev/shm, and Docker's default 64 MB ends in "bus error" or NCCL shm errors.
# The container runs as uid 1000; if yours differs, add --user "$(id -u):$(id -g)" so the
# bind-mounted runs/ and cache stay writable. The host needs an NVIDIA driver >= 580 (CUDA 13)
# and the NVIDIA Container Toolkit.

# CUDA 13.0.3 is what the torch 2.14.1 wheel was built against (it requires cuda-toolkit==13.0.3
# on PyPI and brings its own cuDNN; the image's copy only matters to non-torch tools).
# Pinned by full tag only: no registry digest could be verified when this was written (no
# network). To lock it, run `docker buildx imagetools inspect <this tag>` and append
# @sha256:<digest> to the line below.
FROM nvidia/cuda:13.0.3-cudnn-runtime-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive

# Ubuntu 24.04's own Python 3.12 (torch/torchvision ship cp312 wheels); python3-venv pulls in
# python3 and ensurepip's wheels. The version is noble-updates'; if apt no longer finds it,
# Ubuntu has superseded it: take the new one from `apt-cache policy python3-venv`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv=3.12.3-0ubuntu2.1 \
    && rm -rf /var/lib/apt/lists/*

# Non-root user with uid 1000, the usual first user on a host, so bind mounts stay writable.
# Ubuntu 24.04 images already own uid 1000 as "ubuntu", so that user makes way.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash sara \
    && install -d -o sara -g sara /app /cache

# PYTHONUNBUFFERED: every torchrun rank's log lines appear as they happen.
# XDG_CACHE_HOME: torch.hub, Hugging Face and timm downloads all land in one mountable place.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    XDG_CACHE_HOME=/cache

WORKDIR /app

# Requirements alone first, so the multi-GB torch layer is rebuilt only when they change.
COPY requirements.txt ./
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir -r requirements.txt

# The code last (see .dockerignore for what stays out), writable by the user so runs/ and
# samples/ can be created under /app when they are not bind-mounted.
COPY --chown=1000:1000 . .

# Numeric, so the uid is unambiguous on the host side of bind mounts.
USER 1000:1000

CMD ["python", "train.py", "--help"]
