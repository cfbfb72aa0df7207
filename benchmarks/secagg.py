"""Secure aggregation's cost per round against plain aggregation, aggregation alone (no training).

For each number of clients per round, synthetic updates of the quickstart adapter's size (MiniLM, LoRA
r=8 on query and value, 3-class head: 74,883 float32 values) are aggregated twice:

* plain: each client's reply as the ArrayRecord it would send; the server reads the arrays and takes
  the weighted mean (what FedIT's aggregation does);
* SecAgg+: the server's stages (:mod:`fedlora.server.secagg`) against the real ClientApp's stage handler,
  each client encoding and masking its update as ``clients/local.py`` does, then unmasking and decoding.

Bytes: what travels per round, summed over clients (arrays as counted in ``uplink_bytes``; under
SecAgg+ also the stages' keys, ciphertexts and shares, in both directions). Time: the server's own work,
and each client's protocol work (key generation, sharing, masking), measured separately in this one
process (clients run one after another here; on real nodes they run in parallel). Prints the ratios.

Usage: ``python benchmarks/secagg.py [--clients 10 100] [--shares 0] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import secagg as client
from clients.app import app
from fedlora.core.config import from_dict
from fedlora.core.model.arrays import from_arrays, payload_bytes
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol import secagg
from fedlora.core.protocol.codec import WeightedQuantiser
from fedlora.core.records.store import ClientStore
from fedlora.server.secagg import SecureRound
from strategies.aggregation import weighted_average

SHAPES = {
    **{
        f"layer.{i}.{t}.lora_{k}.weight": (8, 384) if k == "A" else (384, 8)
        for i in range(6)
        for t in ("query", "value")
        for k in ("A", "B")
    },
    "classifier.weight": (3, 384),
    "classifier.bias": (3,),
}


class TimedGrid:
    """The Grid contract answered by the real ClientApp in this process, timing the clients' work."""

    def __init__(self, nodes: int) -> None:
        self.contexts = {n: Context(1, n, {}, RecordDict(), {}) for n in range(1, nodes + 1)}
        self.client_s = 0.0
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"{len(self._replies)}-{time.monotonic_ns()}"
            started = time.perf_counter()
            reply = app(message, self.contexts[message.metadata.dst_node_id])
            self.client_s += time.perf_counter() - started
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


def updates(clients: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) * 1e-3 for k, s in SHAPES.items()} for _ in range(clients)]


def plain_round(replies: list[dict[str, torch.Tensor]], counts: list[float]) -> tuple[int, float]:
    """(uplink bytes, server seconds) of plain FedAvg on these replies."""
    records = [ArrayRecord({k: v.contiguous() for k, v in r.items()}) for r in replies]
    started = time.perf_counter()
    weighted_average([from_arrays(r) for r in records], counts)
    return sum(payload_bytes(r) for r in records), time.perf_counter() - started


def secure_round(
    replies: list[dict[str, torch.Tensor]], counts: list[float], shares: float, root: str
) -> dict[str, float]:
    """Bytes and seconds of one SecAgg+ round over these replies."""
    m = len(replies)
    cfg = from_dict(
        {
            "federation": {"num_clients": m, "min_clients": 2},
            "secure_aggregation": {"enabled": True, "num_shares": shares},
        }
    )
    grid = TimedGrid(m)
    config = {protocol.EXPERIMENT: cfg.to_toml(), protocol.SERVER_ROUND: 1, protocol.STATE_DIR: root}
    messages = [
        Message(
            RecordDict({protocol.CONFIG: ConfigRecord({**config, protocol.ASSIGNED_PARTITION: pid})}),
            message_type=MessageType.TRAIN,
            dst_node_id=pid + 1,
        )
        for pid in range(m)
    ]
    server = SecureRound(cfg)
    started = time.perf_counter()
    out = server.open(grid, 1, messages, list(range(m)))  # type: ignore[arg-type]
    codec = WeightedQuantiser.of(cfg.secure_aggregation)
    vectors, uplink = {}, 0
    masking = time.perf_counter()
    for message in out:
        pid = message.metadata.dst_node_id - 1
        store = ClientStore(grid.contexts[pid + 1], root, pid, 1)
        secrets = client.receive_shares(message, store, pid, 1)
        flat = torch.cat([replies[pid][k].reshape(-1) for k in sorted(SHAPES)]).double().numpy()
        vector, _ = codec.encode(flat, counts[pid], seed=pid)
        record = client.masked_record(secrets, store, vector, server.modulus)
        uplink += payload_bytes(record)
        vectors[pid] = record[secagg.VECTOR].numpy().astype(np.int64)
    grid.client_s += time.perf_counter() - masking
    total = server.close(grid, vectors)  # type: ignore[arg-type]
    assert total is not None
    summed, weight = codec.decode(total, m)
    wall = time.perf_counter() - started
    return {
        "uplink": float(uplink),
        "stage_bytes": float(server.stats.bytes),
        "server_s": wall - grid.client_s,
        "client_s": grid.client_s / m,
        "shares": float(server.stats.shares),
        "threshold": float(server.stats.threshold),
        "decoded": float(np.abs(summed / weight).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--shares", type=float, default=0.0, help="secure_aggregation.num_shares")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    print(f"{datetime.date.today()}  load average (1 min) at start {os.getloadavg()[0]:.1f}")
    print(f"{sum(int(np.prod(s)) for s in SHAPES.values())} values per update, num_shares = {args.shares:g}")
    header = (
        f"{'clients':>7} {'shares':>6} {'t':>3} {'plain up MB':>9} {'secagg MB':>10} {'bytes x':>8} "
        f"{'plain srv s':>11} {'secagg srv s':>12} {'srv x':>7} {'client s':>9}"
    )
    print(header)
    for m in args.clients:
        counts = [float(300 + 37 * i % 500) for i in range(m)]
        plain, secure = [], []
        for repeat in range(args.repeats):
            replies = updates(m, repeat)
            plain.append(plain_round(replies, counts))
            with tempfile.TemporaryDirectory() as root:
                secure.append(secure_round(replies, counts, args.shares, root))
        plain_bytes = plain[0][0]
        plain_s = statistics.median(s for _, s in plain)
        s = {k: statistics.median(r[k] for r in secure) for k in secure[0]}
        secure_bytes = s["uplink"] + s["stage_bytes"]
        print(
            f"{m:>7} {s['shares']:>6.0f} {s['threshold']:>3.0f} {plain_bytes / 1e6:>9.2f} "
            f"{secure_bytes / 1e6:>10.2f} {secure_bytes / plain_bytes:>8.3f} {plain_s:>11.3f} "
            f"{s['server_s']:>12.3f} {s['server_s'] / plain_s:>7.1f} {s['client_s']:>9.3f}"
        )
    print(f"load average (1 min) at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
