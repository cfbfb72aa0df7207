"""FFA-LoRA (Sun et al., ICLR 2024): A random, shared and frozen; only B (and the head) is trained and sent.

Every client derives the same A from the experiment seed (peft's Kaiming-uniform, or orthonormal rows)
and never changes it; A is never sent. B starts at zero. Averaging is then exact:
sum_k p_k (B_k A) = (sum_k p_k B_k) A. Uplink and downlink per adapted matrix fall from r*(d_in + d_out)
to r*d_out values. The paper finds alpha and learning rate interchangeable: fix alpha, tune lr.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model.arrays import State, is_lora_a, orthogonal_a
from fedlora.core.protocol.plan import ClientPlan
from strategies.base import LoraStrategy
from strategies.registry import register


@dataclass
class FfaOptions:
    """a_init: 'kaiming' (peft's default A) or 'orthogonal' (orthonormal rows); both from the seed."""

    a_init: str = "kaiming"

    def __post_init__(self) -> None:
        if self.a_init not in ("kaiming", "orthogonal"):
            raise ConfigError(
                f"strategy.options.a_init = {self.a_init!r} is invalid: expected kaiming or orthogonal"
            )


@register("ffa-lora")
class FfaLora(LoraStrategy):
    """FedAvg of B and the head over a frozen, shared, never-sent A."""

    description = "frozen shared random A, train and send only B (+head): exact averaging, half the traffic"
    Options = FfaOptions

    def __init__(self, cfg: ExperimentConfig, global_state: State) -> None:
        if FfaOptions(**cfg.strategy.options).a_init == "orthogonal":
            global_state = orthogonal_a(global_state, seed=cfg.seed)
        super().__init__(cfg, global_state)

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        return ClientPlan(rank=self.cfg.lora.rank, freeze=frozenset({"lora_A"}), a_init=self.options.a_init)

    def outgoing(self, global_state: State) -> State:
        return {k: v for k, v in global_state.items() if not is_lora_a(k)}
