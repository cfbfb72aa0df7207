"""Comparison plots as PNG (matplotlib, no display needed): accuracy per round, per uplink MB, per ε.

Each function draws one figure from per-cell statistics and returns the file it wrote. Sizes are
chosen to stay readable at about 800 pixels wide (a README column).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedlora.report.clients import PERSONALISED
from fedlora.report.paired import Interval, Pairing, t_interval
from fedlora.report.results import CellStats

SIZE = (7.5, 4.6)  # inches; at DPI 130 about 975 x 600 pixels
DPI = 130


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _finish(fig: Figure, ax: Axes, path: Path, title: str, *, legend: bool = True) -> Path:
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _style_panel(ax: Axes, title: str, legend_loc: Literal["upper right", "lower right"]) -> None:
    """One small-multiple panel's title, grid, legend and whole-number round ticks."""
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc=legend_loc)
    ax.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]


def _finish_panels(fig: Figure, axes: list[Axes], ylabel: str, path: Path, title: str) -> Path:
    """Label the bottom row's x axes and the first panel's y axis, then save the figure."""
    for ax in axes[-min(3, len(axes)) :]:
        ax.set_xlabel("round")
    axes[0].set_ylabel(ylabel)
    return _save(fig, path, title)


def _majority(ax: Axes, cells: list[CellStats]) -> None:
    majority = statistics.fmean(r.majority_accuracy for c in cells for r in c.runs)
    ax.axhline(
        100 * majority,
        color="grey",
        linestyle=":",
        linewidth=1,
        label=f"majority class ({100 * majority:.1f}%)",
    )


