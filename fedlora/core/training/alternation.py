"""Local alternation of the LoRA factors within a round (LA-LoRA): some steps train B with A frozen, the
others A with B frozen.

The client puts the plan's ``alternate_every`` on its model (:func:`set_alternation`); both local loops
(:func:`fedlora.core.training.loops.train_local` and DP-SGD's ``train_private``) wrap their steps in
:class:`Alternation` and call :meth:`Alternation.before_step` before each one. With k =
``alternate_every``, step i (from 0) trains B when ``(i // k) % 2 == 0`` and A otherwise; the head and
anything else trainable train at every step.

A frozen factor has ``requires_grad`` off (the optimizer skips it, and Opacus's DP optimizer, which
lists only parameters that require a gradient, neither clips nor noises it) and, for that step, its
module is swapped for an unhooked twin that shares the Parameter: Opacus's hooks, attached to the
original module when the trainer was made, would otherwise be called on a module whose forward they
skipped and fail ("No activations detected"). Opacus's ghost mode keeps a fixed list of trainable
parameters and cannot follow the alternation; the strategy refuses that combination at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import torch
from torch import nn
from torch.nn import functional

_EVERY = "_fedlora_alternate_every"
FACTORS = ("lora_B", "lora_A")
"""The factor trained in even and odd blocks of steps: B first (peft starts B at zero, where A has no
gradient)."""


def set_alternation(model: nn.Module, every: int) -> None:
    """Make this model's next local rounds alternate factors every ``every`` steps (0: no alternation)."""
    if every < 0:
        raise ValueError(f"alternate_every must be >= 0, got {every}")
    model.__dict__[_EVERY] = every


def alternation_of(model: nn.Module) -> int:
    """The model's ``alternate_every`` (0 when never set)."""
    return int(model.__dict__.get(_EVERY, 0))


def factor_of_step(step: int, every: int) -> str:
    """'lora_B' or 'lora_A': the factor local step ``step`` (from 0) trains, alternating every ``every``."""
    return FACTORS[(step // every) % 2]


class _Unhooked(nn.Module):
    """A linear map over a shared Parameter, called instead of a frozen factor's hooked module."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight)


@dataclass
class _Slot:
    """One factor of one LoRA layer: where it sits, its module and its unhooked twin."""

    holder: nn.ModuleDict
    name: str
    kind: str
    module: nn.Linear
    twin: _Unhooked


class Alternation:
    """One round's alternation over a model's trainable LoRA factors (a no-op when the model's
    ``alternate_every`` is 0). On exit every factor is back in place and trainable as before."""

    def __init__(self, model: nn.Module) -> None:
        self.every = alternation_of(model)
        self.slots: list[_Slot] = []
        if not self.every:
            return
        for layer in model.modules():
            for kind in FACTORS:
                holder = getattr(layer, kind, None)
                if not isinstance(holder, nn.ModuleDict):
                    continue
                for name, module in holder.items():
                    if type(module) is not nn.Linear or module.bias is not None:
                        raise ValueError(f"local alternation needs plain LoRA factors, found {type(module)}")
                    if module.weight.requires_grad:
                        self.slots.append(_Slot(holder, name, kind, module, _Unhooked(module.weight)))
        if {s.kind for s in self.slots} != set(FACTORS):
            raise ValueError("local alternation needs both LoRA factors trainable (the plan froze one)")

    def __enter__(self) -> Alternation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for slot in self.slots:
            slot.holder[slot.name] = slot.module
            slot.module.weight.requires_grad_(True)

    def factor(self, step: int) -> str | None:
        """The factor step ``step`` trains, or None when not alternating (both train)."""
        return factor_of_step(step, self.every) if self.every else None

    def before_step(self, step: int) -> None:
        """Freeze the factor that step ``step`` does not train and unfreeze the one it does."""
        trained = self.factor(step)
        for slot in self.slots:
            train = slot.kind == trained
            slot.module.weight.requires_grad_(train)
            slot.module.weight.grad = None
            slot.holder[slot.name] = slot.module if train else slot.twin
