"""Which partition a message is for, and where that client keeps its state: shared by every handler,
torch-free (a deployed SuperNode starts a process per message; the secure-aggregation stages that do not
train must not pay for torch)."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context

from fedlora.core.protocol import keys as protocol
from fedlora.core.records.store import ClientStore


def partition_id(context: Context, config: ConfigRecord, num_clients: int) -> int:
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


def client_store(context: Context, config: ConfigRecord, partition: int, server_round: int) -> ClientStore:
    """This client's state store: the node's ``state-dir``, else the one the server names, else Context."""
    root = context.node_config.get(protocol.NODE_STATE_DIR) or config.get(protocol.STATE_DIR)
    return ClientStore(context, str(root) if root else None, partition, server_round)
