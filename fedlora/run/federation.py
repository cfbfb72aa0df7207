"""One federated run from start to summary: the round loop plus its run directory.

After each round its per-client lines are appended to ``clients.jsonl``, then the checkpoint is
written (atomically, :mod:`fedlora.run.checkpoint`), then the round's row is appended to
``rounds.jsonl``; at the end the adapter (and any base offsets) and
``summary.json`` are written.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model.adapters import save_adapter
from fedlora.core.protocol import keys as protocol
from fedlora.core.records.rundir import RunDirectory, versions
from fedlora.privacy.mechanisms import registry as mechanisms
from fedlora.run import checkpoint
from fedlora.run.buffered import BufferedLoop
from fedlora.run.evaluation import Evaluator, global_model
from fedlora.run.progress import Listener
from fedlora.run.rounds import RoundLoop
from fedlora.tasks.models import initial_state
from fedlora.tasks.registry import task_of
from strategies import registry

log = logging.getLogger(__name__)


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    run_dir: RunDirectory,
    listener: Listener | None = None,
    *,
    resume: bool = False,
    client_state_dir: Path | None = None,
) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid``, writing the run directory; returns the summary.

    ``listener`` hears the zero-shot scores, each finished round's row, and replies as they arrive
    (:mod:`fedlora.run.progress`). With ``resume`` the run continues after the checkpoint's round. With
    ``client_state_dir`` (a simulation) clients keep their state there by partition, versioned by round
    (:mod:`fedlora.core.records.store`); any virtual node can then play any partition, so the server assigns
    partitions to nodes instead of asking every node for its own (:mod:`fedlora.server.sampling`).
    """
    if resume and cfg.schedule.mode == "fedbuff":
        raise ConfigError("a FedBuff run cannot be resumed: its clients in flight are not checkpointed")
    started = time.monotonic()
    listener = listener or Listener()
    strategy = registry.get(cfg.strategy.name)(cfg, initial_state(cfg))
    strategy.sampler.assigns = client_state_dir is not None
    strategy.summary()
    evaluate = Evaluator(cfg)
    config: dict[str, Any] = {protocol.EXPERIMENT: cfg.to_toml()}
    if client_state_dir is not None:
        config[protocol.STATE_DIR] = str(Path(client_state_dir).resolve())
    loop_class = BufferedLoop if cfg.schedule.mode == "fedbuff" else RoundLoop
    loop = loop_class(grid, cfg, strategy, evaluate, ConfigRecord(config), listener)
    rows: list[dict[str, Any]] = []
    zero_shot = _zero_shot(cfg, evaluate)
    if zero_shot:
        listener.zero_shot(zero_shot)
    before_s = 0.0
    if resume:
        saved = checkpoint.load(run_dir.checkpoint_path)
        strategy.restore(saved.global_state, saved.base_offsets, saved.strategy)
        loop.restore(saved.global_state)
        loop.clock.restore(saved.row)
        rows = run_dir.keep_rounds(saved.round, saved.row)
        before_s = saved.wall_s
        log.warning("fedlora: resuming after round %s", saved.round)
    for server_round in range(len(rows) + 1, cfg.federation.rounds + 1):
        row = loop.run_round(server_round)
        run_dir.append_clients(loop.client_rows)  # before the checkpoint: a resume drops later rounds
        wall_s = before_s + time.monotonic() - started
        state = checkpoint.Checkpoint(
            server_round, loop.global_state, strategy.base_offsets, strategy.checkpoint_state(), row, wall_s
        )
        checkpoint.save(run_dir.checkpoint_path, state)
        run_dir.append_round(row)
        rows.append(row)
        listener.round_done(row)
    save_adapter(global_model(cfg, loop.global_state, {}), run_dir.adapter_path)
    if strategy.base_offsets:  # FedEx-LoRA, FLoRA: what was folded into the frozen weights
        offsets = {k: v.contiguous() for k, v in strategy.base_offsets.items()}
        save_file(offsets, str(run_dir.base_offsets_path))
    summary = _summary(cfg, rows, evaluate, before_s + time.monotonic() - started)
    summary.update({"zero_shot": zero_shot} if zero_shot else {})
    run_dir.write_summary(summary)
    return summary


