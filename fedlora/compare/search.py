"""Tuning by search: a range per hyper-parameter, searched per cell within a budget (``compare.tune``).

::

    [compare]
    tune = { "train.lr" = { low = 1e-3, high = 3e-1, log = true }, "privacy.clip_norm" = [0.5, 1.0] }
    tune_budget = { trials = 8, minutes = 20, reduction_factor = 3, min_rounds = 1 }
    tune_seeds = [100]                     # the one seed trials run at (default: the first of compare.seeds)

A table ``{ low, high, log = false, integer = false, when = {} }`` is a range (``when``: only in cells
whose config has those values, e.g. ``{ "privacy.mode" = "dp-sgd" }`` for the clipping norm); a list
next to a range is a choice between its values. Each cell gets its own search
(:mod:`fedlora.compare.tuner`): trials drawn quasi-randomly over the ranges (log-uniformly where
``log``), each a run at the tuning seed, stopped early by successive halving on the clients'
validation accuracy of the rounds they have evaluated (rungs are rounds: ``min_rounds`` x
``reduction_factor``^k), at most ``trials`` trials and no new one after ``minutes``. The best finished
trial's values are the cell's choice; a value with no trial beyond it towards the end of its range is
flagged "on the edge: widen the range".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedlora.core.config import ConfigError

RANGE_KEYS = {"low", "high", "log", "integer", "when"}
BUDGET_KEYS = {"trials", "minutes", "reduction_factor", "min_rounds"}


@dataclass(frozen=True)
class Range:
    """A numeric hyper-parameter searched between ``low`` and ``high`` (log-uniformly when ``log``)."""

    key: str
    low: float
    high: float
    log: bool = False
    integer: bool = False
    when: dict[str, Any] = field(default_factory=dict)
    """Only in cells whose config has these values (e.g. ``{ "privacy.mode" = "dp-sgd" }``)."""

    def applies(self, config: dict[str, Any]) -> bool:
        """Whether the cell with this resolved ``config`` (nested dict) searches this range."""
        return all(_lookup(config, key) == value for key, value in self.when.items())

    def text(self) -> str:
        """``[0.001, 0.3] (log)``."""
        return f"[{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "")


@dataclass(frozen=True)
class Choice:
    """A hyper-parameter chosen among listed values."""

    key: str
    values: list[Any]

    def applies(self, config: dict[str, Any]) -> bool:
        """A listed choice applies to every cell."""
        return True

    def text(self) -> str:
        """``{a, b}``."""
        return "{" + ", ".join(map(str, self.values)) + "}"


@dataclass(frozen=True)
class Budget:
    """How much one cell's search may spend, and how hard it stops weak trials."""

    trials: int = 8
    minutes: float | None = None
    reduction_factor: int = 3
    min_rounds: int = 1


@dataclass(frozen=True)
class Search:
    """``compare.tune`` with at least one range: the parameters and the budget of each cell's search."""

    params: list[Range | Choice]
    budget: Budget = field(default_factory=Budget)

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def label(self, values: dict[str, Any]) -> str:
        """``lr=0.0123, clip_norm=1.5`` (3 significant digits; the keys of ``values``, in search order)."""
        return ", ".join(f"{_short(k)}={_show(values[k])}" for k in self.keys if k in values)

    def of(self, config: dict[str, Any]) -> Search:
        """The search of a cell with this resolved ``config``: the parameters that apply to it."""
        return Search([p for p in self.params if p.applies(config)], self.budget)

    def extremes(self) -> list[dict[str, Any]]:
        """Values to check before anything runs: every range at its low end, then at its high end, with
        each listed choice at least once."""
        longest = max([len(p.values) for p in self.params if isinstance(p, Choice)] or [1])
        found = []
        for end in range(max(2, longest)):
            found.append(
                {
                    p.key: (p.high if end % 2 else p.low)
                    if isinstance(p, Range)
                    else p.values[end % len(p.values)]
                    for p in self.params
                }
            )
        return found

    def edges(self, chosen: dict[str, Any], tried: list[dict[str, Any]]) -> list[str]:
        """Ranges where ``chosen`` is the most extreme value ``tried`` towards one end: the best may lie
        beyond, so the report says to widen the range there."""
        flags = []
        for p in self.params:
            if not isinstance(p, Range) or p.key not in chosen:
                continue
            value = chosen[p.key]
            values = [t[p.key] for t in tried if p.key in t]
            if value <= min(values):
                flags.append(f"{p.key} at the low edge of {p.text()}: widen the range below {_show(value)}")
            elif value >= max(values):
                flags.append(f"{p.key} at the high edge of {p.text()}: widen the range above {_show(value)}")
        return flags

    def manifest(self) -> dict[str, Any]:
        """As written in comparison.json."""
        return {
            "params": [
                {"key": p.key, "range": p.text()}
                if isinstance(p, Range)
                else {"key": p.key, "choices": p.values}
                for p in self.params
            ],
            "budget": {k: v for k, v in vars(self.budget).items() if v is not None},
        }


