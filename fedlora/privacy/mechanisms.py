"""Differential-privacy mechanisms: one class per ``privacy.mode``, with a server side and a client side.

The round loop and the ClientApp call the same hooks whatever the mode; a mechanism overrides only
the hooks it changes. :class:`NoPrivacy` is the identity: uniform sampling, example-weighted means,
plain local training, replies as trained.

* ``dp-sgd`` (:class:`DpSgd`): clients train with DP-SGD (Opacus) and keep their accountant in their
  node store; a client whose budget this round would exceed declines. The server keeps each client's
  latest epsilon and reports the maximum (the guarantee is per client).
* ``dp-updates`` (:class:`DpUpdates`): clients are Poisson-sampled with rate q = m / N, every reply
  weighs the same, and the strategy's linear aggregate is applied to the noised mean of the clipped
  updates (:func:`fedlora.privacy.dp_updates.private_mean`); one RDP step of the subsampled Gaussian
  mechanism per round. With ``placement = "client"`` each client clips its own update and adds its
  share of the noise.

A new mode is a subclass registered with :func:`register` (and its name added to
``fedlora.core.config.PRIVACY_MODES``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from fedlora.core.config import ExperimentConfig
from fedlora.core.model.arrays import State
from fedlora.core.protocol import keys as protocol
from fedlora.core.records.store import ClientStore
from fedlora.core.training.loops import Encoded, train_local
from fedlora.privacy import accounting
from fedlora.privacy import settings as calibration
from fedlora.privacy.dp_updates import client_share, private_mean

M = TypeVar("M", bound="type[Mechanism]")
_MECHANISMS: dict[str, type[Mechanism]] = {}


def register(mode: str) -> Callable[[M], M]:
    """Class decorator: the mechanism used when ``privacy.mode = mode``."""

    def wrap(cls: M) -> M:
        cls.mode = mode
        _MECHANISMS[mode] = cls
        return cls

    return wrap


def mechanisms() -> dict[str, type[Mechanism]]:
    """Every registered mechanism by mode name."""
    return dict(_MECHANISMS)


def mechanism_class(mode: str) -> type[Mechanism]:
    """The mechanism class of ``privacy.mode`` (the config has already checked the name)."""
    return _MECHANISMS[mode]


def mechanism_for(cfg: ExperimentConfig) -> Mechanism:
    """A fresh mechanism for this run's privacy settings (one per server, one per client message)."""
    return _MECHANISMS[cfg.privacy.mode](cfg)


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
    requires_linear_aggregate: ClassVar[bool] = False
    """True when the mechanism only protects strategies whose aggregate is linear in what travels."""
    aggregates_without_replies: ClassVar[bool] = False
    """True when a round with no trained reply still releases an aggregate (the noise alone)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

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


@register("none")
class NoPrivacy(Mechanism):
    """No differential privacy."""


def _privacy_row(cfg: ExperimentConfig, epsilon: float, noise: float) -> dict[str, float]:
    p = cfg.privacy
    return {"epsilon": epsilon, "delta": p.delta, "noise_multiplier": noise, "clip_norm": p.clip_norm}


@register("dp-sgd")
class DpSgd(Mechanism):
    """DP-SGD inside every client; the server reports the largest epsilon any client has spent."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.client_epsilon: dict[int, float] = {}
        self._round_noise: list[float] = []
        self._declined = 0

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
        return {"num_declined": float(self._declined), **_privacy_row(self.cfg, self.epsilon(), noise)}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"client_epsilon": {str(k): v for k, v in self.client_epsilon.items()}}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.client_epsilon = {int(k): float(v) for k, v in saved["client_epsilon"].items()}

    def train(self, store: ClientStore, model: torch.nn.Module, data: Encoded, *, seed: int) -> LocalTraining:
        """Train with DP-SGD unless this round would exceed the budget; the accountant lives in ``store``."""
        from fedlora.privacy.dp_sgd import train_private  # Opacus: imported only by DP-SGD clients

        p = self.cfg.privacy
        noise, rate, steps = calibration.dp_sgd_plan(self.cfg, len(data))
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
        done = train_private(model, data, self.cfg.train, p, noise_multiplier=noise, seed=seed)
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


@register("dp-updates")
class DpUpdates(Mechanism):
    """User-level DP: Poisson sampling of clients, clipped updates, Gaussian noise on their mean."""

    requires_linear_aggregate = True
    aggregates_without_replies = True

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.rounds_noised = 0
        self._round_info: dict[str, float] = {}

    def sample(self, partitions: Sequence[int], want: int, rng: random.Random) -> list[int]:
        """Each partition independently with probability q = m / N (the accountant's assumption)."""
        rate = calibration.client_rate(self.cfg)
        return [pid for pid in partitions if rng.random() < rate]

    def most_sampled(self, population: int, want: int) -> int:
        """A round's Poisson sample is Binomial(N, q): its mean plus 6 standard deviations (a round
        exceeds it with probability below 1e-8), at most N."""
        rate = calibration.client_rate(self.cfg)
        mean = population * rate
        return min(population, math.ceil(mean + 6 * math.sqrt(mean * (1 - rate))))

    def weights(self, counts: Sequence[float]) -> list[float]:
        """Equal weights: the sum's sensitivity to one client is then the clip norm C."""
        return [1.0 / len(counts)] * len(counts) if counts else []

    def release(
        self, sent: State, updates: Sequence[State], weights: Sequence[float], server_round: int
    ) -> tuple[list[State], list[float]]:
        """The noised mean of the clients' clipped updates, applied to ``sent``, as one state."""
        p = self.cfg.privacy
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + server_round)
        mean, info = private_mean(
            sent,
            updates,
            clip_norm=p.clip_norm,
            noise_multiplier=calibration.update_noise(self.cfg),
            expected_clients=calibration.expected_clients(self.cfg),
            placement=p.placement,
            generator=generator,
        )
        self.rounds_noised += 1
        self._round_info = info
        return [mean], [1.0]

    def epsilon(self) -> float:
        p = self.cfg.privacy
        history = calibration.update_history(self.cfg, self.rounds_noised)
        return accounting.epsilon(history, p.delta, p.accountant)

    def round_metrics(self) -> dict[str, float]:
        noise = calibration.update_noise(self.cfg)
        return {**_privacy_row(self.cfg, self.epsilon(), noise), **self._round_info}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"rounds_noised": self.rounds_noised}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.rounds_noised = int(saved["rounds_noised"])

    def privatise(self, received: State, reply: State, *, seed: int) -> State:
        """Client placement: received + the clipped update + this client's share of the noise."""
        if self.cfg.privacy.placement != "client":
            return reply
        shared, _ = client_share(
            {k: received[k] for k in reply},
            reply,
            clip_norm=self.cfg.privacy.clip_norm,
            noise_multiplier=calibration.update_noise(self.cfg),
            expected_clients=calibration.expected_clients(self.cfg),
            generator=torch.Generator().manual_seed(seed),
        )
        return shared