def _zero_shot(cfg: ExperimentConfig, evaluate: Evaluator) -> dict[str, Any]:
    """Round 0 of a task that has one (:attr:`fedlora.tasks.base.Task.zero_shot`): the untouched model
    (B = 0) on the test set; nothing for a fresh classifier head, which has no zero-shot meaning. Reported,
    and kept in ``summary.json``."""
    task = task_of(cfg)
    if not task.zero_shot:
        return {}
    scores = evaluate(initial_state(cfg), {})
    row: dict[str, Any] = {
        "round": 0,
        "eval_loss": scores.loss,
        "eval_accuracy": scores.accuracy,
        "eval_macro_f1": scores.macro_f1,
        **task.round_metrics(scores),
    }
    return row


def _summary(
    cfg: ExperimentConfig, rows: list[dict[str, Any]], evaluate: Evaluator, wall_s: float
) -> dict[str, Any]:
    scored = [r for r in rows if r.get("eval_accuracy") is not None] or rows  # federation.evaluate_every
    accuracies = [r["eval_accuracy"] for r in scored]
    best = max(range(len(scored)), key=lambda i: accuracies[i])
    f1 = [r.get("eval_macro_f1", math.nan) for r in scored]  # rows of a run resumed from before F1
    return {
        "name": cfg.name,
        "strategy": cfg.strategy.name,
        "rounds": len(rows),
        "num_clients": cfg.federation.num_clients,
        "final_eval_accuracy": accuracies[-1],
        "final_eval_loss": scored[-1]["eval_loss"],
        "best_eval_accuracy": accuracies[best],
        "best_round": scored[best]["round"],
        "final_eval_macro_f1": f1[-1],
        "best_eval_macro_f1": max((v for v in f1 if not math.isnan(v)), default=math.nan),
        **headline(rows, accuracies),
        **task_of(cfg).summary_metrics(rows),
        "majority_accuracy": evaluate.majority_accuracy,
        "majority_macro_f1": evaluate.majority_macro_f1,
        "labels": list(cfg.data.labels),
        "total_uplink_bytes": sum(r["uplink_bytes"] for r in rows),
        "total_downlink_bytes": sum(r["downlink_bytes"] for r in rows),
        "total_failed": sum(r.get("num_failed") or 0 for r in rows),
        "total_rejected": sum(r.get("num_rejected") or 0 for r in rows),
        "total_dropped": sum(r.get("num_dropped") or 0 for r in rows),
        **_clock_summary(rows),
        "wall_s": wall_s,
        **_privacy_summary(cfg, rows),
        "versions": versions(),
    }


def headline(rows: list[dict[str, Any]], test: list[float]) -> dict[str, Any]:
    """The run's headline accuracy, labelled: the clients' personalised accuracy (their own models on their
    own validation splits) when the strategy keeps state on its clients and they evaluated, else the
    global adapter's test accuracy. With a personalised headline the test accuracy is the shared part
    only (for FedSA-LoRA: B = 0 and the initial head), and says so."""
    personal = [float(r["personalised_accuracy"]) for r in rows if r.get("personalised_accuracy") is not None]
    if personal:
        return {
            "accuracy_of": "personalised",
            "final_accuracy": personal[-1],
            "best_accuracy": max(personal),
            "eval_accuracy_of": "shared part",
        }
    return {"accuracy_of": "global", "final_accuracy": test[-1], "best_accuracy": max(test)}


def _privacy_summary(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The privacy spent by the whole run (nothing when DP is off)."""
    if not mechanisms.get(cfg.privacy.mode).private:
        return {}
    return {
        "privacy_mode": cfg.privacy.mode,
        "final_epsilon": rows[-1]["epsilon"],
        "delta": cfg.privacy.delta,
        "total_declined": int(sum(r.get("num_declined", 0) for r in rows)),
    }


def _clock_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The virtual clock's totals (nothing without device classes): the run's virtual time and, under
    FedBuff, how stale the aggregated updates were (server steps -> updates)."""
    if not rows or "virtual_time_s" not in rows[-1]:
        return {}
    found: dict[str, Any] = {"virtual_time_s": rows[-1]["virtual_time_s"]}
    stale = [s for r in rows for s in r.get("staleness", [])]
    if stale:
        found["staleness_histogram"] = {str(k): stale.count(k) for k in sorted(set(stale))}
    return found
