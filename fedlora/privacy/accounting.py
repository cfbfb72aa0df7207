"""Privacy accounting over a whole run, with Opacus's accountants.

A mechanism's history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, one per round
in which it ran (Opacus's own format): for DP-SGD a client's local steps with Poisson sampling rate
q = expected batch / examples; for dp-updates one step per round with q = expected clients per round /
clients. Epsilon is computed from the full history, so it is cumulative over every round.

``privacy.accountant`` names an accountant in Opacus's own registry (``rdp``, ``prv``, ``gdp``, and any
that ``opacus.accountants.register_accountant`` adds). Entries with the same noise and rate are merged
before accounting (their steps summed: the same composition), which is what Opacus's Gaussian (``gdp``)
accountant needs: it reads only the last entry, so it accounts a history with one noise multiplier and
one sample rate, and refuses any other.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from fedlora.core.config import ConfigError

Entry = tuple[float, float, int]
"""(noise multiplier, sample rate, steps) of one round."""

EPSILON_TOLERANCE = 0.01
"""Calibration stops within this much below the target epsilon."""


def accountant_names() -> list[str]:
    """The accountants Opacus's registry holds (what ``create_accountant`` accepts), sorted."""
    # start-up: Opacus takes about a second to import; only runs with DP need it
    from opacus.accountants.registry import _ACCOUNTANTS  # the dict register_accountant writes to

    return sorted(_ACCOUNTANTS)


def check_accountant(kind: str) -> None:
    """ConfigError naming Opacus's accountants unless ``kind`` is one of them."""
    names = accountant_names()
    if kind not in names:
        raise ConfigError(
            f"privacy.accountant = {kind!r} is invalid: expected one of Opacus's accountants "
            f"({', '.join(names)})"
        )


def merged(history: Sequence[Entry]) -> list[Entry]:
    """``history`` with the entries of equal (noise, rate) merged, their steps summed, in first-seen order
    (the same composition of subsampled Gaussian mechanisms)."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        key = (float(s), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in steps.items()]


def _accountant(kind: str, history: Sequence[Entry]) -> object:
    # start-up: Opacus takes about a second to import; only runs with DP need it
    from opacus.accountants import GaussianAccountant, create_accountant

    accountant = create_accountant(kind)
    accountant.history = merged(history)
    if isinstance(accountant, GaussianAccountant) and len(accountant.history) > 1:
        raise ValueError(
            f"privacy.accountant = {kind!r} accounts one noise multiplier and sample rate for the whole run, "
            f"but this history has {len(accountant.history)}; use rdp or prv"
        )
    return accountant


def epsilon(history: Sequence[Entry], delta: float, kind: str = "rdp") -> float:
    """Epsilon spent by ``history`` at ``delta`` (0.0 for an empty history; inf without noise)."""
    if not history:
        return 0.0
    if any(s <= 0 for s, _, n in history if n > 0):
        return float("inf")
    accountant = _accountant(kind, history)
    return float(accountant.get_epsilon(delta))  # type: ignore[attr-defined]


@lru_cache(maxsize=256)
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
