"""The process's LoRA model per experiment: the task's base model with adapters injected, built once
per process and reused across rounds and clients (callers overwrite every adapter and head tensor with
``load_adapter_state`` before use, so reuse is safe)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fedlora.core.config import ExperimentConfig
from fedlora.core.model.adapters import adapter_state, inject_lora
from fedlora.core.model.arrays import State
from fedlora.tasks.registry import task_of

if TYPE_CHECKING:
    from peft import PeftModel

_MODELS: dict[tuple[object, ...], tuple[PeftModel, State]] = {}


def _key(cfg: ExperimentConfig) -> tuple[object, ...]:
    lora = tuple(tuple(v) if isinstance(v, list) else v for v in dataclasses.astuple(cfg.lora))
    return cfg.task, cfg.model.path, lora, cfg.seed, task_of(cfg).model_key()


def _built(cfg: ExperimentConfig) -> tuple[PeftModel, State]:
    key = _key(cfg)
    if key not in _MODELS:
        task = task_of(cfg)
        model = inject_lora(task.load_model(cfg.seed), cfg.lora, seed=cfg.seed, task_type=task.peft_task_type)
        _MODELS[key] = model, adapter_state(model)
    return _MODELS[key]


def get_model(cfg: ExperimentConfig) -> PeftModel:
    """The process's LoRA model for this experiment (its task's model, adapters from ``cfg.seed``)."""
    return _built(cfg)[0]


def initial_state(cfg: ExperimentConfig) -> State:
    """The adapter and head exactly as initialised from ``cfg.seed`` (A random, B zero, head random)."""
    return {k: v.clone() for k, v in _built(cfg)[1].items()}
