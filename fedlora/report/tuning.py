"""Tune, then compare: each cell's tuned value is chosen on the clients' validation splits, not the test set.

A grid with ``[compare] tune = {"train.lr" = [...]}`` runs every cell at every setting (one value per
tuned key, the product when several keys are tuned) and every seed. Per cell, the setting with the
highest mean over seeds of the clients' validation accuracy (``client_eval_accuracy`` of the last round
in which clients evaluated, example-weighted over the evaluating clients: their own validation splits)
is chosen; ties go to the setting listed first. Only the chosen setting's runs enter the tables, the
paired differences and the plots; :class:`Tuning` records every setting's validation score.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

VALIDATION_KEY = "client_eval_accuracy"
"""The per-round key of ``rounds.jsonl`` tuning selects on (a fraction; absent without client evaluation)."""


def validation_accuracy(history: Iterable[Mapping[str, Any]]) -> float | None:
    """The clients' validation accuracy of the last round in which clients evaluated (None if none did).

    Test-set keys (``eval_accuracy``) are never read here.
    """
    values = [float(row[VALIDATION_KEY]) for row in history if row.get(VALIDATION_KEY) is not None]
    return values[-1] if values else None


def choose(scores: Mapping[str, Sequence[float]]) -> str | None:
    """The setting with the highest mean validation score, ties to the first listed; settings without a
    score are skipped; None when no setting has one."""
    best: tuple[str, float] | None = None
    for setting, values in scores.items():
        if values and (best is None or statistics.fmean(values) > best[1]):
            best = (setting, statistics.fmean(values))
    return None if best is None else best[0]


@dataclass(frozen=True)
class Tuning:
    """One cell's tuning: every setting's validation scores (one per finished seed) and the chosen one."""

    cell: str
    scores: dict[str, list[float]]
    chosen: str | None

    def row(self) -> list[str]:
        """The cell, its chosen setting, then each setting's mean validation accuracy (%) and seeds."""
        cells = [f"{100 * statistics.fmean(v):.1f} ({len(v)})" if v else "—" for v in self.scores.values()]
        return [self.cell, self.chosen or "none finished", *cells]


def table(tunings: Sequence[Tuning]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the tuning table (settings in the grid's order)."""
    settings = list(tunings[0].scores) if tunings else []
    header = ["cell", "chosen", *(f"{s}: val. acc. % (seeds)" for s in settings)]
    return header, [t.row() for t in tunings]


def legend() -> str:
    """What the tuning table shows."""
    return (
        "Each cell ran every setting at the tuning seeds (every seed, unless compare.tune_seeds names "
        "some; then the other seeds ran only the chosen setting); in brackets, how many seeds each score "
        "averages. The chosen setting has the highest mean over those seeds of the clients' validation "
        "accuracy (their own validation splits, last evaluated round), never the test set. Only the "
        "chosen setting's runs are in the other tables and plots."
    )


def search_table(cells: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a search's table (``tuning.json``'s cells): per cell the chosen values, their
    validation accuracy, the trials finished, pruned and failed, and the edge flags."""
    header = ["cell", "chosen", "val. acc. %", "trials: finished / pruned / failed", "ranges", "edge"]
    rows = []
    for cell in cells:
        states = [t["state"] for t in cell["trials"]]
        counts = " / ".join(str(states.count(s)) for s in ("complete", "pruned", "fail"))
        value = cell.get("value")
        edges = cell.get("edges") or []
        rows.append(
            [
                str(cell["cell"]),
                cell.get("label") or "none finished",
                "—" if value is None else f"{100 * float(value):.1f}",
                counts,
                "; ".join(f"{k} {r}" for k, r in cell.get("ranges", {}).items()),
                "⚠ " + "; ".join(edges) if edges else "",
            ]
        )
    return header, rows


def search_legend() -> str:
    """What the search table shows."""
    return (
        "Each cell's hyper-parameters were searched at the tuning seed: trials drawn quasi-randomly over the "
        "ranges (log-uniformly for log ranges), each run stopped early by successive halving when its "
        "clients' validation accuracy fell behind the other trials' at the same round. The chosen values are "
        "those of the finished trial with the highest validation accuracy (the clients' own validation "
        "splits, last round), never the test set; they then ran at every seed. ⚠: no trial lay beyond the "
        "chosen value towards that end of its range, so the best may lie outside it: widen the range."
    )
