"""Results of finished runs, grouped into cells: per-run rows, mean ± std per cell, CSV and Markdown.

Accuracies are fractions (0-1) in rows and the CSV, percentages in tables; traffic is in MB
(10^6 bytes) of the arrays that travelled, summed over clients and rounds; times are seconds.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.core.records.rundir import atomic_write, read_clients, read_rounds, read_summary
from fedlora.report.clients import (
    PERSONALISED,
    ClientRound,
    accuracy_kind,
    evaluation_rounds,
)

TO_TARGET = ("rounds_to_target", "virtual_s_to_target")
"""Metrics averaged over the seeds that reached the target (``not reached`` and † otherwise)."""
DEFAULT_TARGET = 0.6
"""Accuracy (0-1) a comparison counts rounds and bytes to when its grid sets no ``target_accuracy``."""

CSV_COLUMNS = (
    "final_accuracy",
    "best_accuracy",
    "rounds_to_target",
    "uplink_mb_to_target",
    "virtual_s_to_target",
    "uplink_mb",
    "downlink_mb",
    "final_epsilon",
    "wall_s",
    "virtual_time_s",
    "client_eval_round",
    "client_eval_clients",
    "client_mean_accuracy",
    "client_worst_accuracy",
    "client_std_accuracy",
    "client_iqr_accuracy",
    "client_accuracy_kind",
)


@dataclass(frozen=True)
class RunResult:
    """One finished run (one cell at one seed)."""

    cell: str
    levels: dict[str, str]
    seed: int
    run_dir: Path
    strategy: str
    rounds: int
    final_accuracy: float
    best_accuracy: float
    rounds_to_target: int | None
    uplink_mb: float
    downlink_mb: float
    final_epsilon: float | None
    delta: float | None
    wall_s: float
    majority_accuracy: float
    accuracy: list[float]
    """Global test accuracy after each round (fractions)."""
    uplink_mb_to_target: float | None = None
    """Uplink MB of rounds 1 to ``rounds_to_target`` (None when the target was never reached)."""
    virtual_s_to_target: float | None = None
    """Virtual seconds (the device clock, ``virtual_time_s``) at the end of round ``rounds_to_target``
    (None when the target was never reached, or the run had no device classes)."""
    virtual_time_s: float | None = None
    """The run's virtual seconds on the device clock (None without device classes)."""
    history: tuple[dict[str, Any], ...] = ()
    """The rows of ``rounds.jsonl`` (losses, traffic, failures and ε per round)."""
    total_failed: int = 0
    total_rejected: int = 0
    client_eval: tuple[ClientRound, ...] = ()
    """Client-side evaluation per round (from ``clients.jsonl``), in round order."""
    tuned: str = ""
    """The tuning setting this run used, chosen on validation (``compare.tune``; "" without tuning)."""
    accuracy_of: str = "global"
    """``personalised``: final and best accuracy are the clients' own models on their validation splits
    (a strategy keeping state on its clients); ``global``: the global adapter on the test set."""
    shared_accuracy: float | None = None
    """With a personalised headline: the final test accuracy of the shared part alone (B = 0)."""

    @property
    def last_client_eval(self) -> ClientRound | None:
        """The last round with client evaluation (the final one when clients evaluate every round)."""
        return self.client_eval[-1] if self.client_eval else None

    @property
    def client_eval_round(self) -> int | None:
        return None if self.last_client_eval is None else self.last_client_eval.round

    @property
    def client_eval_clients(self) -> int | None:
        return None if self.last_client_eval is None else self.last_client_eval.clients

    @property
    def client_mean_accuracy(self) -> float | None:
        return None if self.last_client_eval is None else self.last_client_eval.mean

    @property
    def client_worst_accuracy(self) -> float | None:
        return None if self.last_client_eval is None else self.last_client_eval.worst

    @property
    def client_std_accuracy(self) -> float | None:
        return None if self.last_client_eval is None else self.last_client_eval.std

    @property
    def client_iqr_accuracy(self) -> float | None:
        return None if self.last_client_eval is None else self.last_client_eval.iqr

    @property
    def client_accuracy_kind(self) -> str | None:
        """personalised (FedSA-LoRA) or global adapter; None without client evaluation."""
        return None if self.last_client_eval is None else accuracy_kind(self.strategy)


