"""What every LoRA strategy shares: Flower's Strategy contract around a few pure hooks with defaults.

A strategy is one file: a subclass registered with :func:`strategies.registry.register`, overriding
only what differs from FedAvg on LoRA:

* :meth:`LoraStrategy.aggregate` - the new global state from client states and weights p_k
  (default: the weighted average of every array, as FedAvg);
* :meth:`LoraStrategy.outgoing` - which global arrays travel to clients (default: all);
* :meth:`LoraStrategy.client_plan` - what each client does this round: rank, kinds frozen, kinds kept
  local, re-initialisation, what it replies with (default: train all, reply with what came). The plan
  travels in the message, so the client never looks the strategy up;
* :meth:`LoraStrategy.diagnostics` - strategy-specific numbers for ``rounds.jsonl``;
* ``base_offsets`` - full-rank offsets folded into the frozen base weights (FedEx-LoRA, FLoRA), sent
  with every message and counted in the downlink (:meth:`LoraStrategy.offsets_message` decides how);
* ``Options`` - a dataclass of the strategy's options (``[strategy.options]``), checked at load.

With ``[compression]`` (:mod:`fedlora.core.model.codecs`) the arrays and full base offsets travel down
encoded, and replies carry encoded updates that are decoded and added to what was sent before anything
else reads them.

Sampling (:mod:`fedlora.server.sampling`), reply bookkeeping (:mod:`fedlora.server.replies`), traffic
(:mod:`fedlora.server.traffic`) and privacy (:mod:`fedlora.privacy.mechanisms`) live in their modules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.core.config import ExperimentConfig
from fedlora.core.devices.profiles import class_of
from fedlora.core.model.arrays import State, from_arrays, is_lora_a, is_lora_b, payload_bytes, to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol import secagg
from fedlora.core.protocol.plan import ClientPlan
from fedlora.core.protocol.validation import Spec
from fedlora.privacy.mechanisms import mechanism_for
from fedlora.server import replies as reply_of
from fedlora.server.replies import RoundCounts, RoundFailedError
from fedlora.server.sampling import ClientSampler
from fedlora.server.secagg import SecureRound, vector_problem
from fedlora.server.traffic import RoundTraffic, arrays_bytes
from strategies.aggregation import normalised_weights, weighted_average

log = logging.getLogger(__name__)

__all__ = ["LoraStrategy", "NoOptions", "RoundFailedError"]


@dataclass
class NoOptions:
    """A strategy without options."""


def _with(config: ConfigRecord, extra: dict[str, int]) -> ConfigRecord:
    """``config`` plus ``extra`` (the same record when there is nothing to add)."""
    return ConfigRecord({**dict(config), **extra}) if extra else config


class LoraStrategy(Strategy):
    """FedAvg on LoRA: samples clients, sends them the arrays that travel, aggregates their replies.

    The round loop owns the global adapter: it passes it to :meth:`configure_train` and
    :meth:`configure_evaluate` as an ArrayRecord and keeps what :meth:`aggregate_train` returns.
    ``global_state`` is this round's copy of it as named tensors.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = "FedAvg of every adapter and head tensor"
    Options: ClassVar[type[Any]] = NoOptions
    keeps_client_state: ClassVar[bool] = False
    """True when clients keep part of their model between rounds (:attr:`ClientPlan.keep_local`): each
    client's model is then its own, so its clients evaluate every round by default and the run is judged by
    their personalised accuracy (``personalised_accuracy`` in ``rounds.jsonl``); the server's test accuracy
    is the shared part only."""
    linear_aggregate: ClassVar[bool] = True
    """True when the server needs only the weighted sum of what clients send: the aggregate is a function
    of sum_k p_k * x_k alone, array by array (dp-updates, ddp and secure aggregation need it). A subclass
    that overrides :meth:`aggregate` is taken as non-linear unless it declares True."""
    nonlinear_reason: ClassVar[str] = "its aggregate needs each client's own arrays, not their sum"
    """Why a non-linear strategy cannot run on a sum (in the one-line refusal at load)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "aggregate" in cls.__dict__ and "linear_aggregate" not in cls.__dict__:
            cls.linear_aggregate = False

    def __init__(self, cfg: ExperimentConfig, global_state: State) -> None:
        self.cfg = cfg
        self.options = self.Options(**cfg.strategy.options)
        self.global_state = dict(global_state)
        self.base_offsets: State = {}
        self.privacy = mechanism_for(cfg)
        self.sampler = ClientSampler(cfg, self.privacy)
        self.traffic = RoundTraffic()
        self.counts = RoundCounts()
        self.last_metrics: dict[str, int | float] = {}
        self.client_rows: list[dict[str, Any]] = []
        """This round's ``clients.jsonl`` lines (:func:`fedlora.server.replies.client_row`)."""
        self._sent: State = {}
        self.chosen: dict[int, int] = {}
        """Partition -> node of the last TRAIN messages built, in their order."""
        self.secure = SecureRound(cfg) if cfg.secure_aggregation.enabled else None
        """SecAgg+ for this round (:mod:`fedlora.server.secagg`), when ``[secure_aggregation]`` is on."""
        self._grid: Grid | None = None
        self.server_round = 1
        """The round being played: set by :meth:`configure_train`, read by hooks that depend on it."""

    # ----- hooks (override these) -----------------------------------------------------------
    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Refuse, with one ConfigError line, settings this strategy cannot run with; called when the
        experiment is loaded, after the options are checked (default: nothing to refuse)."""

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        """Instructions for one client in one round (default: train everything, reply with what came)."""
        return ClientPlan(rank=self.cfg.lora.rank)

    def device_rank(self, partition_id: int, ranks: Sequence[int] = ()) -> int:
        """Client ``partition_id``'s LoRA rank for strategies with per-client ranks: its device class's
        ``rank`` when the class sets one, else ``ranks`` cycled over partition ids, else lora.rank."""
        cfg = self.cfg
        if cfg.devices.enabled:
            rank = class_of(cfg.devices, cfg.seed, cfg.federation.num_clients, partition_id).rank
            if rank:
                return rank
        return ranks[partition_id % len(ranks)] if ranks else cfg.lora.rank

    def outgoing(self, global_state: State) -> State:
        """The tensors sent to every sampled client (default: the whole global adapter)."""
        return dict(global_state)

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        """The new global state from client states and normalised weights p_k (default: FedAvg)."""
        return weighted_average(updates, weights)

    def diagnostics(self) -> dict[str, float]:
        """Strategy-specific per-round numbers for ``rounds.jsonl`` (default: none)."""
        return {}

    def expected_reply(self, partition_id: int, server_round: int) -> Spec:
        """Keys, shapes and dtypes client ``partition_id`` must reply with, from its plan: what was sent
        (``reply = 'received'``; ``'trained'`` without the frozen kinds) or the whole adapter at the
        client's rank (``'adapter'``), minus the kinds it keeps local (:meth:`ClientPlan.reply_keys`)."""
        plan = self.client_plan(partition_id, server_round)
        source = self.global_state if plan.reply == "adapter" else self._sent
        spec: Spec = {}
        for key in plan.reply_keys(self._sent, self.global_state):
            value = source[key]
            shape = tuple(value.shape)
            if is_lora_a(key):
                shape = (plan.rank, *shape[1:])
            elif is_lora_b(key):
                shape = (shape[0], plan.rank)
            spec[key] = (shape, value.dtype)
        return spec

    def client_arrays(self, partition_id: int, sent: State) -> State | None:
        """The arrays sent to client ``partition_id`` when they differ between clients (HetLoRA and
        FlexLoRA: truncated to the client's rank); default None: every client gets ``sent``."""
        return None

    def offsets_message(
        self, partition_id: int, full: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The base-offset records and config entries of one client's message (default: ``full``, the
        full offsets shared by every message, and no config; FLoRA sends stacked factors instead)."""
        return full, {}

    # ----- Flower's Strategy contract ---------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's settings in one line."""
        opts = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.options).items())
        log.info("strategy %s (%s)%s", self.name, self.description, f": {opts}" if opts else "")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One TRAIN message per sampled client: the arrays that travel, its plan, the config."""
        self.server_round = server_round
        self.global_state = from_arrays(arrays)
        return self.train_messages(server_round, config, self.sampler.sample(grid, training=True), grid)

    def train_messages(
        self, server_round: int, config: ConfigRecord, chosen: dict[int, int], grid: Grid | None = None
    ) -> list[Message]:
        """TRAIN messages with the current global state to ``chosen`` (partition -> node), in its order;
        the round's traffic and counts start from them. Under secure aggregation the messages open its
        key agreement on ``grid`` (synchronous rounds only: the config loader refuses FedBuff with it)."""
        self.chosen = dict(chosen)
        self._sent = self.outgoing(self.global_state)
        messages = self._messages(server_round, config, chosen, MessageType.TRAIN)
        self.counts = RoundCounts(sampled=len(chosen))
        if self.secure is not None:
            if grid is None:
                raise RuntimeError("secure aggregation needs the round's grid")
            self._grid = grid
            messages = self.secure.open(grid, server_round, messages, list(chosen))
        self.traffic = RoundTraffic(downlink=sum(arrays_bytes(m.content) for m in messages))
        return messages

    def _messages(
        self, server_round: int, config: ConfigRecord, chosen: dict[int, int], kind: str
    ) -> list[Message]:
        """Messages to the chosen nodes (partition -> node), sharing one copy of the arrays."""
        sent = self.outgoing(self.global_state)
        shared: dict[str, Any] = {
            protocol.ARRAYS: to_arrays(sent, self.cfg.compression.downlink),
            protocol.CONFIG: ConfigRecord({**dict(config), protocol.SERVER_ROUND: server_round}),
        }
        offsets: dict[str, Any] = {}
        if self.base_offsets:
            offsets[protocol.BASE_OFFSETS] = to_arrays(self.base_offsets, self.cfg.compression.downlink)
        config = shared[protocol.CONFIG]
        per_client = {pid: self.offsets_message(pid, offsets) for pid in chosen}
        down = self.cfg.compression.downlink
        own = {
            pid: {protocol.ARRAYS: to_arrays(a, down)}
            for pid in chosen
            if (a := self.client_arrays(pid, sent))
        }
        return [
            Message(
                RecordDict(
                    {
                        **shared,
                        **per_client[pid][0],
                        **own.get(pid, {}),
                        protocol.CONFIG: self._assigned(_with(config, per_client[pid][1]), pid),
                        protocol.PLAN: self.client_plan(pid, server_round).to_config(),
                    }
                ),
                message_type=kind,
                dst_node_id=node,
            )
            for pid, node in chosen.items()
        ]

    def _assigned(self, config: ConfigRecord, partition_id: int) -> ConfigRecord:
        """The message config, naming the partition when the sampler assigns them (virtual nodes)."""
        if not self.sampler.assigns:
            return config
        return ConfigRecord({**dict(config), protocol.ASSIGNED_PARTITION: partition_id})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the valid replies; returns the new global adapter and the round's metrics.

        Replies with an error, and replies that fail validation (:meth:`_validate`), are left out and
        counted; the round fails with :class:`RoundFailedError` when fewer than ``federation.min_clients``
        valid replies remain (declining under dp-sgd counts as a valid answer).
        """
        replies = list(replies)
        # Sorted by partition, so that sums are taken in the same order in every run.
        ok = sorted((r for r in replies if not r.has_error()), key=reply_of.partition_of)
        sampled, dropped = self.counts.sampled, self.counts.dropped
        self.counts = RoundCounts(
            sampled, replied=len(ok), failed=sampled - dropped - len(ok), dropped=dropped
        )
        self.client_rows = []
        for reply in replies:
            if reply.has_error():
                reason = reply_of.last_line(str(reply.error.reason))
                log.warning("round %s: a client failed: %s", server_round, reason)
                self._client_row(server_round, "train", reply, "failed", reason)
        self.privacy.observe([r.content[protocol.METRICS] for r in ok if protocol.METRICS in r.content])
        declined = [r for r in ok if reply_of.declined(r)]
        trained = [r for r in ok if not reply_of.declined(r)]
        for reply in trained:
            for name in (protocol.ARRAYS, secagg.MASKED):
                if name in reply.content.array_records:
                    self.traffic.uplink += payload_bytes(reply.content[name])
        trained = self._validate(server_round, trained)
        if self.secure is not None and not self.secure.shared:  # abandoned before training: nothing sent
            self.last_metrics = {"num_clients": 0.0, "train_loss": math.nan, **self.secure.stats.row()}
            return to_arrays(self.global_state), MetricRecord(dict(self.last_metrics))  # type: ignore[arg-type]
        self._check_enough(server_round, replies, len(trained) + len(declined))
        for reply in declined:
            log.info("round %s: a client declined: %s", server_round, reply_of.reason(reply))
            self._client_row(server_round, "train", reply, "declined", reply_of.reason(reply))
        for reply in trained:
            self._client_row(server_round, "train", reply, "ok")
        self.last_metrics = {"num_clients": float(len(trained)), "train_loss": math.nan}
        if self.secure is not None:
            self._aggregate_secure(server_round, trained)
        elif trained or self.privacy.aggregates_without_replies:
            self._aggregate_replies(server_round, trained)
        self.last_metrics.update({**self.privacy.round_metrics(), **self.diagnostics()})
        return to_arrays(self.global_state), MetricRecord(dict(self.last_metrics))  # type: ignore[arg-type]

    def _validate(self, server_round: int, trained: Sequence[Message]) -> list[Message]:
        """The replies whose metrics and arrays pass :func:`fedlora.core.protocol.validation.check_reply`; the
        others are logged with their reason and counted as rejected."""
        valid = []
        for reply in trained:
            problem = self._problem(reply, server_round)
            if problem is None:
                valid.append(reply)
                continue
            self.counts.rejected += 1
            self._client_row(server_round, "train", reply, "rejected", problem)
            who = reply_of.who(reply)
            log.warning("round %s: rejected the reply of client %s: %s", server_round, who, problem)
        return valid

    @property
    def _updates(self) -> bool:
        """Whether replies carry updates (the reply minus what was received) rather than values: with
        any ``compression.uplink`` codec, which then loses far less (docs/usage.md, Compression)."""
        return self.cfg.compression.uplink != "none"

    def _problem(self, reply: Message, server_round: int) -> str | None:
        pid = reply_of.partition_of(reply)
        expected = self.expected_reply(pid, server_round)
        if self.secure is not None:
            return vector_problem(reply, 1 + _length(expected), self.secure.modulus)
        sent = self.client_arrays(pid, self._sent) if pid >= 0 else None
        return reply_of.problem(
            reply, expected, sent or self._sent, self.cfg.robustness.max_update_norm, updates=self._updates
        )

    def _check_enough(self, server_round: int, replies: Sequence[Message], answered: int) -> None:
        """Fail the round when fewer than min_clients valid replies arrived (or than were sampled, if
        fewer: Poisson sampling under dp-updates may pick fewer than min_clients)."""
        need = min(self.cfg.federation.min_clients, self.counts.sampled)
        if answered >= need:
            return
        errors = [str(r.error.reason) for r in replies if r.has_error()]
        c = self.counts
        raise RoundFailedError(
            f"round {server_round}: {answered} valid replies from {c.sampled} sampled clients "
            f"({c.failed} failed, {c.rejected} rejected"
            + (f", {c.dropped} dropped on the virtual clock" if c.dropped else "")
            + "), fewer than federation.min_clients = "
            f"{self.cfg.federation.min_clients}"
            + (f"; first client error: {reply_of.last_line(errors[0])}" if errors else "")
        )

    def _aggregate_replies(self, server_round: int, trained: Sequence[Message]) -> None:
        """New global state from the clients that trained, released through the privacy mechanism."""
        updates = [reply_of.arrays_of(r, self._sent, updates=self._updates) for r in trained]
        counts = [float(r.content[protocol.METRICS][protocol.NUM_EXAMPLES]) for r in trained]  # type: ignore[arg-type]
        losses = [float(r.content[protocol.METRICS][protocol.TRAIN_LOSS]) for r in trained]  # type: ignore[arg-type]
        p = self.privacy.weights(counts) if counts else []
        released, weights = self.privacy.release(self._sent, updates, p, server_round)
        self.global_state = {**self.global_state, **self.aggregate(self.global_state, released, weights)}
        if losses:
            self.last_metrics["train_loss"] = math.fsum(pk * loss for pk, loss in zip(p, losses, strict=True))

    def _aggregate_secure(self, server_round: int, trained: Sequence[Message]) -> None:
        """New global state from the unmasked sum of the valid masked vectors (SecAgg+); nothing changes
        when the round is abandoned (too few shares to unmask it)."""
        assert self.secure is not None and self._grid is not None
        pids = [reply_of.partition_of(r) for r in trained]
        vectors = {
            pid: r.content[secagg.MASKED][secagg.VECTOR].numpy().astype("int64")  # type: ignore[union-attr]
            for pid, r in zip(pids, trained, strict=True)
        }
        total = self.secure.close(self._grid, vectors) if self.secure.shared else None
        self.last_metrics.update(self.secure.stats.row())
        if total is None:
            self.last_metrics["num_clients"] = 0.0
            return
        spec = self.expected_reply(pids[0], server_round)
        codec = self.privacy.secure_codec(_length(spec))
        summed, weight = codec.decode(total, len(vectors))
        state = _unflatten(summed, spec)
        released, weights = self.privacy.release_sum(self._sent, state, weight, len(vectors), server_round)
        self.global_state = {**self.global_state, **self.aggregate(self.global_state, released, weights)}
        counts = [float(r.content[protocol.METRICS][protocol.NUM_EXAMPLES]) for r in trained]  # type: ignore[arg-type]
        losses = [float(r.content[protocol.METRICS][protocol.TRAIN_LOSS]) for r in trained]  # type: ignore[arg-type]
        p = self.privacy.weights(counts)
        self.last_metrics["train_loss"] = math.fsum(pk * loss for pk, loss in zip(p, losses, strict=True))
        clipped = [r.content[protocol.METRICS].get(protocol.SECAGG_CLIPPED, 0) for r in trained]
        self.last_metrics["secagg_clipped"] = math.fsum(float(c) for c in clipped)  # type: ignore[arg-type]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """EVALUATE messages to a fraction of clients (``federation.fraction_evaluate``; 0 = none)."""
        fraction = self.cfg.federation.fraction_evaluate
        if fraction <= 0:
            return []
        self.global_state = from_arrays(arrays)
        chosen = self.sampler.sample(grid, fraction)
        messages = self._messages(server_round, config, chosen, MessageType.EVALUATE)
        self.traffic.downlink += sum(arrays_bytes(m.content) for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted client validation loss and accuracy."""
        replies = list(replies)
        ok = sorted((r for r in replies if not r.has_error()), key=reply_of.partition_of)
        for reply in replies:
            failed = reply_of.last_line(str(reply.error.reason)) if reply.has_error() else ""
            self._client_row(server_round, "evaluate", reply, "failed" if failed else "ok", failed)
        rows = [r.content[protocol.METRICS] for r in ok]
        rows = [m for m in rows if float(m[protocol.NUM_EXAMPLES]) > 0]  # type: ignore[arg-type]
        if not rows:
            return None
        p = normalised_weights([float(m[protocol.NUM_EXAMPLES]) for m in rows])  # type: ignore[arg-type]

        def mean(key: str) -> float:
            return math.fsum(pk * float(m[key]) for pk, m in zip(p, rows, strict=True))  # type: ignore[arg-type]

        scores: dict[str, int | float] = {
            "client_eval_loss": mean(protocol.EVAL_LOSS),
            "client_eval_accuracy": mean(protocol.EVAL_ACCURACY),
        }
        if self.keeps_client_state:  # the clients' own models: the run's headline accuracy
            scores["personalised_accuracy"] = scores["client_eval_accuracy"]
        return MetricRecord(scores)  # type: ignore[arg-type]

    def _client_row(self, server_round: int, phase: str, reply: Message, status: str, why: str = "") -> None:
        """Note what one client's reply said and what became of it (``clients.jsonl``)."""
        self.client_rows.append(reply_of.client_row(server_round, phase, reply, status, why))

    # ----- checkpoint -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """JSON-able state beyond the global adapter and base offsets: the sampling RNG and the
        privacy mechanism's accountant."""
        return {"rng": self.sampler.state(), "privacy": self.privacy.checkpoint_state()}

    def restore(self, global_state: State, base_offsets: State, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint: the inverse of (``global_state``, ``base_offsets``,
        :meth:`checkpoint_state`)."""
        self.global_state = dict(global_state)
        self.base_offsets = dict(base_offsets)
        self.sampler.restore(saved["rng"])
        self.privacy.restore(saved["privacy"])


def _length(spec: Spec) -> int:
    """Values in a reply of this spec, all arrays flattened."""
    return sum(math.prod(shape) for shape, _ in spec.values())


def _unflatten(flat: Any, spec: Spec) -> State:
    """A flat float vector back into the spec's arrays, keys in sorted order (as clients flatten them)."""
    out: State = {}
    start = 0
    for key in sorted(spec):
        shape, dtype = spec[key]
        size = math.prod(shape)
        out[key] = torch.from_numpy(flat[start : start + size].reshape(shape)).to(dtype)
        start += size
    return out
