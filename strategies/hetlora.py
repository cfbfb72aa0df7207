"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024): clients of different capacity train LoRA adapters of different ranks r_k <= r_max.

The server keeps a rank-r_max adapter (r_max = lora.rank). Client k receives its first r_k rows of
every A and first r_k columns of every B (truncation), trains them, and sends them back; the server
zero-pads each A_k with rows and each B_k with columns up to r_max and averages:

    A_bar = sum_k p_k pad(A_k),   B_bar = sum_k p_k pad(B_k)

with p_k the clients' example shares, or, with ``weighting = 'norm'``, the paper's sparsity-weighted
aggregation: per layer, p_k proportional to ||s_k B_k A_k||_F. Every rank keeps one alpha convention:
truncation multiplies both factors by c_k = sqrt(s_max / s_k) and padding divides by it, so client k's
product at its own scale s_k equals the server's at s_max (:func:`strategies.lowrank.rank_factor`).

Ranks come from the clients' device classes (``devices.classes[].rank``), else ``ranks`` cycled over
partition ids, else lora.rank. Rank self-pruning (``prune_weight`` > 0): each client adds
lambda * ||B[:, g:r_k]||_F * ||A[g:r_k, :]||_F, g = floor(gamma r_k), to its local loss (summed over
layers); when that tail's norm shrank during the round, the client's rank becomes g from the next round
on (never below ``min_rank``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model.arrays import State, is_head, lora_scale
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.plan import ClientPlan
from fedlora.server import replies as reply_of
from strategies.aggregation import normalised_weights, weighted_average
from strategies.base import LoraStrategy
from strategies.lowrank import layer_groups, pad_factors, rank_factor, truncate_state
from strategies.registry import register

WEIGHTINGS = ("examples", "norm")


@dataclass
class HetLoraOptions:
    """ranks: per-client ranks cycled over partition ids when device classes set none (empty = lora.rank).
    weighting: 'examples' (p_k = n_k / n) or 'norm' (the paper's sparsity weighting, ||s_k B_k A_k||_F).
    prune_weight: lambda of the rank self-pruning regulariser (0 = off); prune_gamma: the share of the
    rank kept when a client prunes; min_rank: the smallest rank pruning leaves."""

    ranks: list[int] = field(default_factory=list)
    weighting: str = "examples"
    prune_weight: float = 0.0
    prune_gamma: float = 0.9
    min_rank: int = 1

    def __post_init__(self) -> None:
        if any(r < 1 for r in self.ranks):
            raise ConfigError(f"strategy.options.ranks = {self.ranks!r} is invalid: expected integers >= 1")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(
                f"strategy.options.weighting = {self.weighting!r} is invalid: expected one of "
                f"{', '.join(WEIGHTINGS)}"
            )
        if self.prune_weight < 0 or not 0 < self.prune_gamma < 1 or self.min_rank < 1:
            raise ConfigError(
                f"strategy.options: prune_weight = {self.prune_weight:g}, prune_gamma = "
                f"{self.prune_gamma:g}, min_rank = {self.min_rank} are invalid: expected >= 0, (0, 1), >= 1"
            )


def hetlora_aggregate(
    updates: Sequence[State], weights: Sequence[float], factors: Sequence[float], rank: int, norm: bool
) -> State:
    """Zero-pad every client's A_k and B_k (divided by its factor c_k) to ``rank`` and average them with
    ``weights`` (p_k), or per layer with p_k * ||B_k A_k||_F / c_k^2 renormalised when ``norm``; the
    head by ``weights``."""
    result: State = {}
    for _, (key_a, key_b) in layer_groups(updates[0]).items():
        padded = [pad_factors(u[key_a], u[key_b], rank, c) for u, c in zip(updates, factors, strict=True)]
        p = list(weights)
        if norm:
            sizes = [float(b.double().matmul(a.double()).norm()) for a, b in padded]
            p = normalised_weights([pk * n for pk, n in zip(p, sizes, strict=True)]) if sum(sizes) else p
        result.update(weighted_average([{key_a: a, key_b: b} for a, b in padded], p))
    heads = [{k: v for k, v in u.items() if is_head(k)} for u in updates]
    return {**result, **(weighted_average(heads, weights) if heads[0] else {})}


@register("hetlora")
class HetLora(LoraStrategy):
    """Heterogeneous ranks: truncate the global adapter to each client's rank, zero-pad and average."""

    description = "per-client ranks: truncate to r_k, zero-pad to r_max and average (+ rank self-pruning)"
    Options = HetLoraOptions

    def __init__(self, cfg: ExperimentConfig, global_state: State) -> None:
        super().__init__(cfg, global_state)
        if self.options.prune_weight and cfg.privacy.mode != "none":
            raise ConfigError(
                f"strategy.options.prune_weight > 0 with privacy.mode = {cfg.privacy.mode!r}: the pruning "
                "penalty is outside DP's clipping; set prune_weight = 0 or privacy.mode = 'none'"
            )
        self.pruned: dict[int, int] = {}
        """Partition -> the rank it pruned itself to (rank self-pruning)."""

    def rank(self, partition_id: int) -> int:
        """Client ``partition_id``'s rank this round (its device class's, or pruned since)."""
        return self.pruned.get(partition_id, self.device_rank(partition_id, self.options.ranks))

    def factor(self, rank: int) -> float:
        """c_k for a client of rank ``rank``."""
        own = dataclasses.replace(self.cfg.lora, rank=rank)
        return rank_factor(lora_scale(self.cfg.lora), lora_scale(own))

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        rank = self.rank(partition_id)
        if not self.options.prune_weight:
            return ClientPlan(rank=rank)
        tail = max(self.options.min_rank, math.floor(self.options.prune_gamma * rank))
        return ClientPlan(rank=rank, prune_from=tail, prune_weight=self.options.prune_weight)

    def client_arrays(self, partition_id: int, sent: State) -> State | None:
        rank = self.rank(partition_id)
        return truncate_state(sent, rank, self.factor(rank))

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        ranks = [next(v.shape[0] for k, v in u.items() if ".lora_A." in k) for u in updates]
        factors = [self.factor(r) for r in ranks]
        norm = self.options.weighting == "norm"
        return hetlora_aggregate(updates, weights, factors, self.cfg.lora.rank, norm)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate, then note which clients pruned their rank (their tail's norm shrank): from the next
        round on they train at the pruned rank."""
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        for reply in replies:
            metrics = None if reply.has_error() else reply.content.metric_records.get(protocol.METRICS)
            if metrics is None or protocol.TAIL_NORM_AFTER not in metrics:
                continue
            pid = reply_of.partition_of(reply)
            if float(metrics[protocol.TAIL_NORM_AFTER]) < float(metrics[protocol.TAIL_NORM_BEFORE]):  # type: ignore[arg-type]
                self.pruned[pid] = self.client_plan(pid, server_round).prune_from
        return result

    def diagnostics(self) -> dict[str, float]:
        """The mean rank of the clients that have pruned or been assigned one (``mean_rank``)."""
        ranks = [self.rank(pid) for pid in self.chosen] or [self.cfg.lora.rank]
        return {"mean_rank": sum(ranks) / len(ranks)}

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "pruned": {str(k): v for k, v in self.pruned.items()}}

    def restore(self, global_state: State, base_offsets: State, saved: dict[str, Any]) -> None:
        super().restore(global_state, base_offsets, saved)
        self.pruned = {int(k): int(v) for k, v in saved.get("pruned", {}).items()}
