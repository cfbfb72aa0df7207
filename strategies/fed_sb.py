"""Fed-SB (Singhal, Ponkshe, Vartak, Varshney and Vepakomma, "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning", 2025, arXiv:2502.15436),
federated LoRA-SB: W = W0 + s·B·R·A with B and A fixed and only the r x r matrix R trained and sent.

Per adapted layer, with client k's R_k and weight p_k (sum 1), every client trains R over the same B and A,
so averaging R is exact: Σ p_k s·B R_k A = s·B (Σ p_k R_k) A. Clients reply with R and the head only
(``reply = 'trained'``, A and B frozen): the uplink is r² values per adapted matrix plus the head. Under
DP-SGD Opacus sees only R and the head as trainable (R is an ``nn.Linear`` between A and B,
:mod:`fedlora.core.model.cores`), so only r² values per layer are clipped and noised. The aggregate is the
weighted mean of what travels (B and A are copied), so dp-updates and secure aggregation apply.

Initialisation (LoRA-SB, Ponkshe et al. 2024: B, A and R from the truncated SVD of an approximation of the
full fine-tuning update). The papers compute that approximation centrally, from the gradient of the full
weights on a few hundred training examples (the authors' code: -lr·sign of the summed gradient, then
B = U_r, A = V_rᵀ, R = Σ_r); a server here holds no training data (only the held-out test set, which it
must not train on), so the approximation is computed by the clients, privately, in round 1:

* round 1 (the warm-up) is a full-width FFA-LoRA round: every sampled client trains B_w (d_out x r_w) over a
  frozen A_w (r_w x d_in, orthonormal rows from the experiment seed, never sent; r_w = ``warmup_rank``,
  by default the smallest input width of the adapted layers, so that B_w·A_w can represent any update of
  W: this is full fine-tuning of each adapted matrix in a rotated basis) for the round's local steps,
  and sends B_w and the head. Its aggregate ΔW = s_w·B̄_w·A_w (s_w the LoRA scale at rank r_w) is the
  federated full update of round 1, exact and linear in what travels, as FFA-LoRA's;
* the server takes the top-r SVD ΔW ≈ U_r S_r V_rᵀ (through the factors: QR of B̄_w and A_wᵀ, SVD of the
  r_w x r_w core) and sets B = U_r (orthonormal columns), A = V_rᵀ (orthonormal rows), R = S_r / s, so
  that s·B R A is the best rank-r approximation of round 1's update: the global model after round 1 is
  that truncation, and from round 2 on clients train R only.

Who computes what, and its cost: the clients of round 1 train r_w·d_out values per adapted layer (the
compute and optimizer memory of full fine-tuning of those layers, once) and send them (round 1's uplink is
full size: 12 x 384 x 384 values, 7.08 MB, per client on MiniLM with q and v adapted; the downlink carries
B_w = 0 of the same size, which dp-updates needs as the point the update is taken from); the server does
one thin QR and an r_w x r_w SVD per layer. Round 1 is an ordinary training round for the privacy
accounting: under DP-SGD its steps are noised and counted, under dp-updates its mean is clipped and
noised, so the initialisation spends privacy like any round and nothing leaks outside the accountant.
A smaller ``warmup_rank`` (>= lora.rank) makes round 1 cheaper, at the price of an input basis A drawn
from a random r_w-dimensional subspace. The frame exists once B is non-zero (peft starts B at zero);
every round from then on sends A, B, R and the head down (a client sampled for the first time needs the
frame: FedIT's downlink plus r² per layer). A saved adapter folds R into A (B, R·A): plain peft LoRA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model.arrays import (
    State,
    core_key,
    is_head,
    is_lora_b,
    is_lora_r,
    lora_scale,
    orthogonal_a,
)
from fedlora.core.protocol.plan import ClientPlan
from strategies.aggregation import weighted_average
from strategies.base import LoraStrategy
from strategies.lowrank import layer_groups
from strategies.registry import register


@dataclass
class FedSbOptions:
    """warmup_rank: the rank r_w of round 1's full-width update (0 = the smallest input width of the
    adapted layers, full fine-tuning of each; larger values are capped to it; otherwise >= lora.rank)."""

    warmup_rank: int = 0

    def __post_init__(self) -> None:
        if self.warmup_rank < 0:
            raise ConfigError(
                f"strategy.options.warmup_rank = {self.warmup_rank} is invalid: expected 0 (full width) "
                "or a rank"
            )


def frame_from_update(
    b_bar: Tensor, a_w: Tensor, *, scale_w: float, rank: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """LoRA-SB's (A, B, R) from the update ΔW = scale_w · b_bar · a_w of one layer.

    With ΔW ≈ U_r S_r V_rᵀ its top-``rank`` SVD: A = V_rᵀ (rank x d_in, orthonormal rows), B = U_r
    (d_out x rank, orthonormal columns), R = S_r / scale, so scale · B R A is the best rank-``rank``
    approximation of ΔW. Computed in float64 through the factors (QR of b_bar and a_wᵀ, SVD of the small
    core) and returned in the inputs' dtype.
    """
    if b_bar.dim() != 2 or a_w.dim() != 2 or b_bar.shape[1] != a_w.shape[0]:
        raise ValueError(f"B {tuple(b_bar.shape)} and A {tuple(a_w.shape)} are not a LoRA pair")
    q_b, r_b = torch.linalg.qr(b_bar.double())
    q_a, r_a = torch.linalg.qr(a_w.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    if rank > s.numel():
        raise ValueError(f"rank {rank} exceeds the {s.numel()} singular values of the {tuple(b_bar.shape)} B")
    dtype = torch.promote_types(b_bar.dtype, a_w.dtype)
    a = (q_a @ vh[:rank].T).T
    b = q_b @ u[:, :rank]
    r = torch.diag(s[:rank] * (scale_w / scale))
    return a.to(dtype), b.to(dtype), r.to(dtype)


def kept_energy(b_bar: Tensor, a_w: Tensor, rank: int) -> float:
    """Share of ‖b_bar a_w‖_F² in its top-``rank`` singular values (1 for a zero update)."""
    s = torch.linalg.svdvals(b_bar.double() @ a_w.double())
    total = float(s.pow(2).sum())
    return float(s[:rank].pow(2).sum()) / total if total > 0 else 1.0


@register("fed-sb")
class FedSb(LoraStrategy):
    """Train and average only R between fixed B and A (from round 1's full-width update)."""

    description = (
        "round 1's full-width update: its top-r SVD fixes B, A; then train, send only R (r x r), head"
    )
    Options = FedSbOptions
    linear_aggregate = True  # warm-up: a function of the mean B_w; then the mean of R (B, A copied)

    def __init__(self, cfg: ExperimentConfig, global_state: State) -> None:
        state = dict(global_state)
        for layer, (key_a, _) in layer_groups(global_state).items():
            rank = global_state[key_a].shape[0]
            state.setdefault(core_key(layer), torch.zeros(rank, rank, dtype=global_state[key_a].dtype))
        super().__init__(cfg, state)
        widths = [state[key_a].shape[1] for key_a, _ in layer_groups(state).values()]
        chosen = self.options.warmup_rank
        self.warmup_rank = min(widths) if chosen == 0 else min(chosen, min(widths))
        self._diagnostics: dict[str, float] = {}

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        chosen = int(cfg.strategy.options.get("warmup_rank", 0))
        if 0 < chosen < cfg.lora.rank:
            raise ConfigError(
                f"strategy.options.warmup_rank = {chosen} is below lora.rank = {cfg.lora.rank}: the warm-up "
                "update must have at least r singular directions to fix B and A (0 = full width)"
            )

    @staticmethod
    def framed(state: State) -> bool:
        """True once B and A are fixed (B is non-zero; peft starts it at zero)."""
        return any(bool(v.any()) for k, v in state.items() if is_lora_b(k))

    def warmup_a(self, state: State) -> State:
        """A_w of every layer, exactly as each client derives it (``a_init = 'orthogonal'`` at rank r_w)."""
        shapes = {
            key_a: torch.zeros(self.warmup_rank, state[key_a].shape[1], dtype=state[key_a].dtype)
            for key_a, _ in layer_groups(state).values()
        }
        return orthogonal_a(shapes, seed=self.cfg.seed)  # the A keys in the clients' order: the same draws

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        if self.framed(self.global_state):
            frozen = frozenset({"lora_A", "lora_B"})
            return ClientPlan(rank=self.cfg.lora.rank, freeze=frozen, reply="trained", core=True)
        frozen = frozenset({"lora_A"})
        return ClientPlan(rank=self.warmup_rank, freeze=frozen, reply="trained", a_init="orthogonal")

    def outgoing(self, global_state: State) -> State:
        """The frame and R (A, B, R, head) once fixed; in the warm-up B_w = 0 at rank r_w and the head."""
        if self.framed(global_state):
            return dict(global_state)
        heads = {k: v for k, v in global_state.items() if is_head(k)}
        zeros = {}
        for _, key_b in layer_groups(global_state).values():
            b = global_state[key_b]
            zeros[key_b] = torch.zeros(b.shape[0], self.warmup_rank, dtype=b.dtype)
        return {**zeros, **heads}

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        """The head averaged; R averaged over the fixed frame, or, in the warm-up, the frame and R from the
        top-r SVD of s_w·B̄_w·A_w. Any A or B in ``updates`` after the warm-up is ignored."""
        mean = weighted_average(updates, weights)
        groups = layer_groups(global_state)
        if self.framed(global_state):
            self._diagnostics = {"sb_warmup": 0.0, "sb_kept_energy": math.nan}
            frame = {k: global_state[k] for pair in groups.values() for k in pair}
            return {**frame, **{k: v for k, v in mean.items() if is_head(k) or is_lora_r(k)}}
        result = {k: v for k, v in mean.items() if is_head(k)}
        lora, a_w = self.cfg.lora, self.warmup_a(global_state)
        scale_w = lora_scale(dataclasses.replace(lora, rank=self.warmup_rank))
        energy = []
        for layer, (key_a, key_b) in groups.items():
            a, b, r = frame_from_update(
                mean[key_b], a_w[key_a], scale_w=scale_w, rank=lora.rank, scale=lora_scale(lora)
            )
            result[key_a], result[key_b], result[core_key(layer)] = a, b, r
            energy.append(kept_energy(mean[key_b], a_w[key_a], lora.rank))
        self._diagnostics = {"sb_warmup": 1.0, "sb_kept_energy": sum(energy) / len(energy)}
        return result

    def diagnostics(self) -> dict[str, float]:
        """``sb_warmup``: 1 in the round that fixed the frame; ``sb_kept_energy``: there, the mean share of
        the warm-up update's squared norm that the rank-r frame keeps (nan in later rounds)."""
        return dict(self._diagnostics)
