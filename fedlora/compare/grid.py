"""Comparison grids: a base experiment, the axes to vary, and the seeds.

A grid file has one ``[compare]`` table::

    [compare]
    name = "compare-strategies"          # default output directory: runs/<name>
    experiment = "quickstart.toml"       # base experiment, relative to the grid file
    seeds = [0, 1, 2]                    # every cell runs once per seed
    target_accuracy = 0.6                # for "rounds to target" (a fraction, 0-1)
    baseline = "fedit"                   # the cell every other is compared with, seed by seed; or
                                         # { strategy = "fedit" }: each cell against FedIT at its own
                                         # levels of the other axes; or a list of these (one table each)
    set = ["federation.rounds=6"]        # overrides applied to every cell
    tune = { "train.lr" = [1e-4, 1e-3] } # optional: every cell runs each setting, chosen on validation
    tune_seeds = [0]                     # optional: tune on these seeds only; the rest run the chosen one
                                         # (or ranges, searched per cell: fedlora.compare.search)
    stop = { max_seeds = 10, smallest_effect = 0.01 }  # optional: seeds until clear (compare.seeds)

    [[compare.axes]]                     # one config key, one level per value
    key = "strategy.name"
    values = ["fedit", "ffa-lora"]

    [[compare.axes]]                     # named levels, each a list of overrides
    name = "privacy"
    levels = { "no DP" = [], "eps 3" = ["privacy.mode='dp-sgd'", "privacy.target_epsilon=3"] }

    [[compare.axes]]                     # the base model: folders (a level is the folder's name), or
    key = "model.path"                   # named levels setting model.path and lora.targets together
    values = ["/models/minilm", "/models/smollm2"]

Cells are the Cartesian product of the axes' levels, in file order; every cell resolves (and is
validated) before anything runs, so an impossible combination fails first.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.compare.search import Search, parse_search
from fedlora.compare.seeds import StopRule, parse_stop
from fedlora.compare.settings import (
    Setting,
    axis_name,
    level_label,
    parse_search_seed,
    parse_tune,
    parse_tune_seeds,
    slug_of,
    toml_literal,
)
from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.report.results import DEFAULT_TARGET
from fedlora.run.experiment import load_experiment

GRID_KEYS = {
    "name",
    "experiment",
    "seeds",
    "target_accuracy",
    "set",
    "axes",
    "baseline",
    "tune",
    "tune_seeds",
    "tune_budget",
    "stop",
}
AXIS_KEYS = {"key", "values", "name", "levels"}


@dataclass(frozen=True)
class Axis:
    """One varied dimension: its display name and, per level label, the overrides it applies."""

    name: str
    levels: dict[str, list[str]]

    def touches(self, prefix: str) -> bool:
        """Whether any level overrides a key starting with ``prefix`` (e.g. ``privacy.``)."""
        return any(o.strip().startswith(prefix) for overrides in self.levels.values() for o in overrides)


@dataclass(frozen=True)
class Cell:
    """One combination of levels (one per axis); runs once per seed."""

    levels: dict[str, str]
    overrides: list[str]

    @property
    def label(self) -> str:
        """Human-readable: the levels joined, e.g. ``fedit · eps 3``."""
        return " · ".join(self.levels.values()) or "base"

    @property
    def slug(self) -> str:
        """Directory-safe name, e.g. ``fedit__eps-3``."""
        return "__".join(slug_of(v) for v in self.levels.values()) or "base"


@dataclass(frozen=True)
class Task:
    """One run: a cell at one seed (and one tuning setting, with ``compare.tune``), its config resolved."""

    cell: Cell
    seed: int
    config: ExperimentConfig
    setting: Setting | None = None
    trial: int | None = None
    """A trial of the cell's search (``compare.tune`` with ranges), numbered from 0."""

    @property
    def key(self) -> str:
        """Path of the run below ``runs/``: ``<cell>/seed-N``, ``<cell>/<setting>/seed-N`` for a listed
        setting, ``<cell>/tuning/trial-N`` for a search's trial."""
        if self.trial is not None:
            return f"{self.cell.slug}/tuning/trial-{self.trial}"
        if self.setting is not None and self.setting.folder:
            return f"{self.cell.slug}/{self.setting.slug}/seed-{self.seed}"
        return f"{self.cell.slug}/seed-{self.seed}"

    @property
    def label(self) -> str:
        """The cell's label, with the setting when tuned (``fedit [lr=0.001]``)."""
        if self.trial is not None and self.setting is not None:
            return f"{self.cell.label} trial {self.trial} [{self.setting.label}]"
        return f"{self.cell.label} [{self.setting.label}]" if self.setting else self.cell.label


@dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    name: str
    experiment: Path
    seeds: list[int]
    target_accuracy: float
    overrides: list[str]
    axes: list[Axis]
    source: Path | None = None
    baseline: Any = ""
    """Who is compared with whom per seed: a cell label ("" = the first cell), ``{axis: level}`` (each
    cell against the cell with that level and its own levels on the other axes), or a list of these."""
    settings: list[Setting] = field(default_factory=list)
    """``compare.tune``'s settings (empty: no tuning)."""
    tune_seeds: list[int] = field(default_factory=list)
    """``compare.tune_seeds``: the seeds every setting runs at (empty: all seeds). The other seeds run
    only each cell's chosen setting, after the tuning runs have finished."""
    stop: StopRule | None = None
    """``compare.stop``: seeds after ``seeds`` are added while comparisons are undecided."""
    search: Search | None = None
    """``compare.tune`` with ranges: each cell's values found by a search at ``tune_seeds[0]``."""
    cells: list[Cell] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cells", _product(self.axes))
        if not self.baseline:
            object.__setattr__(self, "baseline", self.cells[0].label)
        for spec in self.baseline if isinstance(self.baseline, list) else [self.baseline]:
            self._check_baseline(spec)

    def _check_baseline(self, spec: Any) -> None:
        labels = [c.label for c in self.cells]
        if isinstance(spec, str):
            if spec not in labels:
                raise ConfigError(
                    f"compare.baseline = {spec!r} is not a cell of this grid; cells: {', '.join(labels)}"
                )
            return
        axes = {a.name: a for a in self.axes}
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(
                f"compare.baseline = {spec!r} is invalid: expected a cell label or one axis and its level, "
                f'e.g. {{ {next(iter(axes), "strategy")} = "fedit" }}'
            )
        ((axis, level),) = spec.items()
        if axis not in axes or level not in axes[axis].levels:
            choices = "; ".join(f"{a.name}: {', '.join(a.levels)}" for a in self.axes)
            raise ConfigError(
                f"compare.baseline = {{ {axis} = {level!r} }} names no axis level of this grid ({choices})"
            )

    @property
    def after_tuning_seeds(self) -> list[int]:
        """The seeds that run only each cell's chosen setting (none unless ``tune_seeds`` is set)."""
        return [s for s in self.seeds if s not in self.tune_seeds] if self.tune_seeds else []

    def tasks(self, extra: list[str] | None = None, chosen: dict[str, Setting] | None = None) -> list[Task]:
        """Every run with its config resolved and validated; ``extra`` overrides apply last.

        Without ``tune_seeds``: every (cell, setting, seed). With it: every (cell, setting) at the tuning
        seeds, then, for each cell in ``chosen`` (cell label -> its chosen setting), that setting at the
        other seeds, seed by seed (all cells at one seed, then the next), so that a comparison stopped
        early has the same seeds in every cell.
        """
        if self.search is not None:  # the searched choices at every seed, seed by seed
            chosen = chosen or {}
            return [
                self._task(cell, seed, chosen[cell.label], extra)
                for seed in self.seeds
                for cell in self.cells
                if cell.label in chosen
            ]
        tasks = []
        for cell in self.cells:
            settings: list[Setting | None] = [*self.settings] or [None]
            for setting in settings:
                for seed in self.tune_seeds or self.seeds:
                    tasks.append(self._task(cell, seed, setting, extra))
        for seed in self.after_tuning_seeds:  # seed by seed: stopped early, every cell has as many seeds
            for cell in self.cells:
                if chosen and cell.label in chosen:
                    tasks.append(self._task(cell, seed, chosen[cell.label], extra))
        return tasks

    def all_tasks(self, extra: list[str] | None = None) -> list[Task]:
        """:meth:`tasks` with every cell's first setting standing in for the choice not yet made: the runs
        a whole comparison makes (to check and count them before anything runs)."""
        if self.search is not None:
            return self.tasks(
                extra, {c.label: self.searched(self.search_of(c).extremes()[0]) for c in self.cells}
            )
        stand_in = {c.label: self.settings[0] for c in self.cells} if self.tune_seeds else None
        return self.tasks(extra, stand_in)

    def searched(self, values: dict[str, Any]) -> Setting:
        """The setting of a search's ``values`` (key -> value); its runs have no folder of their own."""
        if self.search is None:
            raise ValueError("searched() needs compare.tune with a range")
        overrides = [f"{k}={toml_literal(values[k])}" for k in self.search.keys if k in values]
        return Setting(self.search.label(values), overrides, folder=False)

    def search_of(self, cell: Cell) -> Search:
        """``cell``'s search: the parameters that apply to it (a range's ``when``)."""
        if self.search is None:
            raise ValueError("search_of() needs compare.tune with a range")
        return self.search.of(self._task(cell, self.tune_seeds[0], None, None).config.to_dict())

    def trial(self, cell: Cell, number: int, values: dict[str, Any], extra: list[str] | None = None) -> Task:
        """Trial ``number`` of ``cell``'s search: its ``values`` at the tuning seed, evaluated every round
        (the rungs of successive halving are rounds with the clients' validation accuracy)."""
        every_round = [*(extra or []), "federation.evaluate_every=1"]
        task = self._task(cell, self.tune_seeds[0], self.searched(values), every_round)
        return dataclasses.replace(task, trial=number)

    def trial_checks(self, extra: list[str] | None = None) -> list[Task]:
        """A trial of every cell at each of the search's extreme values: checked before anything runs."""
        if self.search is None:
            return []
        return [
            self.trial(c, -1 - i, v, extra)
            for c in self.cells
            for i, v in enumerate(self.search_of(c).extremes())
        ]

    def _task(self, cell: Cell, seed: int, setting: Setting | None, extra: list[str] | None) -> Task:
        tuned = setting.overrides if setting else []
        overrides = [*self.overrides, *cell.overrides, *tuned, *(extra or []), f"seed={seed}"]
        try:
            config = load_experiment(self.experiment, overrides)
        except ConfigError as exc:
            raise ConfigError(f"grid cell '{cell.label}': {exc}") from None
        if setting is not None:
            _check_tunable(cell, config)
        return Task(cell, seed, config, setting)

    def manifest(self) -> dict[str, Any]:
        """What ``fedlora report`` needs to rebuild tables and plots (written as comparison.json)."""
        return {
            "name": self.name,
            "experiment": str(self.experiment),
            "seeds": self.seeds,
            "target_accuracy": self.target_accuracy,
            "baseline": self.baseline,
            "axes": [{"name": a.name, "levels": list(a.levels)} for a in self.axes],
            "privacy_axes": [a.name for a in self.axes if a.touches("privacy.")],
            "cells": [{"label": c.label, "slug": c.slug, "levels": c.levels} for c in self.cells],
            **(
                {
                    "tune": [
                        {"label": s.label, "slug": s.slug, "overrides": s.overrides} for s in self.settings
                    ]
                }
                if self.settings
                else {}
            ),
            **({"tune_seeds": self.tune_seeds} if self.tune_seeds else {}),
            **({"stop": self.stop.manifest()} if self.stop else {}),
            **({"search": self.search.manifest()} if self.search else {}),
        }


