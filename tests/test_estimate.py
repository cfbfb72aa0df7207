"""``fedlora compare --estimate``: one calibration per (strategy, privacy mode), a run's time from its
rounds and evaluation schedule, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.compare import estimate as est
from fedlora.compare.grid import Task, parse_grid
from fedlora.core.config import from_dict

SIMS = Path(__file__).resolve().parents[1] / "sims"


def test_a_run_costs_start_up_plus_rounds_plus_evaluations() -> None:
    cal = est.Calibration(overhead_s=20.0, train_s=3.0, eval_s=5.0)
    cfg = from_dict({"federation": {"rounds": 10, "evaluate_every": 4}})  # evaluates rounds 4, 8, 10
    assert cal.run_seconds(cfg) == pytest.approx(20 + 10 * 3 + 3 * 5)
    assert cal.run_seconds(from_dict({"federation": {"rounds": 2}})) == pytest.approx(20 + 2 * 3 + 2 * 5)


def grid():  # type: ignore[no-untyped-def]
    table = {
        "experiment": "quickstart.toml",
        "seeds": [0, 1, 2],
        "set": ["federation.rounds=4"],
        "axes": [
            {"key": "strategy.name", "values": ["fedit", "ffa-lora"]},
            {"key": "data.alpha", "values": [0.1, 1.0]},
        ],
    }
    return parse_grid(table, base_dir=SIMS)


def test_one_calibration_per_strategy_and_privacy_mode() -> None:
    tasks = grid().tasks()
    measured: list[Task] = []

    def fake(task: Task, workdir: Path) -> est.Calibration:
        assert workdir.is_dir()
        measured.append(task)
        return est.Calibration(10.0, 2.0 if task.config.strategy.name == "fedit" else 1.0, 4.0)

    result = est.estimate(tasks, jobs=2, measure_with=fake)
    assert [t.config.strategy.name for t in measured] == ["fedit", "ffa-lora"]
    fedit, ffa = 10 + 4 * 2 + 4 * 4, 10 + 4 * 1 + 4 * 4
    assert result.total_s == pytest.approx((6 * fedit + 6 * ffa) / 2)


@pytest.mark.cli
def test_the_estimate_prints_the_expected_time_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(est, "measure", lambda task, workdir: est.Calibration(10.0, 2.0, 4.0))
    (tmp_path / "grid.toml").write_text(
        f'[compare]\nexperiment = "{SIMS / "quickstart.toml"}"\nseeds = [0, 1]\n'
        'set = ["federation.rounds=4"]\n'
        '[[compare.axes]]\nkey = "strategy.name"\nvalues = ["fedit", "flora"]\n'
    )
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app, ["compare", str(tmp_path / "grid.toml"), "--out", str(out), "--estimate"]
    )
    assert result.exit_code == 0, result.output
    assert "4 runs to do" in result.output and "expected about 2 min" in result.output  # 4 x 34 s
    assert not out.exists()
