"""Strategies chosen by name: a registry filled at import, with typed per-strategy options."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from strategies.base import LoraStrategy

S = TypeVar("S", bound="type[LoraStrategy]")

_REGISTRY: dict[str, type[LoraStrategy]] = {}


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make a strategy selectable as ``strategy.name = name``."""

    def wrap(cls: S) -> S:
        if name in _REGISTRY:
            raise ValueError(f"strategy '{name}' is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    import strategies.fedex_lora
    import strategies.fedit
    import strategies.fedsa_lora
    import strategies.ffa_lora
    import strategies.flora
    import strategies.lora_fair  # noqa: F401


def available() -> dict[str, type[LoraStrategy]]:
    """All registered strategies by name."""
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[LoraStrategy]:
    """The strategy class registered as ``name``; unknown names list the valid ones."""
    from fedlora.core.config import ConfigError

    known = available()
    if name not in known:
        raise ConfigError(f"strategy.name = {name!r} is unknown; valid strategies: {', '.join(known)}")
    return known[name]


def validate_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check ``strategy.options`` against the strategy's Options dataclass; returns them with defaults."""
    from fedlora.core.config import ConfigError, coerce

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
