"""Tasks chosen by name: every module in the ``fedlora.tasks`` package is imported once and each class
decorated with :func:`register` becomes selectable as ``task``; nothing else lists them."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import fedlora.tasks
from fedlora.core.config import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    from fedlora.tasks.base import Task

T = TypeVar("T", bound="type[Task]")

_REGISTRY: dict[str, type[Task]] = {}
_discovered = False


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a task selectable as ``task = name``."""

    def wrap(cls: T) -> T:
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"task '{name}' is registered twice ({known.__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _discover() -> None:
    """Import every module of the ``fedlora.tasks`` package (once), so their decorators run."""
    global _discovered
    if _discovered:
        return
    for module in pkgutil.iter_modules(fedlora.tasks.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"fedlora.tasks.{module.name}")
    _discovered = True


def available() -> dict[str, type[Task]]:
    """All registered tasks by name."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Task]:
    """The task class registered as ``name``; an unknown name lists the valid ones (one line)."""
    known = available()
    if name not in known:
        raise ConfigError(f"task = {name!r} is unknown; valid tasks: {', '.join(known)}")
    return known[name]


def task_of(cfg: ExperimentConfig) -> Task:
    """The experiment's task, bound to ``cfg``."""
    return get(cfg.task)(cfg)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check ``task`` against the registry and the experiment against the task's own rules."""
    task_of(cfg).check_config()
    return cfg
