"""LoRA on a model with peft: injection into the target modules, the adapter state in and out of the
model, what is trainable, the frozen base weights' offsets, saving and reloading.

The same functions serve simulated and deployed clients and the server's evaluation; the arrays
themselves (kinds, initialisations, records) are :mod:`fedlora.core.model.arrays`.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from fedlora.core.config import LoraConfig
from fedlora.core.model.arrays import State, base_weight_name, kind_of
from fedlora.core.model.loading import load_causal_lm, load_classifier, load_tokenizer
from fedlora.core.model.targets import head_modules, resolve


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Module-name suffixes for ``lora.targets`` (a preset resolved for the model's family, or the names
    given), by :func:`fedlora.core.model.targets.resolve`, the function pre-flight uses on the model's
    meta-device tree; ConfigError naming what fits when a target matches no adaptable layer."""
    return resolve(model, targets).names


def inject_lora(model: nn.Module, lora: LoraConfig, *, seed: int, task_type: str = "SEQ_CLS") -> PeftModel:
    """Wrap ``model`` with LoRA adapters (A Kaiming-uniform from ``seed``, B zero). ``task_type``: peft's
    ``TaskType`` name; ``SEQ_CLS`` (default) also trains the classification head, ``CAUSAL_LM`` adds
    adapters only (the LM head stays frozen)."""

    targets = resolve(model, lora.targets)
    spec = PeftLoraConfig(
        task_type=TaskType[task_type],
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        target_modules=targets.modules,  # full names: exactly the modules pre-flight resolved
        fan_in_fan_out=targets.fan_in_fan_out,  # transformers' Conv1D (GPT-2) stores W transposed
        # every new head module is trained; a causal LM's head stays frozen
        modules_to_save=None if task_type == "CAUSAL_LM" else head_modules(model),
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers renames inside peft
        return get_peft_model(model, spec)


def adapter_state(model: PeftModel) -> State:
    """The adapter and head tensors (detached CPU copies), keyed by peft's state-dict names."""

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model; every key must be one of the model's adapter or head keys."""

    expected = set(adapter_state_keys(model))
    unknown = sorted(set(state) - expected)
    if unknown:
        raise KeyError(f"adapter state has keys the model lacks: {unknown[:3]}")
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise KeyError(f"peft rejected adapter keys: {unexpected[:3]}")


_KEYS: weakref.WeakKeyDictionary[nn.Module, tuple[int, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def adapter_state_keys(model: PeftModel) -> list[str]:
    """The names of all adapter and head tensors, in peft's order; listed again only when the model's
    parameters change in number (a strategy that adds adapter matrices, as Fed-SB's R after its warm-up):
    peft takes 0.3 CPU-seconds to list them for SmolLM2, which a warm trainer or a Ray actor would
    otherwise pay for every message; counting the parameters takes about a millisecond."""
    count = sum(1 for _ in model.parameters())
    cached = _KEYS.get(model)
    if cached is None or cached[0] != count:
        cached = _KEYS[model] = (count, tuple(get_peft_model_state_dict(model)))
    return list(cached[1])


def set_trainable(model: nn.Module, frozen: frozenset[str] = frozenset()) -> None:
    """Train every adapter and head parameter except the kinds in ``frozen`` ('lora_A', 'lora_B', 'lora_R',
    'head')."""
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or ".lora_R." in name or "modules_to_save" in name:
            param.requires_grad_(kind_of(name) not in frozen)


def set_checkpointing(model: PeftModel, enabled: bool) -> None:
    """Turn gradient checkpointing of the base model on or off (``train.gradient_checkpointing``):
    activations are recomputed in the backward pass instead of kept, which saves memory on larger
    models and costs about one more forward pass per step. Non-reentrant, so the frozen embeddings need
    no gradient."""
    base: PreTrainedModel = model.get_base_model()  # type: ignore[assignment]
    supported = getattr(base, "supports_gradient_checkpointing", False)
    if not supported or base.is_gradient_checkpointing == enabled:
        return
    if enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def set_base_offsets(model: nn.Module, offsets: Mapping[str, torch.Tensor]) -> None:
    """Set every adapted layer's frozen weight to W0 + offset (W0 = the pretrained weight; no offset = W0).

    Used by strategies that fold updates into the base weights (FedEx-LoRA, FLoRA). The pretrained
    weights are kept on the model the first time, so repeated calls never accumulate.
    """
    pristine: dict[str, torch.Tensor] = model.__dict__.setdefault("_fedlora_w0", {})
    modules = dict(model.named_modules())
    unknown = [k for k in offsets if k.removesuffix(".base_layer.weight") not in modules]
    if unknown:
        raise KeyError(f"base offsets name layers the model lacks: {unknown[:3]}")
    for name, module in modules.items():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        key = base_weight_name(name)
        if key not in offsets and key not in pristine:
            continue
        w0 = pristine.setdefault(key, base.weight.detach().clone())
        with torch.no_grad():
            offset = offsets.get(key)
            if offset is not None and getattr(module, "fan_in_fan_out", False):
                offset = offset.T  # a Conv1D (GPT-2) stores W as d_in x d_out; offsets are d_out x d_in
            base.weight.copy_(w0 if offset is None else w0 + offset.to(w0.dtype).to(w0.device))


def save_adapter(model: PeftModel, directory: Path, model_path: str | None = None) -> None:
    """Write a self-contained adapter folder: the adapter in peft's format, the base model's
    ``config.json`` (its ``id2label`` and ``label2id`` name the classes, see :func:`load_trained`) and the
    tokenizer the run used (with the pad token it set), so that ``AutoTokenizer.from_pretrained`` and
    ``PeftModel.from_pretrained`` on the folder reproduce the run's predictions (docs/data.md).

    ``model_path``: the run's ``model.path`` (default: the folder the base model was loaded from)."""
    base: PreTrainedModel = model.get_base_model()  # type: ignore[assignment]
    model.save_pretrained(str(directory))
    config: PretrainedConfig = base.config
    config.save_pretrained(str(directory))
    load_tokenizer(base.name_or_path if model_path is None else model_path).save_pretrained(str(directory))


def load_trained_lm(directory: Path, model_path: str) -> PeftModel:
    """A saved causal-LM adapter on its base model (``model.path``), in eval mode, with
    ``PeftModel.from_pretrained`` on ``AutoModelForCausalLM``."""
    model = PeftModel.from_pretrained(load_causal_lm(model_path), str(directory))
    model.eval()
    return model


def load_trained(directory: Path, model_path: str = "") -> PeftModel:
    """A saved adapter on its base model, in eval mode, predicting class names: ``model.config.id2label``
    maps an output index to its name. ``model_path``: the base model directory (default: the packaged
    all-MiniLM-L6-v2, as ``model.path``)."""
    config = AutoConfig.from_pretrained(str(directory))
    labels = [config.id2label[i] for i in range(len(config.id2label))]
    model = PeftModel.from_pretrained(load_classifier(model_path, labels=labels), str(directory))
    model.eval()
    return model
