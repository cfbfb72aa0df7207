"""``privacy.mode = "ddp"``: distributed DP under secure aggregation, noise added by the clients in the
integer domain (the Skellam mechanism, :mod:`fedlora.privacy.skellam`), so that no one, the server
included, sees an update or a sum without the full noise.

Each of the m clients of a round clips its update of the arrays that travel to ``clip_norm``, encodes it
at an integer scale and adds its Skellam share; SecAgg+ gives the server only the sum, which it decodes
and divides by m (a fixed divisor: the sum's sensitivity stays one clipped update). Dropouts: a client
whose vector never arrives takes its share with it. The server does not top the noise up (it would have
to be trusted to do so); each round is accounted with the noise that arrived, r of m shares, exactly
(Skellam sums are Skellam), so a round with dropouts spends more epsilon, as ``rounds.jsonl`` shows.
No amplification by subsampling is claimed: the server, which this mode does not trust, picks the clients.

Options of its own, in ``[privacy.options]``: ``wrap_bound``, the largest probability per round that a
coordinate of the sum wraps around the modulus (the integer scale is chosen to keep it there).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model.arrays import State
from fedlora.privacy import accounting, skellam
from fedlora.privacy.mechanisms.base import (
    BudgetOptions,
    Mechanism,
    check_delta,
    privacy_row,
    require,
    require_noise,
)
from fedlora.privacy.mechanisms.registry import register


@dataclass(frozen=True)
class DdpOptions(BudgetOptions):
    """ddp's keys: the budget (clip_norm bounds each client's update), and ``[privacy.options]``
    wrap_bound (default 1e-9)."""

    wrap_bound: float = 1e-9

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.wrap_bound < 1, "options.wrap_bound", self.wrap_bound, "a probability in (0, 1)")
        require(self.accountant == "rdp", "accountant", self.accountant, "'rdp' (Skellam's RDP bound)")


def noise_multiplier(cfg: ExperimentConfig) -> float:
    """sigma of the full sum (all m shares) over its L2 sensitivity: given, or calibrated so that the
    planned rounds spend target_epsilon (Gaussian part, no subsampling; Skellam's excess is accounted
    but is negligible at these scales)."""
    p = cfg.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    return accounting.calibrate(p.target_epsilon, p.delta, 1.0, cfg.federation.rounds, "rdp")


@register("ddp")
class DistributedDp(Mechanism):
    """Clients clip and add Skellam noise shares to integers; SecAgg+ sums them; RDP of what arrived."""

    Options = DdpOptions
    private = True
    requires_linear_aggregate = True
    options: DdpOptions

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.history: list[skellam.Entry] = []
        self._round: dict[str, float] = {}

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """A budget or a noise multiplier, and secure aggregation (without it each share is seen alone)."""
        require_noise(cls.mode, cls.read_options(cfg.privacy))
        if not cfg.secure_aggregation.enabled:
            raise ConfigError(
                "privacy.mode = 'ddp' needs secure_aggregation.enabled = true: without it the server sees "
                "each client's update with a small share of the noise"
            )

    def preflight(self, client_sizes: Sequence[int]) -> None:
        """delta below 1 / N clients."""
        check_delta(self.options.delta, self.cfg.federation.num_clients, "clients")

    # ----- both sides ------------------------------------------------------------------------------------
    def clients(self) -> int:
        """m, the clients sampled per round (the shares that make the full noise)."""
        return self.cfg.federation.clients_per_round()

    def secure_codec(self, length: int) -> skellam.SkellamCodec:
        """The Skellam codec for an update of ``length`` values (both sides derive the same scale)."""
        sigma, m = noise_multiplier(self.cfg), self.clients()
        modulus = 2**self.cfg.secure_aggregation.modulus_bits
        scale = skellam.choose_scale(m, sigma, modulus, length, self.options.wrap_bound)
        mu = skellam.share_mu(sigma, scale, length, m)
        return skellam.SkellamCodec(self.options.clip_norm, scale, mu, modulus)

    def client_weight(self, num_examples: int) -> float:
        """Every client weighs the same (the sum's sensitivity is one clipped update)."""
        return 1.0

    def weights(self, counts: Sequence[float]) -> list[float]:
        """Equal weights (for the train loss the clients report)."""
        return [1.0 / len(counts)] * len(counts) if counts else []

    # ----- server side -----------------------------------------------------------------------------------
    def release_sum(
        self, sent: State, summed: State, weight: float, arrived: int, server_round: int
    ) -> tuple[list[State], list[float]]:
        """sent + noisy sum / m, and the round's accounting entry from the ``arrived`` shares."""
        length = sum(v.numel() for v in summed.values())
        codec = self.secure_codec(length)
        l2, l1 = skellam.sensitivities(codec.scale, length)
        m = self.clients()
        self.history.append((l2, l1, arrived * codec.mu))
        modulus, sigma = codec.modulus, noise_multiplier(self.cfg)
        self._round = {
            "ddp_arrived": float(arrived),
            "ddp_scale": float(codec.scale),
            "ddp_mu": arrived * codec.mu,
            "ddp_l2_sensitivity": l2,
            "ddp_l1_sensitivity": l1,
            "ddp_wrap_bound": skellam.wrap_bound(codec.scale, m, sigma, modulus, length),
        }
        return [{k: sent[k] + summed[k] / m for k in summed}], [1.0]

    def epsilon(self) -> float:
        return skellam.epsilon(self.history, self.options.delta)

    def round_metrics(self) -> dict[str, float]:
        """The budget keys (noise_multiplier: the effective sigma of the noise that arrived this round)."""
        row, self._round = self._round, {}
        if not row:  # abandoned: no noise arrived, nothing was released
            return {
                **privacy_row(self.options, self.epsilon(), noise_multiplier(self.cfg)),
                "ddp_arrived": 0.0,
            }
        sigma = (2 * row["ddp_mu"]) ** 0.5 / row["ddp_l2_sensitivity"]
        return {**privacy_row(self.options, self.epsilon(), sigma), **row}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"history": [list(entry) for entry in self.history]}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.history = [(float(a), float(b), float(c)) for a, b, c in saved["history"]]
