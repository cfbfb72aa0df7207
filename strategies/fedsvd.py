"""FedSVD (Lee et al., NeurIPS 2025): train and send only B; the server re-factorises B̄·A by SVD.

Per adapted layer, with A_prev (r x d_in) the global A that every client used, frozen, this round and
client k's trained B_k (d_out x r) with weight p_k (sum 1), the server computes

    B̄ = Σ p_k B_k,                     (exact, as FFA-LoRA: Σ p_k B_k A_prev = B̄ A_prev)
    U Σ Vᵀ = B̄ · A_prev                 (thin SVD of the d_out x d_in product)
    A_new = V_rᵀ   (r x d_in, orthonormal rows),   B_new = U_r Σ_r   (d_out x r)

and every client starts the next round from (A_new, B_new), A frozen again. The product is unchanged,
B_new A_new = B̄ A_prev exactly, because rank(B̄ A_prev) <= r: the refactorisation moves no weight, it
only turns A into the orthonormal basis of the aggregate's principal input directions (so A adapts,
unlike FFA-LoRA's random A, and ‖A‖_2 = 1 bounds the gradient of B, and with it the DP-SGD noise's
effect on the product, which is linear in B). The LoRA scale s multiplies both sides and plays no part.
Round 1 starts from peft's A (Kaiming-uniform from the experiment seed) and B = 0, as the official code.

The head is trained, sent and averaged like B (as FFA-LoRA here; the official code freezes RoBERTa's
classifier for every method). A travels down in every message (its bytes are in ``downlink_bytes``)
but never up: clients reply with what they trained (``reply = 'trained'``), so update-level DP clips
and noises only B and the head. The aggregate is a function of the weighted mean alone, so dp-updates
(the SVD is post-processing of the noised mean) and secure aggregation of B both apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.core.config import ConfigError
from fedlora.core.model.arrays import State, is_lora_a
from fedlora.core.protocol.plan import ClientPlan
from strategies.aggregation import weighted_average
from strategies.base import LoraStrategy
from strategies.lowrank import layer_groups
from strategies.registry import register


@dataclass
class FedSvdOptions:
    """period: refactorise after every ``period``-th round (rounds, default 1: after every round, as the
    paper's experiments and the official code's default); between refactorisations FedSVD is FFA-LoRA
    over the latest A."""

    period: int = 1

    def __post_init__(self) -> None:
        if self.period < 1:
            raise ConfigError(f"strategy.options.period = {self.period} is invalid: expected an integer >= 1")


def refactorise(b_bar: Tensor, a_prev: Tensor) -> tuple[Tensor, Tensor]:
    """FedSVD's SVD step for one layer: (A_new, B_new) with B_new @ A_new = b_bar @ a_prev.

    ``b_bar`` is d_out x r, ``a_prev`` r x d_in with r <= min(d_out, d_in). A_new = V_rᵀ (r x d_in,
    orthonormal rows), B_new = U_r diag(Σ_r) (d_out x r), from the thin SVD of the product, taken in
    float64 through the factors: with QR decompositions b_bar = Q_b R_b and a_prevᵀ = Q_a R_a, the product
    is Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the r x r core U_m Σ V_mᵀ gives U_r = Q_b U_m and V_r = Q_a V_m
    (O(d r²) instead of the O(d³) of the full product's SVD). Both are returned in the inputs'
    promoted dtype. Singular values are in decreasing order; a product of rank below r still yields r
    orthonormal rows (the extra ones paired with zero columns).
    """
    if b_bar.dim() != 2 or a_prev.dim() != 2 or b_bar.shape[1] != a_prev.shape[0]:
        raise ValueError(f"B {tuple(b_bar.shape)} and A {tuple(a_prev.shape)} are not a LoRA pair")
    rank = a_prev.shape[0]
    if rank > min(b_bar.shape[0], a_prev.shape[1]):
        raise ValueError(f"rank {rank} exceeds the layer's {b_bar.shape[0]} x {a_prev.shape[1]} product")
    q_b, r_b = torch.linalg.qr(b_bar.double())
    q_a, r_a = torch.linalg.qr(a_prev.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    dtype = torch.promote_types(b_bar.dtype, a_prev.dtype)
    return (q_a @ vh.T).T.to(dtype), ((q_b @ u) * s).to(dtype)


@register("fedsvd")
class FedSvd(LoraStrategy):
    """FFA-LoRA's exact average of B, then B̄·A re-factorised by SVD into an orthonormal A and B."""

    description = "mean B over frozen A, SVD of B̄·A into orthonormal A + B; up: B+head, down: A, B, head"
    Options = FedSvdOptions
    linear_aggregate = True  # a function of sum_k p_k x_k alone: the SVD post-processes the (noised) mean

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        return ClientPlan(rank=self.cfg.lora.rank, freeze=frozenset({"lora_A"}), reply="trained")

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        """B̄ and the head averaged; every layer's (A, B) re-factorised from (A_prev, B̄) on a period round.
        Any A in ``updates`` is ignored: A_prev is the global one the clients were sent."""
        mean = weighted_average(updates, weights)
        result = {k: v for k, v in mean.items() if not is_lora_a(k)}
        refactor = self.server_round % self.options.period == 0
        for key_a, key_b in layer_groups(global_state).values():
            a_prev = global_state[key_a]
            if refactor:
                result[key_a], result[key_b] = refactorise(result[key_b], a_prev)
            else:
                result[key_a] = a_prev
        return result
