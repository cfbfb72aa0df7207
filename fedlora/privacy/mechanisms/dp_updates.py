"""``privacy.mode = "dp-updates"``: user-level DP on the arrays that travel.

Clients are Poisson-sampled with rate q = m / N, every reply weighs the same, and the strategy's linear
aggregate is applied to the noised mean of the clipped updates
(:func:`fedlora.privacy.dp_updates.private_mean`); one step of the subsampled Gaussian mechanism per
round. With ``placement = "client"`` each client clips its own update and adds its share of the noise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model.arrays import State
from fedlora.privacy import accounting
from fedlora.privacy.dp_updates import client_share, private_mean
from fedlora.privacy.mechanisms.base import (
    BudgetOptions,
    Mechanism,
    check_delta,
    privacy_row,
    require,
    require_noise,
)
from fedlora.privacy.mechanisms.registry import register

PLACEMENTS = ("server", "client")
"""Who clips and adds the noise: the server (trusted), or each client its share (secure aggregation)."""


@dataclass(frozen=True)
class DpUpdatesOptions(BudgetOptions):
    """dp-updates' keys: the budget (clip_norm bounds each client's update), and the noise placement."""

    placement: str

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.placement in PLACEMENTS, "placement", self.placement, " or ".join(PLACEMENTS))


def client_rate(cfg: ExperimentConfig) -> float:
    """The rate q at which each client is Poisson-sampled per round (m / N)."""
    fed = cfg.federation
    return fed.clients_per_round() / fed.num_clients


def expected_clients(cfg: ExperimentConfig) -> float:
    """The expected number of clients per round, m = q * N (the mean's fixed divisor)."""
    return client_rate(cfg) * cfg.federation.num_clients


def update_noise(cfg: ExperimentConfig) -> float:
    """The noise multiplier sigma (given, or calibrated to target_epsilon over all rounds)."""
    p = cfg.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    return accounting.calibrate(
        p.target_epsilon, p.delta, client_rate(cfg), cfg.federation.rounds, p.accountant
    )


def update_history(cfg: ExperimentConfig, rounds: int) -> list[accounting.Entry]:
    """The accountant's history after ``rounds`` rounds (one step per round)."""
    return [(update_noise(cfg), client_rate(cfg), 1)] * rounds


@register("dp-updates")
class DpUpdates(Mechanism):
    """User-level DP: Poisson sampling of clients, clipped updates, Gaussian noise on their mean."""

    Options = DpUpdatesOptions
    private = True
    requires_linear_aggregate = True
    aggregates_without_replies = True
    options: DpUpdatesOptions

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.rounds_noised = 0
        self._round_info: dict[str, float] = {}

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """A budget or a noise multiplier; no secure aggregation (its Gaussian shares would be rounded to
        integers after noising, which voids the guarantee on the sum: ``ddp`` noises the integers)."""
        require_noise(cls.mode, cls.read_options(cfg.privacy))
        if cfg.secure_aggregation.enabled:
            raise ConfigError(
                "privacy.mode = 'dp-updates' cannot run under secure aggregation: its Gaussian noise shares "
                "would be rounded to integers after noising, which voids the guarantee on the sum; use "
                "privacy.mode = 'ddp' (Skellam noise added to the integers)"
            )

    def preflight(self, client_sizes: Sequence[int]) -> None:
        """delta below 1 / N clients; a given noise multiplier must keep the planned rounds in budget."""
        p, rounds = self.options, self.cfg.federation.rounds
        check_delta(p.delta, self.cfg.federation.num_clients, "clients")
        if p.noise_multiplier > 0 and p.target_epsilon > 0:
            spent = accounting.epsilon(update_history(self.cfg, rounds), p.delta, p.accountant)
            if spent > p.target_epsilon:
                raise ConfigError(
                    f"privacy.target_epsilon = {p.target_epsilon:g} is exceeded: {rounds} rounds at "
                    f"noise_multiplier {p.noise_multiplier:g} spend epsilon {spent:.2f}; raise the noise, "
                    "lower federation.rounds, or set noise_multiplier = 0 to calibrate it"
                )

    # ----- server side --------------------------------------------------------------------------
    def sample(self, partitions: Sequence[int], want: int, rng: random.Random) -> list[int]:
        """Each partition independently with probability q = m / N (the accountant's assumption)."""
        rate = client_rate(self.cfg)
        return [pid for pid in partitions if rng.random() < rate]

    def most_sampled(self, population: int, want: int) -> int:
        """A round's Poisson sample is Binomial(N, q): its mean plus 6 standard deviations (a round
        exceeds it with probability below 1e-8), at most N."""
        rate = client_rate(self.cfg)
        mean = population * rate
        return min(population, math.ceil(mean + 6 * math.sqrt(mean * (1 - rate))))

    def weights(self, counts: Sequence[float]) -> list[float]:
        """Equal weights: the sum's sensitivity to one client is then the clip norm C."""
        return [1.0 / len(counts)] * len(counts) if counts else []

    def release(
        self, sent: State, updates: Sequence[State], weights: Sequence[float], server_round: int
    ) -> tuple[list[State], list[float]]:
        """The noised mean of the clients' clipped updates, applied to ``sent``, as one state."""
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + server_round)
        mean, info = private_mean(
            sent,
            updates,
            clip_norm=self.options.clip_norm,
            noise_multiplier=update_noise(self.cfg),
            expected_clients=expected_clients(self.cfg),
            placement=self.options.placement,
            generator=generator,
        )
        self.rounds_noised += 1
        self._round_info = info
        return [mean], [1.0]

    def epsilon(self) -> float:
        p = self.options
        return accounting.epsilon(update_history(self.cfg, self.rounds_noised), p.delta, p.accountant)

    def round_metrics(self) -> dict[str, float]:
        return {**privacy_row(self.options, self.epsilon(), update_noise(self.cfg)), **self._round_info}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"rounds_noised": self.rounds_noised}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.rounds_noised = int(saved["rounds_noised"])

    # ----- client side --------------------------------------------------------------------------
    def privatise(self, received: State, reply: State, *, seed: int) -> State:
        """Client placement: received + the clipped update + this client's share of the noise."""
        if self.options.placement != "client":
            return reply
        shared, _ = client_share(
            {k: received[k] for k in reply},
            reply,
            clip_norm=self.options.clip_norm,
            noise_multiplier=update_noise(self.cfg),
            expected_clients=expected_clients(self.cfg),
            generator=torch.Generator().manual_seed(seed),
        )
        return shared
