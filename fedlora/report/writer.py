"""Comparison reports: collect finished runs, then write the CSV, Markdown table, PNG plots and HTML.

Sources are comparison directories (with ``comparison.json``, written by ``fedlora compare``), run
directories (with ``config.toml``), or folders holding either. Plain runs are grouped into cells by
their resolved config without ``seed`` and ``name``; a cell's label names the keys that differ.
"""

from __future__ import annotations

import datetime
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError
from fedlora.report import paired, plots
from fedlora.report.html import render
from fedlora.report.results import (
    DEFAULT_TARGET,
    CellStats,
    RunResult,
    group,
    is_finished,
    load_run,
    markdown,
    write_csv,
)

MANIFEST = "comparison.json"
IGNORED_KEYS = {"seed", "name"}


@dataclass
class Collected:
    """Finished runs found in the sources, and the runs that are not finished (listed, not used)."""

    title: str
    target: float
    results: list[RunResult] = field(default_factory=list)
    unfinished: list[Path] = field(default_factory=list)
    privacy_axes: set[str] = field(default_factory=set)
    baseline: str | None = None
    """Label of the cell the others are paired with (None: the first cell)."""

    def series(self, cell: CellStats) -> str:
        """A cell's line in the ε plot: its levels on the non-privacy axes (the strategy by default)."""
        kept = [v for k, v in cell.levels.items() if k not in self.privacy_axes]
        return " · ".join(kept) if kept and self.privacy_axes else cell.runs[0].strategy


def collect(dirs: list[Path], target: float | None = None, baseline: str | None = None) -> Collected:
    """Find every run below ``dirs``; raises ConfigError when a path holds no run or comparison, or when
    ``baseline`` (default: the grid's, else the first cell) names no cell."""
    found = Collected(title="", target=target or DEFAULT_TARGET)
    plain: list[Path] = []
    titles = []
    for path in dirs:
        if not path.is_dir():
            raise ConfigError(f"'{path}' is not a directory; pass run or comparison directories")
        sources = _sources(path)
        if not sources:
            raise ConfigError(
                f"'{path}' holds no run (config.toml) or comparison ({MANIFEST}); check the path"
            )
        for source in sources:
            if (source / MANIFEST).is_file():
                titles.append(_add_comparison(found, source, target))
            else:
                plain.append(source)
    _add_plain(found, plain)
    if not found.results:
        raise ConfigError(
            f"no finished run in {', '.join(map(str, dirs))} (a run is finished once it has summary.json)"
        )
    found.title = ", ".join(dict.fromkeys(titles)) or "runs"
    labels = list(dict.fromkeys(r.cell for r in found.results))
    if baseline is not None:
        found.baseline = baseline
    if found.baseline is not None and found.baseline not in labels:
        raise ConfigError(
            f"baseline {found.baseline!r} is not a cell with finished runs; cells: {', '.join(labels)}"
        )
    return found


def _sources(path: Path) -> list[Path]:
    if (path / MANIFEST).is_file() or (path / "config.toml").is_file():
        return [path]
    return sorted(p for p in path.iterdir() if (p / MANIFEST).is_file() or (p / "config.toml").is_file())


def _add_comparison(found: Collected, path: Path, target: float | None) -> str:
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    found.target = target or float(manifest.get("target_accuracy", DEFAULT_TARGET))
    found.privacy_axes.update(manifest.get("privacy_axes", []))
    if found.baseline is None and manifest.get("baseline"):
        found.baseline = str(manifest["baseline"])
    for cell in manifest["cells"]:
        for seed in manifest["seeds"]:
            run_dir = path / "runs" / cell["slug"] / f"seed-{seed}"
            if is_finished(run_dir):
                found.results.append(
                    load_run(run_dir, cell=cell["label"], levels=cell["levels"], target=found.target)
                )
            else:
                found.unfinished.append(run_dir)
    return str(manifest["name"])


def _add_plain(found: Collected, runs: list[Path]) -> None:
    finished = [r for r in runs if is_finished(r)]
    found.unfinished += [r for r in runs if not is_finished(r)]
    configs = {r: _flat(tomllib.loads((r / "config.toml").read_text(encoding="utf-8"))) for r in finished}
    shared = set.intersection(*(set(c) for c in configs.values())) if configs else set()
    differing = sorted(k for k in shared if len({json.dumps(c[k]) for c in configs.values()}) > 1)
    for run_dir, config in configs.items():
        levels = {_short(k): str(config.get(k)) for k in differing if k not in IGNORED_KEYS}
        label = " · ".join(levels.values()) or str(config.get("name", run_dir.name))
        found.results.append(load_run(run_dir, cell=label, levels=levels, target=found.target))


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = (
                json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
            )
    return flat


def _short(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def write_report(found: Collected, out: Path, *, command: str = "") -> dict[str, Path]:
    """Write comparison.csv, comparison.md, the PNG plots and report.html into ``out``; returns them."""
    out.mkdir(parents=True, exist_ok=True)
    cells = group(found.results)
    seeds = max(len(c.runs) for c in cells)
    baseline = paired.find_baseline(cells, found.baseline)
    files = {"csv": out / "comparison.csv", "markdown": out / "comparison.md", "paired": out / "paired.csv"}
    write_csv(found.results, files["csv"])
    paired.write_csv(cells, baseline, files["paired"])
    files["markdown"].write_text(
        f"## Paired differences against {baseline.label}\n\n"
        + paired.markdown(cells, baseline, found.target)
        + "\n## Per cell\n\n"
        + markdown(cells, found.target),
        encoding="utf-8",
    )
    per = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    files["accuracy"] = plots.accuracy_per_round(
        cells, out / "accuracy_per_round.png", f"{found.title}: test accuracy per round ({per})"
    )
    files["uplink"] = plots.accuracy_vs_uplink(
        cells, out / "accuracy_vs_uplink.png", f"{found.title}: final accuracy against uplink traffic"
    )
    epsilon = plots.accuracy_vs_epsilon(
        cells,
        out / "accuracy_vs_epsilon.png",
        f"{found.title}: final accuracy against privacy spent",
        found.series,
    )
    if epsilon is not None:
        files["epsilon"] = epsilon
    images = [files[k] for k in ("accuracy", "uplink", "epsilon") if k in files]
    files["html"] = out / "report.html"
    files["html"].write_text(
        render(
            found.title,
            cells,
            found.target,
            images,
            _about(found, command),
            (
                f"Paired differences against {baseline.label}",
                *paired.table(cells, baseline, found.target),
                paired.legend(baseline, seeds),
            ),
        ),
        encoding="utf-8",
    )
    return files


def _about(found: Collected, command: str) -> dict[str, str]:
    versions = json.loads((found.results[0].run_dir / "summary.json").read_text(encoding="utf-8")).get(
        "versions", {}
    )
    about = {
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "runs": f"{len(found.results)} finished"
        + (f", {len(found.unfinished)} unfinished (left out)" if found.unfinished else ""),
    }
    if command:
        about["command"] = command
    return about
