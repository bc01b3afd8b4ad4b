# The image `kaleido:0.1.0` that the Kubernetes manifests name (train.kubernetes.image, the work pool's `image`):
# the exact environment of requirements.lock in /opt/venv and the repository checkout at /opt/kaleido, which a
# flow-run pod's init container refreshes into its DVC workspace (`kaleido platform sync-workspace`).
#   make image                                   (docker build -t kaleido:0.1.0 --build-arg GIT_REVISION=...)
# Runs as uid/gid 1000 (the pods' runAsUser); the root filesystem may be read-only: HOME and caches are in /tmp,
# DVC's site cache (its file-hash state, /var/tmp by default) on the workspace PVC, so hashes survive the pod.
FROM python:3.11-slim-bookworm

ARG UV_VERSION=0.13.9
ARG GIT_REVISION=unknown

# gcc: Triton compiles its launcher and DeepSpeed its JIT ops at run time; libGL/glib: OpenCV's import.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir "uv==${UV_VERSION}" \
    && groupadd --gid 1000 kaleido && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home kaleido

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    UV_NO_CACHE=1 \
    KALEIDO_REPO=/workspace \
    KALEIDO_GIT_REVISION=${GIT_REVISION} \
    DVC_SITE_CACHE_DIR=/workspace/.dvc/tmp/site-cache

# The locked environment first: it changes far less often than the code, so this layer stays cached.
COPY requirements.lock /opt/kaleido/requirements.lock
RUN uv venv --python /usr/local/bin/python3.11 /opt/venv \
    && uv pip sync --python /opt/venv/bin/python --compile-bytecode /opt/kaleido/requirements.lock

COPY . /opt/kaleido
RUN uv pip install --python /opt/venv/bin/python --compile-bytecode --no-deps /opt/kaleido \
    && kaleido --help >/dev/null

WORKDIR /workspace
USER 1000:1000
CMD ["kaleido", "--help"]
