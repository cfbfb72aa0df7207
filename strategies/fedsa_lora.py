"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep B personal.

Clients train A, B and the classification head; only A travels and is averaged. Each client's B and
head stay in its node's persistent state across rounds, which outlives the worker process, as in the
official code (``local_head = false`` shares and averages the head too). The server never sees or
changes a client's B. The global model the server evaluates therefore has B at its initial value
(zero), and with a local head the initial head too: it shows the shared part only. FedSA-LoRA is
judged by personalised accuracy: global A with the client's own B and head on its own validation split
(``keeps_client_state``: its clients evaluate every round unless ``federation.fraction_evaluate`` says
otherwise, and that accuracy is the run's headline).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.core.model.arrays import State, is_head, is_lora_a
from fedlora.core.protocol.plan import ClientPlan
from strategies.base import LoraStrategy
from strategies.registry import register


@dataclass
class FedSaOptions:
    """local_head: keep the classification head on each client with its B (default True, as the
    official code; False shares and averages the head like A)."""

    local_head: bool = True


@register("fedsa-lora")
class FedSaLora(LoraStrategy):
    """Average A (and the head with ``local_head = false``); every client keeps its own B and head."""

    description = "share and average A; each client keeps its own B and head in its node state"
    Options = FedSaOptions
    keeps_client_state = True

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        local = {"lora_B", "head"} if self.options.local_head else {"lora_B"}
        return ClientPlan(rank=self.cfg.lora.rank, keep_local=frozenset(local))

    def outgoing(self, global_state: State) -> State:
        shared_head = not self.options.local_head
        return {k: v for k, v in global_state.items() if is_lora_a(k) or (shared_head and is_head(k))}
