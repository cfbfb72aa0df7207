"""Pure aggregation helpers over named tensors (no Flower objects)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.core.model.arrays import State


def normalised_weights(num_examples: Sequence[float]) -> list[float]:
    """p_k = n_k / sum(n); raises ValueError on an empty list or a non-positive total."""
    total = float(sum(num_examples))
    if not num_examples or total <= 0:
        raise ValueError(f"cannot weight clients with example counts {list(num_examples)}")
    return [float(n) / total for n in num_examples]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """sum_k p_k * state_k for every key, with p_k = weights normalised to sum 1.

    Every state must have the same keys and shapes; sums are done in float64 and cast back.
    """
    if not states:
        raise ValueError("no client states to average")
    p = normalised_weights(weights)
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(f"client {i} sent keys {sorted(state)[:3]}... that differ from client 0's")
    result: State = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for pk, state in zip(p, states, strict=True):
            acc += pk * state[key].to(torch.float64)
        result[key] = acc.to(states[0][key].dtype)
    return result
