"""Comparison reports: collect finished runs, then write the CSV, Markdown table, PNG plots and HTML.

Sources are comparison directories (with ``comparison.json``, written by ``fedlora compare``), run
directories (with ``config.toml``), or folders holding either. Plain runs are grouped into cells by
their resolved config without ``seed`` and ``name``; a cell's label names the keys that differ.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.core.config import ConfigError
from fedlora.report import html, paired, plots, sequential, tuning
from fedlora.report.results import (
    DEFAULT_TARGET,
    CellStats,
    RunResult,
    client_legend,
    client_table,
    group,
    is_finished,
    legend,
    load_run,
    markdown,
    table,
    write_csv,
)

MANIFEST = "comparison.json"
STOPPING = "stopping.json"
"""Beside the manifest with ``[compare] stop``: the seeds run, why the comparison stopped or goes on."""
IGNORED_KEYS = {"seed", "name", "federation.ray_address"}


@dataclass
class Collected:
    """Finished runs found in the sources, and the runs that are not finished (listed, not used)."""

    title: str
    target: float
    results: list[RunResult] = field(default_factory=list)
    unfinished: list[Path] = field(default_factory=list)
    privacy_axes: set[str] = field(default_factory=set)
    baseline: Any = None
    """Who is paired with whom (:func:`fedlora.report.paired.pairings`): None (the first cell), a cell
    label, ``{axis: level}``, or a list of these."""
    tunings: list[tuning.Tuning] = field(default_factory=list)
    """Per tuned cell (``compare.tune``): every setting's validation scores and the chosen one."""
    rule: sequential.Rule | None = None
    """``compare.stop``'s decision rule: intervals are then confidence sequences."""
    searches: list[dict[str, Any]] = field(default_factory=list)
    """``tuning.json``'s cells (``compare.tune`` with ranges): chosen values, trials, edge flags."""
    stopping: dict[str, Any] = field(default_factory=dict)
    """``stopping.json``: the seeds run and why the comparison stopped (empty without ``compare.stop``)."""

    def pairings(self) -> list[paired.Pairing]:
        """Who is compared with whom among the finished runs (KeyError: the baseline matches no cell)."""
        return paired.pairings(group(self.results), self.baseline, self.rule)

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
    if baseline is not None:
        found.baseline = baseline
    try:
        found.pairings()
    except KeyError as exc:
        labels = list(dict.fromkeys(r.cell for r in found.results))
        raise ConfigError(
            f"baseline {exc.args[0]!r} matches no cell with finished runs; cells: {', '.join(labels)}"
        ) from None
    return found


def _sources(path: Path) -> list[Path]:
    if (path / MANIFEST).is_file() or (path / "config.toml").is_file():
        return [path]
    return sorted(p for p in path.iterdir() if (p / MANIFEST).is_file() or (p / "config.toml").is_file())


def _add_comparison(found: Collected, path: Path, target: float | None) -> str:
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    found.target = target or float(manifest.get("target_accuracy", DEFAULT_TARGET))
    found.privacy_axes.update(manifest.get("privacy_axes", []))
    if manifest.get("stop"):
        found.rule = sequential.Rule(float(manifest["stop"]["smallest_effect"]))
        if (path / STOPPING).is_file():
            found.stopping = json.loads((path / STOPPING).read_text(encoding="utf-8"))
    searched = _add_searches(found, path) if manifest.get("search") else {}
    if found.baseline is None and manifest.get("baseline"):
        found.baseline = manifest["baseline"]
    for cell in manifest["cells"]:
        if manifest.get("tune"):
            _add_tuned(found, path, cell, manifest)
            continue
        for seed in manifest["seeds"]:
            run_dir = path / "runs" / cell["slug"] / f"seed-{seed}"
            if is_finished(run_dir):
                result = load_run(run_dir, cell=cell["label"], levels=cell["levels"], target=found.target)
                found.results.append(dataclasses.replace(result, tuned=searched.get(cell["label"], "")))
            else:
                found.unfinished.append(run_dir)
    return str(manifest["name"])


