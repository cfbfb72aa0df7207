"""Seeds until the answer is clear: the confidence sequence covers the true mean difference however the
comparison decides to stop, where the Student t interval computed at the stopping seed does not."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import stats

from fedlora.report.sequential import Rule, confidence_sequence, decision, half_width

REPS = 2000
"""Enough to tell 95% from 90%: the standard error of a coverage near 95% is 0.5 points."""

Interval = Callable[[list[float]], tuple[float, float, float]]


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Student's t 95% interval, what a fixed number of seeds would report."""
    n = len(values)
    mean = float(np.mean(values))
    half = T_QUANTILE[n] * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


T_QUANTILE = {n: float(stats.t.ppf(0.975, n - 1)) for n in range(2, 41)}


def stopped_coverage(interval: Interval, mean: float, sd: float, *, first: int = 3, most: int = 20) -> float:
    """The share of simulated comparisons whose interval at the seed they stopped at covers ``mean``:
    paired differences N(mean, sd), seeds added one at a time from ``first`` until the interval is
    decided (excludes zero, or lies within ± 1 point) or ``most`` seeds."""
    rng = np.random.default_rng(0)
    rule = Rule(smallest_effect=0.01)
    covered = 0
    for _ in range(REPS):
        values = rng.normal(mean, sd, most).tolist()
        for n in range(first, most + 1):
            _, low, high = interval(values[:n])
            if decision(low, high, rule) is not None:
                break
        covered += low <= mean <= high
    return covered / REPS


@pytest.mark.parametrize(("mean", "sd"), [(0.0, 0.02), (0.01, 0.02), (0.03, 0.02)])
def test_the_sequence_covers_the_mean_where_the_comparison_stops(mean: float, sd: float) -> None:
    assert stopped_coverage(confidence_sequence, mean, sd) >= 0.95


def test_the_t_interval_at_the_stopping_seed_does_not() -> None:
    """The reason for the sequence: with no true difference, stopping as soon as the t interval excludes
    zero makes that interval cover zero in fewer than 90% of comparisons (about 77% here)."""
    assert stopped_coverage(t_interval, 0.0, 0.02) < 0.90


def test_the_sequence_covers_at_every_seed_at_once() -> None:
    rng = np.random.default_rng(1)
    misses = 0
    for _ in range(REPS):
        values = rng.normal(0.02, 0.03, 15).tolist()
        misses += any(not low <= 0.02 <= high for _, low, high in map(confidence_sequence, _prefixes(values)))
    assert misses / REPS <= 0.05


def _prefixes(values: list[float]) -> list[list[float]]:
    return [values[:n] for n in range(2, len(values) + 1)]


def test_the_sequence_narrows_with_seeds_and_is_wider_than_a_fixed_t_interval() -> None:
    widths = [half_width(n, 1.0) for n in (3, 5, 10, 20)]
    assert widths == sorted(widths, reverse=True) and math.isfinite(widths[0])
    assert half_width(1, 1.0) == math.inf and half_width(2, 1.0) == math.inf
    # the price of stopping at will: about twice the t interval's half-width at 5 to 10 seeds
    for n in (5, 10):
        t_half = T_QUANTILE[n] * math.sqrt(n / (n - 1)) / math.sqrt(n)  # same data: sd with divisor n = 1
        assert 1.3 < half_width(n, 1.0) / t_half < 2.5


def test_decisions() -> None:
    rule = Rule(smallest_effect=0.01)
    assert decision(0.001, 0.05, rule) == "better"
    assert decision(-0.05, -0.001, rule) == "worse"
    assert decision(-0.008, 0.009, rule) == "no difference of 1 pp or more"
    assert decision(-0.02, 0.009, rule) is None
    assert decision(-math.inf, math.inf, rule) is None


def test_a_clear_difference_is_decided_in_a_few_seeds() -> None:
    values = [0.05, 0.06, 0.045, 0.055, 0.05]
    mean, low, high = confidence_sequence(values)
    assert 0 < low < mean < high and math.isclose(mean, 0.052)
    with pytest.raises(ValueError, match="at least one value"):
        confidence_sequence([])
