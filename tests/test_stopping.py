"""``[compare] stop``: seeds are added while a comparison is undecided, within the rule's seeds and minutes;
the report gives confidence sequences and says why the comparison stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedlora.compare.grid import parse_grid
from fedlora.compare.seeds import progress
from fedlora.core.config import ConfigError, load_config
from fedlora.core.records.rundir import RunDirectory
from fedlora.report.writer import collect, write_report

SIMS = Path(__file__).resolve().parents[1] / "sims"


def grid(**extra: Any):  # type: ignore[no-untyped-def]
    table: dict[str, Any] = {
        "experiment": "quickstart.toml",
        "seeds": [0, 1, 2],
        "stop": {"max_seeds": 6, "smallest_effect": 0.01, "max_minutes": 60},
        "axes": [{"key": "strategy.name", "values": ["fedit", "ffa-lora"]}],
    }
    table.update(extra)
    return parse_grid(table, base_dir=SIMS)


def fake_run(path: Path, *, strategy: str, seed: int, accuracy: float, wall_s: float = 60.0) -> None:
    """A finished run directory with one round at ``accuracy`` (what the report reads)."""
    cfg = load_config(SIMS / "quickstart.toml", [f'strategy.name="{strategy}"', f"seed={seed}"])
    run = RunDirectory(path)
    run.create(cfg)
    run.append_round({"round": 1, "eval_accuracy": accuracy, "uplink_bytes": 1000, "downlink_bytes": 1000})
    run.write_summary(
        {
            "name": cfg.name,
            "strategy": strategy,
            "rounds": 1,
            "final_eval_accuracy": accuracy,
            "best_eval_accuracy": accuracy,
            "majority_accuracy": 0.424,
            "total_uplink_bytes": 1000,
            "total_downlink_bytes": 1000,
            "wall_s": wall_s,
            "versions": {"fedlora": "test"},
        }
    )


def comparison(tmp_path: Path, differences: list[float], **extra: Any) -> Path:
    """A comparison directory of fedit and ffa-lora whose paired differences are ``differences``."""
    g = grid(seeds=list(range(len(differences))), **extra)
    root = tmp_path / "cmp"
    root.mkdir()
    (root / "comparison.json").write_text(json.dumps(g.manifest()))
    for seed, diff in enumerate(differences):
        base = 0.6 + 0.05 * (seed % 3)  # seeds vary more than the difference: pairing cancels it
        fake_run(root / "runs" / "fedit" / f"seed-{seed}", strategy="fedit", seed=seed, accuracy=base)
        fake_run(
            root / "runs" / "ffa-lora" / f"seed-{seed}", strategy="ffa-lora", seed=seed, accuracy=base + diff
        )
    return root


def test_the_stop_rule_is_parsed_and_written_to_the_manifest() -> None:
    g = grid()
    assert g.stop is not None and g.stop.max_seeds == 6 and g.stop.smallest_effect == 0.01
    assert g.manifest()["stop"] == {"max_seeds": 6, "smallest_effect": 0.01, "max_minutes": 60}


@pytest.mark.parametrize(
    ("stop", "message"),
    [
        ({"max_seeds": 2, "smallest_effect": 0.01}, "max_seeds = 2 is invalid"),
        ({"max_seeds": 5}, "smallest_effect = None is invalid"),
        ({"max_seeds": 5, "smallest_effect": 1.5}, "smallest_effect = 1.5"),
        ({"max_seeds": 5, "smallest_effect": 0.01, "max_minutes": 0}, "max_minutes = 0"),
        ({"max_seeds": 5, "smallest_effect": 0.01, "seeds": 3}, "unknown key 'compare.stop.seeds'"),
        ([5], "expected a table"),
    ],
)
def test_bad_stop_rules_are_refused(stop: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid(stop=stop)


def test_a_listed_tuning_with_stop_needs_tuning_seeds() -> None:
    with pytest.raises(ConfigError, match=r"needs compare\.tune_seeds"):
        grid(tune={"train.lr": [1e-3, 1e-2]}, set=["federation.fraction_evaluate=0.5"])


def test_an_undecided_comparison_adds_the_next_seed(tmp_path: Path) -> None:
    root = comparison(tmp_path, [0.02, -0.01, 0.03])
    found = collect([root])
    step = progress(found, grid().stop, [0, 1, 2], elapsed_s=60.0, seed_s=120.0)
    assert step.next_seed == 3 and len(step.open) == 1 and step.total == 1
    assert "1 of 1 comparisons undecided at 3 seeds" in step.reason


def test_a_clear_difference_stops(tmp_path: Path) -> None:
    root = comparison(tmp_path, [0.05, 0.052, 0.049, 0.051])
    step = progress(collect([root]), grid().stop, [0, 1, 2, 3], elapsed_s=60.0, seed_s=120.0)
    assert step.next_seed is None and step.open == [] and "decided at 4 seeds" in step.reason
    text = write_report(collect([root]), root)["markdown"].read_text()
    assert "confidence sequence" in text and "| better |" in text


def test_no_difference_within_the_smallest_effect_stops(tmp_path: Path) -> None:
    root = comparison(tmp_path, [0.001, -0.001, 0.0005, 0.0, -0.0005, 0.001])
    step = progress(collect([root]), grid().stop, list(range(6)), elapsed_s=60.0, seed_s=1.0)
    assert step.next_seed is None and step.open == []
    text = write_report(collect([root]), root)["markdown"].read_text()
    assert "no difference of 1 pp or more" in text


def test_seeds_and_minutes_bound_the_comparison(tmp_path: Path) -> None:
    undecided = [0.02, -0.01, 0.03]
    root = comparison(tmp_path, undecided)
    found = collect([root])
    rule = grid().stop
    late = progress(found, rule, [0, 1, 2], elapsed_s=59 * 60.0, seed_s=120.0)
    assert late.next_seed is None and "would pass max_minutes = 60" in late.reason
    assert len(late.open) == 1
    capped = grid(stop={"max_seeds": 3, "smallest_effect": 0.01}).stop
    assert "max_seeds = 3" in progress(found, capped, [0, 1, 2], elapsed_s=0.0, seed_s=1.0).reason


def test_the_report_says_why_the_comparison_stopped(tmp_path: Path) -> None:
    root = comparison(tmp_path, [0.02, -0.01, 0.03])
    (root / "stopping.json").write_text(
        json.dumps({"seeds": [0, 1, 2], "undecided": ["ffa-lora vs fedit"], "reason": "max_seeds = 3"})
    )
    text = write_report(collect([root]), root)["markdown"].read_text()
    assert "stopped: max_seeds = 3 (undecided: ffa-lora vs fedit)" in text
    assert "undecided at 3 seeds" in text


def test_a_personalised_cell_without_client_accuracy_on_the_baseline_adds_no_seeds(tmp_path: Path) -> None:
    """Its personalised accuracy cannot be paired with the baseline's test accuracy: not a comparison
    the rule waits for."""
    root = comparison(tmp_path, [0.02, -0.01, 0.03])
    for seed in range(3):
        summary = root / "runs" / "ffa-lora" / f"seed-{seed}" / "summary.json"
        data = json.loads(summary.read_text())
        summary.write_text(json.dumps({**data, "accuracy_of": "personalised", "final_accuracy": 0.7}))
    step = progress(collect([root]), grid().stop, [0, 1, 2], elapsed_s=0.0, seed_s=1.0)
    assert step.total == 0 and step.next_seed is None
    text = write_report(collect([root]), root)["markdown"].read_text()
    assert "personalised against global accuracy: compare client acc." in text
