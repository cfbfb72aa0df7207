"""Synchronous rounds on the virtual clock: who can be sampled, who makes the deadline, how long it took.

With device classes (``[devices]``), before a round the sampler sees only the clients available in it
(:func:`fedlora.core.devices.profiles.available`) and over-selects by ``schedule.over_select``; once the
round's messages are built, each client's trip is timed from its class, the bytes of its message and of
the reply its plan asks for (:mod:`fedlora.core.devices.clock`). Clients that drop mid-round, would miss
``schedule.deadline_s``, or arrive after the round has its target are not sent their message (in a
simulation their work would be thrown away) and are counted as dropped. Without device classes every
method here returns at once and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict

from fedlora.core.config import ExperimentConfig
from fedlora.core.devices.clock import SyncOutcome, Trip, sync_round, trip, trip_seconds
from fedlora.core.devices.profiles import DeviceClass, available, class_of
from fedlora.core.protocol.validation import Spec
from fedlora.server.sampling import ClientSampler


def message_bytes(content: RecordDict) -> int:
    """Raw tensor bytes of the arrays in a message (what the clock sends over a client's downlink)."""
    return sum(
        math.prod(array.shape) * _itemsize(array.dtype)
        for record in content.array_records.values()
        for array in record.values()
    )


def _itemsize(dtype: str) -> int:
    """Bytes per element of a Flower array's dtype name (float32 -> 4)."""
    return int(np.dtype(dtype).itemsize)


def spec_bytes(spec: Spec) -> int:
    """Raw tensor bytes of a reply with these keys, shapes and dtypes (the client's uplink)."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in spec.values())


class DeviceTimes:
    """The clients' device classes and trip times for one experiment (shared by both schedules)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def device(self, partition_id: int) -> DeviceClass:
        """The device class of client ``partition_id``."""
        return class_of(self.cfg.devices, self.cfg.seed, self.cfg.federation.num_clients, partition_id)

    def available(self, server_round: int) -> Callable[[int], bool]:
        """Whether each client can be sampled in ``server_round``."""
        return lambda pid: available(self.device(pid), self.cfg.seed, server_round, pid)

    def trip(self, draw_round: int, partition_id: int, down_bytes: int, up_bytes: int) -> Trip:
        """Client ``partition_id``'s trip carrying these bytes (drops drawn for ``draw_round``)."""
        cls = self.device(partition_id)
        steps, cost = self.cfg.train.local_steps, self.cfg.devices.step_cost_s
        seconds = trip_seconds(steps, cost, cls, down_bytes, up_bytes)
        return trip(cls, self.cfg.seed, draw_round, partition_id, seconds)


class SyncClock:
    """The virtual clock of synchronous rounds; ``elapsed_s`` is the virtual time since the run began."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.enabled = cfg.devices.enabled
        self.times = DeviceTimes(cfg)
        self.elapsed_s = 0.0
        self.outcome: SyncOutcome | None = None

    def prepare(self, server_round: int, sampler: ClientSampler) -> None:
        """Let the sampler see only this round's available clients, over-selected as configured."""
        if not self.enabled:
            return
        sampler.available = self.times.available(server_round)
        sampler.over_select = self.cfg.schedule.over_select

    def admit(
        self,
        server_round: int,
        chosen: Sequence[int],
        messages: list[Message],
        reply_spec: Callable[[int], Spec],
    ) -> list[Message]:
        """The messages worth sending: those of the clients the round keeps (``chosen``: the partition of
        each message, in order). Advances the clock by the round's virtual duration."""
        if not self.enabled:
            return messages
        trips = [
            self.times.trip(server_round, pid, message_bytes(m.content), spec_bytes(reply_spec(pid)))
            for pid, m in zip(chosen, messages, strict=True)
        ]
        target = len(trips)
        if self.cfg.schedule.over_select > 0:
            target = min(target, self.cfg.federation.clients_per_round())
        self.outcome = sync_round(trips, target, self.cfg.schedule.deadline_s)
        self.elapsed_s += self.outcome.seconds
        keep = set(self.outcome.kept)
        return [m for pid, m in zip(chosen, messages, strict=True) if pid in keep]

    @property
    def dropped(self) -> int:
        """Clients of the last round dropped by the clock."""
        return self.outcome.dropped if self.outcome is not None else 0

    def row(self) -> dict[str, Any]:
        """The last round's clock keys for ``rounds.jsonl`` (nothing without device classes)."""
        if not self.enabled or self.outcome is None:
            return {}
        o = self.outcome
        return {
            "virtual_round_s": o.seconds,
            "virtual_time_s": self.elapsed_s,
            "num_late": len(o.late),
            "num_offline": len(o.offline),
            "num_surplus": len(o.surplus),
        }

    def restore(self, row: dict[str, Any]) -> None:
        """Continue the clock from a checkpoint's last row."""
        self.elapsed_s = float(row.get("virtual_time_s") or 0.0)
