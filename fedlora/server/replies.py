"""What became of a round's messages: counts, failures, and reading the parts of a reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import Message

from fedlora.core.model.arrays import State, from_arrays
from fedlora.core.model.codecs import add_deltas
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.validation import Spec, check_metrics, check_reply


class RoundFailedError(RuntimeError):
    """Too few clients replied to aggregate a round."""


@dataclass
class RoundCounts:
    """What became of one round's training messages (``rounds.jsonl``: num_sampled, num_replied, ...)."""

    sampled: int = 0
    replied: int = 0
    """Replies without an error (declined ones included)."""
    failed: int = 0
    """Sampled clients that raised, or did not answer within ``federation.round_timeout``."""
    rejected: int = 0
    """Replies left out by validation (keys, shapes, dtypes, NaN/Inf, norm, metrics)."""
    dropped: int = 0
    """Sampled clients the virtual clock left out: late for the deadline, gone mid-round, or over-selected
    beyond the round's target (:mod:`fedlora.server.clock`); not counted as failed."""

    def as_row(self) -> dict[str, int]:
        """The counts under their ``rounds.jsonl`` names."""
        return {
            "num_sampled": self.sampled,
            "num_replied": self.replied,
            "num_failed": self.failed,
            "num_rejected": self.rejected,
            "num_dropped": self.dropped,
        }


def arrays_of(reply: Message, sent: State, *, updates: bool = False) -> State:
    """The arrays of a trained reply as float32 tensors (decoded whatever the codec). With ``updates``
    (``compression.uplink`` is on) the reply carries the client's update, which is added to ``sent``,
    what the server sent it (:func:`fedlora.core.model.codecs.add_deltas`)."""
    arrays = from_arrays(reply.content[protocol.ARRAYS])
    return add_deltas(arrays, sent) if updates else arrays


def problem(
    reply: Message, expected: Spec, sent: State, max_norm: float, *, updates: bool = False
) -> str | None:
    """Why a trained reply cannot be aggregated (None: it can): metrics without a partition id or
    with bad counts, missing or unreadable arrays, or arrays (:func:`arrays_of`) that fail
    :func:`fedlora.core.protocol.validation.check_reply` against ``expected`` (keys, shapes, dtypes, finite
    values, update norm at most ``max_norm`` from ``sent``; 0 = no bound)."""
    metrics = reply.content.metric_records.get(protocol.METRICS)
    if metrics is None or protocol.PARTITION_ID not in metrics:
        return "no metrics with a partition-id"
    bad = check_metrics(metrics, protocol.NUM_EXAMPLES)
    if bad or protocol.ARRAYS not in reply.content.array_records:
        return bad or "no arrays"
    try:
        arrays = arrays_of(reply, sent, updates=updates)
    except Exception as exc:  # a malformed record from a buggy client must not stop the round
        return f"unreadable arrays ({type(exc).__name__}: {exc})"
    return check_reply(arrays, expected, sent, max_norm)


def declined(reply: Message) -> bool:
    """Whether the client declined to train (its privacy budget)."""
    metrics = reply.content.metric_records.get(protocol.METRICS)
    return metrics is not None and bool(metrics.get(protocol.DECLINED, 0))


def reason(reply: Message) -> str:
    """Why a client declined."""
    status = reply.content.config_records.get(protocol.STATUS)
    return str(status[protocol.REASON]) if status is not None else "no reason given"


def partition_of(reply: Message) -> int:
    """The reply's partition id (-1 when it has none: validation then rejects it)."""
    metrics = reply.content.metric_records.get(protocol.METRICS)
    if metrics is None or protocol.PARTITION_ID not in metrics:
        return -1
    return int(metrics[protocol.PARTITION_ID])  # type: ignore[arg-type]


def who(reply: Message) -> str:
    """The client, for log lines: its partition, or its node when it sent none."""
    pid = partition_of(reply)
    return f"partition {pid}" if pid >= 0 else f"node {reply.metadata.src_node_id}"


def last_line(text: str) -> str:
    """The last line of a client's error (Flower wraps it: ``... Message: <reason>'>``)."""
    lines = text.strip().removesuffix("'>").strip().splitlines()
    return lines[-1] if lines else "no reason given"


def client_row(server_round: int, phase: str, reply: Message, status: str, why: str = "") -> dict[str, Any]:
    """One line of ``clients.jsonl``: what one client's reply in ``phase`` ("train" or "evaluate") of a
    round said and what became of it (``status``: ok, declined, rejected or failed, with ``why``).

    The reply's metrics follow under snake_case names (num_examples, train_loss, label_counts, ...).
    """
    metrics = reply.content.metric_records.get(protocol.METRICS) if not reply.has_error() else None
    row: dict[str, Any] = {
        "round": server_round,
        "phase": phase,
        "partition_id": partition_of(reply) if not reply.has_error() else -1,
        "node_id": reply.metadata.src_node_id,
        "status": status,
    }
    for key, value in (metrics or {}).items():
        if key != protocol.PARTITION_ID:
            row[key.replace("-", "_")] = list(value) if isinstance(value, list) else value
    if why:
        row["reason"] = why
    return row