@dataclass(frozen=True)
class Metric:
    """A column of the per-cell table."""

    name: str
    title: str
    higher_is_better: bool
    scale: float = 1.0
    digits: int = 1
    mark_best: bool = True
    """Bold the best cell (not for ε: a privacy setting, not a score)."""


METRICS = (
    Metric("final_accuracy", "final acc. (%)", True, 100.0),
    Metric("best_accuracy", "best acc. (%)", True, 100.0),
    Metric("rounds_to_target", "rounds to {target}", False),
    Metric("virtual_s_to_target", "virtual s to {target}", False, digits=0),
    Metric("uplink_mb", "uplink (MB)", False, digits=2),
    Metric("downlink_mb", "downlink (MB)", False, digits=2),
    Metric("client_mean_accuracy", "client acc. (%)", True, 100.0),
    Metric("final_epsilon", "ε", False, digits=2, mark_best=False),
    Metric("virtual_time_s", "virtual time (s)", False, digits=0),
    Metric("wall_s", "wall (s)", False, digits=0),
)


def load_run(run_dir: Path, *, cell: str, levels: dict[str, str], target: float) -> RunResult:
    """Read a finished run directory (``summary.json`` and ``rounds.jsonl``)."""
    summary = read_summary(run_dir)
    rows = read_rounds(run_dir)
    accuracy = [float(r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    reached = next((int(r["round"]) for r in rows if (r.get("eval_accuracy") or 0.0) >= target), None)
    to_target, time_to_target = None, None
    if reached is not None:
        to_target = sum(int(r.get("uplink_bytes") or 0) for r in rows if int(r["round"]) <= reached) / 1e6
        time_to_target = next(r.get("virtual_time_s") for r in rows if int(r["round"]) == reached)
    virtual = summary.get("virtual_time_s")
    epsilon = summary.get("final_epsilon")
    return RunResult(
        cell=cell,
        levels=levels,
        seed=int(_config(run_dir).get("seed", 0)),
        run_dir=run_dir,
        strategy=str(summary["strategy"]),
        rounds=int(summary["rounds"]),
        final_accuracy=float(summary.get("final_accuracy", summary["final_eval_accuracy"])),
        best_accuracy=float(summary.get("best_accuracy", summary["best_eval_accuracy"])),
        rounds_to_target=reached,
        uplink_mb=int(summary["total_uplink_bytes"]) / 1e6,
        downlink_mb=int(summary["total_downlink_bytes"]) / 1e6,
        final_epsilon=None if epsilon is None else float(epsilon),
        delta=None if epsilon is None else float(summary["delta"]),
        wall_s=float(summary["wall_s"]),
        majority_accuracy=float(summary["majority_accuracy"]),
        accuracy=accuracy,
        uplink_mb_to_target=to_target,
        virtual_s_to_target=None if time_to_target is None else float(time_to_target),
        virtual_time_s=None if virtual is None else float(virtual),
        history=tuple(rows),
        total_failed=int(summary.get("total_failed") or 0),
        total_rejected=int(summary.get("total_rejected") or 0),
        client_eval=tuple(evaluation_rounds(read_clients(run_dir))),
        accuracy_of=str(summary.get("accuracy_of", "global")),
        shared_accuracy=(
            float(summary["final_eval_accuracy"]) if summary.get("accuracy_of") == "personalised" else None
        ),
    )


def is_finished(run_dir: Path) -> bool:
    """A run directory with a summary (written only after the last round)."""
    return (Path(run_dir) / "summary.json").is_file()


def _config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.toml"
    return tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass(frozen=True)
class CellStats:
    """The runs of one cell and their statistics over seeds."""

    label: str
    levels: dict[str, str]
    runs: list[RunResult]

    def values(self, metric: str) -> list[float]:
        """The metric's values over the seeds that have one (rounds to target: those that reached it)."""
        found = (getattr(r, metric) for r in self.runs)
        return [float(v) for v in found if v is not None]

    def mean_std(self, metric: str) -> tuple[float, float] | None:
        """Mean and sample standard deviation (0 with one seed); None when no seed has a value."""
        values = self.values(metric)
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def mean_accuracy_curve(self) -> tuple[list[float], list[float]]:
        """Mean and standard deviation of test accuracy per round over seeds (shortest run decides length)."""
        length = min(len(r.accuracy) for r in self.runs)
        columns = [[r.accuracy[i] for r in self.runs] for i in range(length)]
        means = [statistics.fmean(c) for c in columns]
        stds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
        return means, stds


def group(results: Iterable[RunResult]) -> list[CellStats]:
    """Runs grouped by cell label, in first-seen order."""
    cells: dict[str, list[RunResult]] = {}
    for r in results:
        cells.setdefault(r.cell, []).append(r)
    return [
        CellStats(label, runs[0].levels, sorted(runs, key=lambda r: r.seed)) for label, runs in cells.items()
    ]


def write_csv(results: list[RunResult], path: Path) -> None:
    """One row per run: its cell, levels, seed and every metric (raw values, accuracies as fractions)."""
    axes = _axis_names(results)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        fixed = {"cell", "seed", "strategy", "rounds", "tuned", *CSV_COLUMNS, "run_dir"}
        names = [f"axis.{a}" if a in fixed else a for a in axes]
        tuned = ["tuned"] if any(r.tuned for r in results) else []  # compare.tune: the chosen setting
        writer.writerow(["cell", *names, "seed", "strategy", *tuned, "rounds", *CSV_COLUMNS, "run_dir"])
        for r in results:
            metrics = [_csv_value(getattr(r, c)) for c in CSV_COLUMNS]
            levels = [r.levels.get(a, "") for a in axes]
            setting = [r.tuned] if tuned else []
            writer.writerow(
                [r.cell, *levels, r.seed, r.strategy, *setting, r.rounds, *metrics, str(r.run_dir)]
            )


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _axis_names(results: Iterable[RunResult]) -> list[str]:
    names: dict[str, None] = {}
    for r in results:
        names.update(dict.fromkeys(r.levels))
    return list(names)


def table(cells: list[CellStats], target: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-cell table: ``mean ± std`` strings, the best per column in bold.

    Columns without a value in any cell (ε without DP) are left out. Rounds to target are averaged
    over the seeds that reached it; a dagger marks cells where some seeds did not.
    """
    metrics = [m for m in METRICS if any(c.values(m.name) for c in cells)]
    header = ["cell", "seeds", *(m.title.format(target=f"{100 * target:g}%") for m in metrics)]
    columns = [_column(cells, m) for m in metrics]
    rows = [[_label(c), str(len(c.runs)), *(col[i] for col in columns)] for i, c in enumerate(cells)]
    return header, rows


def personalised(cell: CellStats) -> bool:
    """Whether the cell's clients use models of their own (its test accuracy is the shared part only)."""
    return any(r.accuracy_of == "personalised" or r.strategy in PERSONALISED for r in cell.runs)


def _label(cell: CellStats) -> str:
    """A cell's label, marked ‡ when its test accuracy is not the model its clients use (FedSA-LoRA)."""
    return f"{cell.label} ‡" if personalised(cell) else cell.label


def client_table(cells: list[CellStats]) -> tuple[list[str], list[list[str]]] | None:
    """Per cell, the clients' own-validation accuracy in the last round with client evaluation: mean
    over clients, worst client, standard deviation and IQR across clients (each the mean over seeds).
    None when no run has client evaluation."""
    header = [
        "cell",
        "accuracy of",
        "round",
        "clients",
        "mean client (%)",
        "worst client (%)",
        "std across clients (pp)",
        "IQR (pp)",
    ]
    rows = []
    for cell in cells:
        last = [r.last_client_eval for r in cell.runs if r.last_client_eval is not None]
        if not last:
            continue
        rounds = sorted({c.round for c in last})
        clients = sorted({c.clients for c in last})

        def mean(values: Iterable[float]) -> str:
            return f"{100 * statistics.fmean(values):.1f}"

        rows.append(
            [
                cell.label,
                accuracy_kind(cell.runs[0].strategy),
                "/".join(map(str, rounds)),
                "/".join(map(str, clients)),
                mean(c.mean for c in last),
                mean(c.worst for c in last),
                mean(c.std for c in last),
                mean(c.iqr for c in last),
            ]
        )
    return (header, rows) if rows else None


def client_legend() -> str:
    """What the per-client table's numbers mean."""
    return (
        "Each client's accuracy on its own validation split, in the last round where clients evaluated; "
        "every client counts once. Personalised (FedSA-LoRA): the shared A with the client's own B. "
        "Numbers are means over seeds."
    )


def _column(cells: list[CellStats], metric: Metric) -> list[str]:
    stats = [c.mean_std(metric.name) for c in cells]
    shown = [None if s is None else round(s[0] * metric.scale, metric.digits) for s in stats]
    candidates = [v for v in shown if v is not None]
    marked = metric.mark_best and len(cells) > 1 and candidates
    best = (max if metric.higher_is_better else min)(candidates) if marked else None
    out = []
    for cell, s, value in zip(cells, stats, shown, strict=True):
        if s is None or value is None:
            out.append("—" if metric.name not in TO_TARGET else "not reached")
            continue
        text = _format(s[0] * metric.scale, s[1] * metric.scale, metric.digits, len(cell.values(metric.name)))
        if metric.name in TO_TARGET and len(cell.values(metric.name)) < len(cell.runs):
            text += " †"
        out.append(f"**{text}**" if value == best else text)
    return out


def _format(mean: float, std: float, digits: int, n: int) -> str:
    """``mean ± std``; just the mean with one value or when the spread rounds to zero."""
    spread = f"{std:.{digits}f}"
    if n < 2 or float(spread) == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread}"


def markdown(cells: list[CellStats], target: float) -> str:
    """The per-cell table as GitHub Markdown, with a one-line legend."""
    header, rows = table(cells, target)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + legend(cells, target) + "\n"


def legend(cells: list[CellStats], target: float) -> str:
    """What the table's numbers mean (seeds, units, markers, the majority-class baseline)."""
    majority = statistics.fmean(r.majority_accuracy for c in cells for r in c.runs)
    parts = [
        "Mean ± standard deviation over seeds; best per column in bold.",
        "Accuracy on the global held-out test set;",
        f"majority class {100 * majority:.1f}%.",
        "Traffic: adapter arrays sent, all clients and rounds (MB = 10^6 bytes).",
    ]
    if any(c.values("virtual_time_s") for c in cells):
        parts.append("Virtual time: seconds on the device clock (docs/devices.md), not wall time.")
    if any("†" in row[i] for row in table(cells, target)[1] for i in range(len(row))):
        parts.append(f"† some seeds never reached {100 * target:g}%; mean over those that did.")
    if any(c.values("client_mean_accuracy") for c in cells):
        parts.append(
            "Client acc.: mean over clients of their own validation accuracy (last evaluated round)."
        )
    if any(personalised(c) for c in cells):
        shared = [
            f"{c.label} {100 * statistics.fmean(c.values('shared_accuracy')):.1f}%"
            for c in cells
            if c.values("shared_accuracy")
        ]
        parts.append(
            "‡ personalised (the clients keep state of their own, e.g. FedSA-LoRA's B and head): final and "
            "best acc. are the personalised accuracy, the clients' own models on their own validation "
            f"splits; the test set sees only the shared part (B = 0), final shared part: {', '.join(shared)}."
            if shared
            else "‡ FedSA-LoRA: the test accuracy is the shared part alone (B = 0, each client's B never "
            "leaves it); its client acc. is the personalised accuracy (shared A, the client's own B)."
        )
    return " ".join(parts)


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write JSON with NaN/inf as null (the manifest and report metadata)."""
    atomic_write(path, json.dumps(_finite(data), indent=2) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
