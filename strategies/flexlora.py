"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024): clients of different ranks; the server averages full-size products.

Client k trains a LoRA adapter of its own rank r_k and sends A_k and B_k. The server forms the weighted
average of the clients' full-size updates, each at its own LoRA scale s_k,

    dW = sum_k p_k s_k B_k A_k

(:func:`strategies.lowrank.product_average`, exact whatever the ranks), and factorises it by SVD.
Client k starts the next round from the truncation of dW to its rank, U_rk S_rk V_rk^T, the best
rank-r_k approximation (Eckart-Young). The server stores the rank-r_max truncation (r_max = lora.rank)
as the global adapter, with A = sqrt(S/s) V^T and B = U sqrt(S/s) at the global scale s; its first r_k
components are every smaller client's truncation, sent with both factors multiplied by
sqrt(s / s_k) so that the client's own scale gives the same product (:func:`strategies.lowrank.rank_factor`).
The head is averaged. The evaluated global model is the rank-r_max truncation of dW.

Ranks come from the clients' device classes (``devices.classes[].rank``), else ``ranks`` cycled over
partition ids, else lora.rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedlora.core.config import ConfigError
from fedlora.core.model.arrays import State, is_head, lora_scale
from fedlora.core.protocol.plan import ClientPlan
from strategies.aggregation import weighted_average
from strategies.base import LoraStrategy
from strategies.lowrank import layer_groups, product_average, rank_factor, svd_factors, truncate_state
from strategies.registry import register


@dataclass
class FlexLoraOptions:
    """ranks: per-client ranks cycled over partition ids when device classes set none (empty = lora.rank)."""

    ranks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if any(r < 1 for r in self.ranks):
            raise ConfigError(f"strategy.options.ranks = {self.ranks!r} is invalid: expected integers >= 1")


def flexlora_aggregate(
    updates: Sequence[State], weights: Sequence[float], scales: Sequence[float], rank: int, scale: float
) -> State:
    """Per adapted layer, the rank-``rank`` SVD factors (at LoRA scale ``scale``) of
    sum_k p_k s_k B_k A_k; the head averaged with ``weights``."""
    result: State = {}
    for _, (key_a, key_b) in layer_groups(updates[0]).items():
        delta = product_average([u[key_a] for u in updates], [u[key_b] for u in updates], weights, scales)
        result[key_a], result[key_b] = svd_factors(delta, rank, scale)
    heads = [{k: v for k, v in u.items() if is_head(k)} for u in updates]
    return {**result, **(weighted_average(heads, weights) if heads[0] else {})}


@register("flexlora")
class FlexLora(LoraStrategy):
    """Heterogeneous ranks: average the full-size products, SVD back to each client's rank."""

    description = "per-client ranks: average full-size B_k A_k (scaled), SVD truncation to each client's rank"
    Options = FlexLoraOptions

    def scale(self, rank: int) -> float:
        """The LoRA scale s of an adapter of rank ``rank`` (the experiment's alpha convention)."""
        return lora_scale(dataclasses.replace(self.cfg.lora, rank=rank))

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        return ClientPlan(rank=self.device_rank(partition_id, self.options.ranks))

    def client_arrays(self, partition_id: int, sent: State) -> State | None:
        rank = self.device_rank(partition_id, self.options.ranks)
        return truncate_state(sent, rank, rank_factor(self.scale(self.cfg.lora.rank), self.scale(rank)))

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        ranks = [next(v.shape[0] for k, v in u.items() if ".lora_A." in k) for u in updates]
        r_max = self.cfg.lora.rank
        return flexlora_aggregate(updates, weights, [self.scale(r) for r in ranks], r_max, self.scale(r_max))
