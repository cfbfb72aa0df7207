"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep B personal.

Clients train A and B; only A (and the head, unless ``local_head``) travels and is averaged. Each
client's B (and head, with ``local_head``) stays in its node's persistent state across rounds, which
outlives the worker process. The server never sees or changes a client's B. The global model the
server evaluates therefore has B at its initial value (zero) and shows the shared part only; the
personalised accuracy comes from client-side evaluation (``federation.fraction_evaluate`` > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.core.arrays import State, is_head, is_lora_a
from fedlora.core.plan import ClientPlan
from strategies.base import LoraStrategy
from strategies.registry import register


@dataclass
class FedSaOptions:
    """local_head: keep the classification head on each client too (default: the head is shared)."""

    local_head: bool = False


@register("fedsa-lora")
class FedSaLora(LoraStrategy):
    """Average A (and the head); every client keeps its own B."""

    description = "share and average A (+head); each client keeps its own B in its node state"
    Options = FedSaOptions

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        local = {"lora_B", "head"} if self.options.local_head else {"lora_B"}
        return ClientPlan(rank=self.cfg.lora.rank, keep_local=frozenset(local))

    def outgoing(self, global_state: State) -> State:
        shared_head = not self.options.local_head
        return {k: v for k, v in global_state.items() if is_lora_a(k) or (shared_head and is_head(k))}
