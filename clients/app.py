"""The ClientApp: the same code runs in simulated (Ray) and deployed (SuperNode) clients.

Each handler parses the message, calls the library, and builds the reply.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import protocol

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


def _setup(message: Message, context: Context):  # type: ignore[no-untyped-def]
    from clients import runtime
    from fedlora.adapters import from_arrays, load_adapter_state

    config: ConfigRecord = message.content[protocol.CONFIG]  # type: ignore[assignment]
    text = str(config[protocol.EXPERIMENT])
    cfg = runtime.parse_experiment(text)
    runtime.set_threads(cfg.federation.client_cpus)
    pid = _partition_id(context, cfg.federation.num_clients)
    model = runtime.model_for(cfg)
    received = from_arrays(message.content[protocol.ARRAYS])
    load_adapter_state(model, received)
    return cfg, pid, model, runtime.data_for(text, pid), received, int(config[protocol.SERVER_ROUND])  # type: ignore[arg-type]


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received adapter on the local split; reply with the same keys, trained."""
    from clients.runtime import client_seed
    from fedlora.adapters import adapter_state, to_arrays
    from fedlora.training import train_local

    cfg, pid, model, data, received, server_round = _setup(message, context)
    loss, _ = train_local(model, data.train, cfg.train, seed=client_seed(cfg, server_round, pid))
    state = adapter_state(model)
    metrics = MetricRecord(
        {protocol.NUM_EXAMPLES: len(data.train), protocol.TRAIN_LOSS: loss, protocol.PARTITION_ID: pid}
    )
    arrays: ArrayRecord = to_arrays({k: state[k] for k in received})
    return Message(RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received adapter on the client's validation split."""
    from fedlora.training import evaluate as evaluate_model

    _, pid, model, data, _, _ = _setup(message, context)
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
