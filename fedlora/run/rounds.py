"""The round loop: the global adapter passed through a strategy's Flower contract, round by round.

One round is ``configure_train`` -> send and collect -> ``aggregate_train`` (whose ArrayRecord becomes
the new global adapter) -> ``configure_evaluate`` -> ``aggregate_evaluate`` -> the server's evaluation
on the test set, and one row for ``rounds.jsonl``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedlora.core.config import ExperimentConfig
from fedlora.core.model.arrays import State, from_arrays, to_arrays
from fedlora.core.protocol.stopping import STOP, exchange
from fedlora.run.evaluation import Evaluator
from fedlora.run.progress import Listener, RoundProgress
from fedlora.server.clock import SyncClock
from fedlora.server.replies import RoundFailedError
from fedlora.tasks.registry import task_of
from strategies.base import LoraStrategy

log = logging.getLogger(__name__)


class RoundLoop:
    """Runs rounds of one federation; ``arrays`` is the global adapter between rounds."""

    def __init__(
        self,
        grid: Grid,
        cfg: ExperimentConfig,
        strategy: LoraStrategy,
        evaluate: Evaluator,
        config: ConfigRecord,
        listener: Listener | None = None,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.strategy = strategy
        self.evaluate = evaluate
        self.config = config
        self.listener = listener or Listener()
        self.arrays: ArrayRecord = to_arrays(strategy.global_state)
        self.client_rows: list[dict[str, Any]] = []
        """The last round's per-client lines for ``clients.jsonl``, by phase and partition."""
        self.clock = SyncClock(cfg)
        """The virtual clock (:mod:`fedlora.server.clock`); a no-op without device classes."""

    @property
    def global_state(self) -> State:
        """The global adapter as named tensors."""
        return from_arrays(self.arrays)

    def restore(self, global_state: State) -> None:
        """Continue from a checkpoint's global adapter."""
        self.arrays = to_arrays(global_state)

    def run_round(self, server_round: int) -> dict[str, Any]:
        """One round; retried (with a new sample) up to ``robustness.round_retries`` times when too few
        valid replies arrive. The last failure stops the run (finished rounds stay on disk)."""
        retries = self.cfg.robustness.round_retries
        for attempt in range(retries + 1):
            try:
                row = self.one_round(server_round)
            except RoundFailedError as exc:
                if attempt == retries:
                    raise RoundFailedError(
                        f"{exc}; gave up after {retries + 1} attempt(s) "
                        f"(robustness.round_retries = {retries})"
                    ) from None
                log.warning("fedlora: %s; retrying the round (%s of %s)", exc, attempt + 1, retries)
                continue
            row["attempts"] = attempt + 1
            return row
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(self, messages: list[Message], server_round: int, phase: str, t0: float) -> list[Message]:
        """Send and collect one phase's messages, telling the listener as replies arrive."""

        def arrived(replied: int, sent: int) -> None:
            self.listener.progress(RoundProgress(server_round, phase, replied, sent, time.monotonic() - t0))

        return exchange(self.grid, messages, self.cfg.federation.round_timeout, arrived)

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` evaluates: every ``federation.evaluate_every`` rounds, and the last."""
        fed = self.cfg.federation
        return server_round % fed.evaluate_every == 0 or server_round >= fed.rounds

    def train_phase(self, server_round: int, t0: float) -> tuple[dict[str, Any], float]:
        """Sample, send, collect and aggregate one round's training (the synchronous schedule, on the
        virtual clock when clients have device classes); returns the strategy's metrics plus the clock's
        keys, and the seconds spent aggregating."""
        strategy = self.strategy
        self.clock.prepare(server_round, strategy.sampler)
        messages = list(strategy.configure_train(server_round, self.arrays, self.config, self.grid))
        messages = self.clock.admit(
            server_round,
            list(strategy.chosen),
            messages,
            lambda pid: strategy.expected_reply(pid, server_round),
        )
        strategy.counts.dropped = self.clock.dropped
        replies = self._exchange(messages, server_round, "train", t0)
        t_agg = time.monotonic()
        arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        aggregate_s = time.monotonic() - t_agg
        if arrays is not None:
            self.arrays = arrays
        return {**dict(train_metrics or {}), **self.clock.row()}, aggregate_s

    def one_round(self, server_round: int) -> dict[str, Any]:
        """Train, aggregate, evaluate (on evaluation rounds; other rounds' rows have ``eval_loss``,
        ``eval_accuracy`` and ``eval_macro_f1`` null); returns the round's row (without ``attempts``)."""
        t0 = time.monotonic()
        strategy = self.strategy
        metrics, aggregate_s = self.train_phase(server_round, t0)
        client_eval = None
        evaluating = self.evaluates(server_round)
        asked = []
        if evaluating:
            asked = list(strategy.configure_evaluate(server_round, self.arrays, self.config, self.grid))
        if asked:
            client_eval = strategy.aggregate_evaluate(
                server_round, self._exchange(asked, server_round, "evaluate", t0)
            )
        STOP.check()
        if evaluating:
            self.listener.progress(RoundProgress(server_round, "test", 0, 0, time.monotonic() - t0))
        scores = self.evaluate(self.global_state, strategy.base_offsets) if evaluating else None
        row: dict[str, Any] = {
            "round": server_round,
            "strategy": self.cfg.strategy.name,
            "num_clients": int(metrics.pop("num_clients", 0)),
            **strategy.counts.as_row(),
            "train_loss": metrics.pop("train_loss", math.nan),
            "eval_loss": scores.loss if scores else None,
            "eval_accuracy": scores.accuracy if scores else None,
            "eval_macro_f1": scores.macro_f1 if scores else None,
            **task_of(self.cfg).round_metrics(scores),
            "uplink_bytes": strategy.traffic.uplink,
            "downlink_bytes": strategy.traffic.downlink,
            "aggregate_s": aggregate_s,
            "wall_s": time.monotonic() - t0,
            **metrics,
        }
        if client_eval is not None:
            row.update({k: float(v) for k, v in client_eval.items()})  # type: ignore[arg-type]
        phases = {"train": 0, "evaluate": 1}
        self.client_rows = sorted(
            strategy.client_rows, key=lambda r: (phases[r["phase"]], r["partition_id"], r["node_id"])
        )
        return row