def _panels(n: int, *, height: float = 2.5) -> tuple[Figure, list[Axes]]:
    """A grid of ``n`` small panels, three per row, sharing both axes; unused panels hidden."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, grid = plt.subplots(
        rows, cols, figsize=(10.0, 0.6 + height * rows), sharex=True, sharey=True, squeeze=False
    )
    axes = [ax for row in grid for ax in row]
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig: Figure, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _series(cell: CellStats, key: str) -> list[list[float]]:
    """Per seed, the values of ``key`` in ``rounds.jsonl`` (rounds without a value dropped)."""
    return [[float(r[key]) for r in run.history if r.get(key) is not None] for run in cell.runs]


def _rounds(cell: CellStats, key: str, length: int) -> list[int]:
    """The round numbers of the first ``length`` rows with a ``key`` value (rounds between evaluations,
    ``federation.evaluate_every``, have none); 1..length when the history lacks them."""
    rounds = [int(r["round"]) for r in cell.runs[0].history if r.get(key) is not None] if cell.runs else []
    return rounds[:length] if len(rounds) >= length else list(range(1, length + 1))


def _mean_min_max(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per round over the curves: mean, minimum and maximum (the shortest curve decides the length)."""
    curves = [c for c in curves if c]
    length = min((len(c) for c in curves), default=0)
    columns = [[c[i] for c in curves] for i in range(length)]
    return [statistics.fmean(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def accuracy_per_round(
    cells: list[CellStats], path: Path, title: str, baseline_of: dict[str, CellStats] | None = None
) -> Path:
    """Small multiples, one panel per cell: its mean test accuracy per round with the range over seeds
    shaded, its baseline cell's mean (``baseline_of``: cell label -> baseline) dashed grey, the majority
    class dotted."""
    fig, axes = _panels(len(cells))
    majority = 100 * statistics.fmean(r.majority_accuracy for c in cells for r in c.runs)
    for ax, cell, colour in zip(axes, cells, _colours(len(cells)), strict=True):
        mean, low, high = _mean_min_max([[100 * a for a in r.accuracy] for r in cell.runs])
        rounds = _rounds(cell, "eval_accuracy", len(mean))
        baseline = (baseline_of or {}).get(cell.label)
        base = _mean_min_max([[100 * a for a in r.accuracy] for r in baseline.runs])[0] if baseline else []
        if baseline is not None and base:
            ax.plot(
                _rounds(baseline, "eval_accuracy", len(base)),
                base,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=baseline.label,
            )
        ax.fill_between(rounds, low, high, color=colour, alpha=0.2, linewidth=0)
        seeds = f", {len(cell.runs)} seeds" if len(cell.runs) > 1 else ""
        ax.plot(rounds, mean, color=colour, marker="o", markersize=3, label=f"{cell.label}{seeds}")
        ax.axhline(majority, color="grey", linestyle=":", linewidth=1)
        _style_panel(ax, cell.label, "lower right")
    return _finish_panels(fig, axes, "test accuracy (%)", path, title)


def _time_unit(seconds: float) -> tuple[float, str]:
    """Seconds per unit and its name for an axis reaching ``seconds``: seconds, minutes or hours."""
    if seconds < 600:
        return 1.0, "seconds"
    return (60.0, "minutes") if seconds < 36_000 else (3600.0, "hours")


def accuracy_vs_virtual_time(cells: list[CellStats], path: Path, title: str) -> Path | None:
    """Per cell, its mean test accuracy at each evaluated round against the mean virtual time (device
    clock, ``virtual_time_s``) the run had reached by then, the range over seeds shaded; None when no
    run has a virtual clock."""
    timed = [c for c in cells if any(r.virtual_time_s is not None for r in c.runs)]
    if not timed:
        return None
    unit, name = _time_unit(max(r.virtual_time_s or 0.0 for c in timed for r in c.runs))
    fig, ax = plt.subplots(figsize=SIZE)
    for cell, colour in zip(timed, _colours(len(timed)), strict=True):
        scored = [[r for r in run.history if r.get("eval_accuracy") is not None] for run in cell.runs]
        mean, low, high = _mean_min_max([[100 * float(r["eval_accuracy"]) for r in rows] for rows in scored])
        times = _mean_min_max(
            [[float(r.get("virtual_time_s") or 0.0) / unit for r in rows] for rows in scored]
        )
        ax.fill_between(times[0], low, high, color=colour, alpha=0.2, linewidth=0)
        ax.plot(times[0], mean, color=colour, marker="o", markersize=3, label=cell.label)
    _majority(ax, timed)
    ax.set_xlabel(f"virtual time ({name} on the device clock)")
    ax.set_ylabel("test accuracy (%)")
    return _finish(fig, ax, path, title)


def loss_per_round(cells: list[CellStats], path: Path, title: str) -> Path | None:
    """Small multiples, one panel per cell: mean training loss (clients) and test loss per round."""
    if not any(_series(c, "train_loss")[0] or _series(c, "eval_loss")[0] for c in cells):
        return None
    fig, axes = _panels(len(cells))
    for ax, cell in zip(axes, cells, strict=True):
        for key, name, style in (("train_loss", "train (clients)", "-"), ("eval_loss", "test", "--")):
            mean, low, high = _mean_min_max(_series(cell, key))
            rounds = _rounds(cell, key, len(mean))
            colour = "black" if key == "eval_loss" else "tab:blue"
            marker = "o" if key == "eval_loss" else None  # evaluated rounds (federation.evaluate_every)
            ax.plot(rounds, mean, linestyle=style, color=colour, marker=marker, markersize=3, label=name)
            ax.fill_between(
                rounds, low, high, alpha=0.15, linewidth=0, color="tab:blue" if style == "-" else "grey"
            )
        _style_panel(ax, cell.label, "upper right")
    return _finish_panels(fig, axes, "loss", path, title)


def traffic_per_round(cells: list[CellStats], path: Path, title: str) -> Path:
    """Mean uplink and downlink MB per round, one pair of bars per cell (log scale when they differ a lot)."""
    labels = [c.label for c in cells]
    up = [statistics.fmean([v / 1e6 for s in _series(c, "uplink_bytes") for v in s] or [0.0]) for c in cells]
    down = [
        statistics.fmean([v / 1e6 for s in _series(c, "downlink_bytes") for v in s] or [0.0]) for c in cells
    ]
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.45 * len(cells)))
    ys = list(range(len(cells)))
    ax.barh([y - 0.2 for y in ys], up, height=0.38, color="tab:blue", label="uplink")
    ax.barh([y + 0.2 for y in ys], down, height=0.38, color="tab:orange", label="downlink")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    positive = [v for v in up + down if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    elif positive:
        ax.set_xlim(0, 1.3 * max(positive))  # room for the legend on the right
    ax.set_xlabel("MB per round (all clients; mean over rounds and seeds)")
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    return _finish(fig, ax, path, title, legend=False)


def final_accuracy_paired(
    cells: list[CellStats],
    pairing: Pairing,
    differences: dict[str, tuple[list[float], Interval | None]],
    path: Path,
    title: str,
) -> Path:
    """Left: final test accuracy per seed (dots) and the cell mean (bar) per cell. Right: per seed the
    difference to its baseline on the same seed (dots), the mean and its 95% confidence interval."""
    n = len(cells)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(10.0, 1.2 + 0.5 * n), sharey=True, gridspec_kw={"width_ratios": [1, 1]}
    )
    colours = _colours(n)
    for y, (cell, colour) in enumerate(zip(cells, colours, strict=True)):
        values = [100 * r.final_accuracy for r in cell.runs]
        jitter = [0.12 * ((i % 5) - 2) / 2 for i in range(len(values))]
        left.scatter(values, [y + j for j in jitter], color=colour, s=22, zorder=3)
        left.plot([statistics.fmean(values)] * 2, [y - 0.3, y + 0.3], color="black", linewidth=2)
        if cell.label not in differences:
            right.text(
                0.02,
                y,
                "baseline" if cell in pairing.baselines else "not paired",
                va="center",
                fontsize=8,
                color="grey",
                transform=right.get_yaxis_transform(),
            )
            continue
        diffs, interval = differences.get(cell.label, ([], None))
        right.scatter(
            [100 * d for d in diffs], [y + j for j in jitter[: len(diffs)]], color=colour, s=22, zorder=3
        )
        if interval is not None:
            low = interval.low if interval.low is not None else interval.mean
            high = interval.high if interval.high is not None else interval.mean
            right.errorbar(
                100 * interval.mean,
                y,
                xerr=[[100 * (interval.mean - low)], [100 * (high - interval.mean)]],
                fmt="D",
                color="black",
                capsize=4,
                markersize=5,
                zorder=4,
            )
    majority = 100 * statistics.fmean(r.majority_accuracy for c in cells for r in c.runs)
    left.axvline(
        majority, color="grey", linestyle=":", linewidth=1, label=f"majority class ({majority:.1f}%)"
    )
    right.axvline(0, color="grey", linewidth=1)
    left.set_yticks(range(n), [c.label for c in cells], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel(
        f"final test accuracy (%)\nseeds: dots; mean: bar; majority class ({majority:.1f}%) dotted"
    )
    right.set_xlabel(f"difference to {pairing.title} (points)\nseeds: dots; mean and 95% CI: diamond and bar")
    for ax in (left, right):
        ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path, title)


