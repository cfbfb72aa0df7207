"""Adapters as named tensors: the LoRA factors and head by kind, their initialisations, and the Flower
ArrayRecords they travel in (exact byte counts). Keys are peft's state-dict names
(``...query.lora_A.weight``, ``...classifier.weight``), never positions. No model, no peft: the server's
strategies and the privacy code work on these alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from fedlora.core.config import LoraConfig
from fedlora.core.model.codecs import decode_array, encode_tensor

State = dict[str, torch.Tensor]


def is_lora_a(key: str) -> bool:
    """True for a LoRA down-projection A (r x d_in)."""
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    """True for a LoRA up-projection B (d_out x r)."""
    return ".lora_B." in key


def is_lora_r(key: str) -> bool:
    """True for a core R (r x r) between A and B: W = W0 + s * B @ R @ A (Fed-SB's trained matrix)."""
    return ".lora_R." in key


def is_head(key: str) -> bool:
    """True for the classification head (trained and shared, not a LoRA factor)."""
    return not (is_lora_a(key) or is_lora_b(key) or is_lora_r(key))


def layer_of(key: str) -> str:
    """The adapted module a LoRA key belongs to (the key without ``.lora_A.weight``)."""
    return key.split(".lora_A.")[0].split(".lora_B.")[0].split(".lora_R.")[0]


def core_key(layer: str) -> str:
    """The key of the core R of an adapted layer, named like peft's state dict (``<layer>.lora_R.weight``)."""
    return f"{layer}.lora_R.weight"


def fold_cores(state: Mapping[str, torch.Tensor]) -> State:
    """``state`` with every core folded into its A (A := R @ A) and the R keys dropped: plain LoRA factors
    with the same product, B (R A) = B R A, which peft saves and loads as any adapter."""
    out: State = {k: v for k, v in state.items() if not is_lora_r(k)}
    for key, core in state.items():
        if is_lora_r(key):
            a_key = f"{layer_of(key)}.lora_A.weight"
            product = core.double() @ state[a_key].double()
            out[a_key] = product.to(state[a_key].dtype)
    return out


def lora_scale(lora: LoraConfig) -> float:
    """The LoRA scale s applied to B @ A: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return lora.alpha / (lora.rank**0.5 if lora.rslora else lora.rank)


def to_arrays(state: Mapping[str, torch.Tensor], codec: str = "none"):  # type: ignore[no-untyped-def]
    """Named tensors -> a Flower ArrayRecord (order preserved), each encoded by ``codec``
    (:mod:`fedlora.core.model.codecs`; ``none``: NumPy's float32 format)."""

    return ArrayRecord({k: encode_tensor(v, codec) for k, v in state.items()})


def from_arrays(record) -> State:  # type: ignore[no-untyped-def]
    """A Flower ArrayRecord -> named float tensors (copies, writable); encoded arrays restored to float32."""
    return {k: decode_array(arr) for k, arr in record.items()}


def payload_bytes(record) -> int:  # type: ignore[no-untyped-def]
    """Exact serialized bytes of the arrays in a Flower ArrayRecord (what travels on the wire)."""
    return sum(len(arr.data) for arr in record.values())


def kind_of(key: str) -> str:
    """'lora_A', 'lora_B', 'lora_R' or 'head' for an adapter state key."""
    if is_lora_r(key):
        return "lora_R"
    return "lora_A" if is_lora_a(key) else "lora_B" if is_lora_b(key) else "head"


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
