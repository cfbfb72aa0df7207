"""Reliability settings of an experiment: what the server does with bad replies and failed rounds
(``[robustness]``) and the faults a simulation injects (``[faults]``), with their cross-check against the
round timeout (:mod:`fedlora.core.config` holds them; docs/reliability.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.core.errors import ConfigError
from fedlora.core.typed_toml import check as _check
from fedlora.core.typed_toml import help_field as _help


@dataclass
class RobustnessConfig:
    """What the server does with bad replies and failed rounds."""

    max_update_norm: float = _help(
        "reject a reply whose update (reply minus what was sent) has an L2 norm above this; 0 = no bound", 0.0
    )
    round_retries: int = _help(
        "times a round is retried when fewer than federation.min_clients valid replies arrive", 0
    )

    def __post_init__(self) -> None:
        _check(
            self.max_update_norm >= 0,
            "robustness.max_update_norm",
            self.max_update_norm,
            "0 (no bound) or a number > 0",
        )
        _check(self.round_retries >= 0, "robustness.round_retries", self.round_retries, "an integer >= 0")


@dataclass
class FaultsConfig:
    """Fault injection for simulations: exact shares of the clients, drawn anew each round from the seed."""

    raise_fraction: float = _help(
        "share of the clients (drawn anew each round) whose train handler raises an error", 0.0
    )
    straggle_fraction: float = _help("share of the clients that wait straggle_s seconds before training", 0.0)
    straggle_s: float = _help(
        "seconds a straggler waits (above federation.round_timeout: never answers)", 0.0
    )
    nan_fraction: float = _help("share of the clients that reply with NaN in every array", 0.0)
    corrupt_fraction: float = _help("share of the clients that reply with one array of a wrong shape", 0.0)

    def __post_init__(self) -> None:
        for name in ("raise_fraction", "straggle_fraction", "nan_fraction", "corrupt_fraction"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"faults.{name}", value, "a number in [0, 1]")
        _check(self.straggle_s >= 0, "faults.straggle_s", self.straggle_s, "a number of seconds >= 0")
        if self.total > 1.0:
            raise ConfigError(
                f"faults: raise_fraction + straggle_fraction + nan_fraction + corrupt_fraction = "
                f"{self.total:g} is invalid: expected at most 1 (each client plays one fault per round)"
            )
        if self.straggle_fraction > 0 and self.straggle_s == 0:
            raise ConfigError("faults.straggle_fraction > 0 needs faults.straggle_s > 0 (seconds to wait)")

    @property
    def total(self) -> float:
        """Share of sampled clients given any fault."""
        return self.raise_fraction + self.straggle_fraction + self.nan_fraction + self.corrupt_fraction

    @property
    def enabled(self) -> bool:
        """Whether any fault is injected."""
        return self.total > 0


def check_faults(config: Any) -> None:  # an ExperimentConfig (it holds this module's sections)
    """Fault injection that would make every round fail."""
    f = config.faults
    broken = f.raise_fraction + f.nan_fraction + f.corrupt_fraction
    if f.straggle_s > config.federation.round_timeout:
        broken += f.straggle_fraction
    if broken >= 1.0:
        raise ConfigError(
            f"faults: {broken:g} of the clients would never send a valid update, so no round could finish; "
            "keep faults.raise_fraction + nan_fraction + corrupt_fraction (+ straggle_fraction when "
            "straggle_s > federation.round_timeout) below 1"
        )
