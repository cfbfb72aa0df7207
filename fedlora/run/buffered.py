"""FedBuff on the virtual clock: asynchronous, buffered aggregation (Nguyen et al., "Federated Learning
with Buffered Asynchronous Aggregation", AISTATS 2022).

``schedule.concurrency`` (K) clients train at once. Each starts from the global model of the moment it
is dispatched; when it finishes (its trip on the virtual clock, :mod:`fedlora.core.devices.clock`) its
update joins the buffer and a new client is dispatched in its slot at once. When ``schedule.buffer`` (B)
updates are in the buffer the server steps:

    x <- x + eta_g * sum_k p_k * s(tau_k) * (x_k - x_start(k)),   s(tau) = 1 / sqrt(1 + tau)

with x_start(k) the global model client k started from, tau_k the server steps taken since (its
staleness), p_k the privacy mechanism's weights (n_k / sum n; the paper's uniform 1/B when clients hold
equally many examples) and eta_g ``schedule.server_lr``. It applies to strategies whose aggregate is a
weighted sum (``linear_aggregate``): each reply is rewritten as x + eta_g s(tau_k) (x_k - x_start(k))
(:func:`stale_update`), and the strategy's own aggregate of those is exactly the step above.

The order of arrival is the virtual clock's, never the wall clock's, so a run is deterministic for a
seed. A client's message is built when it is dispatched (with the model of that moment) and sent when
the clock says its reply is needed: the B messages of a server step go out together (the clients of a
simulation train them in parallel), and no message is left running when the run ends. A client that
drops mid-trip is never sent its message; its slot is refilled when it vanishes. One server step is one
row of ``rounds.jsonl`` (``round`` counts steps), with the staleness of each update it aggregated.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedlora.core.config import ExperimentConfig
from fedlora.core.devices.clock import staleness_weight
from fedlora.core.devices.profiles import concurrency
from fedlora.core.model.arrays import State, from_arrays, to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.stopping import POLL_S, STOP
from fedlora.run.evaluation import Evaluator
from fedlora.run.progress import Listener, RoundProgress
from fedlora.run.rounds import RoundLoop
from fedlora.server.clock import DeviceTimes, message_bytes, spec_bytes
from fedlora.server.replies import RoundCounts
from fedlora.server.traffic import RoundTraffic
from strategies.base import LoraStrategy

PICK_TRIES = 64
"""Random draws for a free, available client before scanning the whole population for one."""


def stale_update(
    current: Mapping[str, Any], start: Mapping[str, Any], update: State, staleness: int, server_lr: float
) -> State:
    """``current + server_lr * s(staleness) * (update - start)`` for every key of ``update`` (keys the
    start did not send are taken as they came): a weighted sum of these is FedBuff's server step."""
    scale = server_lr * staleness_weight(staleness)
    moved = {k for k in update if k in start and k in current}
    return {k: current[k] + scale * (v - start[k]) if k in moved else v for k, v in update.items()}


@dataclass(order=True)
class InFlight:
    """A dispatched client, ordered by when the server learns its outcome (then by dispatch order)."""

    end_s: float
    seq: int
    partition_id: int = field(compare=False)
    version: int = field(compare=False)
    """Server steps done when it was dispatched (the model it trains on)."""
    message: Message | None = field(compare=False)
    """Its message, built at dispatch; None when it drops mid-trip (never sent)."""


