"""The server's side of SecAgg+ (:mod:`fedlora.core.protocol.secagg`) inside one training round.

:meth:`SecureRound.open` runs the ``setup`` and ``share-keys`` exchanges with the round's sampled
clients and returns their training messages with the key shares each must receive (clients that failed
get none and count as failed); :meth:`SecureRound.close` runs ``unmask`` with the clients whose masked
vector arrived and was valid, and returns the unmasked sum, or None when the round must be abandoned
(too few clients or shares left to unmask it: nothing is aggregated, the run goes on).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.core.config import ExperimentConfig
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol import secagg
from fedlora.core.protocol.stopping import exchange
from fedlora.core.protocol.validation import check_metrics

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    """What the protocol cost and what became of the clients in one round (``rounds.jsonl``)."""

    bytes: int = 0
    """Key material, ciphertexts and shares in the stage messages and replies (masked vectors are arrays,
    counted in ``uplink_bytes``)."""
    seconds: float = 0.0
    """Wall time of the protocol's own exchanges and of unmasking (training excluded)."""
    shares: int = 0
    threshold: int = 0
    dropped: int = 0
    """Clients that took part in ``share-keys`` but whose masked vector did not arrive or was invalid."""
    abandoned: bool = False

    def row(self) -> dict[str, float]:
        """The round's ``secagg_*`` keys."""
        return {
            "secagg_bytes": float(self.bytes),
            "secagg_s": self.seconds,
            "secagg_shares": float(self.shares),
            "secagg_threshold": float(self.threshold),
            "secagg_dropped": float(self.dropped),
            "secagg_abandoned": float(self.abandoned),
        }