def client_accuracy_per_round(cells: list[CellStats], path: Path, title: str) -> Path | None:
    """Small multiples of the clients' own validation accuracy per evaluated round: mean over clients,
    the worst client (dashed), the interquartile range shaded; means over seeds."""
    shown = [c for c in cells if any(r.client_eval for r in c.runs)]
    if not shown:
        return None
    fig, axes = _panels(len(shown))
    for ax, cell, colour in zip(axes, shown, _colours(len(shown)), strict=True):
        by_round: dict[int, list[tuple[float, float, float, float]]] = {}
        for run in cell.runs:
            for c in run.client_eval:
                by_round.setdefault(c.round, []).append((c.mean, c.worst, c.q25, c.q75))
        rounds = sorted(by_round)
        mean, worst, q25, q75 = (
            [100 * statistics.fmean(v[i] for v in by_round[r]) for r in rounds] for i in range(4)
        )
        ax.fill_between(
            rounds, q25, q75, color=colour, alpha=0.2, linewidth=0, label="middle half of clients"
        )
        ax.plot(rounds, mean, color=colour, marker="o", markersize=3, label="mean client")
        ax.plot(rounds, worst, color=colour, linestyle="--", label="worst client")
        kind = "personalised" if any(r.strategy in PERSONALISED for r in cell.runs) else "global adapter"
        _style_panel(ax, f"{cell.label} ({kind})", "lower right")
    return _finish_panels(fig, axes, "client validation accuracy (%)", path, title)


