"""FedEx-LoRA (Singhal et al., 2025): FedIT plus the exact residual folded into the frozen base weights.

Each round the server averages A, B and the head like FedIT, and adds, per adapted layer,
s * (sum_k p_k B_k A_k - B_bar A_bar) to an offset on the frozen base weight W0, with the same p_k on
both terms and the LoRA scale s. Every client then computes with W0 + offset + s B_bar A_bar, which equals
W0 + offset_before + s sum_k p_k B_k A_k: the aggregate is exact. The offsets (one full-rank d_out x d_in
matrix per adapted layer) travel downlink with every message and are counted in ``downlink_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.core.model.arrays import State, lora_scale
from strategies.aggregation import weighted_average
from strategies.base import LoraStrategy
from strategies.lowrank import add_to_offsets, fedex_residual
from strategies.registry import register


def fedex_offsets(offsets: State, updates: Sequence[State], weights: Sequence[float], scale: float) -> State:
    """The base-weight offsets after one round: ``offsets`` plus each layer's FedEx residual."""
    return add_to_offsets(offsets, updates, lambda a, b: fedex_residual(a, b, weights, scale))


@register("fedex-lora")
class FedExLora(LoraStrategy):
    """FedIT with the averaging error folded into every client's frozen weights."""

    description = "FedIT + residual s·(mean(B·A) − mean(B)·mean(A)) folded into frozen weights (exact)"
    nonlinear_reason = (
        "its residual needs the sum of the clients' products B_k A_k (d_out x d_in per adapted layer), "
        "which clients do not send"
    )

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        self.base_offsets = fedex_offsets(self.base_offsets, updates, weights, lora_scale(self.cfg.lora))
        return weighted_average(updates, weights)
