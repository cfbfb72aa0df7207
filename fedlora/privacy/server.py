"""The server's side of differential privacy, for every strategy (the registry says which may use what).

* ``dp-sgd``: clients train privately and report their cumulative epsilon; the server keeps the
  latest value per client and reports the maximum (the federation's guarantee is per client).
* ``dp-updates``: clients are Poisson-sampled with rate q = m / N, every reply weighs the same, and
  the strategy's linear aggregate is applied to the noised mean of the clipped updates
  (:func:`fedlora.privacy.dp_updates.private_mean`). One RDP step of the subsampled Gaussian mechanism is
  accounted per round.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.core import protocol
from fedlora.core.adapters import State
from fedlora.core.config import ExperimentConfig
from fedlora.privacy import accounting
from fedlora.privacy import settings as privacy
from fedlora.privacy.dp_updates import private_mean


class ServerPrivacy:
    """Sampling, weighting, noising and accounting for one run's privacy settings."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.client_epsilon: dict[int, float] = {}
        self.rounds_noised = 0
        self._round_noise: list[float] = []
        self._round_info: dict[str, float] = {}

    @property
    def updates(self) -> bool:
        """Whether update-level DP (dp-updates) is on."""
        return self.cfg.privacy.mode == "dp-updates"

    def sample(self, partitions: Sequence[int], rng: random.Random) -> list[int]:
        """dp-updates: each partition independently with probability q (the accountant's assumption)."""
        rate = privacy.client_rate(self.cfg)
        return [pid for pid in partitions if rng.random() < rate]

    def weights(self, counts: Sequence[float]) -> list[float] | None:
        """dp-updates: equal weights (the sum's sensitivity is then C); None: the strategy's own p_k."""
        return [1.0 / len(counts)] * len(counts) if self.updates and counts else None

    def noised_mean(self, sent: State, replies: Sequence[State], server_round: int) -> State:
        """dp-updates: the noised mean of the clients' clipped updates, applied to ``sent``."""
        p = self.cfg.privacy
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + server_round)
        mean, info = private_mean(
            sent,
            replies,
            clip_norm=p.clip_norm,
            noise_multiplier=privacy.update_noise(self.cfg),
            expected_clients=privacy.expected_clients(self.cfg),
            placement=p.placement,
            generator=generator,
        )
        self.rounds_noised += 1
        self._round_info = info
        return mean

    def observe(self, metrics: Sequence[Mapping[str, Any]]) -> None:
        """dp-sgd: remember each replying client's cumulative epsilon, and the noise of those that trained."""
        self._round_noise = []
        for m in metrics:
            if protocol.EPSILON in m:
                self.client_epsilon[int(m[protocol.PARTITION_ID])] = float(m[protocol.EPSILON])
                if not m.get(protocol.DECLINED, 0):
                    self._round_noise.append(float(m[protocol.NOISE_MULTIPLIER]))

    def epsilon(self) -> float:
        """Epsilon spent so far: max over clients (dp-sgd) or the federation's (dp-updates)."""
        p = self.cfg.privacy
        if self.updates:
            history = privacy.update_history(self.cfg, self.rounds_noised)
            return accounting.epsilon(history, p.delta, p.accountant)
        return max(self.client_epsilon.values(), default=0.0)

    def round_metrics(self) -> dict[str, float]:
        """What ``rounds.jsonl`` records about privacy this round (nothing when DP is off)."""
        if not self.cfg.privacy.enabled:
            return {}
        p = self.cfg.privacy
        if self.updates:
            noise = privacy.update_noise(self.cfg)
        else:
            noise = sum(self._round_noise) / len(self._round_noise) if self._round_noise else math.nan
        return {
            "epsilon": self.epsilon(),
            "delta": p.delta,
            "noise_multiplier": noise,
            "clip_norm": p.clip_norm,
            **self._round_info,
        }
