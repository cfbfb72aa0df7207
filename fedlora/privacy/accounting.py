"""Privacy accounting over a whole run, with Opacus's accountants.

A mechanism's history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, one per round
in which it ran (Opacus's own format): for DP-SGD a client's local steps with Poisson sampling rate
q = expected batch / examples; for dp-updates one step per round with q = expected clients per round /
clients. Epsilon is computed from the full history, so it is cumulative over every round.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

Entry = tuple[float, float, int]
"""(noise multiplier, sample rate, steps) of one round."""

EPSILON_TOLERANCE = 0.01
"""Calibration stops within this much below the target epsilon."""


def _accountant(kind: str, history: Sequence[Entry]) -> object:
    # start-up: Opacus takes about a second to import; only runs with DP need it
    from opacus.accountants import create_accountant

    accountant = create_accountant(kind)
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def epsilon(history: Sequence[Entry], delta: float, kind: str = "rdp") -> float:
    """Epsilon spent by ``history`` at ``delta`` (0.0 for an empty history; inf without noise)."""
    if not history:
        return 0.0
    if any(s <= 0 for s, _, n in history if n > 0):
        return float("inf")
    accountant = _accountant(kind, history)
    return float(accountant.get_epsilon(delta))  # type: ignore[attr-defined]


def calibrate(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp"
) -> float:
    """The smallest noise multiplier (within Opacus's tolerance) whose ``steps`` spend <= the target."""
    # start-up: Opacus takes about a second to import; only runs with DP need it
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search visits huge sigmas, whose best order is the largest
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=kind,
            epsilon_tolerance=EPSILON_TOLERANCE,
        )
    return float(sigma)


def would_exceed(history: Sequence[Entry], entry: Entry, budget: float, delta: float, kind: str) -> bool:
    """Whether running ``entry`` after ``history`` spends more than ``budget`` (0 = no budget)."""
    if budget <= 0:
        return False
    return epsilon([*history, entry], delta, kind) > budget


def history_to_lists(history: Sequence[Entry]) -> dict[str, list[float] | list[int]]:
    """History as three parallel lists (storable in a Flower ConfigRecord)."""
    return {
        "noise": [float(s) for s, _, _ in history],
        "rate": [float(q) for _, q, _ in history],
        "steps": [int(n) for _, _, n in history],
    }


def history_from_lists(record: Mapping[str, Any]) -> list[Entry]:
    """The inverse of :func:`history_to_lists` (accepts any mapping with those three keys)."""
    rows = zip(record["noise"], record["rate"], record["steps"], strict=True)
    return [(float(s), float(q), int(n)) for s, q, n in rows]
