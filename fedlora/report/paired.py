"""Paired differences against a baseline cell: per seed, cell minus baseline on the same seed.

Who is paired with whom is a :class:`Pairing`: every cell against one baseline cell (``baseline =
"fedit · no DP"``), or each cell against the cell that differs from it only on one axis
(``baseline = { strategy = "fedit" }``: every strategy against FedIT at the same privacy level).

A seed fixes the data split, the clients sampled in every round and the initial adapter for every
cell, so the seed-to-seed spread (which is often larger than the gap between two methods) cancels
in the per-seed difference. For each metric this module reports the mean paired difference, a 95%
confidence interval from Student's t distribution on the differences, the number of pairs and a
verdict in plain words. Seeds where either run is missing (failed, unfinished) are left out of
the pairs, and the table says how many pairs there are.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from fedlora.report import sequential
from fedlora.report.results import CellStats, RunResult, personalised

CONFIDENCE = 0.95

PAIRED_METRICS = (
    ("final_accuracy", "final acc."),
    ("best_accuracy", "best acc."),
)
"""Metrics compared per seed (RunResult attribute, column title); accuracies, shown in points."""

CLIENT_METRIC = ("client_mean_accuracy", "client acc.")
"""Compared too when clients evaluate: mean client validation accuracy (personalised for FedSA-LoRA)."""


def metrics(cells: list[CellStats]) -> tuple[tuple[str, str], ...]:
    """The paired metrics of these cells: final and best test accuracy, and client accuracy if any."""
    if any(c.values(CLIENT_METRIC[0]) for c in cells):
        return (*PAIRED_METRICS, CLIENT_METRIC)
    return PAIRED_METRICS


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences with its two-sided confidence interval (None bounds with one pair)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def t_interval(differences: list[float], confidence: float = CONFIDENCE) -> Interval | None:
    """Mean ± t_{(1+c)/2, n-1} · s / sqrt(n) over ``differences``; None for no values.

    With one value there is no spread to estimate: the mean with no bounds.
    """
    n = len(differences)
    if n == 0:
        return None
    mean = statistics.fmean(differences)
    if n == 1:
        return Interval(mean, None, None, 1)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def sequence_interval(differences: list[float], rule: sequential.Rule) -> Interval | None:
    """The confidence sequence's interval after ``differences`` (in seed order; None bounds while it is
    unbounded), :mod:`fedlora.report.sequential`."""
    if not differences:
        return None
    mean, low, high = sequential.confidence_sequence(differences, rule.confidence)
    finite = math.isfinite(low) and math.isfinite(high)
    return Interval(mean, low if finite else None, high if finite else None, len(differences))


def verdict(
    interval: Interval | None, *, higher_is_better: bool = True, rule: sequential.Rule | None = None
) -> str:
    """``better``/``worse`` when the interval excludes zero, else no detectable difference at n seeds;
    with a stopping ``rule`` also ``no difference of δ or more`` when it lies within ± its smallest effect."""
    if interval is None:
        return "no paired seeds"
    if interval.low is None or interval.high is None:
        return "one seed: no interval" if interval.n == 1 else f"undecided at {interval.n} seeds (unbounded)"
    if rule is not None:
        found = sequential.decision(interval.low, interval.high, rule)
        if found in ("better", "worse"):
            return found if higher_is_better else {"better": "worse", "worse": "better"}[found]
        return found or f"undecided at {interval.n} seeds"
    if interval.low > 0 or interval.high < 0:
        up = interval.low > 0
        return "better" if up == higher_is_better else "worse"
    return f"no detectable difference at {interval.n} seeds"


@dataclass(frozen=True)
class Paired:
    """One cell against the baseline on one metric."""

    cell: str
    baseline: str
    metric: str
    seeds: list[int]
    """The seeds present in both cells (the pairs), in order."""
    differences: list[float]
    """cell minus baseline, per paired seed."""
    cell_seeds: int
    baseline_seeds: int
    interval: Interval | None
    rule: sequential.Rule | None = None
    """The stopping rule when seeds were added until the answer was clear (confidence sequence)."""
    note: str = ""
    """Why there is no comparison on this metric (a personalised accuracy against a test accuracy)."""

    @property
    def verdict(self) -> str:
        return self.note or verdict(self.interval, rule=self.rule)

    @property
    def decided(self) -> bool:
        """Whether the answer is clear: the interval excludes zero or (with a rule) lies within ± its
        smallest effect."""
        text = self.verdict
        return text in ("better", "worse") or text.startswith("no difference of")


def by_seed(runs: list[RunResult]) -> dict[int, RunResult]:
    """A cell's runs keyed by seed (the first run of a seed wins if a folder holds two)."""
    found: dict[int, RunResult] = {}
    for run in runs:
        found.setdefault(run.seed, run)
    return found


