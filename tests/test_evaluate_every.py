"""``federation.evaluate_every``: rounds between evaluations have null test metrics, the last round is
always evaluated, and summaries, tables and plots read such runs."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from fedlora.core.config import ConfigError, from_dict, load_config
from fedlora.core.records.rundir import RunDirectory
from fedlora.report.results import load_run
from fedlora.report.writer import collect, write_report
from fedlora.run.federation import _summary
from fedlora.run.rounds import RoundLoop

SIMS = Path(__file__).resolve().parents[1] / "sims"


def test_every_nth_round_and_the_last_evaluate() -> None:
    cfg = from_dict({"federation": {"rounds": 7, "evaluate_every": 3}})
    loop = types.SimpleNamespace(cfg=cfg)
    assert [r for r in range(1, 8) if RoundLoop.evaluates(loop, r)] == [3, 6, 7]  # type: ignore[arg-type]
    default = types.SimpleNamespace(cfg=from_dict({"federation": {"rounds": 3}}))
    assert all(RoundLoop.evaluates(default, r) for r in (1, 2, 3))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"federation\.evaluate_every"):
        from_dict({"federation": {"evaluate_every": 0}})


def rows(accuracy: list[float | None]) -> list[dict[str, object]]:
    return [
        {
            "round": i,
            "eval_accuracy": a,
            "eval_loss": None if a is None else 1.0 - a,
            "eval_macro_f1": None if a is None else a / 2,
            "train_loss": 1.0,
            "uplink_bytes": 100,
            "downlink_bytes": 200,
        }
        for i, a in enumerate(accuracy, start=1)
    ]


def test_the_summary_takes_final_and_best_from_evaluated_rounds() -> None:
    cfg = from_dict({"federation": {"rounds": 5, "evaluate_every": 2}})
    evaluate = types.SimpleNamespace(majority_accuracy=0.4, majority_macro_f1=0.2)
    summary = _summary(cfg, rows([None, 0.6, None, 0.5, 0.55]), evaluate, 1.0)  # type: ignore[arg-type]
    assert summary["rounds"] == 5 and summary["total_uplink_bytes"] == 500
    assert (summary["final_eval_accuracy"], summary["best_eval_accuracy"], summary["best_round"]) == (
        0.55,
        0.6,
        2,
    )
    assert summary["final_eval_loss"] == pytest.approx(0.45)


def test_reports_read_runs_with_rounds_without_evaluation(tmp_path: Path) -> None:
    accuracy = [None, 0.5, None, 0.65, 0.6]
    for seed in (0, 1):
        for strategy in ("fedit", "ffa-lora"):
            cfg = load_config(SIMS / "quickstart.toml", [f'strategy.name="{strategy}"', f"seed={seed}"])
            run = RunDirectory(tmp_path / f"{strategy}-{seed}")
            run.create(cfg)
            (run.path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(accuracy)))
            evaluate = types.SimpleNamespace(majority_accuracy=0.4, majority_macro_f1=0.2)
            run.write_summary(_summary(cfg, rows(accuracy), evaluate, 1.0))  # type: ignore[arg-type]
    result = load_run(tmp_path / "fedit-0", cell="fedit", levels={}, target=0.6)
    assert result.accuracy == [0.5, 0.65, 0.6] and result.rounds_to_target == 4
    assert (result.final_accuracy, result.best_accuracy) == (0.6, 0.65)
    files = write_report(collect([tmp_path]), tmp_path / "report")
    assert files["accuracy"].is_file() and files["loss"].is_file() and files["html"].is_file()
