"""Intervals that stay valid when seeds are added until the answer is clear (``[compare] stop``).

A comparison that adds paired seeds until every interval excludes zero and then reports that interval
looks at the data after every seed: Student's t interval computed at a data-dependent stopping time
covers the true mean difference less often than its nominal 95% (``tests/test_sequential.py`` shows it).
This module uses a *confidence sequence* instead: intervals CS_2, CS_3, ... that cover the mean at every
number of seeds *simultaneously* with probability at least 95%, so the interval at whatever seed the
comparison stops at covers it too, however the stopping was decided.

The sequence is Lai's (1976) t confidence sequence for normally distributed observations of unknown mean
and variance (see also Wang and Ramdas, 2023, "Anytime-valid t-tests and confidence sequences for
Gaussian means with unknown variance"). For a candidate mean m, with y_i = x_i - m, A = sum y_i^2 and
B = sum y_i, the scale-invariant mixture likelihood ratio (a N(0, 1/c) prior on the standardised effect,
Haar measure on the scale)

    M_n(m) = sqrt(c / (n + c)) * (1 - B^2 / ((n + c) A))^(-n/2)

is a nonnegative martingale with M_1 = 1 when m is the true mean, so by Ville's inequality
P(exists n: M_n(m) >= 1/alpha) <= alpha. The confidence sequence {m: M_n(m) < 1/alpha} is, solved for m,

    mean_n ± sd_n * sqrt(q / (n - q)),   q = (n + c) * (1 - (alpha^2 c / (n + c))^(1/n)),

with sd_n the standard deviation with divisor n (the whole real line while q >= n). The running
intersection of the intervals is reported (still valid). It assumes what the Student t interval already
assumes, normally distributed paired differences, and nothing about their variance. Bounds that assume only
that a difference of accuracies lies in [-1, 1] (Hoeffding, empirical Bernstein) are valid without it but
cannot exclude zero at the few seeds a federated comparison can afford: Hoeffding's time-uniform bound is
still ± 1.3 (130 points) after 10 seeds. The coverage of this sequence, and the shortfall of the t
interval, are checked by simulation in ``tests/test_sequential.py``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

PRIOR = 0.1
"""c, the precision of the mixture's prior on the standardised effect: smaller c favours larger effects.
0.1 keeps the interval finite from 3 pairs and narrow between 4 and 15 (the seeds a comparison affords)."""


@dataclass(frozen=True)
class Rule:
    """When a comparison is clear: its confidence sequence excludes zero, or lies within ± the smallest
    effect of interest (then no difference that large exists, at the stated confidence)."""

    smallest_effect: float
    """A difference of accuracies (a fraction, e.g. 0.01 = one point)."""
    confidence: float = 0.95


def half_width(n: int, sd: float, confidence: float = 0.95, prior: float = PRIOR) -> float:
    """Half-width of Lai's t confidence sequence after ``n`` observations with standard deviation ``sd``
    (divisor n); ``inf`` while the sequence is still the whole line (n = 1, or q >= n)."""
    if n < 2:
        return math.inf
    alpha = 1 - confidence
    q = (n + prior) * (1 - (alpha * alpha * prior / (n + prior)) ** (1 / n))
    if q >= n:
        return math.inf
    return sd * math.sqrt(q / (n - q))


def confidence_sequence(
    values: Sequence[float], confidence: float = 0.95, prior: float = PRIOR
) -> tuple[float, float, float]:
    """(mean, low, high) after all of ``values``: the running intersection of Lai's t confidence sequence
    over the prefixes of ``values`` (in the order they were observed); infinite bounds while it is
    unbounded. Raises ValueError for no values."""
    if not values:
        raise ValueError("a confidence sequence needs at least one value")
    low, high = -math.inf, math.inf
    total = squares = 0.0
    for n, value in enumerate(values, start=1):
        total += value
        squares += value * value
        mean = total / n
        half = half_width(n, math.sqrt(max(0.0, squares / n - mean * mean)), confidence, prior)
        low, high = max(low, mean - half), min(high, mean + half)
    mean = statistics.fmean(values)
    if low > high:  # the running intersection emptied: the data contradict normality; report the last
        half = half_width(len(values), statistics.pstdev(values), confidence, prior)
        low, high = mean - half, mean + half
    return mean, low, high


def decision(low: float, high: float, rule: Rule) -> str | None:
    """``better`` or ``worse`` when the interval excludes zero, ``no difference of δ or more`` when it lies
    within ± the smallest effect, else None (undecided: more seeds would help)."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    if -rule.smallest_effect <= low and high <= rule.smallest_effect:
        return f"no difference of {100 * rule.smallest_effect:g} pp or more"
    return None
