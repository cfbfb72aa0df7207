"""A client's work on a train or evaluate message (``clients/app.py`` hands these messages here).

Each handler parses the message, reads the plan the strategy sent for this client (rank, kinds frozen,
kinds kept local, re-initialisation, what to reply with), calls the library and the privacy mechanism
of the experiment, and builds the reply. Nothing here knows which strategy or privacy mode runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients import runtime
from fedlora.core.model.adapters import adapter_state, load_adapter_state, set_base_offsets, set_trainable
from fedlora.core.model.arrays import from_arrays, to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.plan import ClientPlan
from fedlora.core.records.store import ClientStore
from fedlora.core.training import faults
from fedlora.core.training.loops import evaluate as evaluate_model
from fedlora.core.training.pruning import rank_pruning
from fedlora.privacy.mechanisms import mechanism_for


def _partition_id(context: Context, config: ConfigRecord, num_clients: int) -> int:
    """The partition this message is for: the one the server assigned (virtual nodes of a simulation,
    which share one data source), else this node's own, checked against ``federation.num_clients``."""
    assigned = config.get(protocol.ASSIGNED_PARTITION)
    if assigned is not None:
        if context.node_config.get(protocol.NODE_DATA_PATH):
            raise ValueError("this SuperNode has its own data-path and plays no other partition")
        return int(assigned)  # type: ignore[arg-type]
    value = context.node_config.get(protocol.NODE_PARTITION_ID)
    if value is None:
        raise ValueError("this SuperNode has no partition-id; start it with --node-config 'partition-id=N'")
    partitions = context.node_config.get(protocol.NODE_NUM_PARTITIONS)
    if partitions is not None and int(partitions) != num_clients:  # type: ignore[arg-type]
        raise ValueError(
            f"the federation has {partitions} nodes but federation.num_clients = {num_clients}; "
            "make them equal (flwr run: --federation-config num-supernodes=N)"
        )
    return int(value)  # type: ignore[arg-type]


def _store(context: Context, config: ConfigRecord, partition_id: int, server_round: int) -> ClientStore:
    """This client's state store: the node's ``state-dir``, else the one the server names, else Context."""
    root = context.node_config.get(protocol.NODE_STATE_DIR) or config.get(protocol.STATE_DIR)
    return ClientStore(context, str(root) if root else None, partition_id, server_round)


def _prepare(message: Message, context: Context) -> tuple[Any, ...]:
    """Parse the message, build this round's adapter on the process's model; returns what handlers need."""
    config: ConfigRecord = message.content[protocol.CONFIG]  # type: ignore[assignment]
    text = str(config[protocol.EXPERIMENT])
    cfg = runtime.parse_experiment(text)
    runtime.set_threads(cfg.federation.client_cpus)
    pid = _partition_id(context, config, cfg.federation.num_clients)
    server_round = int(config[protocol.SERVER_ROUND])  # type: ignore[arg-type]
    plan = ClientPlan.from_config(message.content[protocol.PLAN])  # type: ignore[arg-type]
    local_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=plan.rank))
    model = runtime.model_for(local_cfg)
    store = _store(context, config, pid, server_round)
    set_base_offsets(model, runtime.base_offsets(message.content, config, store))
    received = from_arrays(message.content[protocol.ARRAYS])
    evaluating = message.metadata.message_type == MessageType.EVALUATE
    state = runtime.start_state(local_cfg, plan)
    state.update(runtime.load_local(store, plan, include_current=evaluating))
    state.update(received)
    load_adapter_state(model, state)
    set_trainable(model, plan.freeze)
    data = runtime.data_for(text, pid, str(context.node_config.get(protocol.NODE_DATA_PATH) or ""))
    runtime.log_startup(message)
    return cfg, pid, plan, model, data, received, server_round, store


def train(message: Message, context: Context) -> Message:
    """Train this round's adapter on the local split; reply with the arrays the strategy wants back.

    A client given a fault in ``[faults]`` (simulations) raises, waits, or spoils its reply
    (:mod:`fedlora.core.training.faults`). Training and the reply go through the experiment's
    privacy mechanism (:mod:`fedlora.privacy.mechanisms`): under dp-sgd a client whose budget this
    round would exceed declines (a reply without arrays, with the reason); under dp-updates with client
    placement the reply carries the clipped update plus this client's share of the noise.
    """

    cfg, pid, plan, model, data, received, server_round, store = _prepare(message, context)
    fault = faults.fault_for(cfg, server_round, pid)
    faults.before_training(cfg, fault, pid, server_round)
    seed = runtime.client_seed(cfg, server_round, pid)
    privacy = mechanism_for(cfg)
    with rank_pruning(model, plan.prune_from, plan.prune_weight) as pruning:  # HetLoRA's self-pruning
        trained = privacy.train(store, model, data.train, seed=seed)
    if trained.declined:
        return _declined(message, pid, trained.declined, trained.metrics)
    state = adapter_state(model)
    runtime.save_local(store, plan, state)
    reply = {k: state[k] for k in plan.reply_keys(received, state)}
    reply = faults.spoil(privacy.privatise(received, reply, seed=seed), fault)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: len(data.train),
            protocol.TRAIN_LOSS: trained.loss,
            protocol.PARTITION_ID: pid,
            **trained.metrics,
            **pruning,
            **runtime.label_counts(cfg, data.train),
        }
    )
    return Message(
        RecordDict({protocol.ARRAYS: to_arrays(reply), protocol.METRICS: metrics}), reply_to=message
    )


def _declined(message: Message, pid: int, reason: str, extra: dict[str, float]) -> Message:
    """A reply that trains nothing and says why (the server counts it and goes on without it)."""
    metrics = MetricRecord({protocol.PARTITION_ID: pid, protocol.DECLINED: 1, **extra})
    status = ConfigRecord({protocol.REASON: reason})
    return Message(RecordDict({protocol.METRICS: metrics, protocol.STATUS: status}), reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """Evaluate this client's adapter (the global one, plus anything kept locally) on its validation split."""
    cfg, pid, _, model, data, _, _, _ = _prepare(message, context)
    loss, accuracy = evaluate_model(model, data.val)
    n = len(data.val)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: n,
            protocol.EVAL_LOSS: loss if n else 0.0,
            protocol.EVAL_ACCURACY: accuracy if n else 0.0,
            protocol.PARTITION_ID: pid,
            **runtime.label_counts(cfg, data.val),
        }
    )
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)
