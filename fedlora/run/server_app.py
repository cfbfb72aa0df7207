"""The ServerApp and the round loop: sample, train, aggregate, evaluate, record.

``run_federation`` is the loop; ``make_server_app`` wraps it for the in-process CLI and
``app`` is the Flower App entry point used by ``flwr run .`` (reads ``[tool.flwr.app.config]``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedlora.core import protocol
from fedlora.core.config import ExperimentConfig
from fedlora.core.records import RunDirectory, versions
from fedlora.core.stopping import STOP, exchange
from fedlora.run import checkpoint
from fedlora.run.experiment import load_experiment, preflight
from strategies import registry
from strategies.base import LoraStrategy, RoundFailedError

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass
class Evaluator:
    """Server-side evaluation of the global adapter on the stratified held-out test set."""

    cfg: ExperimentConfig
    majority_accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        from fedlora.core.data import get_splits, majority_accuracy
        from fedlora.core.models import load_tokenizer
        from fedlora.core.training import encode

        test = get_splits(self.cfg.data, self.cfg.federation.num_clients, self.cfg.seed).test
        self.majority_accuracy = majority_accuracy(test)
        self.test = encode(test, load_tokenizer(self.cfg.model.path), self.cfg.data.max_length)

    def __call__(self, state: dict[str, Any], base_offsets: dict[str, Any]) -> tuple[float, float]:
        """(eval_loss, eval_accuracy) of the adapter ``state`` over W0 + ``base_offsets`` on the test set."""
        from fedlora.core.training import evaluate

        return evaluate(global_model(self.cfg, state, base_offsets), self.test)


def global_model(cfg: ExperimentConfig, state: dict[str, Any], base_offsets: dict[str, Any]) -> Any:
    """The process's model holding the global adapter and base offsets."""
    from fedlora.core.adapters import get_model, load_adapter_state, set_base_offsets

    model = get_model(cfg)
    set_base_offsets(model, base_offsets)
    load_adapter_state(model, state)
    return model


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: RunDirectory,
    on_round: RoundCallback | None = None,
    *,
    resume: bool = False,
    client_state_dir: Path | None = None,
) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid``, writing the run directory; returns the summary.

    After each round the checkpoint is written (atomically) before the round's row is appended to
    ``rounds.jsonl``. With ``resume`` the run continues after the checkpoint's round. With
    ``client_state_dir`` clients keep their state there, versioned by round (:mod:`fedlora.core.store`).
    """
    from fedlora.core.adapters import initial_state

    started = time.monotonic()
    strategy = registry.get(cfg.strategy.name)(cfg, initial_state(cfg))
    strategy.summary()
    evaluate = Evaluator(cfg)
    config: dict[str, Any] = {protocol.EXPERIMENT: cfg.to_toml()}
    if client_state_dir is not None:
        config[protocol.STATE_DIR] = str(Path(client_state_dir).resolve())
    base_config = ConfigRecord(config)
    rows: list[dict[str, Any]] = []
    before_s = 0.0
    if resume:
        saved = checkpoint.load(run_dir.checkpoint_path)
        strategy.restore(saved.global_state, saved.base_offsets, saved.strategy)
        rows = run_dir.keep_rounds(saved.round, saved.row)
        before_s = saved.wall_s
        log.warning("fedlora: resuming after round %s", saved.round)
    for server_round in range(len(rows) + 1, cfg.federation.rounds + 1):
        row = _round_with_retries(grid, cfg, strategy, evaluate, base_config, server_round)
        wall_s = before_s + time.monotonic() - started
        checkpoint.save(
            run_dir.checkpoint_path,
            checkpoint.Checkpoint(
                server_round,
                strategy.global_state,
                strategy.base_offsets,
                strategy.checkpoint_state(),
                row,
                wall_s,
            ),
        )
        run_dir.append_round(row)
        rows.append(row)
        if on_round is not None:
            on_round(row)
    global_model(cfg, strategy.global_state, {}).save_pretrained(str(run_dir.adapter_path))
    if strategy.base_offsets:  # FedEx-LoRA, FLoRA: what was folded into the frozen weights
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in strategy.base_offsets.items()}, str(run_dir.base_offsets_path)
        )
    summary = _summary(cfg, rows, evaluate.majority_accuracy, before_s + time.monotonic() - started)
    run_dir.write_summary(summary)
    return summary


def _round_with_retries(
    grid: Grid,
    cfg: ExperimentConfig,
    strategy: LoraStrategy,
    evaluate: Evaluator,
    base_config: ConfigRecord,
    server_round: int,
) -> dict[str, Any]:
    """One round; retried (with a new sample) up to ``robustness.round_retries`` times when too few
    valid replies arrive. The last failure stops the run (finished rounds stay in the run directory)."""
    retries = cfg.robustness.round_retries
    for attempt in range(retries + 1):
        try:
            row = _one_round(grid, cfg, strategy, evaluate, base_config, server_round)
        except RoundFailedError as exc:
            if attempt == retries:
                raise RoundFailedError(
                    f"{exc}; gave up after {retries + 1} attempt(s) (robustness.round_retries = {retries})"
                ) from None
            log.warning("fedlora: %s; retrying the round (%s of %s)", exc, attempt + 1, retries)
            continue
        row["attempts"] = attempt + 1
        return row
    raise AssertionError("unreachable")  # pragma: no cover


def _one_round(
    grid: Grid,
    cfg: ExperimentConfig,
    strategy: LoraStrategy,
    evaluate: Evaluator,
    base_config: ConfigRecord,
    server_round: int,
) -> dict[str, Any]:
    t0 = time.monotonic()
    # The strategy keeps the global adapter itself; Flower's ``arrays`` argument is not used.
    messages = list(strategy.configure_train(server_round, ArrayRecord(), base_config, grid))
    replies = exchange(grid, messages, cfg.federation.round_timeout)
    t_agg = time.monotonic()
    strategy.aggregate_train(server_round, replies)
    aggregate_s = time.monotonic() - t_agg
    client_eval = None
    eval_messages = list(strategy.configure_evaluate(server_round, ArrayRecord(), base_config, grid))
    if eval_messages:
        client_eval = strategy.aggregate_evaluate(
            server_round, exchange(grid, eval_messages, cfg.federation.round_timeout)
        )
    STOP.check()
    eval_loss, eval_accuracy = evaluate(strategy.global_state, strategy.base_offsets)
    metrics = dict(strategy.last_metrics)
    row: dict[str, Any] = {
        "round": server_round,
        "strategy": cfg.strategy.name,
        "num_clients": int(metrics.pop("num_clients", 0)),
        **strategy.counts.as_row(),
        "train_loss": metrics.pop("train_loss", math.nan),
        "eval_loss": eval_loss,
        "eval_accuracy": eval_accuracy,
        "uplink_bytes": strategy.traffic.uplink,
        "downlink_bytes": strategy.traffic.downlink,
        "aggregate_s": aggregate_s,
        "wall_s": time.monotonic() - t0,
        **metrics,
    }
    if client_eval is not None:
        row.update({k: float(v) for k, v in client_eval.items()})  # type: ignore[arg-type]
    return row


def _summary(
    cfg: ExperimentConfig, rows: list[dict[str, Any]], majority: float, wall_s: float
) -> dict[str, Any]:
    accuracies = [r["eval_accuracy"] for r in rows]
    best = max(range(len(rows)), key=lambda i: accuracies[i])
    return {
        "name": cfg.name,
        "strategy": cfg.strategy.name,
        "rounds": len(rows),
        "num_clients": cfg.federation.num_clients,
        "final_eval_accuracy": accuracies[-1],
        "final_eval_loss": rows[-1]["eval_loss"],
        "best_eval_accuracy": accuracies[best],
        "best_round": rows[best]["round"],
        "majority_accuracy": majority,
        "total_uplink_bytes": sum(r["uplink_bytes"] for r in rows),
        "total_downlink_bytes": sum(r["downlink_bytes"] for r in rows),
        "total_failed": sum(r.get("num_failed") or 0 for r in rows),
        "total_rejected": sum(r.get("num_rejected") or 0 for r in rows),
        "wall_s": wall_s,
        **_privacy_summary(cfg, rows),
        "versions": versions(),
    }


def _privacy_summary(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The privacy spent by the whole run (nothing when DP is off)."""
    if not cfg.privacy.enabled:
        return {}
    return {
        "privacy_mode": cfg.privacy.mode,
        "final_epsilon": rows[-1]["epsilon"],
        "delta": cfg.privacy.delta,
        "total_declined": int(sum(r.get("num_declined", 0) for r in rows)),
    }


def make_server_app(
    cfg: ExperimentConfig,
    run_dir: RunDirectory,
    on_round: RoundCallback | None = None,
    *,
    resume: bool = False,
    client_state_dir: Path | None = None,
) -> ServerApp:
    """A ServerApp bound to an already validated config and run directory (used by the CLI)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run_dir, on_round, resume=resume, client_state_dir=client_state_dir)

    return server_app


def _app_path(path: str) -> Path:
    """``path`` as given if it exists, else relative to the app's root (where ``flwr run`` unpacked it)."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    return Path(__file__).resolve().parents[1] / given


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the experiment file, overrides and output from the run config."""
    run_config = context.run_config
    experiment = _app_path(str(run_config.get("experiment", "sims/quickstart.toml")))
    overrides = [o.strip() for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    cfg = load_experiment(experiment, overrides)
    preflight(cfg)
    out = Path(str(run_config.get("out-dir", "runs"))) / f"{cfg.name}-{int(time.time())}"
    run_dir = RunDirectory(out)
    run_dir.create(cfg)
    log.warning("fedlora: writing run directory %s", out.resolve())
    run_federation(grid, cfg, run_dir)
