"""Privacy mechanisms chosen by name: every module of the ``fedlora.privacy.mechanisms`` package is
imported once and each class decorated with :func:`register` becomes selectable as ``privacy.mode``;
nothing else lists them.

:func:`validate` is the experiment loader's privacy check: the mode is a registered one, every
``[privacy]`` key that is set is read (or knowingly ignored) by that mechanism, its options are valid,
and its own checks pass.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from fedlora.core.config import ConfigError, ExperimentConfig, PrivacyConfig
from fedlora.privacy.mechanisms.base import Mechanism

M = TypeVar("M", bound="type[Mechanism]")

_REGISTRY: dict[str, type[Mechanism]] = {}
_discovered = False


def register(mode: str) -> Callable[[M], M]:
    """Class decorator: the mechanism used when ``privacy.mode = mode``."""

    def wrap(cls: M) -> M:
        known = _REGISTRY.get(mode)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"privacy mode '{mode}' is registered twice ({known.__module__}, {cls.__module__})"
            )
        cls.mode = mode
        _REGISTRY[mode] = cls
        return cls

    return wrap


def _discover() -> None:
    """Import every module of the mechanisms package (once), so their decorators run."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(__package__ or "fedlora.privacy.mechanisms")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _discovered = True


def available() -> dict[str, type[Mechanism]]:
    """Every registered mechanism by mode name, sorted."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get(mode: str) -> type[Mechanism]:
    """The mechanism class of ``privacy.mode``; an unknown mode lists the registered ones."""
    known = available()
    if mode not in known:
        raise ConfigError(f"privacy.mode = {mode!r} is invalid: expected one of {', '.join(known)}")
    return known[mode]


def mechanism_for(cfg: ExperimentConfig) -> Mechanism:
    """A fresh mechanism for this run's privacy settings (one per server, one per client message)."""
    return get(cfg.privacy.mode)(cfg)


def private_modes() -> list[str]:
    """The modes that give (epsilon, delta)-DP."""
    return [mode for mode, cls in available().items() if cls.private]


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """The privacy part of loading an experiment: a registered mode, no key of another mode, the
    mechanism's options and its checks. ConfigError with one line otherwise."""
    cls = get(cfg.privacy.mode)
    refuse_foreign_keys(cls, cfg.privacy)
    cls.read_options(cfg.privacy)
    cls.check(cfg)
    return cfg


def refuse_foreign_keys(cls: type[Mechanism], privacy: PrivacyConfig) -> None:
    """ConfigError for a ``[privacy]`` key set away from its default that ``cls`` neither reads nor
    ignores, naming the modes that read it."""
    own = {f.name for f in dataclasses.fields(cls.Options)} | cls.ignores | {"mode", "options"}
    for key, default in _defaults().items():
        value = getattr(privacy, key)
        if key in own or value == default:
            continue
        users = [mode for mode, other in available().items() if key in _option_names(other)]
        if not users:
            raise ConfigError(
                f"privacy.{key} = {value!r} is read by no privacy mode (mode is {cls.mode!r}); remove it"
            )
        raise ConfigError(
            f"privacy.{key} = {value!r} only applies to privacy.mode = "
            f"{' or '.join(repr(m) for m in users)} (mode is {cls.mode!r}); remove privacy.{key} or set "
            f"privacy.mode = {users[0]!r}"
        )


def _defaults() -> dict[str, Any]:
    """Every ``[privacy]`` key with its default."""
    return {f.name: getattr(PrivacyConfig(), f.name) for f in dataclasses.fields(PrivacyConfig)}


def _option_names(cls: type[Mechanism]) -> set[str]:
    """The ``[privacy]`` keys ``cls`` reads (its options' fields)."""
    return {f.name for f in dataclasses.fields(cls.Options)}
