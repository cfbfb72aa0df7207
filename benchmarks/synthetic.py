"""Strategy rounds without Flower: the server's pure hooks fed with client replies of the real shapes.

A client's reply is built exactly as ``clients/local.py`` builds it (the plan's rank, start state,
received arrays, kept kinds, reply keys); its training is replaced by a small random step on the
kinds the plan trains, so the arrays have the real shapes, dtypes and a realistic spread. Used by
``traffic.py`` (bytes) and ``server_cost.py`` (aggregation time). Nothing here trains a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from clients.runtime import start_state
from fedlora.core.config import ExperimentConfig
from fedlora.core.model.arrays import State, from_arrays, kind_of, payload_bytes, to_arrays
from fedlora.run.experiment import load_experiment
from fedlora.tasks.models import initial_state
from strategies import registry
from strategies.base import LoraStrategy


@dataclass
class Round:
    """One round's messages as the server sends and receives them."""

    downlink_bytes: int
    uplink_bytes: int
    replies: list[Any]  # ArrayRecords, one per client
    weights: list[float]


def config(strategy: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """The quickstart model settings (defaults) with ``strategy`` and ``overrides`` applied."""
    return load_experiment(None, [f'strategy.name="{strategy}"', *(overrides or [])])


def make_strategy(cfg: ExperimentConfig) -> LoraStrategy:
    """The registered strategy of ``cfg``, starting from the seeded initial adapter."""
    return registry.get(cfg.strategy.name)(cfg, initial_state(cfg))


def client_reply(strategy: LoraStrategy, pid: int, server_round: int, received: State, step: float) -> State:
    """What client ``pid`` sends back (as in ``clients/local.py``), after a random step of size ``step``."""
    cfg = strategy.cfg
    plan = strategy.client_plan(pid, server_round)
    local_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=plan.rank))
    state = start_state(local_cfg, plan)
    state.update(received)
    generator = torch.Generator().manual_seed(1_000 * server_round + pid)
    for key, value in state.items():
        if kind_of(key) not in plan.freeze:
            state[key] = value + step * torch.randn(value.shape, generator=generator)
    return {k: state[k] for k in plan.reply_keys(received, state)}


def play_round(strategy: LoraStrategy, server_round: int, clients: list[int], step: float = 1e-2) -> Round:
    """Send, reply and measure one round (aggregation is left to the caller, see :func:`aggregate`)."""
    strategy.server_round = server_round  # what configure_train records in a run
    outgoing = strategy.outgoing(strategy.global_state)
    records = [to_arrays(outgoing)]
    if strategy.base_offsets:
        records.append(to_arrays(strategy.base_offsets))
    down = sum(payload_bytes(r) for r in records) * len(clients)
    replies = [to_arrays(client_reply(strategy, pid, server_round, outgoing, step)) for pid in clients]
    up = sum(payload_bytes(r) for r in replies)
    weights = [1.0 / len(clients)] * len(clients)
    return Round(downlink_bytes=down, uplink_bytes=up, replies=replies, weights=weights)


def aggregate(strategy: LoraStrategy, played: Round) -> None:
    """The server's work on replies: deserialise them and aggregate (as ``LoraStrategy`` does)."""
    updates = [from_arrays(record) for record in played.replies]
    new = strategy.aggregate(strategy.global_state, updates, played.weights)
    strategy.global_state = {**strategy.global_state, **new}


def full_model_bytes(cfg: ExperimentConfig) -> int:
    """Serialized bytes of every parameter of the classifier (full fine-tuning sends all of them)."""
    from fedlora.core.model.loading import load_classifier

    model = load_classifier(cfg.model.path, num_labels=3, seed=cfg.seed)
    return int(payload_bytes(to_arrays(dict(model.named_parameters()))))
