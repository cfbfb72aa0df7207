"""Comparison grids, result tables and reports, on grid files and run directories written here."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.compare.grid import Grid, load_grid, parse_grid
from fedlora.compare.runner import _last_error, plan, prepare, run_environment
from fedlora.core.config import ConfigError, load_config
from fedlora.core.records.rundir import RunDirectory
from fedlora.report import paired
from fedlora.report.results import CellStats, group, load_run, markdown, table
from fedlora.report.writer import collect, write_report

ROOT = Path(__file__).resolve().parents[1]
SIMS = ROOT / "sims"


def grid_table(**extra: object) -> dict[str, object]:
    table: dict[str, object] = {
        "experiment": "quickstart.toml",
        "seeds": [0, 1],
        "axes": [
            {"key": "strategy.name", "values": ["fedit", "ffa-lora"]},
            {
                "name": "privacy",
                "levels": {"no DP": [], "eps 3": ["privacy.mode='dp-sgd'", "privacy.target_epsilon=3"]},
            },
        ],
    }
    table.update(extra)
    return table


def test_cells_are_the_product_of_the_axes_in_file_order() -> None:
    grid = parse_grid(grid_table(), base_dir=SIMS)
    assert [c.label for c in grid.cells] == [
        "fedit · no DP",
        "fedit · eps 3",
        "ffa-lora · no DP",
        "ffa-lora · eps 3",
    ]
    assert [c.slug for c in grid.cells] == [
        "fedit__no-dp",
        "fedit__eps-3",
        "ffa-lora__no-dp",
        "ffa-lora__eps-3",
    ]
    assert grid.cells[1].overrides == [
        'strategy.name="fedit"',
        "privacy.mode='dp-sgd'",
        "privacy.target_epsilon=3",
    ]
    assert grid.manifest()["privacy_axes"] == ["privacy"]


def test_every_task_resolves_the_base_with_the_cell_seed_and_extra_overrides() -> None:
    grid = parse_grid(grid_table(set=["federation.rounds=3"]), base_dir=SIMS)
    tasks = grid.tasks(["train.local_steps=2"])
    assert len(tasks) == 8
    task = tasks[3]  # fedit · eps 3, seed 1
    assert (task.cell.label, task.seed, task.key) == ("fedit · eps 3", 1, "fedit__eps-3/seed-1")
    assert task.config.seed == 1
    assert task.config.privacy.target_epsilon == 3.0
    assert task.config.federation.rounds == 3
    assert task.config.train.local_steps == 2
    base = load_config(SIMS / "quickstart.toml")
    assert task.config.lora == base.lora  # everything not varied is identical


def test_numeric_levels_carry_the_axis_name() -> None:
    grid = parse_grid(
        {"experiment": "quickstart.toml", "axes": [{"key": "data.alpha", "values": [1.0, 0.1]}]},
        base_dir=SIMS,
    )
    assert [c.label for c in grid.cells] == ["alpha=1.0", "alpha=0.1"]
    assert [t.config.data.alpha for t in grid.tasks()] == [1.0, 0.1]


BAD_GRIDS = [
    ({"seeds": []}, "compare.seeds"),
    ({"seeds": [0, 0]}, "repeats a seed"),
    ({"seeds": [0.5]}, "compare.seeds"),
    ({"target_accuracy": 60}, "compare.target_accuracy"),
    ({"runs": 3}, "unknown key 'compare.runs'"),
    ({"set": "lora.rank=4"}, "compare.set"),
    ({"experiment": ""}, "compare.experiment"),
    ({"axes": [{"key": "strategy.name"}]}, "exactly one of 'values'"),
    ({"axes": [{"values": ["fedit"]}]}, "no 'key'"),
    ({"axes": [{"key": "seed", "values": [1, 2]}]}, "compare.seeds instead"),
    ({"axes": [{"key": "lora.rank", "values": [4, 4]}]}, "repeats a value"),
    ({"axes": [{"name": "x", "levels": {"a": "lora.rank=4"}}]}, "compare.axes[0].levels.a"),
    ({"axes": [{"key": "lora.rank", "values": [4], "colour": 1}]}, "unknown key 'compare.axes[0].colour'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_GRIDS)
def test_bad_grids_fail_with_a_message_naming_the_key(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_grid(grid_table(**change), base_dir=SIMS)


def test_an_impossible_cell_is_refused_before_anything_runs() -> None:
    grid = parse_grid(
        {
            "experiment": "quickstart.toml",
            "axes": [
                {"key": "strategy.name", "values": ["fedit", "lora-fair"]},
                {
                    "name": "dp",
                    "levels": {"user-level": ["privacy.mode='dp-updates'", "privacy.target_epsilon=3"]},
                },
            ],
        },
        base_dir=SIMS,
    )
    with pytest.raises(ConfigError, match=r"grid cell 'lora-fair · user-level'.*dp-updates"):
        grid.tasks()


def test_the_shipped_grids_resolve() -> None:
    """Every grid in sims/ loads, and its runs (before any tuning choice) cover every cell."""
    grids = [path for path in sorted(SIMS.glob("*.toml")) if "[compare]" in path.read_text()]
    assert {"compare_strategies.toml", "paper_ffa_dp.toml", "cross_device_dp.toml"} <= {p.name for p in grids}
    for path in grids:
        grid = load_grid(path)
        tasks = grid.all_tasks()  # a search's cells run once it has chosen: stand-ins until then
        assert {t.cell.label for t in tasks} == {c.label for c in grid.cells} and len(grid.cells) >= 4, (
            path.name
        )


def fake_run(
    path: Path, *, strategy: str, seed: int, accuracy: list[float], up: int, epsilon: float | None = None
) -> Path:
    """A finished run directory with the given per-round accuracies (written by the real writer)."""
    overrides = [f'strategy.name="{strategy}"', f"seed={seed}", f"federation.rounds={len(accuracy)}"]
    if epsilon is not None:
        overrides += ["privacy.mode='dp-sgd'", "privacy.target_epsilon=8"]
    cfg = load_config(SIMS / "quickstart.toml", overrides)
    run = RunDirectory(path)
    run.create(cfg)
    for i, acc in enumerate(accuracy, start=1):
        run.append_round({"round": i, "eval_accuracy": acc, "uplink_bytes": up // len(accuracy)})
    summary = {
        "name": cfg.name,
        "strategy": strategy,
        "rounds": len(accuracy),
        "final_eval_accuracy": accuracy[-1],
        "best_eval_accuracy": max(accuracy),
        "majority_accuracy": 0.424,
        "total_uplink_bytes": up,
        "total_downlink_bytes": 2 * up,
        "wall_s": 10.0 + seed,
        "versions": {"fedlora": "test"},
    }
    if epsilon is not None:
        summary.update(final_epsilon=epsilon, delta=1e-5)
    run.write_summary(summary)
    return path


def test_run_results_and_rounds_to_target(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "r", strategy="fedit", seed=3, accuracy=[0.5, 0.62, 0.61], up=3_000_000)
    result = load_run(run, cell="fedit", levels={"strategy": "fedit"}, target=0.6)
    assert (result.seed, result.rounds, result.final_accuracy, result.best_accuracy) == (3, 3, 0.61, 0.62)
    assert result.rounds_to_target == 2
    assert (result.uplink_mb, result.downlink_mb) == (3.0, 6.0)
    assert load_run(run, cell="x", levels={}, target=0.7).rounds_to_target is None


def test_table_means_stds_and_best_marks(tmp_path: Path) -> None:
    runs = [
        fake_run(tmp_path / "a0", strategy="fedit", seed=0, accuracy=[0.4, 0.5], up=2_000_000),
        fake_run(tmp_path / "a1", strategy="fedit", seed=1, accuracy=[0.6, 0.7], up=2_000_000),
        fake_run(tmp_path / "b0", strategy="ffa-lora", seed=0, accuracy=[0.5, 0.55], up=1_000_000),
    ]
    results = [load_run(r, cell=r.name[0], levels={}, target=0.6) for r in runs]
    cells = group(results)
    header, rows = table(cells, 0.6)
    assert header[:5] == ["cell", "seeds", "final acc. (%)", "best acc. (%)", "rounds to 60%"]
    std = 100 * math.sqrt(((0.5 - 0.6) ** 2 + (0.7 - 0.6) ** 2) / 1)
    assert rows[0][2] == f"**60.0 ± {std:.1f}**"  # fedit: mean 60.0 beats 55.0
    assert rows[1][2] == "55.0"
    assert rows[0][4] == "**1.0 †**" and rows[1][4] == "not reached"  # one fedit seed reached 60% in round 1
    assert rows[0][5] == "2.00" and rows[1][5] == "**1.00**"  # less uplink is better
    assert "ε" not in header  # no DP anywhere: no epsilon column
    assert "† some seeds never reached 60%" in markdown(cells, 0.6)
    means, stds = cells[0].mean_accuracy_curve()
    assert means == pytest.approx([0.5, 0.6]) and stds == pytest.approx([0.1414, 0.1414], abs=1e-4)


def test_report_from_plain_run_directories_groups_by_differing_keys(tmp_path: Path) -> None:
    for seed in (0, 1):
        fake_run(tmp_path / "runs" / f"fedit-{seed}", strategy="fedit", seed=seed, accuracy=[0.5, 0.6], up=10)
        fake_run(
            tmp_path / "runs" / f"ffa-{seed}", strategy="ffa-lora", seed=seed, accuracy=[0.5, 0.55], up=5
        )
    (tmp_path / "runs" / "unfinished").mkdir()
    RunDirectory(tmp_path / "runs" / "unfinished").create(load_config(None))
    found = collect([tmp_path / "runs"], target=0.55)
    assert sorted({r.cell for r in found.results}) == ["fedit", "ffa-lora"]
    assert found.unfinished == [tmp_path / "runs" / "unfinished"]
    files = write_report(found, tmp_path / "report")
    assert {p.name for p in files.values()} == {
        "comparison.csv",
        "comparison.md",
        "paired.csv",
        "final_accuracy_paired.png",
        "accuracy_per_round.png",
        "accuracy_vs_uplink.png",
        "traffic_per_round.png",
        "report.html",
    }
    rows = list(csv.DictReader(files["csv"].open()))
    assert len(rows) == 4 and {r["seed"] for r in rows} == {"0", "1"}


def test_epsilon_plot_and_column_appear_with_dp(tmp_path: Path) -> None:
    fake_run(tmp_path / "a", strategy="fedit", seed=0, accuracy=[0.5], up=10)
    fake_run(tmp_path / "b", strategy="fedit", seed=0, accuracy=[0.45], up=10, epsilon=2.9)
    found = collect([tmp_path / "a", tmp_path / "b"])
    files = write_report(found, tmp_path / "out")
    assert files["epsilon"].is_file()
    header, rows = table(group(found.results), found.target)
    column = header.index("ε")
    assert [row[column] for row in rows] == ["—", "2.90"]  # shown, never marked "best"


def test_html_report_is_self_contained(tmp_path: Path) -> None:
    fake_run(tmp_path / "a", strategy="fedit", seed=0, accuracy=[0.5, 0.6], up=10)
    html = write_report(collect([tmp_path / "a"]), tmp_path / "out")["html"].read_text()
    # paired dot plot, accuracy per round, accuracy against uplink, traffic per round (no losses recorded)
    assert html.count('src="data:image/png;base64,') == 4
    for external in ("http://", "https://", "<link", "<script", "@import", "url("):
        assert external not in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    from matplotlib.image import imread

    page = write_report(collect([write_showcase(tmp_path / "cmp")]), tmp_path / "out")["html"]
    shot = tmp_path / "shot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
    ]
    flags += ["--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    flags += [f"--screenshot={shot}", "--window-size=1100,2400", "--hide-scrollbars"]
    subprocess.run([CHROMIUM, *flags, page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = imread(shot)[..., :3]
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    # the paired table (text), the per-seed dot plot and the curves (tab10 colours); page and text are grey
    coloured = (saturation > 0.3).mean()
    dark = (pixels.max(axis=-1) < 0.3).mean()  # table text
    assert coloured > 0.002, f"no plot visible in the screenshot ({coloured:.4%} coloured pixels)"
    assert dark > 0.002, f"no text visible in the screenshot ({dark:.4%} dark pixels)"


def test_plan_skips_finished_runs_and_refuses_a_changed_config(tmp_path: Path) -> None:
    grid: Grid = parse_grid({"experiment": "quickstart.toml", "seeds": [0, 1]}, base_dir=SIMS)
    tasks = grid.tasks()
    prepare(grid, tasks, tmp_path)
    run = RunDirectory(tmp_path / "runs" / tasks[0].key)
    run.create(tasks[0].config)
    todo, done = plan(tasks, tmp_path)
    assert (len(todo), len(done)) == (2, 0)  # no summary yet: run it again
    run.write_summary({"final_eval_accuracy": 0.5})
    todo, done = plan(tasks, tmp_path)
    assert todo == [tasks[1]] and done == [tasks[0]]
    with pytest.raises(ConfigError, match=r"different config.*--overwrite"):
        plan(grid.tasks(["lora.rank=4"]), tmp_path)


def test_cli_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "grid.toml"
    bad.write_text('[compare]\nexperiment = "nope.toml"\n')
    result = CliRunner().invoke(app, ["compare", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "experiment file" in result.output and "not found" in result.output
    assert not (tmp_path / "out").exists()  # nothing written before the grid is valid
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "holds no run" in result.output
    unknown = tmp_path / "baseline.toml"
    unknown.write_text(
        f'[compare]\nexperiment = "{SIMS / "quickstart.toml"}"\nbaseline = "fedsa"\n'
        '[[compare.axes]]\nkey = "strategy.name"\nvalues = ["fedit", "ffa-lora"]\n'
    )
    result = CliRunner().invoke(app, ["compare", str(unknown), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "compare.baseline = 'fedsa' is not a cell of this grid; cells: fedit, ffa-lora" in result.output
    assert not (tmp_path / "out").exists()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    good = tmp_path / "good.toml"
    good.write_text(f'[compare]\nexperiment = "{SIMS / "quickstart.toml"}"\n')
    result = CliRunner().invoke(app, ["compare", str(good), "--out", str(tmp_path / "keep"), "--overwrite"])
    assert result.exit_code == 2 and "not a comparison directory" in result.output
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"


def test_an_unfinished_run_with_a_checkpoint_continues_with_resume(tmp_path: Path) -> None:
    import torch

    from fedlora.compare.runner import Comparison, _command
    from fedlora.run import checkpoint

    grid = parse_grid({"experiment": "quickstart.toml", "seeds": [0]}, base_dir=SIMS)
    (task,) = grid.tasks()
    where = Comparison(tmp_path)
    run = RunDirectory(where.run_dir(task))
    run.create(task.config)
    assert "--overwrite" in _command(task, where, verbose=False)  # no round finished: start again
    checkpoint.save(run.checkpoint_path, checkpoint.Checkpoint(round=1, global_state={"w": torch.zeros(2)}))
    assert _command(task, where, verbose=False)[-2:] == ["--resume", str(run.path)]
    (other,) = grid.tasks(["lora.rank=4"])  # the grid changed: the checkpoint is not this run's
    assert "--overwrite" in _command(other, where, verbose=False)


def test_a_run_made_before_new_keys_existed_still_counts_as_finished(tmp_path: Path) -> None:
    import tomllib

    import tomli_w

    grid = parse_grid({"experiment": "quickstart.toml", "seeds": [0]}, base_dir=SIMS)
    tasks = grid.tasks()
    run = RunDirectory(tmp_path / "runs" / tasks[0].key)
    run.create(tasks[0].config)
    run.write_summary({"final_eval_accuracy": 0.5})
    older = tomllib.loads((run.path / "config.toml").read_text())
    del older["faults"]  # a section added to fedlora after this run was made, at its defaults
    (run.path / "config.toml").write_text(tomli_w.dumps(older))
    assert plan(tasks, tmp_path) == ([], tasks)


# ----- paired differences against a baseline ----------------------------------------------------


def against(cells: list[CellStats], index: int) -> paired.Pairing:
    """Every other cell paired with ``cells[index]``."""
    return paired.pairings(cells, cells[index].label)[0]


def paired_runs(tmp_path: Path, finals: dict[str, list[float]], seeds: list[int]) -> list[CellStats]:
    """Cells of one-round runs whose final accuracy per seed is given (None: that run is missing)."""
    results = []
    for label, values in finals.items():
        for seed, acc in zip(seeds, values, strict=True):
            if acc is None:
                continue
            run = fake_run(tmp_path / f"{label}-{seed}", strategy="fedit", seed=seed, accuracy=[acc], up=10)
            results.append(load_run(run, cell=label, levels={"strategy": label}, target=0.6))
    return group(results)


def test_paired_difference_and_interval_equal_a_hand_computation(tmp_path: Path) -> None:
    base = [0.50, 0.60, 0.55, 0.52]
    diffs = [0.02, 0.04, 0.03, 0.05]  # a consistent gain of about 3.5 points
    cells = paired_runs(
        tmp_path, {"a": base, "b": [x + d for x, d in zip(base, diffs, strict=True)]}, [0, 1, 2, 3]
    )
    (final, best) = paired.compare(cells, against(cells, 0))[0]
    # by hand: mean 0.035, sample std sqrt(sum((d - mean)^2) / 3), t_{0.975, 3} (a t table)
    mean = 0.035
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    half = T_975[3] * sd / math.sqrt(4)
    assert final.seeds == [0, 1, 2, 3]
    assert final.interval is not None
    assert final.interval.mean == pytest.approx(mean, abs=1e-12)
    assert final.interval.low == pytest.approx(mean - half, abs=1e-12)
    assert final.interval.high == pytest.approx(mean + half, abs=1e-12)
    assert final.verdict == "better" and best.verdict == "better"
    _, rows = paired.table(cells, against(cells, 0), 0.6)
    assert rows[0][0] == "a (baseline)"
    assert rows[1][:4] == [
        "b",
        "4",
        f"+3.5 [+{100 * (mean - half):.1f}, +{100 * (mean + half):.1f}]",
        "better",
    ]
    flipped = paired.compare(cells, against(cells, 1))[0][0]  # the other way round: worse
    assert flipped.verdict == "worse" and flipped.interval.mean == pytest.approx(-mean)  # type: ignore[union-attr]


T_975 = {
    # closed forms for 1 and 2 degrees of freedom; published table values for the others
    1: math.tan(math.pi * (0.975 - 0.5)),
    2: (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * (1 - 0.975)),
    3: 3.182446305284,
    4: 2.776445105198,
    9: 2.262157162798,
}


@pytest.mark.parametrize(("df", "quantile"), sorted(T_975.items()))
def test_the_interval_uses_students_t_quantile(df: int, quantile: float) -> None:
    """Half-width = t_{0.975, n-1} * s / sqrt(n) for n = df + 1 values."""
    n = df + 1
    values = [float(i % 2) for i in range(n)]  # 0, 1, 0, 1, ...
    interval = paired.t_interval(values)
    assert interval is not None and interval.low is not None
    s = statistics.stdev(values)
    assert interval.mean - interval.low == pytest.approx(quantile * s / math.sqrt(n), rel=1e-11)


def test_no_detectable_difference_when_the_interval_contains_zero(tmp_path: Path) -> None:
    cells = paired_runs(tmp_path, {"a": [0.5, 0.6, 0.55], "b": [0.52, 0.57, 0.56]}, [0, 1, 2])
    (final, _) = paired.compare(cells, against(cells, 0))[0]
    assert final.interval is not None and final.interval.low < 0 < final.interval.high  # type: ignore[operator]
    assert final.verdict == "no detectable difference at 3 seeds"
    assert "no detectable difference at 3 seeds" in paired.markdown(cells, against(cells, 0), 0.6)


def test_missing_seeds_are_left_out_of_the_pairs(tmp_path: Path) -> None:
    cells = paired_runs(tmp_path, {"a": [0.5, 0.6, None, 0.55], "b": [0.52, None, 0.6, 0.58]}, [0, 1, 2, 3])
    (final, _) = paired.compare(cells, against(cells, 0))[0]
    assert final.seeds == [0, 3]
    assert final.differences == pytest.approx([0.02, 0.03])
    assert paired.pairs_text(final) == "2 of 3"
    one = paired_runs(tmp_path / "one", {"a": [0.5], "b": [0.6]}, [0])
    (single, _) = paired.compare(one, against(one, 0))[0]
    assert single.verdict == "one seed: no interval"
    assert paired.interval_text(single.interval) == "+10.0"


def test_bytes_to_target_sum_the_uplink_of_rounds_until_the_target(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "r", strategy="fedit", seed=0, accuracy=[0.5, 0.62, 0.7], up=3_000_000)
    result = load_run(run, cell="fedit", levels={}, target=0.6)
    assert result.rounds_to_target == 2 and result.uplink_mb_to_target == pytest.approx(2.0)
    assert load_run(run, cell="fedit", levels={}, target=0.9).uplink_mb_to_target is None


def test_baseline_is_validated_and_defaults_to_the_first_cell() -> None:
    assert parse_grid(grid_table(), base_dir=SIMS).baseline == "fedit · no DP"
    grid = parse_grid(grid_table(baseline="ffa-lora · no DP"), base_dir=SIMS)
    assert grid.manifest()["baseline"] == "ffa-lora · no DP"
    with pytest.raises(
        ConfigError, match=r"compare.baseline = 'fedsa' is not a cell.*cells: fedit · no DP, "
    ):
        parse_grid(grid_table(baseline="fedsa"), base_dir=SIMS)
    with pytest.raises(ConfigError, match=r"compare\.baseline = 3"):
        parse_grid(grid_table(baseline=3), base_dir=SIMS)
    matched = parse_grid(grid_table(baseline=[{"strategy": "ffa-lora"}, "fedit · no DP"]), base_dir=SIMS)
    assert matched.manifest()["baseline"] == [{"strategy": "ffa-lora"}, "fedit · no DP"]
    with pytest.raises(ConfigError, match=r"names no axis level of this grid \(strategy: fedit, ffa-lora;"):
        parse_grid(grid_table(baseline={"strategy": "fedsa"}), base_dir=SIMS)
    with pytest.raises(ConfigError, match="one axis and its level"):
        parse_grid(grid_table(baseline={"strategy": "fedit", "privacy": "no DP"}), base_dir=SIMS)


def test_report_puts_the_paired_table_first(tmp_path: Path) -> None:
    for seed, (a, b) in enumerate([(0.5, 0.55), (0.6, 0.66), (0.55, 0.59)]):
        fake_run(tmp_path / "runs" / f"fedit-{seed}", strategy="fedit", seed=seed, accuracy=[0.4, a], up=10)
        fake_run(tmp_path / "runs" / f"ffa-{seed}", strategy="ffa-lora", seed=seed, accuracy=[0.4, b], up=5)
    files = write_report(collect([tmp_path / "runs"], baseline="ffa-lora"), tmp_path / "out")
    text = files["markdown"].read_text()
    assert text.startswith("## Paired differences against ffa-lora")
    assert text.index("| ffa-lora (baseline)") < text.index("## Per cell")
    rows = list(csv.DictReader(files["paired"].open()))
    assert [(r["cell"], r["baseline"], r["metric"], r["pairs"]) for r in rows] == [
        ("fedit", "ffa-lora", "final_accuracy", "3"),
        ("fedit", "ffa-lora", "best_accuracy", "3"),
    ]
    assert float(rows[0]["mean_diff"]) == pytest.approx(-0.05)
    assert rows[0]["verdict"] == "worse"
    html = files["html"].read_text()
    assert html.index("Paired differences against ffa-lora") < html.index("Per cell")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--baseline", "nope"])
    assert result.exit_code == 2 and "baseline 'nope' matches no cell" in result.output
    assert "cells: fedit, ffa-lora" in result.output


def test_an_axis_level_baseline_pairs_each_cell_with_its_own_level_on_the_other_axes(tmp_path: Path) -> None:
    """``baseline = { strategy = "fedit" }``: every strategy against FedIT at the same privacy level."""
    finals = {
        ("fedit", "none"): [0.50, 0.60, 0.55],
        ("ffa", "none"): [0.52, 0.63, 0.57],
        ("fedit", "eps1"): [0.40, 0.45, 0.42],
        ("ffa", "eps1"): [0.38, 0.42, 0.41],
    }
    results = []
    for (strategy, privacy), values in finals.items():
        for seed, acc in enumerate(values):
            run = fake_run(
                tmp_path / f"{strategy}-{privacy}-{seed}", strategy="fedit", seed=seed, accuracy=[acc], up=1
            )
            levels = {"strategy": strategy, "privacy": privacy}
            results.append(load_run(run, cell=f"{strategy} · {privacy}", levels=levels, target=0.6))
    cells = group(results)
    (by_level, single) = paired.pairings(cells, [{"strategy": "fedit"}, "fedit · none"])
    assert by_level.title == "fedit at the same privacy"
    assert [(c.label, b.label) for c, b in by_level.pairs()] == [
        ("ffa · none", "fedit · none"),
        ("ffa · eps1", "fedit · eps1"),
    ]
    (none, eps1) = paired.compare(cells, by_level)
    assert none[0].differences == pytest.approx([0.02, 0.03, 0.02])
    assert eps1[0].differences == pytest.approx([-0.02, -0.03, -0.01])
    _, rows = paired.table(cells, by_level, 0.6)
    assert [r[0] for r in rows] == [
        "fedit · none (baseline)",
        "ffa · none",
        "fedit · eps1 (baseline)",
        "ffa · eps1",
    ]
    assert len(single.pairs()) == 3
    with pytest.raises(KeyError):
        paired.pairings(cells, {"strategy": "fedsa"})


# ----- per-client metrics and the full report -----------------------------------------------------


def rich_run(path: Path, *, strategy: str, seed: int, gain: float, rounds: int = 6, clients: int = 5) -> Path:
    """A finished run with losses, traffic, a failed client and per-client evaluation in clients.jsonl."""
    run = fake_run(
        path,
        strategy=strategy,
        seed=seed,
        accuracy=[0.42 + gain * r / rounds + 0.01 * ((seed * 7 + r) % 3) for r in range(1, rounds + 1)],
        up=rounds * 600_000,
    )
    rows = []
    for r in range(1, rounds + 1):
        acc = 0.42 + gain * r / rounds + 0.01 * ((seed * 7 + r) % 3)
        rows.append(
            {
                "round": r,
                "eval_accuracy": acc,
                "train_loss": 1.1 - 0.4 * gain * r,
                "eval_loss": 1.08 - 0.3 * gain * r,
                "uplink_bytes": 600_000,
                "downlink_bytes": 1_200_000,
                "num_failed": 1 if r == 2 and seed == 0 else 0,
            }
        )
    (run / "rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lines = []
    for r in range(1, rounds + 1):
        for pid in range(clients):
            acc = 0.4 + gain * r / rounds + 0.04 * pid - 0.01 * seed
            lines.append(
                {"round": r, "phase": "train", "partition_id": pid, "status": "ok", "num_examples": 50}
            )
            lines.append(
                {
                    "round": r,
                    "phase": "evaluate",
                    "partition_id": pid,
                    "status": "ok",
                    "num_examples": 10 if pid else 0,  # client 0 has no validation split: left out
                    "eval_loss": 1.0,
                    "eval_accuracy": acc,
                }
            )
    lines.append({"round": 1, "phase": "evaluate", "partition_id": -1, "status": "failed", "reason": "x"})
    (run / "clients.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_per_client_metrics_of_the_last_evaluated_round(tmp_path: Path) -> None:
    run = rich_run(tmp_path / "r", strategy="fedsa-lora", seed=1, gain=0.12, rounds=4, clients=5)
    result = load_run(run, cell="fedsa", levels={}, target=0.6)
    assert [c.round for c in result.client_eval] == [1, 2, 3, 4]
    values = [0.4 + 0.12 + 0.04 * pid - 0.01 for pid in range(1, 5)]  # round 4, clients 1-4
    last = result.last_client_eval
    assert last is not None and last.clients == 4
    assert last.mean == pytest.approx(statistics.fmean(values))
    assert last.worst == pytest.approx(min(values))
    assert last.std == pytest.approx(statistics.stdev(values))
    assert last.iqr == pytest.approx(
        statistics.quantiles(values, n=4, method="inclusive")[2]
        - statistics.quantiles(values, n=4, method="inclusive")[0]
    )
    assert result.client_accuracy_kind == "personalised (shared A, own B)"
    files = write_report(collect([run]), tmp_path / "out")
    row = next(csv.DictReader(files["csv"].open()))
    assert float(row["client_mean_accuracy"]) == pytest.approx(last.mean)
    assert float(row["client_worst_accuracy"]) == pytest.approx(last.worst)
    assert row["client_eval_round"] == "4" and row["client_accuracy_kind"].startswith("personalised")
    text = files["markdown"].read_text()
    assert "## Per client" in text and "personalised (shared A, own B)" in text
    assert "fedsa ‡" in text or "‡ FedSA-LoRA" in text
    plain = fake_run(tmp_path / "p", strategy="fedit", seed=0, accuracy=[0.5], up=10)
    assert load_run(plain, cell="x", levels={}, target=0.6).client_eval == ()  # no client evaluation


def write_showcase(root: Path, seeds: int = 4) -> Path:
    """A comparison directory as `fedlora compare` leaves it: three strategies, ``seeds`` seeds."""
    gains = {"fedit": 0.10, "ffa-lora": 0.16, "fedsa-lora": 0.11}
    cells = [{"label": s, "slug": s, "levels": {"strategy": s}} for s in gains]
    for strategy, gain in gains.items():
        for seed in range(seeds):
            rich_run(root / "runs" / strategy / f"seed-{seed}", strategy=strategy, seed=seed, gain=gain)
    manifest = {"name": "showcase", "seeds": list(range(seeds)), "target_accuracy": 0.5, "baseline": "fedit"}
    (root / "comparison.json").write_text(json.dumps({**manifest, "cells": cells, "privacy_axes": []}))
    return root


def test_the_report_shows_paired_table_curves_traffic_failures_clients_and_config(tmp_path: Path) -> None:
    files = write_report(collect([write_showcase(tmp_path / "cmp")]), tmp_path / "cmp")
    for kind in ("final", "accuracy", "loss", "uplink", "traffic", "clients"):
        assert files[kind].is_file(), kind
    html = files["html"].read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", html)
    assert headings[0] == "Paired differences against fedit"
    assert headings[1:] == [
        "Per cell",
        "Cells: strategy and what differs from fedit",
        "Accuracy and loss per round",
        "Traffic",
        "Per-client metrics",
        "Failed, rejected and declined clients",
        "Base configuration",
        "About this report",
    ]
    assert "strategy.name = &quot;ffa-lora&quot;" in html or "strategy.name = ffa-lora" in html
    assert "[federation]" in html  # the full base config
    assert html.count('src="data:image/png;base64,') == 6  # every figure but ε (no DP)
    paired_rows = list(csv.DictReader(files["paired"].open()))
    ffa = next(r for r in paired_rows if r["cell"] == "ffa-lora" and r["metric"] == "final_accuracy")
    assert (
        ffa["pairs"] == "4" and float(ffa["mean_diff"]) == pytest.approx(0.06) and ffa["verdict"] == "better"
    )
    client = next(
        r for r in paired_rows if r["cell"] == "fedsa-lora" and r["metric"] == "client_mean_accuracy"
    )
    assert float(client["mean_diff"]) == pytest.approx(0.01)


# ----- one Ray head for the grid ------------------------------------------------------------------


def test_the_ray_address_never_makes_a_finished_or_resumable_run_different(tmp_path: Path) -> None:
    import torch

    from fedlora.compare.runner import Comparison, _command
    from fedlora.run import checkpoint

    grid = parse_grid({"experiment": "quickstart.toml", "seeds": [0, 1]}, base_dir=SIMS)
    tasks = grid.tasks()
    prepare(grid, tasks, tmp_path)
    assert 'ray_address = ""' in (tmp_path / "configs" / f"{tasks[0].key}.toml").read_text()
    attached = grid.tasks(
        ['federation.ray_address="127.0.0.1:6379"']
    )  # as `fedlora run --ray-address` writes
    finished = RunDirectory(tmp_path / "runs" / tasks[0].key)
    finished.create(attached[0].config)
    finished.write_summary({"final_eval_accuracy": 0.5})
    where = Comparison(tmp_path)
    unfinished = RunDirectory(where.run_dir(tasks[1]))
    unfinished.create(attached[1].config)
    checkpoint.save(
        unfinished.checkpoint_path, checkpoint.Checkpoint(round=1, global_state={"w": torch.zeros(2)})
    )
    assert plan(tasks, tmp_path) == ([tasks[1]], [tasks[0]])
    command = _command(tasks[1], where, verbose=False, ray_address="127.0.0.1:7000")
    assert command[-4:] == ["--resume", str(unfinished.path), "--ray-address", "127.0.0.1:7000"]
    fresh = _command(grid.tasks(["lora.rank=4"])[1], where, verbose=False, ray_address="127.0.0.1:7000")
    assert "--overwrite" in fresh and fresh[-2:] == ["--ray-address", "127.0.0.1:7000"]
    assert "--ray-address" not in _command(tasks[1], where, verbose=False)  # a Ray per run


def test_each_running_run_gets_a_head_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from fedlora.compare import runner

    grid = parse_grid({"experiment": "quickstart.toml", "seeds": [0, 1, 2, 3, 4]}, base_dir=SIMS)
    tasks = grid.tasks()
    lent: list[tuple[str, str]] = []
    busy: set[str] = set()

    def start(task, where, verbose, ray_address="", jobs=1):  # type: ignore[no-untyped-def]
        assert ray_address and ray_address not in busy, (ray_address, busy)  # never two runs on one head
        busy.add(ray_address)
        lent.append((task.key, ray_address))
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
        return proc, (tmp_path / f"{len(lent)}.log").open("wb")

    def outcome(task, code, seconds, where):  # type: ignore[no-untyped-def]
        busy.discard(next(a for k, a in lent if k == task.key))
        return runner.Event("finished", task, seconds)

    monkeypatch.setattr(runner, "_start", start)
    monkeypatch.setattr(runner, "_outcome", outcome)
    assert runner.execute(tasks, tmp_path, lambda e: None, jobs=2, ray_addresses=["h:1", "h:2"])
    assert [k for k, _ in lent] == [t.key for t in tasks]
    assert {a for _, a in lent} == {"h:1", "h:2"}
    with pytest.raises(ValueError, match="one per job"):
        runner.execute(tasks, tmp_path, lambda e: None, jobs=2, ray_addresses=["h:1"])


def test_resume_accepts_a_ray_address(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.create(load_config(SIMS / "quickstart.toml"))
    result = CliRunner().invoke(app, ["run", "--resume", str(run.path), "--ray-address", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "no checkpoint" in result.output and "drop" not in result.output  # refused for its own reason
    result = CliRunner().invoke(app, ["run", "--resume", str(run.path), "--seed", "3"])
    assert result.exit_code == 2 and "drop --set or a shortcut" in result.output


def test_runs_sharing_the_cores_sleep_while_they_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs > 1: the runs get OMP_WAIT_POLICY=PASSIVE (benchmarks/omp_wait.py), unless the user set it."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "OMP_WAIT_POLICY" not in run_environment(1)
    assert run_environment(2)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert run_environment(3)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_failed_runs_reason_comes_from_its_log_even_when_the_log_is_gone(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("starting\nValueError: bad value\n\nbye\n")
    assert _last_error(log) == "ValueError: bad value"
    log.write_text("only this\n")
    assert _last_error(log) == "only this"
    log.unlink()  # deleted under a running comparison: a reason, not a FileNotFoundError
    assert _last_error(log).startswith(f"its log {log} cannot be read (")
