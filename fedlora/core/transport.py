"""How updates travel: the ``[compression]`` codecs and ``[secure_aggregation]`` (SecAgg+) sections of an
experiment, and the checks that tie them to the rest of it (:mod:`fedlora.core.config` holds them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.core.errors import ConfigError
from fedlora.core.typed_toml import check as _check
from fedlora.core.typed_toml import help_field as _help

CODECS = ("none", "fp16", "bf16", "int8")


@dataclass
class CompressionConfig:
    """Lossy codecs for the arrays that travel (``[compression]``, :mod:`fedlora.core.model.codecs`)."""

    uplink: str = _help(
        "codec of the clients' updates (reply minus what was received): none, fp16, bf16 or int8 "
        "(per-row scales)",
        "none",
    )
    downlink: str = _help(
        "codec of the arrays the server sends (adapter, head, full base offsets): none, fp16, bf16 or int8",
        "none",
    )
    error_feedback: bool = _help(
        "each client keeps what the uplink codec lost and adds it to its next update (linear strategies)",
        False,
    )

    def __post_init__(self) -> None:
        for key in ("uplink", "downlink"):
            value = getattr(self, key)
            _check(value in CODECS, f"compression.{key}", value, f"one of {', '.join(CODECS)}")
        if self.error_feedback and self.uplink == "none":
            raise ConfigError(
                "compression.error_feedback = true needs compression.uplink = fp16, bf16 or int8 "
                "(with none nothing is lost to feed back)"
            )

    @property
    def active(self) -> bool:
        """Whether any array travels compressed."""
        return self.uplink != "none" or self.downlink != "none"


@dataclass
class SecureAggregationConfig:
    """SecAgg+ (Bell et al., CCS 2020): clients mask their updates so that the server decodes only their
    sum (docs/privacy.md). Defaults are those of Flower's ``SecAggPlusWorkflow`` where it has one."""

    enabled: bool = _help("mask every client's update; the server learns only the round's sum", False)
    num_shares: float = _help(
        "clients holding shares of each client's secrets, itself included: 0 = SecAgg+'s logarithmic "
        "degree 2*ceil(log2 m)+1, a fraction (<= 1) of the m sampled clients, or a count (>= 3); Flower's "
        "workflow takes the same forms and has no default",
        0.0,
    )
    reconstruction_threshold: float = _help(
        "shares that rebuild a secret: a fraction (<= 1) of num_shares or a count (>= 2); above one half, "
        "no minority of a client's neighbours can unmask it; n - t dropouts per neighbourhood are survived",
        0.6,
    )
    clipping_range: float = _help(
        "coordinates of a weighted update are clipped to [-c, c] (Flower: 8.0)", 8.0
    )
    quantization_bits: int = _help("2**bits quantisation levels over [-c, c] (Flower: 2**22)", 22)
    modulus_bits: int = _help("masks and sums are taken modulo 2**bits (Flower: 2**32)", 32)
    max_weight: float = _help(
        "the weight (num-examples) a client's update is scaled by is sent as weight / max_weight, "
        "quantised (Flower: 1000.0)",
        1000.0,
    )

    def __post_init__(self) -> None:
        _check(
            self.num_shares == 0 or 0 < self.num_shares <= 1 or self.num_shares >= 3,
            "secure_aggregation.num_shares",
            self.num_shares,
            "0 (logarithmic), a fraction in (0, 1] or a count >= 3",
        )
        t = self.reconstruction_threshold
        _check(
            0 < t <= 1 or (t >= 2 and t == int(t)),
            "secure_aggregation.reconstruction_threshold",
            t,
            "a fraction in (0, 1] or a whole count >= 2",
        )
        key = "secure_aggregation."
        _check(self.clipping_range > 0, key + "clipping_range", self.clipping_range, "a number > 0")
        _check(
            2 <= self.quantization_bits <= 30, key + "quantization_bits", self.quantization_bits, "2 to 30"
        )
        _check(
            self.quantization_bits < self.modulus_bits <= 62,
            key + "modulus_bits",
            self.modulus_bits,
            f"more than quantization_bits ({self.quantization_bits}) and at most 62",
        )
        _check(self.max_weight > 0, key + "max_weight", self.max_weight, "a number > 0")


def check_compression(config: Any) -> None:  # an ExperimentConfig (it holds this module's sections)
    """Compression and secure aggregation exclude each other: secure aggregation quantises what it masks
    itself, into its own integer field. Reads the ``[secure_aggregation]`` table's ``enabled`` switch
    wherever that table exists."""
    secure = getattr(config, "secure_aggregation", None)
    if config.compression.active and bool(getattr(secure, "enabled", False)):
        raise ConfigError(
            "[compression] cannot be combined with secure aggregation (it quantises the masked updates "
            "itself); set compression.uplink and compression.downlink to none"
        )


def check_secure(config: Any) -> None:  # an ExperimentConfig (it holds this module's sections)
    """Secure aggregation needs two clients a round, no per-update check, and a field that holds the sum."""
    sa, fed = config.secure_aggregation, config.federation
    if not sa.enabled:
        return
    if config.schedule.mode != "sync":
        raise ConfigError(
            f"secure_aggregation.enabled needs schedule.mode = 'sync' (it is {config.schedule.mode!r}): "
            "its masks cancel only over one synchronous round's clients"
        )
    if fed.min_clients < 2:
        raise ConfigError(
            "secure_aggregation.enabled needs federation.min_clients >= 2: a sum of one update is the update"
        )
    if config.robustness.max_update_norm > 0:
        raise ConfigError(
            "robustness.max_update_norm cannot be checked under secure aggregation (the server never sees "
            "one update); set it to 0 (secure_aggregation.clipping_range bounds each coordinate instead)"
        )
    m = fed.clients_per_round()
    if m * 2**sa.quantization_bits >= 2**sa.modulus_bits:
        raise ConfigError(
            f"secure_aggregation.modulus_bits = {sa.modulus_bits} is too small: {m} clients' sums of "
            f"2**{sa.quantization_bits} levels wrap around; use modulus_bits >= "
            f"{sa.quantization_bits + m.bit_length()} or fewer quantization_bits"
        )
