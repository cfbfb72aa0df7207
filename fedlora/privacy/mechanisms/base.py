"""What every privacy mechanism is: an options dataclass read from ``[privacy]``, its checks, and the
hooks the round loop (server side) and the ClientApp (client side) call whatever the mode.

:class:`Mechanism` is the identity (uniform sampling, example-weighted means, plain local training,
replies as trained); a mechanism overrides only the hooks it changes. :class:`BudgetOptions` holds the
(epsilon, delta) settings that the accounted mechanisms share.
"""

from __future__ import annotations

import dataclasses
import math
import random
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from fedlora.core.config import ConfigError, ExperimentConfig, PrivacyConfig
from fedlora.core.model.arrays import State
from fedlora.core.protocol.codec import Codec, WeightedQuantiser
from fedlora.core.records.store import ClientStore
from fedlora.core.training.loops import Encoded, train_local
from fedlora.core.typed_toml import coerce
from fedlora.privacy import accounting


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """ConfigError ``privacy.<key> = <value> is invalid: expected <expected>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"privacy.{key} = {value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class NoOptions:
    """A mechanism that reads no ``[privacy]`` key but ``mode``."""


@dataclass(frozen=True)
class BudgetOptions:
    """The (epsilon, delta) settings of a mechanism with an accountant; their ranges are checked by
    :class:`~fedlora.core.config.PrivacyConfig`, the accountant's name against Opacus's registry here."""

    target_epsilon: float
    noise_multiplier: float
    clip_norm: float
    delta: float
    accountant: str

    def __post_init__(self) -> None:
        accounting.check_accountant(self.accountant)


def check_delta(delta: float, population: int, what: str) -> None:
    """ConfigError unless ``delta`` < 1 / ``population`` (``what`` names the population)."""
    if delta >= 1 / population:
        raise ConfigError(
            f"privacy.delta = {delta:g} is invalid: it must be below 1 / {population} ({what}); "
            f"use e.g. {_below(1 / population):g}"
        )


def _below(bound: float) -> float:
    """A round power of ten well below ``bound``."""
    exponent = 0
    while 10.0**exponent >= bound / 10:
        exponent -= 1
    return 10.0**exponent


@dataclass(frozen=True)
class LocalTraining:
    """What a client's local training produced: its mean loss and metrics for the reply, or the reason
    it declined to train (then nothing is sent but the metrics)."""

    loss: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)
    declined: str = ""


class Mechanism:
    """No differential privacy: the hooks every mechanism can override."""

    mode: ClassVar[str] = ""
    """``privacy.mode`` that selects it (set by the registry's ``register``)."""
    Options: ClassVar[type[Any]] = NoOptions
    """A frozen dataclass whose fields are the ``[privacy]`` keys this mechanism reads; it checks their
    values on construction (ConfigError naming the key, the value and the valid choices)."""
    ignores: ClassVar[frozenset[str]] = frozenset()
    """``[privacy]`` keys it accepts and ignores; any other key it does not read is refused when set."""
    private: ClassVar[bool] = False
    """True when it gives (epsilon, delta)-DP: it reports epsilon, and clients keep label counts to
    themselves."""
    requires_linear_aggregate: ClassVar[bool] = False
    """True when the mechanism only protects strategies whose aggregate is linear in what travels."""
    aggregates_without_replies: ClassVar[bool] = False
    """True when a round with no trained reply still releases an aggregate (the noise alone)."""

    options: Any

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.options = self.read_options(cfg.privacy)

    @classmethod
    def read_options(cls, privacy: PrivacyConfig) -> Any:
        """:attr:`Options` built (and so checked) from the ``[privacy]`` table: fields named like a
        ``[privacy]`` key read that key; the others (a mechanism's own keys) read ``[privacy.options]``,
        whose other keys are refused."""
        shared = {f.name for f in dataclasses.fields(PrivacyConfig)}
        fields = dataclasses.fields(cls.Options)
        own = sorted(f.name for f in fields if f.name not in shared)
        unknown = sorted(set(privacy.options) - set(own))
        if unknown:
            raise ConfigError(
                f"privacy.options.{unknown[0]} is unknown for privacy.mode = {cls.mode!r}; valid options: "
                f"{', '.join(own) or 'none'}"
            )
        hints = typing.get_type_hints(cls.Options)
        extra = {k: coerce(hints[k], v, f"privacy.options.{k}") for k, v in privacy.options.items()}
        return cls.Options(**{f.name: getattr(privacy, f.name) for f in fields if f.name in shared}, **extra)

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Checks of the whole experiment that need neither data nor model (default: none)."""

    def preflight(self, client_sizes: Sequence[int]) -> None:
        """Checks against the clients' training-split sizes, before any work starts (default: none)."""

    # ----- server side --------------------------------------------------------------------------
    def sample(self, partitions: Sequence[int], want: int, rng: random.Random) -> list[int]:
        """The partitions that train this round: ``want`` of them, uniformly without replacement."""
        return sorted(rng.sample(list(partitions), want))

    def most_sampled(self, population: int, want: int) -> int:
        """How many partitions :meth:`sample` can return in a round, for sizing a simulation: ``want``."""
        return want

    def weights(self, counts: Sequence[float]) -> list[float]:
        """Aggregation weights p_k = n_k / sum(n) from the clients' example counts."""
        total = float(sum(counts))
        if not counts or total <= 0:
            raise ValueError(f"cannot weight clients with example counts {list(counts)}")
        return [float(n) / total for n in counts]

    def release(
        self, sent: State, updates: Sequence[State], weights: Sequence[float], server_round: int
    ) -> tuple[list[State], list[float]]:
        """What the strategy aggregates: the clients' states and weights (default: as they came)."""
        return list(updates), list(weights)

    def secure_codec(self, length: int) -> Codec:
        """Under secure aggregation, how a client's update of ``length`` values becomes integers and the
        sum comes back (default: Flower's quantiser, example-weighted)."""
        return WeightedQuantiser.of(self.cfg.secure_aggregation)

    def client_weight(self, num_examples: int) -> float:
        """A client's unnormalised weight, sent inside its masked vector (default: its examples, so that
        the decoded mean is :meth:`weights`' p_k = n_k / sum n)."""
        return float(num_examples)

    def release_sum(
        self, sent: State, summed: State, weight: float, arrived: int, server_round: int
    ) -> tuple[list[State], list[float]]:
        """Under secure aggregation: what the strategy aggregates from ``summed`` (the sum of the
        ``arrived`` clients' weighted updates) and their summed ``weight`` (default: the weighted mean,
        applied to ``sent``, as one state)."""
        return [{k: sent[k] + summed[k] / weight for k in summed}], [1.0]

    def observe(self, metrics: Sequence[Mapping[str, Any]]) -> None:
        """Read the metrics of every reply without an error (declined ones included)."""

    def round_metrics(self) -> dict[str, float]:
        """What ``rounds.jsonl`` records about privacy this round (nothing without DP)."""
        return {}

    def epsilon(self) -> float:
        """Epsilon spent so far (0 without DP)."""
        return 0.0

    def checkpoint_state(self) -> dict[str, Any]:
        """JSON-able accountant state, restored by :meth:`restore` on resume."""
        return {}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Continue the accountant from :meth:`checkpoint_state`."""

    # ----- client side --------------------------------------------------------------------------
    def train(self, store: ClientStore, model: torch.nn.Module, data: Encoded, *, seed: int) -> LocalTraining:
        """Train ``model`` on the client's split (default: plain local training)."""
        loss, _ = train_local(model, data, self.cfg.train, seed=seed)
        return LocalTraining(loss=loss)

    def privatise(self, received: State, reply: State, *, seed: int) -> State:
        """The arrays a client sends, from the ones it trained (default: unchanged)."""
        return reply


def flat_update(received: State, reply: State, keys: Sequence[str]) -> np.ndarray:
    """``reply - received`` (the reply itself where nothing of its shape was received) for ``keys`` in
    order, as one float64 vector: what a client encodes under secure aggregation."""

    def update(key: str) -> torch.Tensor:
        sent = received.get(key)
        return reply[key] - sent if sent is not None and sent.shape == reply[key].shape else reply[key]

    parts = [update(k).double().reshape(-1) for k in keys]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def require_noise(mode: str, options: BudgetOptions) -> None:
    """ConfigError unless the noise is given or can be calibrated from a budget."""
    if options.target_epsilon == 0 and options.noise_multiplier == 0:
        raise ConfigError(
            f"privacy.mode = {mode!r} needs privacy.target_epsilon (to calibrate the noise) "
            "or privacy.noise_multiplier > 0"
        )


def privacy_row(options: BudgetOptions, epsilon: float, noise: float) -> dict[str, float]:
    """The per-round keys every accounted mechanism records (docs/privacy.md)."""
    return {
        "epsilon": epsilon,
        "delta": options.delta,
        "noise_multiplier": noise,
        "clip_norm": options.clip_norm,
    }
