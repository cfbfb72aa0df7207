"""What a run's privacy settings mean in numbers: sampling rates, noise multipliers, and checks.

Both the server and the clients call these, so they agree without sending anything extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.training.loops import num_steps
from fedlora.privacy import accounting
from fedlora.privacy.dp_sgd import sample_rate


def client_rate(cfg: ExperimentConfig) -> float:
    """dp-updates: the rate q at which each client is Poisson-sampled per round (m / N)."""
    fed = cfg.federation
    return fed.clients_per_round() / fed.num_clients


def expected_clients(cfg: ExperimentConfig) -> float:
    """dp-updates: the expected number of clients per round, m = q * N (the mean's fixed divisor)."""
    return client_rate(cfg) * cfg.federation.num_clients


def update_noise(cfg: ExperimentConfig) -> float:
    """dp-updates: the noise multiplier sigma (given, or calibrated to target_epsilon over all rounds)."""
    p = cfg.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    return _calibrate(p.target_epsilon, p.delta, client_rate(cfg), cfg.federation.rounds, p.accountant)


def dp_sgd_plan(cfg: ExperimentConfig, num_examples: int) -> tuple[float, float, int]:
    """dp-sgd on a client with ``num_examples``: (noise multiplier, sample rate, steps per round).

    Without a given noise multiplier it is calibrated so that taking part in every planned round
    (rounds x steps per round at this rate) spends exactly ``target_epsilon``.
    """
    p = cfg.privacy
    rate = sample_rate(cfg.train.batch_size, num_examples)
    steps = num_steps(cfg.train, num_examples)
    if p.noise_multiplier > 0:
        return p.noise_multiplier, rate, steps
    planned = steps * cfg.federation.rounds
    return _calibrate(p.target_epsilon, p.delta, rate, planned, p.accountant), rate, steps


@lru_cache(maxsize=256)
def _calibrate(target: float, delta: float, rate: float, steps: int, kind: str) -> float:
    return accounting.calibrate(target, delta, rate, steps, kind)


def update_history(cfg: ExperimentConfig, rounds: int) -> list[accounting.Entry]:
    """dp-updates: the accountant's history after ``rounds`` rounds (one step per round)."""
    return [(update_noise(cfg), client_rate(cfg), 1)] * rounds


def check(cfg: ExperimentConfig, client_sizes: Sequence[int]) -> None:
    """Refuse settings whose epsilon would be meaningless or over budget, before any work starts."""
    p = cfg.privacy
    if not p.enabled:
        return
    population = list(client_sizes) if p.mode == "dp-sgd" else [cfg.federation.num_clients]
    what = "examples of the largest client" if p.mode == "dp-sgd" else "clients"
    largest = max(population)
    if p.delta >= 1 / largest:
        raise ConfigError(
            f"privacy.delta = {p.delta:g} is invalid: it must be below 1 / {largest} ({what}); "
            f"use e.g. {_below(1 / largest):g}"
        )
    if p.mode == "dp-updates" and p.noise_multiplier > 0 and p.target_epsilon > 0:
        spent = accounting.epsilon(update_history(cfg, cfg.federation.rounds), p.delta, p.accountant)
        if spent > p.target_epsilon:
            raise ConfigError(
                f"privacy.target_epsilon = {p.target_epsilon:g} is exceeded: "
                f"{cfg.federation.rounds} rounds at noise_multiplier {p.noise_multiplier:g} spend "
                f"epsilon {spent:.2f}; raise the noise, lower federation.rounds, or set "
                "noise_multiplier = 0 to calibrate it"
            )


def _below(bound: float) -> float:
    """A round power of ten well below ``bound``."""
    exponent = 0
    while 10.0**exponent >= bound / 10:
        exponent -= 1
    return 10.0**exponent