class BufferedLoop(RoundLoop):
    """The round loop of ``schedule.mode = 'fedbuff'``: each 'round' is one buffered server step."""

    def __init__(
        self,
        grid: Grid,
        cfg: ExperimentConfig,
        strategy: LoraStrategy,
        evaluate: Evaluator,
        config: ConfigRecord,
        listener: Listener | None = None,
    ) -> None:
        super().__init__(grid, cfg, strategy, evaluate, config, listener)
        self.times = DeviceTimes(cfg)
        self.slots = concurrency(cfg.schedule, cfg.federation.clients_per_round())
        self.now = 0.0
        self.version = 0
        self.seq = 0
        self.flying: list[InFlight] = []
        self.started: dict[int, State] = {}
        """Version -> the arrays sent to clients dispatched at it (kept while one of them flies)."""
        self.replies: dict[str, Message] = {}

    def train_phase(self, server_round: int, t0: float) -> tuple[dict[str, Any], float]:
        """Run the clock until ``schedule.buffer`` updates arrived, dispatching a client into each freed
        slot, then take the server step; returns the step's metrics and the seconds spent aggregating."""
        strategy = self.strategy
        strategy.server_round = server_round
        strategy.global_state = from_arrays(self.arrays)
        self.started[self.version] = strategy.outgoing(strategy.global_state)
        began, downlink, dropped = self.now, 0, 0
        while len(self.flying) < self.slots and self._dispatch(server_round):
            downlink += strategy.traffic.downlink
        arrived: list[InFlight] = []
        while len(arrived) < self.cfg.schedule.buffer and self.flying:
            done = heapq.heappop(self.flying)
            self.now = done.end_s
            if done.message is None:
                dropped += 1
            else:
                arrived.append(done)
            if self._dispatch(server_round):
                downlink += strategy.traffic.downlink
        replies = self._collect(arrived, server_round, t0)
        strategy.train_messages(server_round, self.config, {})  # this version's arrays as the ones sent
        strategy.traffic = RoundTraffic(downlink=downlink)
        strategy.counts = RoundCounts(sampled=len(arrived) + dropped, dropped=dropped)
        t_agg = time.monotonic()
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        aggregate_s = time.monotonic() - t_agg
        staleness = [self.version - a.version for a in arrived]
        self.arrays = arrays if arrays is not None else self.arrays
        self.version += 1
        self._forget()
        return {
            **dict(metrics or {}),
            "virtual_round_s": self.now - began,
            "virtual_time_s": self.now,
            "num_offline": dropped,
            "staleness": staleness,
            "staleness_mean": sum(staleness) / len(staleness) if staleness else math.nan,
        }, aggregate_s

    # ----- dispatch -----------------------------------------------------------------------------
    def _dispatch(self, server_round: int) -> bool:
        """Send the current model to one free, available client (False when there is none)."""
        pid = self._pick(server_round)
        if pid is None:
            return False
        self.seq += 1
        strategy = self.strategy
        message = strategy.train_messages(server_round, self.config, {pid: self._node(pid)})[0]
        up = spec_bytes(strategy.expected_reply(pid, server_round))
        trip = self.times.trip(self.seq, pid, message_bytes(message.content), up)
        kept = None if trip.drop_s is not None else message
        heapq.heappush(self.flying, InFlight(self.now + trip.end_s, self.seq, pid, self.version, kept))
        return True

    def _pick(self, server_round: int) -> int | None:
        """A client not training now and available in ``server_round``, drawn uniformly with the run's
        seeded sampling RNG."""
        busy = {f.partition_id for f in self.flying}
        sampler = self.strategy.sampler
        population = self._population()
        can = self.times.available(server_round)
        for _ in range(PICK_TRIES):
            pid = population[sampler.rng.randrange(len(population))]
            if pid not in busy and can(pid):
                return pid
        free = [pid for pid in population if pid not in busy and can(pid)]
        return free[sampler.rng.randrange(len(free))] if free else None

    def _population(self) -> list[int]:
        """Every partition (a simulation), or those of the connected deployed nodes."""
        sampler = self.strategy.sampler
        if sampler.assigns:
            return list(range(self.cfg.federation.num_clients))
        return sorted(sampler.partitions(self.grid))

    def _node(self, partition_id: int) -> int:
        """The node a partition's message goes to: virtual nodes in turn, or the partition's own node."""
        sampler = self.strategy.sampler
        if sampler.assigns:
            nodes = sorted(self.grid.get_node_ids())
            return nodes[self.seq % len(nodes)]
        return sampler.partitions(self.grid)[partition_id]

    # ----- collect ------------------------------------------------------------------------------
    def _collect(self, arrived: list[InFlight], server_round: int, t0: float) -> list[Message]:
        """Send the messages of the clients that ``arrived`` on the clock and collect their replies (up to
        ``federation.round_timeout``), each rewritten as its staleness-weighted update."""
        STOP.check()
        messages = [a.message for a in arrived if a.message is not None]
        wanted = dict(zip(self.grid.push_messages(messages), arrived, strict=True))
        limit = time.monotonic() + self.cfg.federation.round_timeout
        while True:
            missing = [m for m in wanted if m not in self.replies]
            for reply in self.grid.pull_messages(missing) if missing else []:
                self.replies[reply.metadata.reply_to_message_id] = reply
            got = len(wanted) - len([m for m in wanted if m not in self.replies])
            elapsed = time.monotonic() - t0
            self.listener.progress(RoundProgress(server_round, "train", got, len(wanted), elapsed))
            if got == len(wanted) or time.monotonic() > limit:
                break
            STOP.check()
            time.sleep(POLL_S)
        return [self._weighted(self.replies.pop(m), a) for m, a in wanted.items() if m in self.replies]

    def _weighted(self, reply: Message, arrived: InFlight) -> Message:
        """``reply`` with its arrays replaced by :func:`stale_update` and its staleness in its metrics."""
        if reply.has_error() or protocol.ARRAYS not in reply.content.array_records:
            return reply
        staleness = self.version - arrived.version
        current, start = self.started[self.version], self.started[arrived.version]
        update = from_arrays(reply.content[protocol.ARRAYS])
        new = stale_update(current, start, update, staleness, self.cfg.schedule.server_lr)
        reply.content[protocol.ARRAYS] = to_arrays(new)
        if protocol.METRICS in reply.content.metric_records:
            reply.content.metric_records[protocol.METRICS][protocol.STALENESS] = staleness
        return reply

    def _forget(self) -> None:
        """Drop the sent arrays of versions no flying client started from."""
        keep = {f.version for f in self.flying} | {self.version}
        self.started = {v: s for v, s in self.started.items() if v in keep}
