"""Strategies chosen by name: every module in the ``strategies`` package is imported once and each
class decorated with :func:`register` becomes selectable as ``strategy.name``; nothing else lists them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import strategies
from fedlora.core.config import AUTO, ConfigError, ExperimentConfig
from fedlora.core.typed_toml import coerce
from fedlora.privacy.mechanisms import registry as mechanisms

if TYPE_CHECKING:
    from strategies.base import LoraStrategy

S = TypeVar("S", bound="type[LoraStrategy]")

_REGISTRY: dict[str, type[LoraStrategy]] = {}
_discovered = False


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make a strategy selectable as ``strategy.name = name``."""

    def wrap(cls: S) -> S:
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"strategy '{name}' is registered twice ({known.__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    """Import every module of the ``strategies`` package (once), so their decorators run."""
    global _discovered
    if _discovered:
        return

    for module in pkgutil.iter_modules(strategies.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"strategies.{module.name}")
    _discovered = True


def available() -> dict[str, type[LoraStrategy]]:
    """All registered strategies by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[LoraStrategy]:
    """The strategy class registered as ``name``; unknown names list the valid ones."""
    known = available()
    if name not in known:
        raise ConfigError(f"strategy.name = {name!r} is unknown; valid strategies: {', '.join(known)}")
    return known[name]


def validate_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check ``strategy.options`` against the strategy's Options dataclass; returns them with defaults."""
    cls = get(name)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ConfigError(
            f"strategy.options.{unknown[0]} is unknown for strategy '{name}'; valid options: {valid}"
        )
    try:
        built = coerce(cls.Options, options, "strategy.options")
    except TypeError as exc:  # pragma: no cover - programming error in an Options class
        raise ConfigError(str(exc)) from None
    return dataclasses.asdict(built)


def linear_strategies() -> list[str]:
    """Strategies whose aggregate is a (weighted) sum of the arrays that travel, array by array."""
    return [name for name, cls in available().items() if cls.linear_aggregate]


def privacy_modes(name: str) -> list[str]:
    """The registered ``privacy.mode`` values strategy ``name`` can run under."""
    linear = get(name).linear_aggregate
    return [m for m, cls in mechanisms.available().items() if linear or not cls.requires_linear_aggregate]


def dp_modes(name: str) -> list[str]:
    """The modes giving differential privacy that strategy ``name`` can run under."""
    private = mechanisms.private_modes()
    return [m for m in privacy_modes(name) if m in private]


def resolve_evaluation(cfg: ExperimentConfig) -> None:
    """``federation.fraction_evaluate = -1`` (the default) becomes the strategy's choice: every client
    evaluates every evaluated round when the strategy keeps state on its clients (its model is then the
    client's own: judged by personalised accuracy), none otherwise; none without validation splits."""
    fed = cfg.federation
    if fed.fraction_evaluate != AUTO:
        return
    personal = get(cfg.strategy.name).keeps_client_state and cfg.data.val_fraction > 0
    fed.fraction_evaluate = 1.0 if personal else 0.0


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check the privacy settings (:func:`fedlora.privacy.mechanisms.registry.validate`), the strategy's
    name, its options (filled with defaults), its own rules (:meth:`strategies.base.LoraStrategy.check`)
    and whether the privacy mode can protect it."""
    mechanisms.validate(cfg)
    cfg.strategy.options = validate_options(cfg.strategy.name, cfg.strategy.options)
    resolve_evaluation(cfg)
    cls = get(cfg.strategy.name)
    if cfg.secure_aggregation.enabled and not cls.linear_aggregate:
        raise ConfigError(
            f"strategy '{cfg.strategy.name}' cannot run under secure aggregation: {cls.nonlinear_reason}, "
            f"and the server only learns the sum; use {', '.join(linear_strategies())} or set "
            "secure_aggregation.enabled = false"
        )
    cls.check(cfg)
    if cfg.privacy.mode not in privacy_modes(cfg.strategy.name):
        others = dp_modes(cfg.strategy.name)
        raise ConfigError(
            f"privacy.mode = {cfg.privacy.mode!r} cannot protect strategy '{cfg.strategy.name}': it combines "
            "each client's own factors, which the noise on the sum does not cover; use a strategy with a "
            f"linear aggregate ({', '.join(linear_strategies())})"
            + (f" or privacy.mode = {' or '.join(repr(m) for m in others)}" if others else "")
        )
    check_error_feedback(cfg)
    return cfg


def check_error_feedback(cfg: ExperimentConfig) -> None:
    """Error feedback only for strategies whose aggregate is a weighted sum of what travels: there, what
    the codec lost in one round arrives in a later one and the sums add up; a strategy that multiplies
    or stacks each client's factors would meet a residual beside factors it does not belong to."""
    if cfg.compression.error_feedback and not get(cfg.strategy.name).linear_aggregate:
        raise ConfigError(
            f"compression.error_feedback = true cannot be used with strategy '{cfg.strategy.name}': it "
            "combines each client's own factors, so a residual delivered later would meet other factors; "
            f"use a strategy with a linear aggregate ({', '.join(linear_strategies())}) or set it to false"
        )
