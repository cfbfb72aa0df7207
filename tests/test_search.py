"""Tuning by search (``compare.tune`` with ranges): each cell's values found by Optuna with successive
halving on the clients' validation accuracy, never the test set; the report gives the chosen values and
flags a choice on the edge of its range.

Runs here are stand-in processes that write a run directory round by round (what the tuner and the report
read), so the search, its pruning and its report are checked in seconds; a real `fedlora run` per trial is
in test_compare_e2e.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedlora.compare import runner, session
from fedlora.compare.grid import parse_grid
from fedlora.compare.search import Range, Search
from fedlora.core.config import ConfigError

SIMS = Path(__file__).resolve().parents[1] / "sims"

GRID = """
[compare]
name = "search"
experiment = "{base}"
seeds = [0, 1]
tune = {{ "train.lr" = {{ low = 1e-3, high = 3e-1, log = true }} }}
tune_budget = {{ trials = 6, reduction_factor = 3, min_rounds = 1 }}
set = ["federation.fraction_evaluate=1.0", "federation.rounds=6"]

[[compare.axes]]
key = "strategy.name"
values = ["fedit", "ffa-lora"]
"""

BEST_LR = {"fedit": 0.02, "ffa-lora": 10.0}
"""Where each stand-in method's validation accuracy peaks: inside the range for FedIT, far above it for
FFA-LoRA (its choice must be flagged on the edge)."""

RUN = r"""
import json, math, signal, sys, time
run_dir, lr, best, rounds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
noise = 0.02 * ((int(sys.argv[6]) * 3 + len(sys.argv[5])) % 5 - 2)  # seeds differ, on the test set
signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
rows = []
for r in range(1, rounds + 1):
    time.sleep(0.15)
    validation = (0.9 - 0.08 * (math.log10(lr) - math.log10(best)) ** 2) * (0.5 + 0.5 * r / rounds)
    row = {"round": r, "client_eval_accuracy": validation, "eval_accuracy": 1.0 - validation + noise,
           "uplink_bytes": 10, "downlink_bytes": 10}
    rows.append(row)
    with open(f"{run_dir}/rounds.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
summary = {"strategy": sys.argv[5], "rounds": rounds, "final_eval_accuracy": rows[-1]["eval_accuracy"],
           "best_eval_accuracy": max(x["eval_accuracy"] for x in rows), "majority_accuracy": 0.4,
           "total_uplink_bytes": 60, "total_downlink_bytes": 60, "wall_s": 1.0, "versions": {}}
with open(f"{run_dir}/summary.json", "w") as f:
    json.dump(summary, f)
"""
"""A stand-in run: validation accuracy peaks at ``best`` lr (log scale), rises with rounds; its test
accuracy is the opposite of its validation accuracy, so a tuner that read the test set would choose the
worst value."""


@pytest.fixture
def stand_in_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs are the stand-in script; configs are checked without reading model or data."""

    def start(task, where, verbose, ray_address="", jobs=1):  # type: ignore[no-untyped-def]
        run_dir = where.run_dir(task)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(task.config.to_toml())
        cfg = task.config
        command = [
            sys.executable,
            "-c",
            RUN,
            str(run_dir),
            repr(cfg.train.lr),
            repr(BEST_LR[cfg.strategy.name]),
        ]
        command += [str(cfg.federation.rounds), cfg.strategy.name, str(cfg.seed)]
        return subprocess.Popen(command), (run_dir / "log").open("wb")

    def unchanged(cfg, simulation=False):  # type: ignore[no-untyped-def]
        return cfg

    monkeypatch.setattr(runner, "_start", start)
    monkeypatch.setattr(session, "preflight", unchanged)
    monkeypatch.setattr("fedlora.compare.tuner.preflight", unchanged)


def test_a_search_finds_each_cells_best_on_validation_and_flags_an_edge(
    tmp_path: Path, stand_in_runs: None
) -> None:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID.format(base=SIMS / "quickstart.toml"))
    root = tmp_path / "cmp"
    plan = session.plan_comparison(grid_file, [], out=root)
    assert plan.tasks == [] and plan.grid.tune_seeds == [0]
    tuner = session.start_search(plan)
    events: list[runner.Event] = []
    assert runner.execute(tuner, root, events.append, jobs=2)
    kinds = [e.kind for e in events if e.kind != "started"]
    assert len(kinds) == 12 and set(kinds) <= {"finished", "pruned"} and "pruned" in kinds

    plan, chosen = session.after_search(plan, tuner)
    results = {c["cell"]: c for c in session.search_results(root)}
    for cell in ("fedit", "ffa-lora"):
        trials = results[cell]["trials"]
        finished = [t for t in trials if t["state"] == "complete"]
        best = max(finished, key=lambda t: t["value"])
        assert results[cell]["chosen"] == best["params"] and results[cell]["value"] == best["value"]
        # the closest finished trial to the peak (validation, never the inverted test accuracy)
        closest = min(finished, key=lambda t: abs(math.log10(t["params"]["train.lr"] / BEST_LR[cell])))
        assert best["number"] == closest["number"]
        assert all(t["rounds"] < 6 for t in trials if t["state"] == "pruned")
    assert results["fedit"]["edges"] == []
    assert results["ffa-lora"]["edges"] and "high edge" in results["ffa-lora"]["edges"][0]
    assert chosen["fedit"].overrides == [f"train.lr={results['fedit']['chosen']['train.lr']!r}"]

    # the best trial ran at seed 0 with the same config: it is that seed's run; seed 1 runs now
    assert {(t.cell.label, t.seed) for t in plan.done} == {("fedit", 0), ("ffa-lora", 0)}
    assert {(t.cell.label, t.seed) for t in plan.todo} == {("fedit", 1), ("ffa-lora", 1)}
    assert runner.execute(plan.todo, root, lambda e: None, jobs=2)
    files = session.write_comparison_report(root, command="test")
    assert files is not None
    text = files["markdown"].read_text()
    assert "## Tuning (searched on validation)" in text
    assert f"| fedit | {results['fedit']['label']} |" in text
    ffa_row = next(line for line in text.splitlines() if line.startswith("| ffa-lora | lr="))
    assert "⚠ train.lr at the high edge of [0.001, 0.3] (log): widen the range" in ffa_row


