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

from fedlora.core import protocol
from fedlora.core.adapters import State, from_arrays, is_lora_a, is_lora_b, kind_of, payload_bytes, to_arrays
from fedlora.core.config import ExperimentConfig
from fedlora.core.plan import ClientPlan
from fedlora.core.stopping import exchange
from fedlora.core.validation import Spec, check_metrics, check_reply
from fedlora.privacy.server import ServerPrivacy
from strategies.aggregation import normalised_weights

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
        self.counts = RoundCounts()

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

    def expected_reply(self, partition_id: int, server_round: int) -> Spec:
        """Keys, shapes and dtypes client ``partition_id`` must reply with, from its plan: what was sent
        (``reply = 'received'``) or the whole adapter at the client's rank (``'adapter'``), minus the
        kinds it keeps local."""
        plan = self.client_plan(self.cfg, self.options, partition_id, server_round)
        source = self._sent if plan.reply == "received" else self.global_state
        spec: Spec = {}
        for key, value in source.items():
            if kind_of(key) in plan.keep_local:
                continue
            shape = tuple(value.shape)
            if is_lora_a(key):
                shape = (plan.rank, *shape[1:])
            elif is_lora_b(key):
                shape = (shape[0], plan.rank)
            spec[key] = (shape, value.dtype)
        return spec

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
        """Aggregate the valid replies; returns the new global adapter and round metrics.

        Replies with an error, and replies that fail validation (:meth:`_validate`), are left out and
        counted; the round fails with :class:`RoundFailedError` when fewer than ``federation.min_clients``
        valid replies remain (declining under dp-sgd counts as a valid answer).
        """
        replies = list(replies)
        # Sorted by partition, so that sums are taken in the same order in every run.
        ok = sorted((r for r in replies if not r.has_error()), key=_partition_key)
        self.counts = RoundCounts(
            sampled=self._num_sampled, replied=len(ok), failed=self._num_sampled - len(ok)
        )
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %s: a client failed: %s", server_round, _last_line(str(reply.error.reason))
                )
        self.privacy.observe([r.content[protocol.METRICS] for r in ok if protocol.METRICS in r.content])
        declined = [r for r in ok if _declined(r)]
        trained = [r for r in ok if not _declined(r)]
        for reply in trained:
            if protocol.ARRAYS in reply.content:
                self.traffic.uplink += payload_bytes(reply.content[protocol.ARRAYS])
        trained = self._validate(server_round, trained)
        self._check_enough(server_round, replies, len(trained) + len(declined))
        for reply in declined:
            log.info("round %s: a client declined: %s", server_round, _reason(reply))
        self.last_metrics = {"num_clients": float(len(trained)), "train_loss": math.nan}
        if trained or self.privacy.updates:
            self._aggregate_replies(server_round, trained)
        if self.cfg.privacy.mode == "dp-sgd":
            self.last_metrics["num_declined"] = float(len(declined))
        self.last_metrics.update({**self.privacy.round_metrics(), **self.diagnostics()})
        return to_arrays(self.global_state), MetricRecord(dict(self.last_metrics))  # type: ignore[arg-type]

    def _validate(self, server_round: int, trained: Sequence[Message]) -> list[Message]:
        """The replies whose metrics and arrays pass :func:`fedlora.core.validation.check_reply`; the others
        are logged with their reason and counted as rejected."""
        valid = []
        for reply in trained:
            reason = self._problem(reply, server_round)
            if reason is None:
                valid.append(reply)
                continue
            self.counts.rejected += 1
            log.warning("round %s: rejected the reply of client %s: %s", server_round, _who(reply), reason)
        return valid

    def _problem(self, reply: Message, server_round: int) -> str | None:
        metrics = reply.content.metric_records.get(protocol.METRICS)
        if metrics is None or protocol.PARTITION_ID not in metrics:
            return "no metrics with a partition-id"
        bad = check_metrics(metrics, protocol.NUM_EXAMPLES)
        if bad or protocol.ARRAYS not in reply.content.array_records:
            return bad or "no arrays"
        try:
            arrays = from_arrays(reply.content[protocol.ARRAYS])
        except Exception as exc:  # a malformed record from a buggy client must not stop the round
            return f"unreadable arrays ({type(exc).__name__}: {exc})"
        expected = self.expected_reply(_partition_key(reply), server_round)
        return check_reply(arrays, expected, self._sent, self.cfg.robustness.max_update_norm)

    def _check_enough(self, server_round: int, replies: Sequence[Message], answered: int) -> None:
        """Fail the round when fewer than min_clients valid replies arrived (or than were sampled, if
        fewer: Poisson sampling under dp-updates may pick fewer than min_clients)."""
        need = min(self.cfg.federation.min_clients, self._num_sampled)
        if answered >= need:
            return
        errors = [str(r.error.reason) for r in replies if r.has_error()]
        c = self.counts
        raise RoundFailedError(
            f"round {server_round}: {answered} valid replies from {c.sampled} sampled clients "
            f"({c.failed} failed, {c.rejected} rejected), fewer than federation.min_clients = "
            f"{self.cfg.federation.min_clients}"
            + (f"; first client error: {_last_line(errors[0])}" if errors else "")
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

    # ----- checkpoint -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """JSON-able state beyond the global adapter and base offsets: the sampling RNG and the
        privacy accountant (dp-sgd: each client's latest epsilon; dp-updates: rounds noised)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "client_epsilon": {str(k): v for k, v in self.privacy.client_epsilon.items()},
            "rounds_noised": self.privacy.rounds_noised,
        }

    def restore(self, global_state: State, base_offsets: State, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint: the inverse of (``global_state``, ``base_offsets``,
        :meth:`checkpoint_state`)."""
        self.global_state = dict(global_state)
        self.base_offsets = dict(base_offsets)
        version, internal, gauss = saved["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.privacy.client_epsilon = {int(k): float(v) for k, v in saved["client_epsilon"].items()}
        self.privacy.rounds_noised = int(saved["rounds_noised"])

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
    metrics = reply.content.metric_records.get(protocol.METRICS)
    return metrics is not None and bool(metrics.get(protocol.DECLINED, 0))


def _reason(reply: Message) -> str:
    status = reply.content.config_records.get(protocol.STATUS)
    return str(status[protocol.REASON]) if status is not None else "no reason given"


def _partition_key(reply: Message) -> int:
    """The reply's partition id (-1 when it has none: validation then rejects it)."""
    metrics = reply.content.metric_records.get(protocol.METRICS)
    if metrics is None or protocol.PARTITION_ID not in metrics:
        return -1
    return int(metrics[protocol.PARTITION_ID])  # type: ignore[arg-type]


def _who(reply: Message) -> str:
    pid = _partition_key(reply)
    return f"partition {pid}" if pid >= 0 else f"node {reply.metadata.src_node_id}"


def _last_line(text: str) -> str:
    """The last line of a client's error (Flower wraps it: ``... Message: <reason>'>``)."""
    lines = text.strip().removesuffix("'>").strip().splitlines()
    return lines[-1] if lines else "no reason given"


def _arrays_bytes(content: RecordDict) -> int:
    return sum(payload_bytes(record) for record in content.array_records.values())
