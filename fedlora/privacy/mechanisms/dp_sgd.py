"""``privacy.mode = "dp-sgd"``: sample-level DP, DP-SGD (Opacus) inside every client.

Each client keeps its accountant's history in its node store; a client whose budget this round would
exceed declines. The server keeps each client's latest epsilon and reports the maximum (the guarantee
is per client). The Opacus training round itself is :mod:`fedlora.privacy.dp_sgd`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.protocol import keys as protocol
from fedlora.core.records.store import ClientStore
from fedlora.core.training.loops import Encoded, num_steps
from fedlora.privacy import accounting
from fedlora.privacy.dp_sgd import sample_rate, train_private
from fedlora.privacy.mechanisms.base import (
    BudgetOptions,
    LocalTraining,
    Mechanism,
    check_delta,
    privacy_row,
    require,
    require_noise,
)
from fedlora.privacy.mechanisms.registry import register

OPACUS_MODES = ("hooks", "ghost")
"""Opacus per-sample gradient modes that train peft's LoRA (``ew`` fails on keyword-only inputs)."""


@dataclass(frozen=True)
class DpSgdOptions(BudgetOptions):
    """DP-SGD's keys: the budget, and how Opacus computes per-example gradients."""

    opacus_mode: str
    max_physical_batch: int

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.opacus_mode in OPACUS_MODES, "opacus_mode", self.opacus_mode, " or ".join(OPACUS_MODES))


def plan(cfg: ExperimentConfig, num_examples: int) -> tuple[float, float, int]:
    """DP-SGD on a client with ``num_examples``: (noise multiplier, sample rate, steps per round).

    Without a given noise multiplier it is calibrated so that taking part in every planned round
    (rounds x steps per round at this rate) spends exactly ``target_epsilon``.
    """
    p = cfg.privacy
    rate = sample_rate(cfg.train.batch_size, num_examples)
    steps = num_steps(cfg.train, num_examples)
    if p.noise_multiplier > 0:
        return p.noise_multiplier, rate, steps
    planned = steps * cfg.federation.rounds
    return accounting.calibrate(p.target_epsilon, p.delta, rate, planned, p.accountant), rate, steps


@register("dp-sgd")
class DpSgd(Mechanism):
    """DP-SGD inside every client; the server reports the largest epsilon any client has spent."""

    Options = DpSgdOptions
    private = True
    options: DpSgdOptions

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.client_epsilon: dict[int, float] = {}
        self._round_noise: list[float] = []
        self._declined = 0

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """A budget or a noise multiplier; no gradient checkpointing (Opacus needs each activation once)."""
        require_noise(cls.mode, cls.read_options(cfg.privacy))
        if cfg.train.gradient_checkpointing:
            raise ConfigError(
                f"train.gradient_checkpointing = true does not work with privacy.mode = {cls.mode!r} "
                "(Opacus records each layer's activations once); turn one of them off"
            )

    def preflight(self, client_sizes: Sequence[int]) -> None:
        """delta below 1 / n for the largest client's n (each client's guarantee is over its examples)."""
        check_delta(self.options.delta, max(client_sizes), "examples of the largest client")

    # ----- server side --------------------------------------------------------------------------
    def observe(self, metrics: Sequence[Mapping[str, Any]]) -> None:
        """Remember each client's cumulative epsilon, and the noise of those that trained."""
        self._round_noise = []
        self._declined = 0
        for m in metrics:
            declined = bool(m.get(protocol.DECLINED, 0))
            self._declined += declined
            if protocol.EPSILON in m:
                self.client_epsilon[int(m[protocol.PARTITION_ID])] = float(m[protocol.EPSILON])
                if not declined:
                    self._round_noise.append(float(m[protocol.NOISE_MULTIPLIER]))

    def epsilon(self) -> float:
        return max(self.client_epsilon.values(), default=0.0)

    def round_metrics(self) -> dict[str, float]:
        noise = sum(self._round_noise) / len(self._round_noise) if self._round_noise else math.nan
        return {"num_declined": float(self._declined), **privacy_row(self.options, self.epsilon(), noise)}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"client_epsilon": {str(k): v for k, v in self.client_epsilon.items()}}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.client_epsilon = {int(k): float(v) for k, v in saved["client_epsilon"].items()}

    # ----- client side --------------------------------------------------------------------------
    def train(self, store: ClientStore, model: torch.nn.Module, data: Encoded, *, seed: int) -> LocalTraining:
        """Train with DP-SGD unless this round would exceed the budget; the accountant lives in ``store``."""
        p = self.options
        noise, rate, steps = plan(self.cfg, len(data))
        history = load_history(store)
        entry = (noise, rate, steps)
        if accounting.would_exceed(history, entry, p.target_epsilon, p.delta, p.accountant):
            spent = accounting.epsilon(history, p.delta, p.accountant)
            after = accounting.epsilon([*history, entry], p.delta, p.accountant)
            return LocalTraining(
                metrics={protocol.EPSILON: spent, protocol.NOISE_MULTIPLIER: noise},
                declined=f"privacy budget: epsilon {spent:.3f} spent, this round would reach {after:.3f} "
                f"> privacy.target_epsilon {p.target_epsilon:g}",
            )
        done = train_private(  # Opacus is imported in here: only DP-SGD clients need it
            model, data, self.cfg.train, self.cfg.privacy, noise_multiplier=noise, seed=seed
        )
        history.append(done.entry)
        save_history(store, history)
        spent = accounting.epsilon(history, p.delta, p.accountant)
        return LocalTraining(
            loss=done.loss, metrics={protocol.EPSILON: spent, protocol.NOISE_MULTIPLIER: noise}
        )


def load_history(store: ClientStore) -> list[accounting.Entry]:
    """This node's DP-SGD accountant history (every earlier round it trained in), from its store."""
    record = store.load_config(protocol.DP_HISTORY)
    return accounting.history_from_lists(record) if record is not None else []  # type: ignore[arg-type]


def save_history(store: ClientStore, history: list[accounting.Entry]) -> None:
    """Keep the history in the client's store, which outlives the ClientApp process."""
    store.save_config(protocol.DP_HISTORY, accounting.history_to_lists(history))  # type: ignore[arg-type]
