"""Comparison plots as PNG (matplotlib, no display needed): accuracy per round, per uplink MB, per ε.

Each function draws one figure from per-cell statistics and returns the file it wrote. Sizes are
chosen to stay readable at about 800 pixels wide (a README column).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

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


def _majority(ax: Axes, cells: list[CellStats]) -> None:
    majority = statistics.fmean(r.majority_accuracy for c in cells for r in c.runs)
    ax.axhline(
        100 * majority,
        color="grey",
        linestyle=":",
        linewidth=1,
        label=f"majority class ({100 * majority:.1f}%)",
    )


def accuracy_per_round(cells: list[CellStats], path: Path, title: str) -> Path:
    """Mean test accuracy per round, one line per cell, with a ± 1 std band over seeds."""
    fig, ax = plt.subplots(figsize=SIZE)
    for cell, colour in zip(cells, _colours(len(cells)), strict=True):
        mean, std = cell.mean_accuracy_curve()
        rounds = list(range(1, len(mean) + 1))
        ax.plot(rounds, [100 * m for m in mean], color=colour, marker="o", markersize=3, label=cell.label)
        low = [100 * (m - s) for m, s in zip(mean, std, strict=True)]
        high = [100 * (m + s) for m, s in zip(mean, std, strict=True)]
        ax.fill_between(rounds, low, high, color=colour, alpha=0.15, linewidth=0)
    _majority(ax, cells)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]
    return _finish(fig, ax, path, title)


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
    """Final accuracy against ε spent, one line per series (e.g. strategy); no-DP cells as dashed lines.

    Returns None (and writes nothing) when no cell used differential privacy.
    """
    if not any(c.values("final_epsilon") for c in cells):
        return None
    groups: dict[str, list[CellStats]] = {}
    for cell in cells:
        groups.setdefault(series(cell), []).append(cell)
    fig, ax = plt.subplots(figsize=SIZE)
    for (name, members), colour in zip(groups.items(), _colours(len(groups)), strict=True):
        private = [(c.mean_std("final_epsilon"), c.mean_std("final_accuracy")) for c in members]
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
