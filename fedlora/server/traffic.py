"""Traffic accounting: the exact payload bytes of the arrays that travel, per round."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import RecordDict

from fedlora.core.model.arrays import payload_bytes


@dataclass
class RoundTraffic:
    """Exact payload bytes of the arrays that travelled in one round, summed over clients."""

    uplink: int = 0
    downlink: int = 0


def arrays_bytes(content: RecordDict) -> int:
    """Payload bytes of every ArrayRecord in a message (configs and metrics are not counted)."""
    return sum(payload_bytes(record) for record in content.array_records.values())
