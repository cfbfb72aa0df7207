"""Tune, then compare: each cell's value is chosen on the clients' validation accuracy, never the test set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedlora.compare.grid import parse_grid
from fedlora.core.config import ConfigError, load_config
from fedlora.core.records.rundir import RunDirectory
from fedlora.report import tuning
from fedlora.report.writer import collect, write_report

SIMS = Path(__file__).resolve().parents[1] / "sims"


def test_validation_accuracy_reads_client_evaluation_only() -> None:
    history = [
        {"round": 1, "eval_accuracy": 0.9, "client_eval_accuracy": 0.5},
        {"round": 2, "eval_accuracy": 0.95, "client_eval_accuracy": 0.6},
        {"round": 3, "eval_accuracy": 0.99},  # no client evaluation this round
    ]
    assert tuning.validation_accuracy(history) == 0.6
    assert tuning.validation_accuracy([{"round": 1, "eval_accuracy": 0.9}]) is None


def test_choose_takes_the_best_mean_ties_to_the_first_and_skips_empty() -> None:
    assert tuning.choose({"a": [0.5, 0.7], "b": [0.65, 0.6], "c": []}) == "b"
    assert tuning.choose({"a": [0.6], "b": [0.6]}) == "a"
    assert tuning.choose({"a": [], "b": []}) is None


def grid(**extra: object):  # type: ignore[no-untyped-def]
    table: dict[str, object] = {
        "experiment": "quickstart.toml",
        "seeds": [0, 1],
        "set": ["federation.fraction_evaluate=0.5", "data.val_fraction=0.1"],
        "tune": {"train.lr": [1e-4, 1e-3]},
        "axes": [{"key": "strategy.name", "values": ["fedit", "ffa-lora"]}],
    }
    table.update(extra)
    return parse_grid(table, base_dir=SIMS)


def test_every_cell_runs_every_setting_at_every_seed() -> None:
    g = grid()
    assert [s.label for s in g.settings] == ["lr=0.0001", "lr=0.001"]
    tasks = g.tasks()
    assert len(tasks) == 2 * 2 * 2
    assert {t.config.train.lr for t in tasks if t.cell.label == "fedit"} == {1e-4, 1e-3}
    assert tasks[0].key == "fedit/lr-0.0001/seed-0" and tasks[0].label == "fedit [lr=0.0001]"
    assert g.manifest()["tune"][1] == {
        "label": "lr=0.001",
        "slug": "lr-0.001",
        "overrides": ["train.lr=0.001"],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"set": []}, "compare.tune chooses on the clients' validation accuracy"),
        ({"tune": {"train.lr": []}}, "compare.tune.train.lr"),
        ({"tune": {"seed": [1, 2]}}, "compare.seeds"),
        ({"tune": ["train.lr"]}, "expected a table"),
    ],
)
def test_bad_tuning_is_refused_before_anything_runs(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid(**change).tasks()


def tuned_run(path: Path, *, strategy: str, seed: int, lr: float, test: float, validation: float) -> None:
    cfg = load_config(
        SIMS / "quickstart.toml", [f'strategy.name="{strategy}"', f"seed={seed}", f"train.lr={lr}"]
    )
    run = RunDirectory(path)
    run.create(cfg)
    for r in (1, 2):
        run.append_round(
            {
                "round": r,
                "eval_accuracy": test - 0.05 * (2 - r),
                "client_eval_accuracy": validation - 0.05 * (2 - r),
                "uplink_bytes": 1000,
            }
        )
    run.write_summary(
        {
            "name": cfg.name,
            "strategy": strategy,
            "rounds": 2,
            "final_eval_accuracy": test,
            "best_eval_accuracy": test,
            "majority_accuracy": 0.424,
            "total_uplink_bytes": 2000,
            "total_downlink_bytes": 2000,
            "wall_s": 1.0,
            "versions": {"fedlora": "test"},
        }
    )


def test_the_report_keeps_only_the_setting_chosen_on_validation(tmp_path: Path) -> None:
    g = grid()
    root = tmp_path / "cmp"
    root.mkdir()
    (root / "comparison.json").write_text(json.dumps(g.manifest()))
    # lr=0.001 has the better TEST accuracy for fedit but the worse validation accuracy: 1e-4 must win
    scores = {
        ("fedit", 1e-4): (0.55, 0.70),
        ("fedit", 1e-3): (0.80, 0.60),
        ("ffa-lora", 1e-4): (0.50, 0.50),
        ("ffa-lora", 1e-3): (0.65, 0.66),
    }
    for task in g.tasks():
        test, validation = scores[(task.cell.label, task.config.train.lr)]
        tuned_run(
            root / "runs" / task.key,
            strategy=task.cell.label,
            seed=task.seed,
            lr=task.config.train.lr,
            test=test + 0.01 * task.seed,
            validation=validation + 0.01 * task.seed,
        )
    found = collect([root])
    assert {t.cell: t.chosen for t in found.tunings} == {"fedit": "lr=0.0001", "ffa-lora": "lr=0.001"}
    fedit = [r for r in found.results if r.cell == "fedit"]
    assert [r.final_accuracy for r in fedit] == [0.55, 0.56] and {r.tuned for r in fedit} == {"lr=0.0001"}
    assert len(found.results) == 4
    files = write_report(found, root)
    rows = list(csv.DictReader(files["csv"].open()))
    assert {(r["cell"], r["tuned"]) for r in rows} == {("fedit", "lr=0.0001"), ("ffa-lora", "lr=0.001")}
    text = files["markdown"].read_text()
    assert "## Tuning (chosen on validation)" in text
    assert "| fedit | lr=0.0001 | 70.5 (2) | 60.5 (2) |" in text
    html = files["html"].read_text()
    assert "<h2>Tuning (chosen on validation)</h2>" in html and "(tuned: lr=0.001)" in html


def test_tune_seeds_tune_on_some_seeds_then_run_the_chosen_setting_at_the_others() -> None:
    g = grid(seeds=[0, 1, 2], tune_seeds=[0])
    first = g.tasks()
    assert [(t.cell.label, t.setting.label, t.seed) for t in first if t.setting] == [
        ("fedit", "lr=0.0001", 0),
        ("fedit", "lr=0.001", 0),
        ("ffa-lora", "lr=0.0001", 0),
        ("ffa-lora", "lr=0.001", 0),
    ]
    chosen = {"fedit": g.settings[1]}  # ffa-lora not chosen yet: none of its later runs
    later = [t for t in g.tasks(chosen=chosen) if t not in first]
    assert [(t.key, t.config.train.lr) for t in later] == [
        ("fedit/lr-0.001/seed-1", 1e-3),
        ("fedit/lr-0.001/seed-2", 1e-3),
    ]
    assert len(g.all_tasks()) == 4 + 2 * 2 and g.manifest()["tune_seeds"] == [0]
    both = [t for t in g.tasks(chosen={"fedit": g.settings[1], "ffa-lora": g.settings[0]}) if t not in first]
    assert [(t.cell.label, t.seed) for t in both] == [
        ("fedit", 1),
        ("ffa-lora", 1),
        ("fedit", 2),
        ("ffa-lora", 2),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tune_seeds": [7]}, "not in compare.seeds"),
        ({"tune_seeds": [0, 0]}, "distinct seeds"),
        ({"tune_seeds": [0], "tune": {}}, "needs compare.tune"),
    ],
)
def test_bad_tune_seeds_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid(**change)


def test_tuning_on_some_seeds_chooses_on_those_and_reports_the_chosen_at_every_seed(tmp_path: Path) -> None:
    from fedlora.compare.runner import choose_settings

    g = grid(seeds=[0, 1, 2], tune_seeds=[0])
    root = tmp_path / "cmp"
    root.mkdir()
    scores = {
        ("fedit", 1e-4): 0.70,
        ("fedit", 1e-3): 0.60,
        ("ffa-lora", 1e-4): 0.50,
        ("ffa-lora", 1e-3): 0.66,
    }

    def write(tasks):  # type: ignore[no-untyped-def]
        for task in tasks:
            validation = scores[(task.cell.label, task.config.train.lr)]
            # at the later seeds, the other setting would look better: they must not sway the choice
            validation += 0.3 * (task.seed > 0)
            tuned_run(
                root / "runs" / task.key,
                strategy=task.cell.label,
                seed=task.seed,
                lr=task.config.train.lr,
                test=0.5 + 0.01 * task.seed,
                validation=validation,
            )

    first = g.tasks()
    write(first[:3])  # ffa-lora's second setting is not finished: only fedit is chosen
    assert {c: s.label for c, s in choose_settings(g, first, root).items()} == {"fedit": "lr=0.0001"}
    write(first[3:])
    chosen = choose_settings(g, first, root)
    assert {c: s.label for c, s in chosen.items()} == {"fedit": "lr=0.0001", "ffa-lora": "lr=0.001"}
    (root / "comparison.json").write_text(json.dumps(g.manifest()))
    later = [t for t in g.tasks(chosen=chosen) if t not in first]
    write(later[:3])  # one run of ffa-lora's chosen setting still to do
    found = collect([root])
    assert {t.cell: t.chosen for t in found.tunings} == {"fedit": "lr=0.0001", "ffa-lora": "lr=0.001"}
    assert sorted((r.cell, r.seed, r.tuned) for r in found.results) == [
        ("fedit", 0, "lr=0.0001"),
        ("fedit", 1, "lr=0.0001"),
        ("fedit", 2, "lr=0.0001"),
        ("ffa-lora", 0, "lr=0.001"),
        ("ffa-lora", 1, "lr=0.001"),
    ]
    assert found.unfinished == [root / "runs" / "ffa-lora" / "lr-0.001" / "seed-2"]
    assert next(t for t in found.tunings if t.cell == "fedit").scores == {
        "lr=0.0001": [0.7],
        "lr=0.001": [0.6],
    }


def test_the_paper_suites_search_each_cell_and_add_seeds_until_clear() -> None:
    """Both suites search each method's learning rate on validation (and, under DP, its clipping norm),
    at a seed they are not compared on, and add seeds until every comparison is decided."""
    from fedlora.compare.grid import load_grid

    ffa = load_grid(SIMS / "paper_ffa_dp.toml")
    assert ffa.search is not None and ffa.tune_seeds == [100] and 100 not in ffa.seeds
    assert ffa.stop is not None and ffa.stop.max_seeds >= 5 and ffa.stop.smallest_effect == 0.01
    labels = {c.label for c in ffa.cells}
    methods = ("fedit", "ffa-lora", "fedsvd", "rolora", "fed-sb", "la-lora")
    assert labels == {f"{m} · ε=1" for m in methods}
    by_label = {c.label: c for c in ffa.cells}
    assert ffa.search_of(by_label["ffa-lora · ε=1"]).keys == ["train.lr", "privacy.clip_norm"]
    assert all(t.config.privacy.mode == "dp-sgd" for t in ffa.all_tasks())
    assert all(t.config.train.batch_size == 32 for t in ffa.all_tasks())
    fair = load_grid(SIMS / "paper_fair_skew.toml")
    assert fair.search is not None and fair.search.keys == ["train.lr"] and fair.stop is not None
    tasks = fair.all_tasks()
    assert {t.config.strategy.name for t in tasks} == {"fedit", "lora-fair", "fedex-lora"}
    assert {(t.config.data.partitioner, t.config.data.alpha) for t in tasks} >= {("dirichlet", 0.5)}
    assert "natural" in {t.config.data.partitioner for t in tasks}