def accuracy_vs_uplink(cells: list[CellStats], path: Path, title: str) -> Path:
    """Final accuracy against total uplink traffic, one point per cell with ± 1 std error bars."""
    fig, ax = plt.subplots(figsize=SIZE)
    for cell, colour in zip(cells, _colours(len(cells)), strict=True):
        up, acc = cell.mean_std("uplink_mb"), cell.mean_std("final_accuracy")
        if up is None or acc is None:
            continue
        ax.errorbar(
            up[0],
            100 * acc[0],
            xerr=up[1],
            yerr=100 * acc[1],
            fmt="o",
            color=colour,
            capsize=3,
            label=cell.label,
        )
    _majority(ax, cells)
    ax.set_xlabel("total uplink (MB, all clients and rounds)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_xlim(0, 1.12 * max((c.mean_std("uplink_mb") or (0.0, 0.0))[0] for c in cells) or 1.0)
    return _finish(fig, ax, path, title)


def accuracy_vs_epsilon(
    cells: list[CellStats], path: Path, title: str, series: Callable[[CellStats], str]
) -> Path | None:
    """Final accuracy against ε spent, one line per series (e.g. strategy), with 95% confidence intervals
    of the mean over seeds (Student t); no-DP cells as dashed lines.

    Returns None (and writes nothing) when no cell used differential privacy.
    """
    if not any(c.values("final_epsilon") for c in cells):
        return None
    groups: dict[str, list[CellStats]] = {}
    for cell in cells:
        groups.setdefault(series(cell), []).append(cell)
    fig, ax = plt.subplots(figsize=SIZE)
    for (name, members), colour in zip(groups.items(), _colours(len(groups)), strict=True):
        private = [(c.mean_std("final_epsilon"), _half_width(c)) for c in members]
        points = sorted((e[0], 100 * a[0], 100 * a[1]) for e, a in private if e is not None and a is not None)
        if points:
            xs, ys, errs = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=errs, marker="o", color=colour, capsize=3, label=name)
        for cell in members:
            acc = cell.mean_std("final_accuracy")
            if cell.mean_std("final_epsilon") is None and acc is not None:
                ax.axhline(100 * acc[0], color=colour, linestyle="--", linewidth=1, label=f"{name}, no DP")
    _majority(ax, cells)
    delta = {r.delta for c in cells for r in c.runs if r.delta is not None}
    suffix = f", δ = {delta.pop():g}" if len(delta) == 1 else ""
    ax.set_xlabel(f"ε spent over the whole run{suffix}")
    ax.set_ylabel("final test accuracy (%)")
    return _finish(fig, ax, path, title)


def _half_width(cell: CellStats) -> tuple[float, float] | None:
    """Mean final accuracy and the half-width of its 95% confidence interval (0 with one seed)."""
    interval = t_interval(cell.values("final_accuracy"))
    if interval is None:
        return None
    return interval.mean, 0.0 if interval.high is None else interval.high - interval.mean
