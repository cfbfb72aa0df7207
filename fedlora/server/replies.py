"""What became of a round's messages: counts, failures, and reading the parts of a reply."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Message

from fedlora.core import protocol


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

    def as_row(self) -> dict[str, int]:
        """The counts under their ``rounds.jsonl`` names."""
        return {
            "num_sampled": self.sampled,
            "num_replied": self.replied,
            "num_failed": self.failed,
            "num_rejected": self.rejected,
        }


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
