"""End to end: a tuned `fedlora compare` on a small real grid, killed mid-way, resumed on one shared Ray
head, then re-run (all skipped).

How cells, settings and seeds expand into runs and rows is covered by the unit tests in
test_compare.py and test_tuning.py; here each run is a real `fedlora run` process, about half a minute
each."""

from __future__ import annotations

import csv
import signal
import time
from pathlib import Path

import psutil
import pytest

from fedlora.core.records.rundir import read_summary

GRID = """
[compare]
name = "small"
experiment = "{base}"
seeds = [0, 1]
tune_seeds = [0]
tune = {{ "train.lr" = [1e-4, 1e-2] }}
target_accuracy = 0.4
set = ["federation.num_clients=3", "federation.rounds=1", "train.local_steps=2", "data.max_examples=900",
       "data.test_size=60", "federation.fraction_evaluate=1.0", "data.max_length=32",
       "federation.client_cpus=2"]

[[compare.axes]]
key = "strategy.name"
values = ["fedit"]
"""


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.e2e
def test_a_tuned_compare_killed_mid_way_resumes_on_a_shared_ray_and_skips_finished_runs(
    tmp_path: Path, repo_root: Path, start_cli
) -> None:  # type: ignore[no-untyped-def]
    """Both learning rates at seed 0 (the first one's run finishes, then the comparison is SIGKILLed
    while the second one runs), then resumed with one Ray head for the rest: the second tuning run
    again, and the setting chosen on the clients' validation accuracy at seed 1 only; a third call
    runs nothing."""
    from fedlora.core.records.rundir import read_rounds

    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(base=repo_root / "sims" / "quickstart.toml"))
    out = tmp_path / "cmp"

    def compare(*extra: str):  # type: ignore[no-untyped-def]
        return start_cli("compare", str(grid), "--out", str(out), *extra, start_new_session=True)

    first_summary = out / "runs" / "fedit" / "lr-0.0001" / "seed-0" / "summary.json"

    proc = compare()
    deadline = time.monotonic() + 300
    while proc.poll() is None and not first_summary.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    time.sleep(3)  # the second run is starting
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: its runs must stop on their own
    proc.communicate(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"processes left after the comparison was killed: {[p.pid for p in alive]}"

    proc = compare("--shared-ray")
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    assert "2 runs, 1 already finished" in output and "local head(s) for the whole grid" in output
    assert output.count("done ") == 2

    validation = {
        setting: read_rounds(out / "runs" / "fedit" / setting / "seed-0")[-1]["client_eval_accuracy"]
        for setting in ("lr-0.0001", "lr-0.01")
    }
    expected = "lr=0.0001" if validation["lr-0.0001"] >= validation["lr-0.01"] else "lr=0.01"  # ties: first
    assert f"tuned on seed(s) 0: fedit -> {expected}" in output
    other = "lr-0.01" if expected == "lr=0.0001" else "lr-0.0001"
    assert not (out / "runs" / "fedit" / other / "seed-1").exists()  # seed 1 runs the chosen setting only
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["cell"], r["seed"], r["tuned"]) for r in rows] == [
        ("fedit", "0", expected),
        ("fedit", "1", expected),
    ]
    for row in rows:
        summary = read_summary(Path(row["run_dir"]))
        assert float(row["final_accuracy"]) == summary["final_eval_accuracy"]
        assert float(row["best_accuracy"]) == summary["best_eval_accuracy"]
        assert float(row["uplink_mb"]) == summary["total_uplink_bytes"] / 1e6
        assert float(row["downlink_mb"]) == summary["total_downlink_bytes"] / 1e6
        assert float(row["wall_s"]) == summary["wall_s"]
        assert row["strategy"] == summary["strategy"] == row["cell"]
    assert "## Tuning (chosen on validation)" in (out / "comparison.md").read_text()
    for name in ("comparison.md", "accuracy_per_round.png", "accuracy_vs_uplink.png", "report.html"):
        assert (out / name).is_file(), name

    started = time.monotonic()
    proc = compare()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "2 already finished" in output and "1 already finished" in output and "done " not in output
    assert time.monotonic() - started < 60  # nothing ran again