def _check_tunable(cell: Cell, config: ExperimentConfig) -> None:
    """Tuning selects on the clients' validation splits: they must exist and be evaluated."""
    fed, data = config.federation, config.data
    if fed.fraction_evaluate <= 0 or data.val_fraction <= 0:
        raise ConfigError(
            f"grid cell '{cell.label}': compare.tune chooses on the clients' validation accuracy, but "
            f"federation.fraction_evaluate = {fed.fraction_evaluate:g} and data.val_fraction = "
            f"{data.val_fraction:g}; set both > 0 (e.g. in compare.set)"
        )


def load_grid(path: Path) -> Grid:
    """Read and check a grid file; errors name the key and the fix."""
    if not path.is_file():
        raise ConfigError(
            f"grid file '{path}' not found; pass an existing .toml file (see sims/compare_*.toml)"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"grid file '{path}' is not valid TOML: {exc}") from None
    if set(data) != {"compare"}:
        raise ConfigError(
            f"grid file '{path}' must hold exactly one [compare] table "
            f"(found: {', '.join(data) or 'nothing'}); to run a single experiment use `fedlora run`"
        )
    return parse_grid(data["compare"], base_dir=path.parent, source=path)


def parse_grid(table: dict[str, Any], *, base_dir: Path, source: Path | None = None) -> Grid:
    """Build a :class:`Grid` from the ``[compare]`` table."""
    _no_unknown(table, GRID_KEYS, "compare")
    experiment = table.get("experiment")
    if not isinstance(experiment, str) or not experiment:
        raise ConfigError(
            "compare.experiment is missing: name the base experiment file, e.g. 'quickstart.toml'"
        )
    seeds = table.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise ConfigError(f"compare.seeds = {seeds!r} is invalid: expected a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare.seeds = {seeds!r} repeats a seed; list each seed once")
    target = table.get("target_accuracy", DEFAULT_TARGET)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ConfigError(f"compare.target_accuracy = {target!r} is invalid: expected a fraction in (0, 1]")
    overrides = _string_list(table.get("set", []), "compare.set")
    axes_data = table.get("axes", [])
    if not isinstance(axes_data, list):
        raise ConfigError("compare.axes is invalid: write each axis as a [[compare.axes]] table")
    axes = [_parse_axis(a, i) for i, a in enumerate(axes_data)]
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"compare.axes names repeat ({', '.join(names)}); give each axis a distinct name")
    name = table.get("name", source.stem if source else "comparison")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"compare.name = {name!r} is invalid: expected a non-empty string")
    baseline = table.get("baseline", "")
    if not isinstance(baseline, (str, dict, list)) or baseline == []:
        raise ConfigError(f'compare.baseline = {baseline!r} is invalid: expected a cell label, e.g. "fedit"')
    tune = table.get("tune", {})
    search = parse_search(tune, table.get("tune_budget")) if isinstance(tune, dict) else None
    settings = [] if search else parse_tune(tune)
    if search is None:
        tune_seeds = parse_tune_seeds(table.get("tune_seeds", []), seeds, settings)
    else:
        tune_seeds = parse_search_seed(table.get("tune_seeds", seeds[:1]))
    stop = parse_stop(table.get("stop"), seeds)
    if stop is not None and settings and not tune_seeds:
        raise ConfigError(
            "compare.stop with a list of settings in compare.tune needs compare.tune_seeds: the seeds it "
            "adds run each cell's chosen setting only; add e.g. tune_seeds = [0]"
        )
    return Grid(
        name,
        base_dir / experiment,
        list(seeds),
        float(target),
        overrides,
        axes,
        source,
        baseline,
        settings,
        tune_seeds,
        stop,
        search,
    )