@dataclass
class SecureRound:
    """One round of SecAgg+ seen from the server, by partition id."""

    cfg: ExperimentConfig
    server_round: int = 0
    node_of: dict[int, int] = field(default_factory=dict)
    neighbours: dict[int, list[int]] = field(default_factory=dict)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: list[int] = field(default_factory=list)
    """Clients whose ``share-keys`` reply arrived: the only ones that train and mask."""
    stats: RoundStats = field(default_factory=RoundStats)
    _config: dict[int, ConfigRecord] = field(default_factory=dict)

    @property
    def modulus(self) -> int:
        """The field's size, 2**modulus_bits."""
        return 2**self.cfg.secure_aggregation.modulus_bits

    def open(
        self, grid: Grid, server_round: int, messages: Sequence[Message], pids: Sequence[int]
    ) -> list[Message]:
        """``setup`` and ``share-keys`` with the clients of ``messages`` (their partitions ``pids``, in
        order); returns the training messages of those that completed both, each with the ciphertexts
        addressed to it. Empty when the round is abandoned."""
        started = time.monotonic()
        sa = self.cfg.secure_aggregation
        self.server_round, self.stats = server_round, RoundStats()
        self.node_of = {pid: m.metadata.dst_node_id for pid, m in zip(pids, messages, strict=True)}
        self._config = {pid: m.content[protocol.CONFIG] for pid, m in zip(pids, messages, strict=True)}  # type: ignore[misc]
        m = len(pids)
        shares = secagg.share_count(sa.num_shares, m)
        threshold = secagg.threshold_count(sa.reconstruction_threshold, shares)
        self.stats.shares, self.stats.threshold = shares, threshold
        rng = random.Random(self.cfg.seed * 1_000_003 + server_round)
        self.neighbours = secagg.neighbourhoods(sorted(pids), shares, rng)
        setup = {
            secagg.STAGE: secagg.SETUP,
            secagg.SAMPLED: m,
            secagg.SHARES: shares,
            secagg.THRESHOLD: threshold,
        }
        keys = {
            pid: (bytes(r[secagg.PK1]), bytes(r[secagg.PK2]))  # type: ignore[arg-type]
            for pid, r in self._stage(grid, {pid: dict(setup) for pid in pids}).items()
        }
        self.public_keys = keys
        enough = self._enough(keys)
        replies = self._stage(grid, {pid: self._keys_for(pid, keys) for pid in keys}) if enough else {}
        self.shared = sorted(replies) if self._enough(replies) else []
        out = self._collect_messages(messages, pids, replies) if self.shared else []
        self.stats.abandoned = not out
        self.stats.seconds += time.monotonic() - started
        if not out:
            log.warning(
                "round %s: secure aggregation abandoned: too few clients completed key sharing", server_round
            )
        return out

    def close(self, grid: Grid, vectors: Mapping[int, np.ndarray]) -> np.ndarray | None:
        """``unmask`` with the clients whose valid masked vector arrived (``vectors`` by partition); the sum
        of their unmasked vectors, or None (the round is abandoned)."""
        started = time.monotonic()
        arrived = sorted(p for p in vectors if p in self.shared)
        dead = sorted(set(self.shared) - set(arrived))
        self.stats.dropped = len(dead)
        shares: dict[int, list[bytes]] = {pid: [] for pid in [*arrived, *dead]}
        asks = {
            pid: {
                secagg.STAGE: secagg.UNMASK,
                secagg.ACTIVE: [p for p in self.neighbours[pid] if p in arrived],
                secagg.DEAD: [p for p in self.neighbours[pid] if p in dead],
            }
            for pid in arrived
        }
        for reply in self._stage(grid, asks).values():
            owners, pieces = reply.get(secagg.OWNERS, []), reply.get(secagg.SECRET_SHARES, [])
            for owner, piece in zip(owners, pieces, strict=True):  # type: ignore[call-overload]
                if int(owner) in shares:
                    shares[int(owner)].append(bytes(piece))
        result = None
        if arrived:
            length = len(vectors[arrived[0]])
            result = secagg.unmask_sum(
                secagg.add_vectors((vectors[p] for p in arrived), length, self.modulus),
                modulus=self.modulus,
                threshold=self.stats.threshold,
                neighbours=self.neighbours,
                public_keys=self.public_keys,
                arrived=arrived,
                dead=dead,
                shares=shares,
            )
        self.stats.abandoned = result is None
        self.stats.seconds += time.monotonic() - started
        if result is None:
            log.warning(
                "round %s: secure aggregation abandoned: %s of %s clients' vectors arrived, too few "
                "shares to unmask (threshold %s)",
                self.server_round,
                len(arrived),
                len(self.shared),
                self.stats.threshold,
            )
        return result

    # ----- helpers ---------------------------------------------------------------------------------------
    def _enough(self, clients: Mapping[int, Any]) -> bool:
        """Whether every client left has at least ``threshold`` neighbours left, itself included."""
        left = set(clients)
        need = self.stats.threshold
        return bool(left) and all(len(left & set(self.neighbours[p])) >= need for p in left)

    def _keys_for(self, pid: int, keys: Mapping[int, tuple[bytes, bytes]]) -> dict[str, Any]:
        """The ``share-keys`` record of ``pid``: its live neighbours' public keys (its own included)."""
        record: dict[str, Any] = {secagg.STAGE: secagg.SHARE_KEYS}
        for other in self.neighbours[pid]:
            if other in keys:
                record[f"{secagg.KEYS_PREFIX}{other}"] = list(keys[other])
        return record

    def _collect_messages(
        self, messages: Sequence[Message], pids: Sequence[int], replies: Mapping[int, Mapping[str, Any]]
    ) -> list[Message]:
        """The training messages of the clients in :attr:`shared`, each with the ciphertexts addressed to
        it by the others in :attr:`shared`."""
        inbox: dict[int, tuple[list[int], list[bytes]]] = {pid: ([], []) for pid in self.shared}
        for src in self.shared:
            reply = replies[src]
            for dst, text in zip(reply[secagg.DESTINATIONS], reply[secagg.CIPHERTEXTS], strict=True):  # type: ignore[call-overload]
                if int(dst) in inbox and int(dst) in self.neighbours[src]:
                    inbox[int(dst)][0].append(src)
                    inbox[int(dst)][1].append(bytes(text))
        out = []
        for pid, message in zip(pids, messages, strict=True):
            if pid not in inbox:
                continue
            sources, texts = inbox[pid]
            record = {secagg.STAGE: secagg.COLLECT, secagg.SOURCES: sources, secagg.CIPHERTEXTS: texts}
            self.stats.bytes += secagg.record_bytes(record.values())
            content = RecordDict({**dict(message.content.items()), secagg.RECORD: ConfigRecord(record)})  # type: ignore[arg-type]
            out.append(
                Message(content, message_type=MessageType.TRAIN, dst_node_id=message.metadata.dst_node_id)
            )
        return out

    def _stage(self, grid: Grid, records: Mapping[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Send each client its stage record (with its message config) and collect the replies that arrive
        in time without an error, by partition."""
        grid_messages = []
        for pid, record in records.items():
            self.stats.bytes += secagg.record_bytes(record.values())
            content = RecordDict({protocol.CONFIG: self._config[pid], secagg.RECORD: ConfigRecord(record)})
            grid_messages.append(
                Message(content, message_type=MessageType.TRAIN, dst_node_id=self.node_of[pid])
            )
        if not grid_messages:
            return {}
        out: dict[int, dict[str, Any]] = {}
        for reply in exchange(grid, grid_messages, self.cfg.federation.round_timeout):
            if reply.has_error() or secagg.RECORD not in reply.content.config_records:
                continue
            record = dict(reply.content.config_records[secagg.RECORD])
            pid = int(record.get(secagg.PARTITION, -1))  # type: ignore[call-overload]
            if pid in records and self.node_of.get(pid) == reply.metadata.src_node_id:
                self.stats.bytes += secagg.record_bytes(record.values())
                out[pid] = record
        return out


def vector_problem(reply: Message, length: int, modulus: int) -> str | None:
    """Why a masked-vector reply cannot be summed (None: it can): metrics without a partition id or with a
    bad example count, no masked vector, or one of the wrong length, type or range."""
    metrics = reply.content.metric_records.get(protocol.METRICS)
    if metrics is None or protocol.PARTITION_ID not in metrics:
        return "no metrics with a partition-id"
    bad = check_metrics(metrics, protocol.NUM_EXAMPLES)
    record = reply.content.array_records.get(secagg.MASKED)
    if bad or record is None or secagg.VECTOR not in record:
        return bad or "no masked vector"
    try:
        vector = record[secagg.VECTOR].numpy()
    except Exception as exc:  # a malformed record from a buggy client must not stop the round
        return f"unreadable masked vector ({type(exc).__name__}: {exc})"
    if vector.ndim != 1 or vector.shape[0] != length:
        return f"masked vector of shape {tuple(vector.shape)}, expected ({length},)"
    if not np.issubdtype(vector.dtype, np.integer):
        return f"masked vector of dtype {vector.dtype}, expected integers"
    if vector.size and (int(vector.min()) < 0 or int(vector.max()) >= modulus):
        return f"masked vector outside [0, 2**{modulus.bit_length() - 1})"
    return None
