"""The base of every LoRA strategy: Flower plumbing (sampling, messages, replies) around pure math.

A strategy subclass overrides the pure hooks only:

* :meth:`LoraStrategy.outgoing` - which global tensors travel to clients (default: all);
* :meth:`LoraStrategy.aggregate` - new global state from client states and weights p_k;
* :meth:`LoraStrategy.client_plan` - what each client does (runs on the client: freeze, keep local,
  re-initialise, rank);
* ``base_offsets`` - full-rank offsets folded into the frozen base weights (FedEx-LoRA, FLoRA), sent
  with every message and counted in the downlink.

Everything Flower-specific (Messages, ArrayRecords, errors in replies) stays here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora import protocol
from fedlora.adapters import State, from_arrays, payload_bytes, to_arrays
from fedlora.config import ExperimentConfig
from fedlora.stopping import exchange
from strategies.aggregation import normalised_weights
from strategies.plan import ClientPlan
from strategies.privacy import ServerPrivacy

log = logging.getLogger(__name__)


@dataclass
class NoOptions:
    """A strategy without options."""


@dataclass
class RoundTraffic:
    """Exact payload bytes of the arrays that travelled in one round, summed over clients."""

    uplink: int = 0
    downlink: int = 0


class RoundFailedError(RuntimeError):
    """Too few clients replied to aggregate a round."""


class LoraStrategy(Strategy):
    """Samples clients, sends them the arrays that travel, and aggregates their replies.

    ``global_state`` is the full global adapter (LoRA factors and head) the server evaluates and saves.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[Any]] = NoOptions
    linear_aggregate: ClassVar[bool] = False
    """True when the aggregate is sum_k p_k * x_k for every array x that travels (dp-updates needs it)."""

    def __init__(self, cfg: ExperimentConfig, global_state: State) -> None:
        self.cfg = cfg
        self.options = self.Options(**cfg.strategy.options)
        self.global_state = dict(global_state)
        self.traffic = RoundTraffic()
        self.last_metrics: dict[str, int | float] = {}
        self._rng = random.Random(cfg.seed)
        self._partition_of: dict[int, int] | None = None
        self.base_offsets: State = {}
        self.privacy = ServerPrivacy(cfg)
        self._sent: State = {}
        self._num_sampled = 0

    # ----- pure hooks (override these) -------------------------------------------------------
    @classmethod
    def client_plan(
        cls, cfg: ExperimentConfig, options: Any, partition_id: int, server_round: int
    ) -> ClientPlan:
        """Instructions for one client in one round (default: train everything, reply with what came)."""
        return ClientPlan(rank=cfg.lora.rank)

    def outgoing(self, global_state: State) -> State:
        """The tensors sent to every sampled client (default: the whole global adapter)."""
        return dict(global_state)

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        """The new global state from client states and normalised weights p_k (sum 1)."""
        raise NotImplementedError

    # ----- Flower plumbing -------------------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's settings in one line."""
        opts = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.options).items())
        log.info("strategy %s (%s)%s", self.name, self.description, f": {opts}" if opts else "")

    def partitions(self, grid: Grid) -> dict[int, int]:
        """partition-id -> node id of every connected node, asked once with a QUERY message.

        Sampling by partition id (not by Flower's random node ids) makes runs with the same seed
        sample the same clients.
        """
        nodes = sorted(grid.get_node_ids())
        if self._partition_of is None or set(self._partition_of.values()) != set(nodes):
            ask = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
            replies = exchange(grid, ask, self.cfg.federation.round_timeout)
            found = {}
            for reply in replies:
                if not reply.has_error():
                    pid = int(reply.content[protocol.METRICS][protocol.PARTITION_ID])  # type: ignore[arg-type]
                    found[pid] = reply.metadata.src_node_id
            self._partition_of = dict(sorted(found.items()))
        return self._partition_of

    def sample(self, grid: Grid, fraction: float | None = None, *, training: bool = False) -> list[int]:
        """Node ids of the clients for this round, sampled by partition id with the seeded RNG.

        ``fraction`` defaults to ``federation.fraction``; at least ``federation.min_clients`` are taken.
        Training rounds under dp-updates sample each client independently (Poisson, rate m / N).
        """
        fed = self.cfg.federation
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < fed.min_clients:
            raise RoundFailedError(
                f"only {len(nodes)} clients are connected but federation.min_clients = {fed.min_clients}"
            )
        if (fraction if fraction is not None else fed.fraction) >= 1.0:
            return nodes
        by_partition = self.partitions(grid)
        if training and self.privacy.updates:
            return [by_partition[pid] for pid in self.privacy.sample(sorted(by_partition), self._rng)]
        want = min(len(by_partition), fed.clients_per_round(fraction))
        chosen = sorted(self._rng.sample(sorted(by_partition), want))
        return [by_partition[pid] for pid in chosen]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One TRAIN message per sampled client, carrying only the arrays that travel."""
        nodes = self.sample(grid, training=True)
        self._sent = self.outgoing(self.global_state)
        self._num_sampled = len(nodes)
        content = self._content(server_round, config)
        self.traffic = RoundTraffic(downlink=_arrays_bytes(content) * len(nodes))
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in nodes]

    def _content(self, server_round: int, config: ConfigRecord) -> RecordDict:
        """The arrays that travel, the base offsets if any, and the config with the round number."""
        records: dict[str, Any] = {
            protocol.ARRAYS: to_arrays(self.outgoing(self.global_state)),
            protocol.CONFIG: ConfigRecord({**dict(config), protocol.SERVER_ROUND: server_round}),
        }
        if self.base_offsets:
            records[protocol.BASE_OFFSETS] = to_arrays(self.base_offsets)
        return RecordDict(records)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies without errors; returns the new global adapter and round metrics."""
        replies = list(replies)
        # Sorted by partition, so that sums are taken in the same order in every run.
        ok = sorted((r for r in replies if not r.has_error()), key=_partition_key)
        self.privacy.observe([r.content[protocol.METRICS] for r in ok])
        declined = [r for r in ok if _declined(r)]
        trained = [r for r in ok if not _declined(r)]
        for reply in trained:
            self.traffic.uplink += payload_bytes(reply.content[protocol.ARRAYS])
        self._check_enough(server_round, replies, len(ok))  # declining is an answer
        for reply in declined:
            log.info("round %s: a client declined: %s", server_round, _reason(reply))
        self.last_metrics = {"num_clients": float(len(trained)), "train_loss": math.nan}
        if trained or self.privacy.updates:
            self._aggregate_replies(server_round, trained)
        if self.cfg.privacy.mode == "dp-sgd":
            self.last_metrics["num_declined"] = float(len(declined))
        self.last_metrics.update({**self.privacy.round_metrics(), **self.diagnostics()})
        return to_arrays(self.global_state), MetricRecord(dict(self.last_metrics))  # type: ignore[arg-type]

    def _check_enough(self, server_round: int, replies: Sequence[Message], answered: int) -> None:
        """Fail the round when fewer than min_clients answered (or than were sampled, if fewer:
        Poisson sampling under dp-updates may pick fewer than min_clients)."""
        need = min(self.cfg.federation.min_clients, self._num_sampled)
        if answered >= need:
            return
        errors = [str(r.error.reason) for r in replies if r.has_error()]
        raise RoundFailedError(
            f"round {server_round}: {answered} of {self._num_sampled} clients replied, fewer than "
            f"federation.min_clients = {self.cfg.federation.min_clients}"
            + (f"; first client error: {errors[0].strip().splitlines()[-1]}" if errors else "")
        )

    def _aggregate_replies(self, server_round: int, trained: Sequence[Message]) -> None:
        """New global state from the clients that trained (through the noised mean under dp-updates)."""
        updates = [from_arrays(r.content[protocol.ARRAYS]) for r in trained]
        counts = [float(r.content[protocol.METRICS][protocol.NUM_EXAMPLES]) for r in trained]  # type: ignore[arg-type]
        losses = [float(r.content[protocol.METRICS][protocol.TRAIN_LOSS]) for r in trained]  # type: ignore[arg-type]
        p = self.privacy.weights(counts) or normalised_weights(counts)
        if self.privacy.updates:
            updates, weights = [self.privacy.noised_mean(self._sent, updates, server_round)], [1.0]
        else:
            weights = p
        self.global_state = {**self.global_state, **self.aggregate(self.global_state, updates, weights)}
        if losses:
            self.last_metrics["train_loss"] = math.fsum(pk * loss for pk, loss in zip(p, losses, strict=True))

    def diagnostics(self) -> dict[str, float]:
        """Strategy-specific per-round numbers for ``rounds.jsonl`` (default: none)."""
        return {}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """EVALUATE messages to a fraction of clients (``federation.fraction_evaluate``; 0 = none)."""
        fraction = self.cfg.federation.fraction_evaluate
        if fraction <= 0:
            return []
        chosen = self.sample(grid, fraction)
        content = self._content(server_round, config)
        self.traffic.downlink += _arrays_bytes(content) * len(chosen)
        return [Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n) for n in chosen]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted client validation loss and accuracy."""
        ok = sorted((r for r in replies if not r.has_error()), key=_partition_key)
        rows = [r.content[protocol.METRICS] for r in ok]
        rows = [m for m in rows if float(m[protocol.NUM_EXAMPLES]) > 0]  # type: ignore[arg-type]
        if not rows:
            return None
        p = normalised_weights([float(m[protocol.NUM_EXAMPLES]) for m in rows])  # type: ignore[arg-type]

        def mean(key: str) -> float:
            return math.fsum(pk * float(m[key]) for pk, m in zip(p, rows, strict=True))  # type: ignore[arg-type]

        return MetricRecord(
            {
                "client_eval_loss": mean(protocol.EVAL_LOSS),
                "client_eval_accuracy": mean(protocol.EVAL_ACCURACY),
            }
        )


def _declined(reply: Message) -> bool:
    return bool(reply.content[protocol.METRICS].get(protocol.DECLINED, 0))  # type: ignore[union-attr]


def _reason(reply: Message) -> str:
    status = reply.content.config_records.get(protocol.STATUS)
    return str(status[protocol.REASON]) if status is not None else "no reason given"


def _partition_key(reply: Message) -> int:
    return int(reply.content[protocol.METRICS][protocol.PARTITION_ID])  # type: ignore[arg-type]


def _arrays_bytes(content: RecordDict) -> int:
    return sum(payload_bytes(record) for record in content.array_records.values())