def _add_searches(found: Collected, path: Path) -> dict[str, str]:
    """A search's ``tuning.json`` (when the search has ended): its cells into ``found``; returns each
    cell's chosen values as a label."""
    results = path / "tuning.json"
    if not results.is_file():
        return {}
    cells = json.loads(results.read_text(encoding="utf-8"))["cells"]
    found.searches.extend(cells)
    return {c["cell"]: c["label"] for c in cells if c.get("label")}


def _add_tuned(found: Collected, path: Path, cell: dict[str, Any], manifest: dict[str, Any]) -> None:
    """A tuned cell: every setting's finished runs at the tuning seeds (``tune_seeds``, else all) scored
    on validation; the chosen setting's runs at every seed kept."""
    tune_seeds = manifest.get("tune_seeds") or manifest["seeds"]
    runs: dict[str, dict[int, RunResult]] = {}
    for setting in manifest["tune"]:
        runs[setting["label"]] = {}
        for seed in manifest["seeds"]:
            run_dir = path / "runs" / cell["slug"] / setting["slug"] / f"seed-{seed}"
            if is_finished(run_dir):
                result = load_run(run_dir, cell=cell["label"], levels=cell["levels"], target=found.target)
                runs[setting["label"]][seed] = dataclasses.replace(result, tuned=setting["label"])
            elif seed in tune_seeds:
                found.unfinished.append(run_dir)
    scores = {
        label: [
            v
            for v in (tuning.validation_accuracy(r.history) for s, r in results.items() if s in tune_seeds)
            if v is not None
        ]
        for label, results in runs.items()
    }
    chosen = tuning.choose(scores)
    found.tunings.append(tuning.Tuning(cell["label"], scores, chosen))
    if chosen is not None:
        found.results.extend(runs[chosen].values())
        chosen_slug = next(s["slug"] for s in manifest["tune"] if s["label"] == chosen)
        found.unfinished += [
            path / "runs" / cell["slug"] / chosen_slug / f"seed-{seed}"
            for seed in manifest["seeds"]
            if seed not in tune_seeds and seed not in runs[chosen]
        ]


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
    """Write comparison.csv, paired.csv, comparison.md, the PNG plots and report.html into ``out``;
    returns them by kind."""
    out.mkdir(parents=True, exist_ok=True)
    cells = group(found.results)
    seeds = max(len(c.runs) for c in cells)
    pairings = found.pairings()
    files = {"csv": out / "comparison.csv", "markdown": out / "comparison.md", "paired": out / "paired.csv"}
    write_csv(found.results, files["csv"])
    paired.write_csv(cells, pairings, files["paired"])
    clients = client_table(cells)
    files["markdown"].write_text(
        _stopping_text(found)
        + "".join(
            f"## Paired differences against {p.title}\n\n" + paired.markdown(cells, p, found.target) + "\n"
            for p in pairings
        )
        + "\n## Per cell\n\n"
        + markdown(cells, found.target)
        + (
            ""
            if clients is None
            else "\n## Per client\n\n" + _markdown_table(*clients) + "\n" + client_legend() + "\n"
        )
        + (
            "\n## Tuning (searched on validation)\n\n"
            + _markdown_table(*tuning.search_table(found.searches))
            + "\n"
            + tuning.search_legend()
            + "\n"
            if found.searches
            else ""
        )
        + (
            "\n## Tuning (chosen on validation)\n\n"
            + _markdown_table(*tuning.table(found.tunings))
            + "\n"
            + tuning.legend()
            + "\n"
            if found.tunings
            else ""
        ),
        encoding="utf-8",
    )
    files.update(_plots(found, cells, pairings[0], out, seeds))
    files["html"] = out / "report.html"
    files["html"].write_text(_html(found, cells, pairings, files, seeds, command), encoding="utf-8")
    return files


def _stopping_text(found: Collected) -> str:
    """With ``compare.stop``: how many seeds ran and why the comparison stopped (or goes on)."""
    if not found.stopping:
        return ""
    seeds = found.stopping.get("seeds", [])
    undecided = found.stopping.get("undecided", [])
    going = found.stopping.get("next_seed") is not None
    text = (
        f"Seeds added until the answer was clear: {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
        + ("going on: " if going else "stopped: ")
        + str(found.stopping.get("reason", ""))
        + ("." if not undecided else f" (undecided: {'; '.join(undecided)}).")
    )
    return text + "\n\n"