def pair(cell: CellStats, baseline: CellStats, metric: str, rule: sequential.Rule | None = None) -> Paired:
    """The paired differences of ``metric`` between ``cell`` and ``baseline`` on their shared seeds
    (with a stopping ``rule``: in seed order, with the confidence sequence's interval)."""
    mine, theirs = by_seed(cell.runs), by_seed(baseline.runs)
    if metric != CLIENT_METRIC[0] and personalised(cell) != personalised(baseline):
        note = "personalised against global accuracy: compare client acc."
        return Paired(cell.label, baseline.label, metric, [], [], len(mine), len(theirs), None, rule, note)
    seeds = sorted(set(mine) & set(theirs))
    seeds = [
        s for s in seeds if getattr(mine[s], metric) is not None and getattr(theirs[s], metric) is not None
    ]
    differences = [float(getattr(mine[s], metric)) - float(getattr(theirs[s], metric)) for s in seeds]
    return Paired(
        cell.label,
        baseline.label,
        metric,
        seeds,
        differences,
        len(mine),
        len(theirs),
        t_interval(differences) if rule is None else sequence_interval(differences, rule),
        rule,
    )


def headline_metric(cell: CellStats, baseline: CellStats) -> str:
    """The metric a comparison is decided on: final test accuracy, or the clients' own validation accuracy
    when either side is personalised (its test accuracy is the shared part only) and both have one."""
    client = CLIENT_METRIC[0]
    if (personalised(cell) or personalised(baseline)) and cell.values(client) and baseline.values(client):
        return client
    return "final_accuracy"


def find_baseline(cells: list[CellStats], label: str | None) -> CellStats:
    """The baseline cell by label (default: the first cell)."""
    if label is None:
        return cells[0]
    for cell in cells:
        if cell.label == label:
            return cell
    raise KeyError(label)


@dataclass(frozen=True)
class Pairing:
    """Which cells are compared with which: each baseline cell with the cells paired against it."""

    title: str
    """Says what the baseline is: a cell's label, or e.g. ``fedit at the same privacy``."""
    groups: list[tuple[CellStats, list[CellStats]]]
    rule: sequential.Rule | None = None
    """With ``[compare] stop``: intervals are the confidence sequence's, verdicts follow the rule."""

    @property
    def baselines(self) -> list[CellStats]:
        return [base for base, _ in self.groups]

    def pairs(self) -> list[tuple[CellStats, CellStats]]:
        """(cell, its baseline) for every paired cell, grouped by baseline."""
        return [(cell, base) for base, paired in self.groups for cell in paired]


def pairings(cells: list[CellStats], spec: Any, rule: sequential.Rule | None = None) -> list[Pairing]:
    """The pairings of ``spec``: None (the first cell), a cell label, ``{axis: level}`` (each cell against
    the cell with that level on that axis and its own levels on the others), or a list of these.
    Raises KeyError naming what matched no cell."""
    return [_pairing(cells, s, rule) for s in (spec if isinstance(spec, list) else [spec])]


def _pairing(cells: list[CellStats], spec: Any, rule: sequential.Rule | None) -> Pairing:
    if spec is None or isinstance(spec, str):
        base = find_baseline(cells, spec)
        return Pairing(base.label, [(base, [c for c in cells if c is not base])], rule)
    ((axis, level),) = spec.items()
    groups = []
    for base in (c for c in cells if c.levels.get(axis) == level):
        rest = {k: v for k, v in base.levels.items() if k != axis}
        same = [
            c for c in cells if c is not base and {k: v for k, v in c.levels.items() if k != axis} == rest
        ]
        groups.append((base, same))
    if not groups:
        raise KeyError(f"{axis} = {level}")
    others = [k for k in cells[0].levels if k != axis]
    return Pairing(f"{level} at the same {', '.join(others) or 'levels'}", groups, rule)


def compare(cells: list[CellStats], pairing: Pairing) -> list[list[Paired]]:
    """For every paired cell, its :class:`Paired` results against its baseline, one per metric of
    :func:`metrics`."""
    return [[pair(c, base, m, pairing.rule) for m, _ in metrics(cells)] for c, base in pairing.pairs()]


def signed(value: float, digits: int = 1) -> str:
    """A difference with its sign, in points: ``+2.1``, ``-0.4``, ``0.0``."""
    text = f"{value:+.{digits}f}"
    return "0.0" if float(text) == 0 else text.replace("-", "−")


def interval_text(interval: Interval | None, scale: float = 100.0) -> str:
    """``+2.1 [−0.5, +4.7]`` in points; just the mean with one pair; an em dash for none."""
    if interval is None:
        return "—"
    mean = signed(scale * interval.mean)
    if interval.low is None or interval.high is None:
        return mean
    return f"{mean} [{signed(scale * interval.low)}, {signed(scale * interval.high)}]"