def parse_search(data: dict[str, Any], budget: Any) -> Search | None:
    """``compare.tune`` as a search when any of its values is a range table (None: a list of settings,
    which needs no ``tune_budget``)."""
    if not any(isinstance(v, dict) for v in data.values()):
        if budget is not None:
            raise ConfigError(
                "compare.tune_budget needs a range in compare.tune, e.g. "
                '{ "train.lr" = { low = 1e-3, high = 3e-1, log = true } }'
            )
        return None
    params: list[Range | Choice] = []
    for key, value in data.items():
        if key == "seed":
            raise ConfigError("compare.tune varies 'seed'; list seeds in compare.seeds instead")
        if isinstance(value, dict):
            params.append(_parse_range(key, value))
        elif isinstance(value, list) and value:
            params.append(Choice(key, list(value)))
        else:
            raise ConfigError(
                f"compare.tune.{key} = {value!r} is invalid: expected a range {{ low = .., high = .., "
                "log = true }} or a non-empty list of values"
            )
    return Search(params, _parse_budget(budget))


def _parse_range(key: str, data: dict[str, Any]) -> Range:
    where = f"compare.tune.{key}"
    for name in data:
        if name not in RANGE_KEYS:
            raise ConfigError(f"unknown key '{where}.{name}'; valid keys: {', '.join(sorted(RANGE_KEYS))}")
    low, high = data.get("low"), data.get("high")
    log, integer = data.get("log", False), data.get("integer", False)
    if not (_is_number(low) and _is_number(high)) or not low < high:  # type: ignore[operator]
        raise ConfigError(f"{where} = {data!r} is invalid: expected numbers low < high")
    if not isinstance(log, bool) or not isinstance(integer, bool):
        raise ConfigError(f"{where}: log and integer are true or false")
    if log and low <= 0:  # type: ignore[operator]
        raise ConfigError(f"{where}.low = {low!r} is invalid with log = true: expected a number > 0")
    if integer and not (float(low).is_integer() and float(high).is_integer()):  # type: ignore[arg-type]
        raise ConfigError(f"{where}: integer = true needs whole numbers for low and high")
    when = data.get("when", {})
    if not isinstance(when, dict) or not all(isinstance(v, (str, int, float, bool)) for v in when.values()):
        raise ConfigError(
            f"{where}.when = {when!r} is invalid: expected a table of config keys and values, "
            'e.g. { "privacy.mode" = "dp-sgd" }'
        )
    return Range(key, float(low), float(high), log, integer, dict(when))  # type: ignore[arg-type]


def _parse_budget(data: Any) -> Budget:
    if data is None:
        return Budget()
    if not isinstance(data, dict):
        raise ConfigError(
            f"compare.tune_budget = {data!r} is invalid: expected a table, e.g. {{ trials = 8 }}"
        )
    for name in data:
        if name not in BUDGET_KEYS:
            raise ConfigError(
                f"unknown key 'compare.tune_budget.{name}'; valid keys: {', '.join(sorted(BUDGET_KEYS))}"
            )
    budget = Budget(**data)
    checks = [
        ("trials", _is_int(budget.trials) and budget.trials >= 1, "an integer >= 1"),
        (
            "reduction_factor",
            _is_int(budget.reduction_factor) and budget.reduction_factor >= 2,
            "an integer >= 2",
        ),
        ("min_rounds", _is_int(budget.min_rounds) and budget.min_rounds >= 1, "an integer >= 1"),
        (
            "minutes",
            budget.minutes is None or (_is_number(budget.minutes) and budget.minutes > 0),
            "minutes > 0",
        ),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"compare.tune_budget.{name} = {data[name]!r} is invalid: expected {expected}")
    return budget


def _lookup(config: dict[str, Any], key: str) -> Any:
    """The value of a dotted ``key`` in a nested config dict (None when absent)."""
    found: Any = config
    for part in key.split("."):
        found = found.get(part) if isinstance(found, dict) else None
    return found


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _show(value: Any) -> str:
    """Numbers with 3 significant digits, other values as they are."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.3g}"
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
