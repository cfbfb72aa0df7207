"""The ClientApp: the same code runs in simulated (Ray) and deployed (SuperNode) clients.

``train`` and ``evaluate`` do the client's work (:mod:`clients.local`: the message's plan, the model,
the local data, the privacy mechanism), or hand the message to the node's warm trainer when one is
configured (:mod:`clients.warm`); ``query`` tells the server which partition a deployed node holds.
Nothing here knows which strategy or privacy mode runs.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import warm
from fedlora.core.protocol import keys as protocol

app = ClientApp()


def _handed_over(message: Message, context: Context) -> Message | None:
    """The warm trainer's reply to ``message``; None when no trainer is configured (FEDLORA_TRAINER_SOCKET)
    or it runs other code: the caller trains in this process."""
    path = warm.socket_path()
    return warm.hand_over(message, context, path) if path else None


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train this round's adapter on the local split (:func:`clients.local.train`), in the node's warm
    trainer when it has one, or take part in a secure-aggregation stage that does not train
    (:func:`clients.secagg.handle`, here, without torch)."""
    # start-up: a SuperNode starts a new process for every message, and a query needs neither torch nor
    # the model (5.2 CPU-seconds of imports a query process no longer pays; 0.5 remain); the SecAgg+
    # stages that do not train need the crypto primitives only
    from clients import secagg

    if secagg.handles(message):
        return secagg.handle(message, context)
    reply = _handed_over(message, context)
    if reply is not None:
        return reply
    # start-up: as above
    from clients import local

    return local.train(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate this client's adapter on its validation split (:func:`clients.local.evaluate`), in the
    node's warm trainer when it has one."""
    reply = _handed_over(message, context)
    if reply is not None:
        return reply
    # start-up: as in train()
    from clients import local

    return local.evaluate(message, context)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (used to sample clients reproducibly)."""
    value = context.node_config.get(protocol.NODE_PARTITION_ID)
    if value is None:
        raise ValueError("this SuperNode has no partition-id; start it with --node-config 'partition-id=N'")
    metrics = MetricRecord({protocol.PARTITION_ID: int(value)})  # type: ignore[arg-type]
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)
