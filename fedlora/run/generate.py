"""``fedlora generate``: the answer of a finished run's fine-tuned model to a prompt, as its task writes
one (causal-lm: greedy decoding)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model.adapters import set_base_offsets
from fedlora.core.records.rundir import RunDirectory
from fedlora.tasks.base import Task
from fedlora.tasks.registry import task_of


def run_config(run_dir: Path) -> ExperimentConfig:
    """The config of a finished run whose task writes text; ConfigError (one line) for anything else."""
    directory = RunDirectory(run_dir)
    config = directory.path / "config.toml"
    if not config.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no config.toml)")
    cfg = ExperimentConfig.from_toml(config.read_text(encoding="utf-8"))
    task = task_of(cfg)
    if type(task).generate is Task.generate:
        raise ConfigError(f"run '{run_dir}' has task = {cfg.task!r}; fedlora generate needs a causal-lm run")
    if not (directory.adapter_path / "adapter_config.json").is_file():
        raise ConfigError(f"run '{run_dir}' has no adapter/ yet (it has not finished)")
    return cfg


def generate(run_dir: Path, text: str, *, max_new_tokens: int = 16, raw: bool = False) -> str:
    """The fine-tuned model's answer to ``text`` (see the task's ``generate``; causal-lm fills ``text``
    into the run's ``data.template`` unless ``raw``). ``max_new_tokens``: at most this many tokens are
    generated (default 16)."""
    cfg = run_config(run_dir)
    directory = RunDirectory(run_dir)
    task = task_of(cfg)
    model = task.load_trained(directory.adapter_path)
    if directory.base_offsets_path.is_file():  # FedEx-LoRA, FLoRA: updates folded into the base weights
        set_base_offsets(model, load_file(str(directory.base_offsets_path)))
    return task.generate(model, text, max_new_tokens=max_new_tokens, raw=raw)
