"""The ClientApp: the same code runs in simulated (Ray) and deployed (SuperNode) clients.

Each handler parses the message, asks the strategy for this client's plan (freeze, keep local,
re-initialise, rank), calls the library, and builds the reply.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.core import protocol

app = ClientApp()


def _partition_id(context: Context, num_clients: int) -> int:
    """This node's partition, checked against the experiment's ``federation.num_clients``."""
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


def _store(context: Context, config: ConfigRecord, partition_id: int, server_round: int) -> Any:
    """This client's state store: the node's ``state-dir``, else the one the server names, else Context."""
    from fedlora.core.store import ClientStore

    root = context.node_config.get(protocol.NODE_STATE_DIR) or config.get(protocol.STATE_DIR)
    return ClientStore(context, str(root) if root else None, partition_id, server_round)


def _prepare(message: Message, context: Context) -> tuple[Any, ...]:
    """Parse the message, build this round's adapter on the process's model; returns what handlers need."""
    import dataclasses

    from clients import runtime
    from fedlora.core.adapters import from_arrays, load_adapter_state, set_base_offsets, set_trainable
    from strategies import registry

    config: ConfigRecord = message.content[protocol.CONFIG]  # type: ignore[assignment]
    text = str(config[protocol.EXPERIMENT])
    cfg = runtime.parse_experiment(text)
    runtime.set_threads(cfg.federation.client_cpus)
    pid = _partition_id(context, cfg.federation.num_clients)
    server_round = int(config[protocol.SERVER_ROUND])  # type: ignore[arg-type]
    strategy = registry.get(cfg.strategy.name)
    plan = strategy.client_plan(cfg, strategy.Options(**cfg.strategy.options), pid, server_round)
    local_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=plan.rank))
    model = runtime.model_for(local_cfg)
    offsets = message.content.array_records.get(protocol.BASE_OFFSETS)
    set_base_offsets(model, from_arrays(offsets) if offsets is not None else {})
    received = from_arrays(message.content[protocol.ARRAYS])
    store = _store(context, config, pid, server_round)
    evaluating = message.metadata.message_type == MessageType.EVALUATE
    state = runtime.start_state(local_cfg, plan)
    state.update(runtime.load_local(store, plan, include_current=evaluating))
    state.update(received)
    load_adapter_state(model, state)
    set_trainable(model, plan.freeze)
    data = runtime.data_for(text, pid)
    runtime.log_startup(message)
    return cfg, pid, plan, model, data, received, server_round, store


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train this round's adapter on the local split; reply with the arrays the strategy wants back.

    A client given a fault in ``[faults]`` (simulations) raises, waits, or spoils its reply
    (:mod:`fedlora.core.faults`). With ``privacy.mode = "dp-sgd"`` training is DP-SGD and a client whose
    budget this round would exceed declines (a reply without arrays, with the reason); with
    ``dp-updates`` and client placement the reply carries the clipped update plus this client's
    share of the noise.
    """
    from clients import runtime
    from fedlora.core import faults
    from fedlora.core.adapters import adapter_state, kind_of, to_arrays
    from fedlora.core.training import train_local

    cfg, pid, plan, model, data, received, server_round, store = _prepare(message, context)
    fault = faults.fault_for(cfg, server_round, pid)
    faults.before_training(cfg, fault, pid, server_round)
    seed = runtime.client_seed(cfg, server_round, pid)
    extra: dict[str, float] = {}
    if cfg.privacy.mode == "dp-sgd":
        from fedlora.privacy.client import dp_sgd_round

        outcome = dp_sgd_round(store, cfg, model, data.train, seed=seed)
        extra = {protocol.EPSILON: outcome.epsilon, protocol.NOISE_MULTIPLIER: outcome.noise_multiplier}
        if outcome.declined:
            return _declined(message, pid, outcome.declined, extra)
        loss = outcome.loss
    else:
        loss, _ = train_local(model, data.train, cfg.train, seed=seed)
    state = adapter_state(model)
    runtime.save_local(store, plan, state)
    keys = list(received) if plan.reply == "received" else list(state)
    reply = {k: state[k] for k in keys if kind_of(k) not in plan.keep_local}
    if cfg.privacy.mode == "dp-updates" and cfg.privacy.placement == "client":
        from fedlora.privacy.client import privatise_reply

        reply = privatise_reply(cfg, received, reply, seed=seed)
    reply = faults.spoil(reply, fault)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: len(data.train),
            protocol.TRAIN_LOSS: loss,
            protocol.PARTITION_ID: pid,
            **extra,
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


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate this client's adapter (the global one, plus anything kept locally) on its validation split."""
    from fedlora.core.training import evaluate as evaluate_model

    _, pid, _, model, data, _, _, _ = _prepare(message, context)
    loss, accuracy = evaluate_model(model, data.val)
    n = len(data.val)
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: n,
            protocol.EVAL_LOSS: loss if n else 0.0,
            protocol.EVAL_ACCURACY: accuracy if n else 0.0,
            protocol.PARTITION_ID: pid,
        }
    )
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (used to sample clients reproducibly)."""
    value = context.node_config.get(protocol.NODE_PARTITION_ID)
    if value is None:
        raise ValueError("this SuperNode has no partition-id; start it with --node-config 'partition-id=N'")
    metrics = MetricRecord({protocol.PARTITION_ID: int(value)})  # type: ignore[arg-type]
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)
