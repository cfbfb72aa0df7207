"""End to end: `fedlora compare` on a small real grid, killed mid-way, resumed, then re-run (all skipped).

One seed per cell: how seeds expand into runs and rows is covered by the unit tests in test_compare.py;
here each run is a real `fedlora run` process with its own Ray, about half a minute each."""

from __future__ import annotations

import csv
import signal
import time
from pathlib import Path

import psutil
import pytest

from fedlora.core.records import read_summary

GRID = """
[compare]
name = "small"
experiment = "{base}"
seeds = [0]
target_accuracy = 0.4
set = ["federation.num_clients=3", "federation.rounds=2", "train.local_steps=2", "data.max_examples=2000",
       "data.test_size=100", "federation.fraction_evaluate=1.0", "data.max_length=32",
       "federation.client_cpus=2"]

[[compare.axes]]
key = "strategy.name"
values = ["fedit", "ffa-lora"]
"""


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.e2e
def test_compare_killed_mid_way_resumes_and_skips_finished_runs(
    tmp_path: Path, repo_root: Path, start_cli
) -> None:  # type: ignore[no-untyped-def]
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(base=repo_root / "sims" / "quickstart.toml"))
    out = tmp_path / "cmp"

    def compare():  # type: ignore[no-untyped-def]
        return start_cli("compare", str(grid), "--out", str(out), start_new_session=True)

    first_summary = out / "runs" / "fedit" / "seed-0" / "summary.json"

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

    proc = compare()
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    assert "1 already finished" in output
    assert output.count("done ") == 1

    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["cell"], r["seed"]) for r in rows] == [("fedit", "0"), ("ffa-lora", "0")]
    for row in rows:
        summary = read_summary(Path(row["run_dir"]))
        assert float(row["final_accuracy"]) == summary["final_eval_accuracy"]
        assert float(row["best_accuracy"]) == summary["best_eval_accuracy"]
        assert float(row["uplink_mb"]) == summary["total_uplink_bytes"] / 1e6
        assert float(row["downlink_mb"]) == summary["total_downlink_bytes"] / 1e6
        assert float(row["wall_s"]) == summary["wall_s"]
        assert row["strategy"] == summary["strategy"] == row["cell"]
    ffa, fedit = (float(r["uplink_mb"]) for r in (rows[1], rows[0]))
    assert ffa < 0.55 * fedit  # FFA-LoRA sends B only
    for name in ("comparison.md", "accuracy_per_round.png", "accuracy_vs_uplink.png", "report.html"):
        assert (out / name).is_file(), name

    started = time.monotonic()
    proc = compare()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "2 already finished" in output and "done " not in output
    assert time.monotonic() - started < 60  # nothing ran again
