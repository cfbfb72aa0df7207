"""A model folder's module tree, built from its ``config.json`` on the meta device (no weight is read or
allocated): the task's model class as transformers builds it, for pre-flight to resolve LoRA targets on
(:func:`fedlora.core.model.targets.resolve`, the same function training uses), to refuse a family that
cannot be trained, and to see whether the folder already holds a head.

Every refusal is a :class:`~fedlora.core.config.ConfigError` of one line that names the fix.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from fedlora.core.config import ConfigError
from fedlora.core.model.targets import base_prefix, head_modules
from fedlora.core.model.weights import model_dir, model_label

ENCODERS = "an encoder such as BERT, RoBERTa, DeBERTa-v2 or DistilBERT"
DECODERS = "a decoder such as Llama, Qwen2, Mistral, Gemma, Phi-3 or GPT-2"
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
"""How transformers names causal-LM classes (``LlamaForCausalLM``, ``GPT2LMHeadModel``)."""


def model_tree(path: str, causal: bool) -> nn.Module:
    """The task's model (sequence classifier, or causal LM with ``causal``) for the folder ``model.path``,
    on the meta device; built once per folder, task and ``config.json`` version."""
    directory = model_dir(path)
    config_file = directory / "config.json"
    return _tree(str(directory), causal, config_file.stat().st_mtime_ns, model_label(path))


@functools.lru_cache(maxsize=32)
def _tree(directory: str, causal: bool, stamp: int, label: str) -> nn.Module:
    """The meta-device tree (``stamp``: the config file's mtime, so an edited folder is rebuilt)."""
    transformers.logging.set_verbosity_error()
    config = read_config(Path(directory), label)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    classes = MODEL_FOR_CAUSAL_LM_MAPPING if causal else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    if type(config) not in classes:
        raise ConfigError(_no_class(config.model_type, causal, label))
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception as exc:  # the model's own code checks its config in its own ways
        raise ConfigError(
            f"model.path: transformers cannot build a {config.model_type} model from the config.json of "
            f"{label} ({_one_line(exc)}); fix config.json or use another model"
        ) from None


def read_config(directory: Path, label: str) -> transformers.PretrainedConfig:
    """The folder's config as transformers reads it; ConfigError when it cannot."""
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # unknown model_type, invalid JSON, remote code: each its own kind
        raise ConfigError(
            f"model.path: transformers {transformers.__version__} cannot read the config.json of {label} "
            f"({_one_line(exc)}); use a model folder of a family transformers knows"
        ) from None


def _no_class(model_type: str, causal: bool, label: str) -> str:
    """The refusal of a family that has no class for the task."""
    if causal:
        return (
            f"task = 'causal-lm': {label} is a {model_type} model, which has no causal-LM class in "
            f"transformers; use {DECODERS}, or set task = 'classification'"
        )
    return (
        f"model.path: {label} is a {model_type} model, which has no sequence-classification class in "
        f"transformers; fedlora fine-tunes text models: use {ENCODERS} or {DECODERS}"
    )


def missing_weights(tree: nn.Module, modules: list[str], keys: list[str]) -> list[str]:
    """The ``modules`` (full names in ``tree``) whose weight is not among the checkpoint's ``keys``: a
    checkpoint saved from the base model names them without the base model's prefix."""
    prefix = base_prefix(tree)
    found = set(keys)
    missing = []
    for name in modules:
        bare = name.removeprefix(f"{prefix}.") if prefix else name
        if not ({f"{name}.weight", f"{bare}.weight"} & found):
            missing.append(name)
    return missing


def held_head(tree: nn.Module, keys: list[str]) -> list[str]:
    """The head modules of the task model (``tree``) whose weights the checkpoint holds."""
    return [head for head in head_modules(tree) if any(k.startswith(f"{head}.") for k in keys)]


def head_notice(path: str, tree: nn.Module, keys: list[str], num_labels: int) -> str:
    """A one-line notice when a classifier's new head replaces what the folder holds: a classification
    head (of any size) or a causal LM's head; empty for a bare base model."""
    config: transformers.PretrainedConfig = tree.config  # type: ignore[assignment]
    label = model_label(path)
    architecture = next(iter(getattr(config, "architectures", None) or []), "")
    held = held_head(tree, keys)
    if held:
        return (
            f"model.path: {label} holds a classification head ({', '.join(held)}, {config.num_labels} "
            f"labels, {architecture or config.model_type}); this run trains a new one for its {num_labels} "
            "labels in its place"
        )
    if architecture.endswith(CAUSAL_SUFFIXES):
        return (
            f"model.path: {label} is a causal language model ({architecture}); its language-model head is "
            f"left out and a new classification head for the run's {num_labels} labels goes on top"
        )
    return ""


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or "no detail"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"
