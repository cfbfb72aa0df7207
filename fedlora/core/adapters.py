"""LoRA injection with peft, and the adapter arrays that travel between server and clients.

The same functions serve simulated and deployed clients and the server. Arrays are keyed by
peft's own state-dict names (``...query.lora_A.weight``, ``...classifier.weight``), never by position.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from fedlora.core.config import TARGET_PRESETS, ExperimentConfig, LoraConfig

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

#: Module-name suffixes per preset, for BERT-style and Llama-style attention blocks.
PRESETS: dict[str, dict[str, list[str]]] = {
    "bert": {
        "qv": ["query", "value"],
        "qkvo": ["query", "key", "value", "attention.output.dense"],
        "vo": ["value", "attention.output.dense"],
    },
    "llama": {
        "qv": ["q_proj", "v_proj"],
        "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "vo": ["v_proj", "o_proj"],
    },
}

State = dict[str, torch.Tensor]


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the model's linear layers (what LoRA can adapt), in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def preset_family(names: list[str]) -> str:
    """'llama' or 'bert': which attention naming the linear layer ``names`` follow."""
    return "llama" if any(n.endswith("q_proj") for n in names) else "bert"


def target_suffixes(targets: list[str], names: list[str]) -> list[str]:
    """``targets`` as module-name suffixes: a preset resolved for the model's family, or the names given."""
    if len(targets) == 1 and targets[0] in TARGET_PRESETS:
        return list(PRESETS[preset_family(names)][targets[0]])
    return list(targets)


def unmatched(suffixes: list[str], names: list[str]) -> list[str]:
    """The suffixes that match no name (a suffix matches a whole name or its dotted tail)."""
    return [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in names)]


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Module-name suffixes for peft's ``target_modules``: a preset name or explicit names.

    Raises ValueError naming the targets that match no linear layer of the model.
    """
    names = linear_names(model)
    suffixes = target_suffixes(targets, names)
    missing = unmatched(suffixes, names)
    if missing:
        raise ValueError(
            f"lora.targets = {targets!r}: no linear layer named {missing}; "
            f"use a preset ({', '.join(TARGET_PRESETS)}) or names such as {names[0].rsplit('.', 1)[-1]!r}"
        )
    return suffixes


def inject_lora(model: nn.Module, lora: LoraConfig, *, seed: int) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (A Kaiming-uniform from ``seed``, B zero) and a trainable head."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    spec = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        target_modules=resolve_targets(model, lora.targets),
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers renames inside peft
        return get_peft_model(model, spec)


def adapter_state(model: PeftModel) -> State:
    """The adapter and head tensors (detached CPU copies), keyed by peft's state-dict names."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model; every key must be one of the model's adapter or head keys."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state_keys(model))
    unknown = sorted(set(state) - expected)
    if unknown:
        raise KeyError(f"adapter state has keys the model lacks: {unknown[:3]}")
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise KeyError(f"peft rejected adapter keys: {unexpected[:3]}")


def adapter_state_keys(model: PeftModel) -> list[str]:
    """The names of all adapter and head tensors, in peft's order."""
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model))


def is_lora_a(key: str) -> bool:
    """True for a LoRA down-projection A (r x d_in)."""
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    """True for a LoRA up-projection B (d_out x r)."""
    return ".lora_B." in key


def is_head(key: str) -> bool:
    """True for the classification head (trained and shared, not a LoRA factor)."""
    return not (is_lora_a(key) or is_lora_b(key))


def layer_of(key: str) -> str:
    """The adapted module a LoRA key belongs to (the key without ``.lora_A.weight``)."""
    return key.split(".lora_A.")[0].split(".lora_B.")[0]


def lora_scale(lora: LoraConfig) -> float:
    """The LoRA scale s applied to B @ A: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return lora.alpha / (lora.rank**0.5 if lora.rslora else lora.rank)


def to_arrays(state: Mapping[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    """Named tensors -> a Flower ArrayRecord (order preserved)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_arrays(record) -> State:  # type: ignore[no-untyped-def]
    """A Flower ArrayRecord -> named float tensors (copies, writable)."""
    return {k: torch.from_numpy(arr.numpy().copy()) for k, arr in record.items()}


