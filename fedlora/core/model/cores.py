"""A trainable r x r core R between each LoRA layer's A and B: W = W0 + s * B @ R @ A (Fed-SB, LoRA-SB).

peft has no such matrix, so it is added to the LoRA layers peft built, without forking peft:

* R is an ``nn.Linear(r, r)`` registered on the LoRA layer as ``lora_R[adapter]``; peft's state dict
  takes every tensor of a tuner layer except the base layer, so R appears in :func:`adapter_state` as
  ``<layer>.lora_R.weight`` and loads with ``load_adapter_state`` like A and B;
* the layer's ``lora_A[adapter]`` becomes a :class:`CoredDown` that owns A's very Parameter (A's key is
  unchanged) and calls R after A, so peft's forward ``B(A(dropout(x))) * s`` computes ``B(R(A x)) * s``.

Opacus sees R as a plain ``nn.Linear`` (supported in hooks and ghost modes) and A's wrapper as a module
without trainable parameters (skipped). A saved adapter folds R into A instead
(:func:`fedlora.core.model.arrays.fold_cores`), so ``PeftModel.from_pretrained`` loads it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class CoredDown(nn.Module):
    """A LoRA down-projection followed by the layer's core: x -> R (A x). Holds A's Parameter as its own
    ``weight`` (same key as peft's ``lora_A``) and a reference to R, which the LoRA layer registers."""

    def __init__(self, down: nn.Linear, core: nn.Linear) -> None:
        super().__init__()
        if down.bias is not None:
            raise ValueError("a LoRA core needs a down-projection without bias")
        self.weight: nn.Parameter = down.weight
        self.in_features: int = down.in_features
        self.out_features: int = down.out_features
        object.__setattr__(self, "core", core)  # not a child: its key is lora_R, not lora_A.core

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """R (A x)."""
        core: nn.Linear = self.__dict__["core"]
        return core(functional.linear(x, self.weight))


def _holder(layer: nn.Module, name: str) -> nn.ModuleDict | None:
    """The layer's ModuleDict ``name`` (peft's ``lora_A``, ``lora_B``, our ``lora_R``), if it has one."""
    holder = getattr(layer, name, None)
    return holder if isinstance(holder, nn.ModuleDict) else None


def _lora_layers(model: nn.Module) -> list[tuple[nn.Module, nn.ModuleDict]]:
    """peft's LoRA layers of ``model`` with their ``lora_A`` ModuleDict."""
    found = [(m, _holder(m, "lora_A")) for m in model.modules()]
    return [(m, downs) for m, downs in found if downs is not None]


def has_cores(model: nn.Module) -> bool:
    """True when the model's LoRA layers carry a core R."""
    return any(isinstance(d, CoredDown) for _, downs in _lora_layers(model) for d in downs.values())


def _add_core(layer: nn.Module, downs: nn.ModuleDict, name: str, down: nn.Linear) -> None:
    """Register an identity core R on ``layer`` and put A's cored wrapper in its place."""
    core = nn.Linear(down.out_features, down.out_features, bias=False)
    core.to(device=down.weight.device, dtype=down.weight.dtype)
    with torch.no_grad():
        core.weight.copy_(torch.eye(down.out_features))
    cores = _holder(layer, "lora_R")
    if cores is None:
        cores = nn.ModuleDict()
        layer.add_module("lora_R", cores)
    cores[name] = core
    downs[name] = CoredDown(down, core)


def _remove_core(layer: nn.Module, downs: nn.ModuleDict, name: str, down: CoredDown) -> None:
    """Put A back as a plain ``nn.Linear`` over the same Parameter and drop the layer's core."""
    plain = nn.Linear(down.in_features, down.out_features, bias=False, device="meta")
    plain.weight = down.weight
    downs[name] = plain
    cores = _holder(layer, "lora_R")
    if cores is not None:
        del cores[name]
        if not len(cores):
            delattr(layer, "lora_R")


def set_cores(model: nn.Module, enabled: bool) -> None:
    """Give every LoRA layer a core R (``enabled``; R starts as the identity, so the product is unchanged)
    or take them away (A is put back as a plain ``nn.Linear`` with the same Parameter). Idempotent: a
    process's model is shared by messages whose plans differ, so each message sets what it needs."""
    for layer, downs in _lora_layers(model):
        for name, down in list(downs.items()):
            if enabled and isinstance(down, nn.Linear):
                _add_core(layer, downs, name, down)
            elif not enabled and isinstance(down, CoredDown):
                _remove_core(layer, downs, name, down)
