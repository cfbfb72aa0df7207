"""Tuning settings and level labels shared by grids and searches: a listed setting of ``compare.tune``,
the TOML text of a value, labels and directory names."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from fedlora.core.config import ConfigError


@dataclass(frozen=True)
class Setting:
    """One combination of the tuned keys' values (``compare.tune``), e.g. ``lr=0.001``."""

    label: str
    overrides: list[str]
    folder: bool = True
    """Whether its runs have a folder of their own (a listed setting); a searched choice has none: only the
    chosen values' runs exist at the comparison's seeds."""

    @property
    def slug(self) -> str:
        """Directory-safe name, e.g. ``lr-0.001``."""
        return slug_of(self.label)


def parse_search_seed(data: Any) -> list[int]:
    """A search's ``compare.tune_seeds``: exactly one seed (any: one outside compare.seeds keeps the choice
    apart from the seeds it is compared on)."""
    if not isinstance(data, list) or len(data) != 1 or not _is_int(data[0]):
        raise ConfigError(
            f"compare.tune_seeds = {data!r} is invalid with a range in compare.tune: expected one seed, "
            "e.g. [100] (trials run at it)"
        )
    return list(data)


def parse_tune_seeds(data: Any, seeds: list[int], settings: list[Setting]) -> list[int]:
    """``compare.tune_seeds``: a non-empty subset of ``compare.seeds``, only with ``compare.tune``."""
    if data == []:
        return []
    if not settings:
        raise ConfigError("compare.tune_seeds needs compare.tune (the settings to choose between); add it")
    if not isinstance(data, list) or not all(_is_int(s) for s in data) or len(set(data)) != len(data):
        raise ConfigError(f"compare.tune_seeds = {data!r} is invalid: expected a list of distinct seeds")
    if missing := [s for s in data if s not in seeds]:
        raise ConfigError(
            f"compare.tune_seeds lists {missing}, not in compare.seeds {seeds}; "
            "tune on seeds that are compared"
        )
    return list(data)


def parse_tune(data: Any) -> list[Setting]:
    """``compare.tune``: a table of config key -> list of values; the settings are their product."""
    if not isinstance(data, dict):
        raise ConfigError(
            f'compare.tune = {data!r} is invalid: expected a table, e.g. {{ "train.lr" = [1e-4, 1e-3] }}'
        )
    per_key = []
    for key, values in data.items():
        if key == "seed":
            raise ConfigError("compare.tune varies 'seed'; list seeds in compare.seeds instead")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"compare.tune.{key} = {values!r} is invalid: expected a non-empty list of values"
            )
        labels = [level_label(axis_name(key), v) for v in values]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"compare.tune.{key} repeats a value; list each once")
        per_key.append([(label, f"{key}={toml_literal(v)}") for label, v in zip(labels, values, strict=True)])
    settings = (
        [
            Setting(", ".join(label for label, _ in combo), [o for _, o in combo])
            for combo in itertools.product(*per_key)
        ]
        if per_key
        else []
    )
    if len({s.slug for s in settings}) != len(settings):
        raise ConfigError(
            "compare.tune: two settings map to the same directory name; use more distinct values"
        )
    return settings


def toml_literal(value: Any) -> str:
    """A value as it would be written in TOML (what ``--set key=VALUE`` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise ConfigError(f"grid value {value!r} is not supported: use a string, number, boolean or list")


FOLDER_KEYS = {"model.path": "model"}
"""Keys whose values are folders: the axis takes the section's name, a level the folder's name."""


def level_label(axis: str, value: Any, key: str = "") -> str:
    """Strings label themselves (``fedit``); a folder its name (``model.path``: ``/models/tiny-bert`` ->
    ``tiny-bert``); other values carry the axis name (``alpha=0.1``)."""
    if isinstance(value, str) and key in FOLDER_KEYS:
        return PurePath(value.rstrip("/")).name or value
    if isinstance(value, str):
        return value
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value).lower()
    return f"{axis}={text}"


def axis_name(key: str) -> str:
    """``strategy.name`` -> ``strategy``; ``model.path`` -> ``model``; ``data.alpha`` -> ``alpha``."""
    if key in FOLDER_KEYS:
        return FOLDER_KEYS[key]
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def slug_of(text: str) -> str:
    for greek, latin in (("ε", "eps"), ("δ", "delta"), ("α", "alpha"), ("σ", "sigma")):
        text = text.replace(greek, latin)
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