def payload_bytes(record) -> int:  # type: ignore[no-untyped-def]
    """Exact serialized bytes of the arrays in a Flower ArrayRecord (what travels on the wire)."""
    return sum(len(arr.data) for arr in record.values())


@functools.cache
def _cached_model(model_path: str, lora_key: tuple[object, ...], seed: int) -> tuple[PeftModel, State]:
    from fedlora.core.data import LABELS
    from fedlora.core.models import load_classifier

    rank, alpha, dropout, rslora, targets = lora_key
    lora = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, targets=list(targets))  # type: ignore[arg-type, call-overload]
    model = inject_lora(load_classifier(model_path, num_labels=len(LABELS), seed=seed), lora, seed=seed)
    return model, adapter_state(model)


def _key(cfg: ExperimentConfig) -> tuple[str, tuple[object, ...], int]:
    import dataclasses

    lora_key = tuple(tuple(v) if isinstance(v, list) else v for v in dataclasses.astuple(cfg.lora))
    return cfg.model.path, lora_key, cfg.seed


def get_model(cfg: ExperimentConfig) -> PeftModel:
    """The process's LoRA model for this experiment, built once and reused across rounds and clients.

    Callers overwrite every adapter and head tensor (``load_adapter_state``) before use, so reuse is safe.
    """
    return _cached_model(*_key(cfg))[0]


def initial_state(cfg: ExperimentConfig) -> State:
    """The adapter and head exactly as initialised from ``cfg.seed`` (A random, B zero, head random)."""
    return {k: v.clone() for k, v in _cached_model(*_key(cfg))[1].items()}


def kind_of(key: str) -> str:
    """'lora_A', 'lora_B' or 'head' for an adapter state key."""
    return "lora_A" if is_lora_a(key) else "lora_B" if is_lora_b(key) else "head"


def set_trainable(model: nn.Module, frozen: frozenset[str] = frozenset()) -> None:
    """Train every adapter and head parameter except the kinds in ``frozen`` ('lora_A', 'lora_B', 'head')."""
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or "modules_to_save" in name:
            param.requires_grad_(kind_of(name) not in frozen)


def kaiming_a(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A LoRA A factor initialised like peft (Kaiming-uniform, a = sqrt(5)) from ``generator``."""
    rows, fan_in = shape
    bound = 1.0 / fan_in**0.5  # kaiming_uniform_ with a=sqrt(5): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    return (torch.rand(rows, fan_in, generator=generator) * 2 - 1) * bound


def fresh_lora(state: Mapping[str, torch.Tensor], *, seed: int) -> State:
    """``state`` with every A re-drawn (peft's Kaiming-uniform) from ``seed`` and every B zero; head kept."""
    generator = torch.Generator().manual_seed(seed)
    out: State = {}
    for key, value in state.items():
        if is_lora_a(key):
            out[key] = kaiming_a(tuple(value.shape), generator).to(value.dtype)
        elif is_lora_b(key):
            out[key] = torch.zeros_like(value)
        else:
            out[key] = value.clone()
    return out


def base_weight_name(layer: str) -> str:
    """The frozen base weight of an adapted layer, named like peft's state dict."""
    return f"{layer}.base_layer.weight"


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
            base.weight.copy_(w0 if offset is None else w0 + offset.to(w0.dtype).to(w0.device))


def orthogonal_a(state: Mapping[str, torch.Tensor], *, seed: int) -> State:
    """``state`` with every A replaced by orthonormal rows (QR of a seeded Gaussian), scaled so that the
    entries have the variance of peft's Kaiming-uniform A (1 / (3 d_in)); B and head kept."""
    generator = torch.Generator().manual_seed(seed)
    out: State = {}
    for key, value in state.items():
        if is_lora_a(key):
            rows, d_in = value.shape
            q, _ = torch.linalg.qr(torch.randn(d_in, rows, generator=generator, dtype=torch.float64))
            out[key] = (q.T * (d_in / 3.0) ** 0.5 / d_in**0.5).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def global_norm(arrays: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all ``arrays`` taken together, as one vector."""
    return math.sqrt(math.fsum(float(v.double().pow(2).sum()) for v in arrays.values()))