def test_an_interrupted_search_resumes_its_studies(tmp_path: Path, stand_in_runs: None) -> None:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID.format(base=SIMS / "quickstart.toml").replace("trials = 6", "trials = 2"))
    root = tmp_path / "cmp"
    plan = session.plan_comparison(grid_file, [], out=root)
    first = session.start_search(plan)
    task = first.take()
    assert task is not None and task.key == "fedit/tuning/trial-0"
    # the comparison dies here: the trial stays running in the journal and continues next time
    again = session.start_search(plan)
    resumed = again.take()
    assert resumed is not None and resumed.key == task.key
    assert resumed.config.train.lr == task.config.train.lr
    assert again.take().key == "fedit/tuning/trial-1"  # type: ignore[union-attr]


def grid(**tune: Any):  # type: ignore[no-untyped-def]
    table: dict[str, Any] = {
        "experiment": "quickstart.toml",
        "seeds": [0, 1],
        "set": ["federation.fraction_evaluate=0.5"],
        "axes": [{"key": "strategy.name", "values": ["fedit"]}],
        **tune,
    }
    return parse_grid(table, base_dir=SIMS)


def test_ranges_and_lists_parse_into_a_search() -> None:
    g = grid(tune={"train.lr": {"low": 1e-3, "high": 0.3, "log": True}, "lora.rank": [4, 8]})
    assert g.search is not None and g.settings == []
    assert g.search.params[0] == Range("train.lr", 1e-3, 0.3, log=True)
    assert g.search.extremes() == [{"train.lr": 1e-3, "lora.rank": 4}, {"train.lr": 0.3, "lora.rank": 8}]
    trial = g.trial(g.cells[0], 3, {"train.lr": 0.01, "lora.rank": 8})
    assert trial.key == "fedit/tuning/trial-3" and trial.config.train.lr == 0.01
    assert trial.config.lora.rank == 8 and trial.config.federation.evaluate_every == 1
    assert g.manifest()["search"]["params"][0] == {"key": "train.lr", "range": "[0.001, 0.3] (log)"}
    chosen = g.tasks(chosen={"fedit": g.searched({"train.lr": 0.02, "lora.rank": 4})})
    assert [t.key for t in chosen] == ["fedit/seed-0", "fedit/seed-1"]
    # the old form, a list per key, is still a list of settings
    listed = grid(tune={"train.lr": [1e-3, 1e-2]})
    assert listed.search is None and len(listed.settings) == 2


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ({"tune": {"train.lr": {"low": 0.3, "high": 0.1}}}, "expected numbers low < high"),
        ({"tune": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}, "with log = true"),
        (
            {"tune": {"train.lr": {"low": 1e-3, "high": 0.1, "step": 2}}},
            "unknown key 'compare.tune.train.lr.step'",
        ),
        (
            {"tune": {"train.lr": {"low": 1e-3, "high": 0.1}}, "tune_budget": {"trials": 0}},
            "compare.tune_budget.trials = 0",
        ),
        ({"tune": {"train.lr": [1e-3]}, "tune_budget": {"trials": 3}}, "needs a range"),
        (
            {"tune": {"train.lr": {"low": 1e-3, "high": 0.1}}, "tune_seeds": [0, 1]},
            "expected one seed",
        ),
    ],
)
def test_bad_searches_are_refused(tune: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid(**tune)


def test_edges_flag_the_most_extreme_value_tried() -> None:
    search = Search([Range("train.lr", 1e-3, 0.3, log=True)])
    tried = [{"train.lr": v} for v in (0.002, 0.01, 0.05, 0.2)]
    assert search.edges({"train.lr": 0.05}, tried) == []
    assert "low edge" in search.edges({"train.lr": 0.002}, tried)[0]
    assert "high edge" in search.edges({"train.lr": 0.2}, tried)[0]
    assert json.dumps(search.manifest())  # written to comparison.json


def test_a_range_with_when_is_searched_only_in_the_cells_it_names() -> None:
    g = parse_grid(
        {
            "experiment": "quickstart.toml",
            "set": ["federation.fraction_evaluate=0.5"],
            "tune": {
                "train.lr": {"low": 1e-3, "high": 0.3, "log": True},
                "privacy.clip_norm": {
                    "low": 0.1,
                    "high": 10.0,
                    "log": True,
                    "when": {"privacy.mode": "dp-sgd"},
                },
            },
            "axes": [
                {
                    "name": "privacy",
                    "levels": {"no DP": [], "eps 3": ["privacy.mode='dp-sgd'", "privacy.target_epsilon=3.0"]},
                }
            ],
        },
        base_dir=SIMS,
    )
    plain, private = g.cells
    assert g.search_of(plain).keys == ["train.lr"]
    assert g.search_of(private).keys == ["train.lr", "privacy.clip_norm"]
    checks = {(t.cell.label, t.setting.label) for t in g.trial_checks() if t.setting}
    assert checks == {
        ("no DP", "lr=0.001"),
        ("no DP", "lr=0.3"),
        ("eps 3", "lr=0.001, clip_norm=0.1"),
        ("eps 3", "lr=0.3, clip_norm=10"),
    }
    with pytest.raises(ConfigError, match="when"):
        grid(tune={"train.lr": {"low": 1e-3, "high": 0.1, "when": ["dp"]}})


@pytest.mark.cli
def test_the_cli_searches_then_adds_seeds_until_the_rule_stops(
    tmp_path: Path, stand_in_runs: None, run_in_process
) -> None:  # type: ignore[no-untyped-def]
    """``fedlora compare`` end to end on stand-in runs: the search, each cell's choice with its edge flag,
    the chosen values at seeds 0 and 1 (seed 0 reused from the best trial), one seed added while the
    comparison is undecided, then stopped by max_seeds; the report says so."""
    grid_file = tmp_path / "grid.toml"
    text = GRID.format(base=SIMS / "quickstart.toml").replace("trials = 6", "trials = 3")
    grid_file.write_text(
        text.replace(
            "[[compare.axes]]", "stop = { max_seeds = 3, smallest_effect = 0.001 }\n\n[[compare.axes]]"
        )
    )
    root = tmp_path / "cmp"
    done = run_in_process("compare", str(grid_file), "--out", str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "tuned fedit -> lr=" in out and "tuned ffa-lora -> lr=" in out and "on the edge" in out
    assert "2 cells x 2 seeds = 4 runs, 2 already finished" in out  # the best trials are the seed-0 runs
    assert "adding seed 2" in out and "2 cells x seed 2 = 2 runs" in out
    assert "stopped after 3 seeds" in out and "max_seeds = 3" in out
    assert (root / "runs" / "ffa-lora" / "seed-2" / "summary.json").is_file()
    report = (root / "comparison.md").read_text()
    assert "Seeds added until the answer was clear: 3 seeds (0, 1, 2); stopped" in report
    assert "## Tuning (searched on validation)" in report and "widen the range" in report