def _plots(
    found: Collected, cells: list[CellStats], pairing: paired.Pairing, out: Path, seeds: int
) -> dict[str, Path]:
    title = found.title
    per = f"mean over {seeds} seeds, range shaded" if seeds > 1 else "one seed"
    differences = {}
    for results in paired.compare(cells, pairing):
        final = results[0]
        differences[final.cell] = (final.differences, final.interval)
    baseline_of = {cell.label: base for cell, base in pairing.pairs()}
    made: dict[str, Path | None] = {
        "final": plots.final_accuracy_paired(
            cells,
            pairing,
            differences,
            out / "final_accuracy_paired.png",
            f"{title}: final test accuracy per seed",
        ),
        "accuracy": plots.accuracy_per_round(
            cells, out / "accuracy_per_round.png", f"{title}: test accuracy per round ({per})", baseline_of
        ),
        "loss": plots.loss_per_round(cells, out / "loss_per_round.png", f"{title}: loss per round ({per})"),
        "uplink": plots.accuracy_vs_uplink(
            cells, out / "accuracy_vs_uplink.png", f"{title}: final accuracy against uplink traffic"
        ),
        "traffic": plots.traffic_per_round(
            cells, out / "traffic_per_round.png", f"{title}: traffic per round"
        ),
        "virtual": plots.accuracy_vs_virtual_time(
            cells,
            out / "accuracy_vs_virtual_time.png",
            f"{title}: test accuracy against virtual time ({per})",
        ),
        "epsilon": plots.accuracy_vs_epsilon(
            cells,
            out / "accuracy_vs_epsilon.png",
            f"{title}: final accuracy against privacy spent",
            found.series,
        ),
        "clients": plots.client_accuracy_per_round(
            cells, out / "client_accuracy_per_round.png", f"{title}: clients' own validation accuracy"
        ),
    }
    return {k: v for k, v in made.items() if v is not None}


def _html(
    found: Collected,
    cells: list[CellStats],
    pairings: list[paired.Pairing],
    files: dict[str, Path],
    seeds: int,
    command: str,
) -> str:
    def figures(*kinds: str) -> str:
        return "".join(html.figure(files[k]) for k in kinds if k in files)

    baseline = pairings[0].baselines[0]
    sections = [
        (
            f"Paired differences against {p.title}",
            _paired_html(cells, p, found.target)
            + html.legend(paired.legend(p, seeds))
            + (figures("final") if i == 0 else ""),
        )
        for i, p in enumerate(pairings)
    ]
    if found.stopping:
        sections.insert(0, ("Seeds until the answer was clear", html.legend(_stopping_text(found).strip())))
    sections += [
        ("Per cell", html.table(*table(cells, found.target)) + html.legend(legend(cells, found.target))),
        *(
            [
                (
                    "Tuning (chosen on validation)",
                    html.table(*tuning.table(found.tunings)) + html.legend(tuning.legend()),
                )
            ]
            if found.tunings
            else []
        ),
        *(
            [
                (
                    "Tuning (searched on validation)",
                    html.table(*tuning.search_table(found.searches), text_columns=(1, 4, 5))
                    + html.legend(tuning.search_legend()),
                )
            ]
            if found.searches
            else []
        ),
        (
            f"Cells: strategy and what differs from {baseline.label}",
            html.table(*_cells_table(cells, baseline), text_columns=(1, 2)),
        ),
        ("Accuracy and loss per round", figures("accuracy", "virtual", "loss")),
        ("Traffic", figures("uplink", "traffic")),
    ]
    if "epsilon" in files:
        sections.append(("Privacy", figures("epsilon") + html.table(*_privacy_table(cells))))
    clients = client_table(cells)
    if clients is not None:
        sections.append(
            (
                "Per-client metrics",
                html.table(*clients, text_columns=(1,)) + html.legend(client_legend()) + figures("clients"),
            )
        )
    sections.append(("Failed, rejected and declined clients", _failures(found, cells)))
    config = baseline.runs[0].run_dir / "config.toml"
    if config.is_file():
        sections.append(
            (
                "Base configuration",
                html.preformatted(
                    config.read_text(encoding="utf-8"),
                    f"{baseline.label}, seed {baseline.runs[0].seed} (config.toml); the other cells differ "
                    "only in the keys listed under Cells, and every run in its seed",
                ),
            )
        )
    return html.page(found.title, sections, _about(found, command))


