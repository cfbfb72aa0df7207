"""FedAvg with a server learning rate (Reddi et al., ICLR 2021, "Adaptive Federated Optimization",
FedOpt with the SGD server optimiser): the server moves the global adapter only part of the way
towards the clients' average,

    x <- x + eta * (sum_k p_k x_k - x),

which damps client drift when eta < 1 (eta = 1 is FedIT). Dropped into ``strategies/`` this file is
all it takes: the registry finds it, ``fedlora strategies`` lists it, ``strategy.name =
"fedavg-server-lr"`` runs it, and the registry-driven tests check it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedlora.core.config import ConfigError
from fedlora.core.model.arrays import State
from strategies.base import LoraStrategy
from strategies.registry import register


@dataclass
class ServerLrOptions:
    """server_lr: the server's step size eta in (0, 2); 1 = plain FedAvg."""

    server_lr: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.server_lr < 2:
            raise ConfigError(
                f"strategy.options.server_lr = {self.server_lr} is invalid: expected a number in (0, 2)"
            )


@register("fedavg-server-lr")
class FedAvgServerLr(LoraStrategy):
    """FedAvg of every array, applied with a server step size."""

    description = "FedAvg moved by a server learning rate: x + eta * (mean(x_k) - x)"
    Options = ServerLrOptions
    # x + eta * (sum_k p_k x_k - x) = sum_k p_k (x + eta * (x_k - x)): linear in the clients' arrays,
    # so update-level DP (noise on the clipped mean) protects it.
    linear_aggregate = True

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        mean = super().aggregate(global_state, updates, weights)
        eta = self.options.server_lr
        return {k: global_state[k] + eta * (v - global_state[k]) for k, v in mean.items()}
