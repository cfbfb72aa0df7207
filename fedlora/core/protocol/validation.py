"""Checks on a client's reply before it is aggregated: keys, shapes, dtypes, finite values, norm.

Pure functions over named tensors; the strategy logs the reason and leaves the reply out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedlora.core.model.arrays import global_norm

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""Expected reply: key -> (shape, dtype)."""


def spec_of(state: Mapping[str, torch.Tensor]) -> Spec:
    """The keys, shapes and dtypes of ``state``."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def update_norm(reply: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the update: the reply minus what was sent, key by key (the reply itself for keys
    that were not sent, e.g. FLoRA's freshly initialised adapters)."""
    return global_norm({k: v - sent[k] if k in sent else v for k, v in reply.items()})


def check_reply(
    reply: Mapping[str, torch.Tensor],
    expected: Spec,
    sent: Mapping[str, torch.Tensor],
    max_norm: float = 0.0,
) -> str | None:
    """Why ``reply`` must not be aggregated, or None when it is fine.

    ``expected``: the keys, shapes and dtypes the client had to send; ``sent``: what the server sent it;
    ``max_norm``: bound on :func:`update_norm` (0 = no bound).
    """
    missing, extra = sorted(set(expected) - set(reply)), sorted(set(reply) - set(expected))
    if missing:
        return f"missing array '{missing[0]}'" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if extra:
        return f"unexpected array '{extra[0]}'" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
    for key in sorted(expected):
        shape, dtype = expected[key]
        value = reply[key]
        if tuple(value.shape) != shape:
            return f"array '{key}' has shape {tuple(value.shape)}, expected {shape}"
        if value.dtype != dtype:
            return f"array '{key}' has dtype {value.dtype}, expected {dtype}"
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            return f"array '{key}' has {bad} NaN or infinite values"
    if max_norm > 0:
        norm = update_norm(reply, sent)
        if not math.isfinite(norm) or norm > max_norm:
            return f"update norm {norm:.4g} exceeds robustness.max_update_norm = {max_norm:g}"
    return None


def check_metrics(metrics: Mapping[str, object], num_examples_key: str) -> str | None:
    """Why a reply's metrics make it unusable (number of examples missing, not finite or <= 0), or None."""
    value = metrics.get(num_examples_key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"metric '{num_examples_key}' is missing"
    if not math.isfinite(value) or value <= 0:
        return f"metric '{num_examples_key}' = {value!r}, expected a number > 0"
    return None
