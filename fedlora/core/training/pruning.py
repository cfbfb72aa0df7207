"""Rank self-pruning (HetLoRA, Cho et al. 2024): a penalty on the tail ranks of every LoRA adapter.

For a tail starting at rank g, each adapted layer adds lambda * ||B[:, g:]||_F * ||A[g:, :]||_F to the
local loss. The penalty is applied through gradient hooks on the LoRA factors, so the training loop and
its reported loss are unchanged: d/dA_t = lambda ||B_t|| A_t / ||A_t||, d/dB_t = lambda ||A_t|| B_t / ||B_t||
(0 where a norm is 0, the subgradient at the kink).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedlora.core.protocol.keys import TAIL_NORM_AFTER, TAIL_NORM_BEFORE

ADAPTER = "default"


def lora_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(A, B) weight of every peft LoRA layer of ``model``, in module order."""
    pairs = []
    for module in model.modules():
        a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict) and ADAPTER in a:
            weight_a, weight_b = a[ADAPTER].weight, b[ADAPTER].weight
            if isinstance(weight_a, nn.Parameter) and isinstance(weight_b, nn.Parameter):
                pairs.append((weight_a, weight_b))
    return pairs


def tail_norm(model: nn.Module, start: int) -> float:
    """sum over layers of ||B[:, start:]||_F * ||A[start:, :]||_F."""
    with torch.no_grad():
        return math.fsum(
            float(b[:, start:].double().norm() * a[start:].double().norm()) for a, b in lora_pairs(model)
        )


def _scaled(x: torch.Tensor, other_norm: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * ||other|| * x / ||x|| (0 when ||x|| is 0)."""
    norm = x.norm()
    return torch.zeros_like(x) if float(norm) == 0 else weight * other_norm * x / norm


@contextmanager
def tail_penalty(model: nn.Module, start: int, weight: float) -> Iterator[None]:
    """While active, every backward pass adds the gradient of the tail penalty to the LoRA factors."""
    handles = []
    for a, b in lora_pairs(model):

        def grad_a(g: torch.Tensor, a: nn.Parameter = a, b: nn.Parameter = b) -> torch.Tensor:
            extra = torch.zeros_like(g)
            extra[start:] = _scaled(a.detach()[start:], b.detach()[:, start:].norm(), weight)
            return g + extra

        def grad_b(g: torch.Tensor, a: nn.Parameter = a, b: nn.Parameter = b) -> torch.Tensor:
            extra = torch.zeros_like(g)
            extra[:, start:] = _scaled(b.detach()[:, start:], a.detach()[start:].norm(), weight)
            return g + extra

        handles += [p.register_hook(f) for p, f in ((a, grad_a), (b, grad_b)) if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def rank_pruning(model: nn.Module, start: int, weight: float) -> Iterator[dict[str, float]]:
    """Train inside this block for rank self-pruning: with ``weight`` > 0 the tail penalty is active and
    the yielded dict is filled on exit with the tail's norm before and after (the reply's metrics);
    with ``weight`` 0 nothing happens and the dict stays empty."""
    found: dict[str, float] = {}
    if not weight:
        yield found
        return
    before = tail_norm(model, start)
    with tail_penalty(model, start, weight):
        yield found
    found.update({TAIL_NORM_BEFORE: before, TAIL_NORM_AFTER: tail_norm(model, start)})
