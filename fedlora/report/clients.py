"""Per-client metrics from a run's ``clients.jsonl``: how accuracy spreads over the clients.

Clients that evaluate (``federation.fraction_evaluate`` > 0) report the accuracy on their own
validation split of the model they would use: the global adapter for global methods, and for
FedSA-LoRA the shared A with the client's own B (its personalised accuracy). Per round this module
gives the mean over clients (each client counts once, whatever its size), the worst client, the
standard deviation and the interquartile range. Clients with an empty validation split, and failed
replies, are left out.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

PERSONALISED = frozenset({"fedsa-lora"})
"""Strategies whose clients evaluate a personal model (shared A, their own B): personalised accuracy."""


@dataclass(frozen=True)
class ClientRound:
    """Client-side evaluation of one round."""

    round: int
    clients: int
    mean: float
    worst: float
    best: float
    std: float
    """Sample standard deviation over clients (0 with one client)."""
    q25: float
    q75: float

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25


def evaluation_rounds(rows: list[dict[str, Any]]) -> list[ClientRound]:
    """Per round with client evaluation: mean, worst, best, spread of the clients' accuracies."""
    per_round: dict[int, dict[int, float]] = {}
    for row in rows:
        if row.get("phase") != "evaluate" or row.get("status") != "ok":
            continue
        if not row.get("num_examples") or row.get("eval_accuracy") is None:
            continue
        # one value per client and round (a retried round may repeat a client: the last reply counts)
        per_round.setdefault(int(row["round"]), {})[int(row["partition_id"])] = float(row["eval_accuracy"])
    found = []
    for rnd in sorted(per_round):
        values = sorted(per_round[rnd].values())
        q25, q75 = _quartiles(values)
        found.append(
            ClientRound(
                round=rnd,
                clients=len(values),
                mean=statistics.fmean(values),
                worst=values[0],
                best=values[-1],
                std=statistics.stdev(values) if len(values) > 1 else 0.0,
                q25=q25,
                q75=q75,
            )
        )
    return found


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def accuracy_kind(strategy: str) -> str:
    """What the clients' accuracy measures for ``strategy``."""
    return "personalised (shared A, own B)" if strategy in PERSONALISED else "global adapter"
