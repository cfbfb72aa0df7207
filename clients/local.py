"""A client's work on a train or evaluate message (``clients/app.py`` hands these messages here).

Each handler parses the message, reads the plan the strategy sent for this client (rank, kinds frozen,
kinds kept local, re-initialisation, what to reply with, a core R between A and B, local alternation),
calls the library and the privacy mechanism of the experiment, and builds the reply. Nothing here knows
which strategy or privacy mode runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients import node, runtime
from clients import secagg as secure
from fedlora.core.config import CompressionConfig
from fedlora.core.model import codecs
from fedlora.core.model.adapters import adapter_state, load_adapter_state, set_base_offsets, set_trainable
from fedlora.core.model.arrays import State, from_arrays, to_arrays
from fedlora.core.model.cores import set_cores
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol import secagg
from fedlora.core.protocol.plan import ClientPlan
from fedlora.core.records.store import ClientStore
from fedlora.core.training import faults
from fedlora.core.training.alternation import set_alternation
from fedlora.core.training.loops import evaluate as evaluate_model
from fedlora.core.training.pruning import rank_pruning
from fedlora.privacy.mechanisms import mechanism_for
from fedlora.privacy.mechanisms.base import flat_update


def _prepare(message: Message, context: Context) -> tuple[Any, ...]:
    """Parse the message, build this round's adapter on the process's model; returns what handlers need."""
    config: ConfigRecord = message.content[protocol.CONFIG]  # type: ignore[assignment]
    text = str(config[protocol.EXPERIMENT])
    cfg = runtime.parse_experiment(text)
    runtime.set_threads(cfg.federation.client_cpus)
    pid = node.partition_id(context, config, cfg.federation.num_clients)
    server_round = int(config[protocol.SERVER_ROUND])  # type: ignore[arg-type]
    plan = ClientPlan.from_config(message.content[protocol.PLAN])  # type: ignore[arg-type]
    local_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=plan.rank))
    model = runtime.model_for(local_cfg)
    store = node.client_store(context, config, pid, server_round)
    set_base_offsets(model, runtime.base_offsets(message.content, config, store))
    received = from_arrays(message.content[protocol.ARRAYS])
    evaluating = message.metadata.message_type == MessageType.EVALUATE
    state = runtime.start_state(local_cfg, plan)
    state.update(runtime.load_local(store, plan, include_current=evaluating))
    state.update(received)
    set_cores(model, plan.core)  # the process's model is shared by messages with other plans
    load_adapter_state(model, state)
    set_trainable(model, plan.freeze)
    set_alternation(model, plan.alternate_every)
    data = runtime.data_for(text, pid, str(context.node_config.get(protocol.NODE_DATA_PATH) or ""))
    runtime.log_startup(message)
    return cfg, pid, plan, model, data, received, server_round, store


def train(message: Message, context: Context) -> Message:
    """Train this round's adapter on the local split; reply with the arrays the strategy wants back.

    A client given a fault in ``[faults]`` (simulations) raises, waits, or spoils its reply
    (:mod:`fedlora.core.training.faults`). Training and the reply go through the experiment's
    privacy mechanism (:mod:`fedlora.privacy.mechanisms`): under dp-sgd a client whose budget this
    round would exceed declines (a reply without arrays, with the reason); under dp-updates with client
    placement the reply carries the clipped update plus this client's share of the noise. With a
    ``compression.uplink`` codec the reply carries the encoded update instead (:func:`encode_reply`).
    """

    cfg, pid, plan, model, data, received, server_round, store = _prepare(message, context)
    secrets = secure.receive_shares(message, store, pid, server_round) if secure.stage_of(message) else None
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
    metrics: dict[str, Any] = {
        protocol.NUM_EXAMPLES: len(data.train),
        protocol.TRAIN_LOSS: trained.loss,
        protocol.PARTITION_ID: pid,
        **trained.metrics,
        **pruning,
        **runtime.label_counts(cfg, data.train),
    }
    if secrets is None:
        content = {protocol.ARRAYS: encode_reply(cfg.compression, store, received, reply)}
    else:
        update = flat_update(received, reply, sorted(reply))
        if not np.isfinite(update).all():
            raise ValueError("the trained update is not finite; secure aggregation cannot mask it")
        codec = privacy.secure_codec(len(update))
        vector, clipped = codec.encode(update, privacy.client_weight(len(data.train)), seed)
        content = {secagg.MASKED: secure.masked_record(secrets, store, vector, codec.modulus)}
        metrics[protocol.SECAGG_CLIPPED] = clipped
    return Message(RecordDict({**content, protocol.METRICS: MetricRecord(metrics)}), reply_to=message)


def encode_reply(compression: CompressionConfig, store: ClientStore, received: State, reply: State) -> Any:
    """The reply's ArrayRecord: the arrays as they are without an uplink codec; with one, the update
    (``reply`` minus ``received``) encoded, plus, with error feedback, what the codec lost of earlier
    updates (kept in the client's store, which keeps this round's loss for the next time)."""
    if compression.uplink == "none":
        return to_arrays(reply)
    update = codecs.deltas(reply, received)
    if compression.error_feedback:
        previous = store.load_arrays(protocol.RESIDUAL) or {}
        update = codecs.with_residual(update, previous)
    record = to_arrays(update, compression.uplink)
    if compression.error_feedback:
        store.save_arrays(protocol.RESIDUAL, codecs.residual_of(update, from_arrays(record), previous))
    return record


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
