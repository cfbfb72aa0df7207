"""Alternating freezing (RoLoRA, Chen et al., NeurIPS 2025; also LoRA-A2's alternating freeze): each round
trains and sends only one LoRA factor.

In a 'B' round every client trains B (and the head) over the global A, frozen; in an 'A' round it
trains A (and the head) over the global B, frozen. The server averages the factor that moved and keeps
the other, so the aggregate is exact in both phases:

    'B' round:  B̄ = Σ p_k B_k,  Σ p_k B_k A = B̄ A;      'A' round:  Ā = Σ p_k A_k,  Σ p_k B A_k = B Ā.

Clients reply with what they trained (``reply = 'trained'``): the uplink carries one factor, FFA-LoRA's
volume. Both factors travel down every round, because a client sampled now may have missed the round
in which the other factor last moved (clients keep no state); the downlink is FedIT's.

``schedule`` cycles phases over rounds: round t (from 1) is phase ``schedule[(t - 1) % len(schedule)]``.
The default 'BA' alternates every round and starts with B: peft starts B at zero, and the gradient of
A is s·Bᵀ·(∂L/∂y)·xᵀ = 0 while B = 0, so an 'A' round first would move nothing but the head (and, under
DP-SGD, add pure noise to A). A schedule must therefore start with 'B' and contain both letters.
The aggregate is the weighted mean of what moved (the frozen factor is copied), so dp-updates and
secure aggregation apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedlora.core.config import ConfigError
from fedlora.core.model.arrays import State, kind_of
from fedlora.core.protocol.plan import ClientPlan
from strategies.aggregation import weighted_average
from strategies.base import LoraStrategy
from strategies.registry import register

_FROZEN = {"B": "lora_A", "A": "lora_B"}
"""The kind frozen in each phase (the phase names the factor that is trained)."""


@dataclass
class AlternatingOptions:
    """schedule: the phases of consecutive rounds, cycled ('B': train and send B with A frozen; 'A': the
    reverse). Default 'BA': alternate every round, B first; 'BBAA' alternates every two rounds. It must
    start with 'B' (B starts at zero, where A has no gradient) and contain both letters."""

    schedule: str = "BA"

    def __post_init__(self) -> None:
        s = self.schedule
        if not s or set(s) != {"A", "B"} or s[0] != "B":
            raise ConfigError(
                f"strategy.options.schedule = {s!r} is invalid: expected letters A and B (both), starting "
                "with B, e.g. 'BA' (B starts at zero, so A has no gradient in a first A round)"
            )


@register("rolora")
class RoLora(LoraStrategy):
    """Rounds alternate between training and sending only B and only A; the moved factor is averaged."""

    description = "rounds alternate training B or A, exact mean; up: trained factor+head, down: A, B, head"
    Options = AlternatingOptions
    linear_aggregate = True  # the weighted mean of what moved; the frozen factor is copied

    def phase(self, server_round: int) -> str:
        """'B' or 'A': the factor trained in ``server_round`` (from 1)."""
        schedule = self.options.schedule
        return schedule[(server_round - 1) % len(schedule)]

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        frozen = frozenset({_FROZEN[self.phase(server_round)]})
        return ClientPlan(rank=self.cfg.lora.rank, freeze=frozen, reply="trained")

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        """The weighted mean of the trained factor and the head; the frozen factor as it was sent (any
        copy of it in ``updates`` is ignored)."""
        frozen = _FROZEN[self.phase(self.server_round)]
        mean = weighted_average(updates, weights)
        moved = {k: v for k, v in mean.items() if kind_of(k) != frozen}
        return {**{k: v for k, v in global_state.items() if kind_of(k) == frozen}, **moved}

    def diagnostics(self) -> dict[str, float]:
        """``trained_b``: 1 when this round trained B, 0 when it trained A."""
        return {"trained_b": float(self.phase(self.server_round) == "B")}