def _paired_html(cells: list[CellStats], pairing: paired.Pairing, target: float) -> str:
    """The paired table, its verdict columns wrapping (they are sentences)."""
    header, rows = paired.table(cells, pairing, target)
    verdicts = tuple(i for i, h in enumerate(header) if h.endswith("verdict"))
    return html.table(header, rows, text_columns=verdicts)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


PLACEMENT_KEYS = {"seed", "name", "federation.ray_address"}
"""Keys that never make two cells different: the seed is paired, the others do not change results."""


def _cells_table(cells: list[CellStats], baseline: CellStats) -> tuple[list[str], list[list[str]]]:
    """Per cell: its strategy and the resolved config keys whose values differ from the baseline's."""
    reference = _run_config(baseline.runs[0].run_dir)
    rows = []
    for cell in cells:
        mine = _run_config(cell.runs[0].run_dir)
        keys = sorted((set(mine) | set(reference)) - PLACEMENT_KEYS)
        changed = [f"{k} = {mine.get(k, '(unset)')}" for k in keys if mine.get(k) != reference.get(k)]
        what = "(baseline)" if cell is baseline else "; ".join(changed) or "nothing"
        if cell.runs[0].tuned:
            what += f" (tuned: {cell.runs[0].tuned})"
        rows.append([cell.label, cell.runs[0].strategy, what, ", ".join(str(r.seed) for r in cell.runs)])
    return ["cell", "strategy", f"changed keys (against {baseline.label})", "seeds"], rows


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.toml"
    return _flat(tomllib.loads(path.read_text(encoding="utf-8"))) if path.is_file() else {}


def _privacy_table(cells: list[CellStats]) -> tuple[list[str], list[list[str]]]:
    """Per cell: ε spent (mean over seeds), δ, and the last round's noise multiplier and clipping norm."""
    rows = []
    for cell in cells:
        last = cell.runs[0].history[-1] if cell.runs[0].history else {}
        eps = cell.mean_std("final_epsilon")
        rows.append(
            [
                cell.label,
                "no DP" if eps is None else f"{eps[0]:.2f}",
                "—" if cell.runs[0].delta is None else f"{cell.runs[0].delta:g}",
                _number(last.get("noise_multiplier")),
                _number(last.get("clip_norm")),
            ]
        )
    return ["cell", "ε spent", "δ", "noise multiplier", "clipping norm"], rows


def _number(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3g}"


def _failures(found: Collected, cells: list[CellStats]) -> str:
    """Per cell the client replies that failed, were rejected or declined (totals over seeds and rounds),
    and the runs that have not finished."""
    rows = []
    for cell in cells:
        totals = {k: sum(int(r.get(k) or 0) for run in cell.runs for r in run.history) for k in FAULT_KEYS}
        bad_rounds = sum(1 for run in cell.runs for r in run.history if any(r.get(k) for k in FAULT_KEYS))
        rows.append([cell.label, str(len(cell.runs)), *(str(totals[k]) for k in FAULT_KEYS), str(bad_rounds)])
    header = ["cell", "runs", "failed replies", "rejected replies", "declined (DP)", "rounds with any"]
    text = html.table(header, rows)
    text += html.legend(
        "Failed: the client raised or timed out; rejected: its reply failed validation (shapes, NaN, norm); "
        "declined: under DP-SGD a client with too few examples for its budget sends nothing. "
        "Per client and round in each run's clients.jsonl."
    )
    if found.unfinished:
        text += html.legend("Unfinished runs (left out): " + ", ".join(str(p) for p in found.unfinished))
    return text


FAULT_KEYS = ("num_failed", "num_rejected", "num_declined")


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
