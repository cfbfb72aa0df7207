"""Fault injection for simulations: which clients misbehave in a round, and how.

Per round, the federation's partitions are shuffled with a seed drawn from (experiment seed, round);
the first ``round(raise_fraction * N)`` of them raise, the next ``round(straggle_fraction * N)``
straggle, then ``nan`` and ``corrupt``. Every client computes the same assignment from the experiment
alone, so a run with faults is as reproducible as one without. A sampled client with a fault:

* ``raise``: its train handler raises :class:`InjectedFault` (Flower replies with an error);
* ``straggle``: it waits ``faults.straggle_s`` seconds before training (longer than
  ``federation.round_timeout``: it never answers in time);
* ``nan``: it trains, then replies with NaN in every array;
* ``corrupt``: it trains, then replies with one array one element short (a wrong shape).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping

import torch

from fedlora.core.config import ExperimentConfig

FAULTS = ("raise", "straggle", "nan", "corrupt")


class InjectedFault(RuntimeError):
    """The error a client with the ``raise`` fault raises (on purpose, configured in ``[faults]``)."""


def assignment(cfg: ExperimentConfig, server_round: int) -> dict[int, str]:
    """partition id -> fault for every client given one in ``server_round`` (absent: no fault)."""
    f, n = cfg.faults, cfg.federation.num_clients
    if not f.enabled:
        return {}
    order = list(range(n))
    random.Random(f"fedlora-faults/{cfg.seed}/{server_round}").shuffle(order)
    shares = (f.raise_fraction, f.straggle_fraction, f.nan_fraction, f.corrupt_fraction)
    found: dict[int, str] = {}
    start = 0
    for name, share in zip(FAULTS, shares, strict=True):
        count = round(share * n)
        found.update({pid: name for pid in order[start : start + count]})
        start += count
    return found


def fault_for(cfg: ExperimentConfig, server_round: int, partition_id: int) -> str | None:
    """The fault client ``partition_id`` plays in ``server_round``, or None."""
    return assignment(cfg, server_round).get(partition_id)


def before_training(cfg: ExperimentConfig, fault: str | None, partition_id: int, server_round: int) -> None:
    """Raise (``raise``) or wait ``faults.straggle_s`` seconds (``straggle``); nothing otherwise."""
    if fault == "raise":
        raise InjectedFault(f"injected fault: client {partition_id} raises in round {server_round}")
    if fault == "straggle":
        time.sleep(cfg.faults.straggle_s)


def spoil(reply: Mapping[str, torch.Tensor], fault: str | None) -> dict[str, torch.Tensor]:
    """The reply a ``nan`` or ``corrupt`` client sends instead of ``reply`` (unchanged otherwise)."""
    spoilt = dict(reply)
    if fault == "nan":
        spoilt = {k: torch.full_like(v, float("nan")) for k, v in reply.items()}
    elif fault == "corrupt" and reply:
        key = sorted(reply)[0]
        spoilt[key] = reply[key].flatten()[:-1].clone()
    return spoilt
