"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters, merge them into the base weights.

Each round every sampled client starts from a freshly initialised LoRA (A random, B zero) of its own
rank r_k, trains it, and sends A_k, B_k and the head. The server stacks them: A_stack holds the rows of
every A_k, B_stack the columns of p_k s_k B_k, so B_stack A_stack = sum_k p_k s_k B_k A_k exactly, with
s_k = alpha / r_k (alpha / sqrt(r_k) with rsLoRA): one alpha convention for every rank. The product is
added to an offset on the frozen base weights, which travels to clients with every message (counted in
``downlink_bytes``); the head is averaged like FedAvg.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedlora.core.arrays import State, is_head, lora_scale
from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.plan import ClientPlan
from strategies.aggregation import weighted_average
from strategies.base import LoraStrategy
from strategies.lowrank import add_to_offsets, flora_merge
from strategies.registry import register


@dataclass
class FloraOptions:
    """ranks: LoRA rank per client, cycled over partition ids (client k gets ranks[k % len]); empty =
    lora.rank for every client."""

    ranks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(r < 1 for r in self.ranks):
            raise ConfigError(f"strategy.options.ranks = {self.ranks!r} is invalid: expected integers >= 1")


def client_rank(cfg: ExperimentConfig, options: FloraOptions, partition_id: int) -> int:
    """The LoRA rank of client ``partition_id``."""
    return options.ranks[partition_id % len(options.ranks)] if options.ranks else cfg.lora.rank


def flora_offsets(
    offsets: State, updates: Sequence[State], weights: Sequence[float], scales: Sequence[float]
) -> State:
    """``offsets`` plus, per adapted layer, the merged stacked update sum_k p_k s_k B_k A_k."""
    return add_to_offsets(offsets, updates, lambda a, b: flora_merge(a, b, weights, scales))


@register("flora")
class Flora(LoraStrategy):
    """Stacking aggregation with per-client ranks; LoRA re-initialised on clients every round."""

    description = "stack clients' adapters (any ranks) so the product is exact; merge into frozen weights"
    Options = FloraOptions

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        seed = (self.cfg.seed * 7_919 + server_round * 104_729 + partition_id) % 2**31
        rank = client_rank(self.cfg, self.options, partition_id)
        return ClientPlan(rank=rank, reinit_seed=seed, reply="adapter")

    def outgoing(self, global_state: State) -> State:
        return {k: v for k, v in global_state.items() if is_head(k)}

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        ranks = [next(v.shape[0] for k, v in u.items() if ".lora_A." in k) for u in updates]
        scales = [lora_scale(dataclasses.replace(self.cfg.lora, rank=r)) for r in ranks]
        self.base_offsets = flora_offsets(self.base_offsets, updates, weights, scales)
        heads = [{k: v for k, v in u.items() if is_head(k)} for u in updates]
        return weighted_average(heads, weights)
