"""The virtual clock: how long a client's trip takes on its device, and what a synchronous round keeps.

A trip is one client's part in a round, from the server sending the model to its reply arriving:

    seconds = local steps x devices.step_cost_s / speed + downlink bytes / downlink bandwidth
              + uplink bytes / uplink bandwidth + latency

Everything here is arithmetic on configured constants and seeded draws: the same seed gives the same
virtual times to the last digit, however loaded the machine is. Pure functions, no Flower objects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedlora.core.devices.profiles import DeviceClass, draw

BITS_PER_BYTE = 8
MEGA = 1e6


def trip_seconds(steps: int, step_cost_s: float, cls: DeviceClass, down_bytes: int, up_bytes: int) -> float:
    """Virtual seconds of one client trip on a device of class ``cls`` (bandwidths in Mbit/s)."""
    compute = steps * step_cost_s / cls.speed
    down = down_bytes * BITS_PER_BYTE / (cls.downlink_mbps * MEGA)
    up = up_bytes * BITS_PER_BYTE / (cls.uplink_mbps * MEGA)
    return compute + down + up + cls.latency_s


@dataclass(frozen=True)
class Trip:
    """One client's trip: when its reply would arrive, and when it vanishes instead (if it drops)."""

    partition_id: int
    arrive_s: float
    """Seconds from dispatch to the reply arriving, had the client not dropped."""
    drop_s: float | None = None
    """Seconds from dispatch to the client vanishing mid-round; None: it does not drop."""

    @property
    def end_s(self) -> float:
        """When the server learns the outcome (the reply, or the lost connection)."""
        return self.arrive_s if self.drop_s is None else self.drop_s


def trip(cls: DeviceClass, seed: int, draw_round: int, partition_id: int, seconds: float) -> Trip:
    """The trip of a client of class ``cls`` taking ``seconds``; whether and when it drops is drawn from
    (seed, ``draw_round``, client): a share ``cls.drop`` of trips vanish at a uniform point of the trip."""
    if cls.drop > 0 and draw(seed, "drop", draw_round, partition_id) < cls.drop:
        return Trip(partition_id, seconds, draw(seed, "drop-at", draw_round, partition_id) * seconds)
    return Trip(partition_id, seconds)


@dataclass(frozen=True)
class SyncOutcome:
    """What a synchronous round on the virtual clock keeps and drops, and how long it lasts."""

    kept: list[int]
    """Partitions whose replies are aggregated, in order of arrival."""
    late: list[int]
    """Replies that would arrive after the deadline."""
    offline: list[int]
    """Clients that vanished mid-round."""
    surplus: list[int]
    """Over-selected clients that arrived in time but after the round had its target."""
    seconds: float
    """The round's virtual duration."""

    @property
    def dropped(self) -> int:
        """Clients sampled but not aggregated because of the clock."""
        return len(self.late) + len(self.offline) + len(self.surplus)


def sync_round(trips: Sequence[Trip], target: int, deadline_s: float) -> SyncOutcome:
    """A synchronous round: the first ``target`` replies to arrive by the deadline are kept (0 = no
    deadline). The round ends when the target has arrived, when every outcome is known, or at the
    deadline, whichever comes first; without a deadline and drops it waits for the slowest client."""
    limit = deadline_s if deadline_s > 0 else math.inf
    arriving = sorted((t for t in trips if t.drop_s is None), key=lambda t: (t.arrive_s, t.partition_id))
    in_time = [t for t in arriving if t.arrive_s <= limit]
    kept = in_time[:target]
    reached = kept[-1].arrive_s if target and len(kept) == target else math.inf
    known = max((t.end_s for t in trips), default=0.0)
    return SyncOutcome(
        kept=[t.partition_id for t in kept],
        late=[t.partition_id for t in arriving if t.arrive_s > limit],
        offline=sorted(t.partition_id for t in trips if t.drop_s is not None),
        surplus=[t.partition_id for t in in_time[target:]],
        seconds=min(reached, known, limit),
    )


def staleness_weight(staleness: int) -> float:
    """FedBuff's down-weighting of an update computed on a model ``staleness`` server steps old:
    1 / sqrt(1 + staleness) (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
    AISTATS 2022, section 4)."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} < 0")
    return 1.0 / math.sqrt(1.0 + staleness)