def pairs_text(p: Paired) -> str:
    """How many seeds are paired, and of how many when a run is missing on either side."""
    most = max(p.cell_seeds, p.baseline_seeds)
    return str(len(p.seeds)) if len(p.seeds) == most else f"{len(p.seeds)} of {most}"


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def to_target(cell: CellStats, timed: bool = False) -> tuple[str, ...]:
    """Mean rounds and uplink MB to the target over the seeds that reached it, with ``k/n`` reached;
    with ``timed`` also the mean virtual seconds to it (the device clock)."""
    rounds = cell.values("rounds_to_target")
    megabytes = cell.values("uplink_mb_to_target")
    seconds = cell.values("virtual_s_to_target")
    clock = (f"{_mean(seconds):.0f}" if seconds else "—",) if timed else ()
    if not rounds:
        return ("not reached", "—", *(("—",) if timed else ()))
    reached = f" ({len(rounds)}/{len(cell.runs)})" if len(rounds) < len(cell.runs) else ""
    return (f"{_mean(rounds):.1f}{reached}", f"{_mean(megabytes):.2f}" if megabytes else "—", *clock)


def table(cells: list[CellStats], pairing: Pairing, target: float) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired table: per baseline, its row (its own means), then its cells."""
    header = ["cell", "pairs"]
    for _, title in metrics(cells):
        header += [f"Δ {title} (pp) [95% CI]", f"{title}: verdict"]
    header += [f"rounds to {100 * target:g}%", f"uplink MB to {100 * target:g}%"]
    timed = any(c.values("virtual_s_to_target") for c in cells)
    header += [f"virtual s to {100 * target:g}%"] if timed else []
    rows = []
    results = iter(compare(cells, pairing))
    for base, paired in pairing.groups:
        base_row = [f"{base.label} (baseline)", str(len(base.runs))]
        for name, _ in metrics(cells):
            found = base.mean_std(name)
            base_row += [f"{100 * found[0]:.1f}% (mean)" if found else "—", ""]
        rows.append(base_row + list(to_target(base, timed)))
        for cell in paired:
            mine = next(results)
            row = [cell.label, pairs_text(mine[0])]
            for p in mine:
                row += [interval_text(p.interval), p.verdict]
            rows.append(row + list(to_target(cell, timed)))
    return header, rows


def legend(pairing: Pairing, seeds: int) -> str:
    """What the paired table's numbers mean."""
    against = f"{pairing.title}" if len(pairing.groups) == 1 else f"each group's baseline ({pairing.title})"
    rule = pairing.rule
    how = (
        f"its {100 * CONFIDENCE:g}% confidence interval (Student t on the per-seed differences). better / "
        "worse: the interval excludes zero; otherwise no difference is detectable with this many seeds "
        f"({seeds} at most here)."
        if rule is None
        else f"its {100 * rule.confidence:g}% confidence sequence (Lai's t confidence sequence on the "
        "per-seed differences: valid at whatever seed the comparison stopped, so wider than a fixed-seed "
        "t interval). "
        "better / worse: it excludes zero; no difference of δ or more: it lies within ± the smallest effect "
        f"of interest (δ = {100 * rule.smallest_effect:g} pp); undecided: neither, when the seeds or minutes "
        "ran out."
    )
    return (
        f"Differences against {against} on the same seeds, in percentage points of test accuracy: "
        f"mean over the paired seeds and {how} Pairs: seeds where both runs finished. "
        "Rounds and uplink MB to the target: mean over the seeds that reached it ((k/n): only k did)."
        + (
            " Client acc.: mean over clients of their own validation accuracy (personalised for FedSA-LoRA)."
            if any(b.values(CLIENT_METRIC[0]) for b in pairing.baselines)
            else ""
        )
    )


def markdown(cells: list[CellStats], pairing: Pairing, target: float) -> str:
    """The paired table as GitHub Markdown with its legend."""
    header, rows = table(cells, pairing, target)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    seeds = max(len(c.runs) for c in cells)
    return "\n".join(lines) + "\n\n" + legend(pairing, seeds) + "\n"


CSV_COLUMNS = ("cell", "baseline", "metric", "pairs", "seeds", "mean_diff", "ci_low", "ci_high", "verdict")


def write_csv(cells: list[CellStats], pairings: list[Pairing], path: Path) -> None:
    """One row per (pairing, cell, metric): the paired seeds, the mean difference and interval
    (fractions)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for pairing in pairings:
            for results in compare(cells, pairing):
                for p in results:
                    i = p.interval
                    low = "" if i is None or i.low is None else repr(i.low)
                    high = "" if i is None or i.high is None else repr(i.high)
                    mean = "" if i is None else repr(i.mean)
                    seeds = " ".join(map(str, p.seeds))
                    writer.writerow(
                        [p.cell, p.baseline, p.metric, len(p.seeds), seeds, mean, low, high, p.verdict]
                    )
