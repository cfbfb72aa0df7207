"""Seeds until the answer is clear: ``[compare] stop`` adds paired seeds while a comparison is undecided.

::

    [compare]
    seeds = [0, 1, 2]                      # run first (at least 2)
    stop = { max_seeds = 10, max_minutes = 120, smallest_effect = 0.01 }

After the first seeds have run, each further seed (one more than the largest so far) runs in every cell
until every comparison (each cell against its baseline, on final test accuracy; on the clients' own
validation accuracy where a side is personalised) is decided: its confidence sequence excludes zero, or
lies within ± ``smallest_effect`` (:mod:`fedlora.report.sequential`). It stops earlier at ``max_seeds``
seeds, or when another seed would end after ``max_minutes`` (counted from the start of ``fedlora
compare``, at the pace of the seeds run so far).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.core.config import ConfigError
from fedlora.report import paired
from fedlora.report.results import group
from fedlora.report.sequential import Rule
from fedlora.report.writer import Collected

STOP_KEYS = {"max_seeds", "max_minutes", "smallest_effect"}


@dataclass(frozen=True)
class StopRule:
    """``compare.stop``: at most ``max_seeds`` seeds and ``max_minutes`` minutes; clear when every interval
    excludes zero or lies within ± ``smallest_effect``."""

    max_seeds: int
    smallest_effect: float
    max_minutes: float | None = None

    @property
    def rule(self) -> Rule:
        """The decision rule the report applies to every comparison."""
        return Rule(self.smallest_effect)

    def manifest(self) -> dict[str, Any]:
        """As written in comparison.json (what ``fedlora report`` reads)."""
        found: dict[str, Any] = {"max_seeds": self.max_seeds, "smallest_effect": self.smallest_effect}
        return found | ({"max_minutes": self.max_minutes} if self.max_minutes is not None else {})


def parse_stop(data: Any, seeds: list[int]) -> StopRule | None:
    """``compare.stop`` checked against ``compare.seeds`` (None when absent)."""
    if data is None:
        return None
    example = "e.g. { max_seeds = 10, max_minutes = 120, smallest_effect = 0.01 }"
    if not isinstance(data, dict):
        raise ConfigError(f"compare.stop = {data!r} is invalid: expected a table, {example}")
    for key in data:
        if key not in STOP_KEYS:
            raise ConfigError(f"unknown key 'compare.stop.{key}'; valid keys: {', '.join(sorted(STOP_KEYS))}")
    most: Any = data.get("max_seeds")
    effect: Any = data.get("smallest_effect")
    minutes: Any = data.get("max_minutes")
    if not _is_int(most) or most < max(3, len(seeds)):
        raise ConfigError(
            f"compare.stop.max_seeds = {most!r} is invalid: expected an integer >= {max(3, len(seeds))} "
            "(at least 3, and no fewer than compare.seeds lists)"
        )
    if not _is_number(effect) or not 0 < effect < 1:
        raise ConfigError(
            f"compare.stop.smallest_effect = {effect!r} is invalid: expected the smallest difference of "
            "accuracy worth detecting, a fraction in (0, 1), e.g. 0.01 for one point"
        )
    if minutes is not None and (not _is_number(minutes) or minutes <= 0):
        raise ConfigError(f"compare.stop.max_minutes = {minutes!r} is invalid: expected minutes > 0")
    if len(seeds) < 2:
        raise ConfigError(
            f"compare.seeds = {seeds} with compare.stop: list at least 2 seeds to run before the first check"
        )
    return StopRule(int(most), float(effect), None if minutes is None else float(minutes))


@dataclass(frozen=True)
class Progress:
    """Where a comparison with a stopping rule stands after its seeds so far."""

    seeds: list[int]
    open: list[paired.Paired]
    """The comparisons still undecided (headline metric)."""
    total: int
    """How many comparisons there are."""
    next_seed: int | None
    """The seed to run next; None: stop."""
    reason: str
    """Why it goes on or stops, in words."""

    def manifest(self) -> dict[str, Any]:
        """As written in stopping.json beside comparison.json."""
        return {
            "seeds": self.seeds,
            "undecided": [f"{p.cell} vs {p.baseline}" for p in self.open],
            "comparisons": self.total,
            "next_seed": self.next_seed,
            "reason": self.reason,
        }


def progress(
    found: Collected, stop: StopRule, seeds: list[int], *, elapsed_s: float, seed_s: float
) -> Progress:
    """Whether to add a seed to ``seeds`` (those run so far), from the finished runs in ``found``:
    ``elapsed_s`` since the comparison started and ``seed_s``, the seconds one seed took so far."""
    cells = group(found.results)
    pairs = [p for pairing in paired.pairings(cells, found.baseline, stop.rule) for p in pairing.pairs()]
    results = [paired.pair(c, b, paired.headline_metric(c, b), stop.rule) for c, b in pairs]
    results = [p for p in results if not p.note]  # not comparable (personalised against test accuracy)
    undecided = [p for p in results if not p.decided]
    following = max(seeds) + 1
    if not undecided:
        return Progress(seeds, [], len(results), None, f"every comparison is decided at {len(seeds)} seeds")
    if len(seeds) >= stop.max_seeds:
        reason = f"{len(undecided)} of {len(results)} still undecided, but max_seeds = {stop.max_seeds}"
        return Progress(seeds, undecided, len(results), None, reason)
    budget = None if stop.max_minutes is None else 60 * stop.max_minutes
    if budget is not None and elapsed_s + seed_s > budget:
        reason = (
            f"{len(undecided)} of {len(results)} still undecided, but another seed (about "
            f"{seed_s / 60:.0f} min) would pass max_minutes = {stop.max_minutes:g}"
        )
        return Progress(seeds, undecided, len(results), None, reason)
    reason = f"{len(undecided)} of {len(results)} comparisons undecided at {len(seeds)} seeds"
    return Progress(seeds, undecided, len(results), following, reason)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