def _parse_axis(data: Any, index: int) -> Axis:
    where = f"compare.axes[{index}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is invalid: expected a table with key/values or name/levels")
    _no_unknown(data, AXIS_KEYS, where)
    if ("values" in data) == ("levels" in data):
        raise ConfigError(f"{where} needs exactly one of 'values' (with 'key') or 'levels' (with 'name')")
    if "values" in data:
        key = data.get("key")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where} has values but no 'key'; add e.g. key = \"strategy.name\"")
        values = data["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.values is invalid: expected a non-empty list")
        if key == "seed":
            raise ConfigError(f"{where} varies 'seed'; list seeds in compare.seeds instead")
        label = str(data.get("name", axis_name(key)))
        levels = {level_label(label, v, key): [f"{key}={toml_literal(v)}"] for v in values}
        if len(levels) != len(values):
            raise ConfigError(f"{where}.values repeats a value; list each once")
        return Axis(label, levels)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where} has levels but no 'name'; add e.g. name = \"privacy\"")
    raw = data["levels"]
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{where}.levels is invalid: expected a table of label = [overrides]")
    levels = {str(label): _string_list(v, f"{where}.levels.{label}") for label, v in raw.items()}
    return Axis(name, levels)


def _product(axes: list[Axis]) -> list[Cell]:
    cells = []
    for combo in itertools.product(*(list(a.levels.items()) for a in axes)):
        levels = {axis.name: label for axis, (label, _) in zip(axes, combo, strict=True)}
        overrides = [o for _, level_overrides in combo for o in level_overrides]
        cells.append(Cell(levels, overrides))
    slugs = [c.slug for c in cells]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(
            "two grid cells map to the same directory name; make the level labels more distinct"
        )
    return cells


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} = {value!r} is invalid: expected a list of 'section.key=value' strings")
    return list(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_unknown(table: dict[str, Any], valid: set[str], where: str) -> None:
    for key in table:
        if key not in valid:
            raise ConfigError(f"unknown key '{where}.{key}'; valid keys here: {', '.join(sorted(valid))}")
