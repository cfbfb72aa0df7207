"""Offsets to the frozen base weights sent as stacked low-rank factors (FLoRA's downlink protocol).

FLoRA folds sum_k p_k s_k B_k A_k into the frozen weights every round. Its paper's server does not send
that full-rank matrix: it sends the round's stacked factors (A_stack: the clients' A_k by rows,
B_stack: their p_k s_k B_k by columns, rank sum_k r_k) and every client merges B_stack @ A_stack into its
own copy of the base weights. Offsets therefore have a *version*: the number of merges folded into them.
A client keeps its offsets and their version in its state store; the server sends it the stacks of the
versions it has not seen, or the full offsets when those would be fewer bytes (a client sampled for the
first time after many rounds). Server and client merge with :func:`merge_stack`, the same float64
product of the same tensors, so both hold the same offsets.

Keys of a stack record: ``v<version>|<offset key>|A`` and ``...|B`` (the offset key is
``<layer>.base_layer.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlora.core.model.arrays import State

VERSION_KEY = "__offsets_version__"
"""Key of a 0-d int64 tensor holding the version in the offsets a client stores (one atomic file)."""


def stack_key(version: int, offset_key: str, factor: str) -> str:
    """The record key of one factor ('A' or 'B') of one layer's stack at ``version``."""
    return f"v{version}|{offset_key}|{factor}"


def _parse(key: str) -> tuple[int, str, str]:
    version, offset_key, factor = key.split("|")
    if not version.startswith("v") or factor not in ("A", "B"):
        raise ValueError(f"malformed stacked-factor key {key!r}")
    return int(version[1:]), offset_key, factor


def merge_stack(a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    """B_stack @ A_stack (d_out x d_in), taken in float64 and returned in A_stack's dtype."""
    return (b_stack.to(torch.float64) @ a_stack.to(torch.float64)).to(a_stack.dtype)


def apply_stacks(
    offsets: Mapping[str, torch.Tensor], stacks: Mapping[str, torch.Tensor], *, after: int
) -> State:
    """``offsets`` plus B_stack @ A_stack of every version above ``after`` in ``stacks``, in version order.

    Raises ValueError when a layer's stack lacks its A or B.
    """
    result = dict(offsets)
    layers: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in stacks.items():
        version, offset_key, factor = _parse(key)
        if version > after:
            layers.setdefault(version, {}).setdefault(offset_key, {})[factor] = value
    for version in sorted(layers):
        for offset_key, pair in layers[version].items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"stacked factors of {offset_key!r} at version {version} lack A or B")
            delta = merge_stack(pair["A"], pair["B"])
            result[offset_key] = result[offset_key] + delta if offset_key in result else delta
    return result


def pack(offsets: Mapping[str, torch.Tensor], version: int) -> State:
    """Offsets plus their version, as one state to save."""
    return {**offsets, VERSION_KEY: torch.tensor(version, dtype=torch.int64)}


def unpack(saved: Mapping[str, torch.Tensor] | None) -> tuple[State, int]:
    """The inverse of :func:`pack`; ``({}, 0)`` when nothing was saved."""
    if not saved:
        return {}, 0
    offsets = {k: v for k, v in saved.items() if k != VERSION_KEY}
    return offsets, int(saved[VERSION_KEY]) if VERSION_KEY in saved else 0
