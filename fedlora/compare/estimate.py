"""``fedlora compare --estimate``: the expected wall time of a grid, from short calibration runs.

Per distinct (strategy, privacy mode) among the runs still to do, one calibration run of the first such
run's config is made in a temporary directory (deleted afterwards: nothing permanent is written) with
``federation.rounds = 3`` and ``federation.evaluate_every = 3``: its first round warms up (client actors
load the model and data) and trains, its second only trains, its third trains and evaluates. From its
``rounds.jsonl`` and its process's wall time:

- ``train_s``: round 2's wall time (sampling, local training, aggregation);
- ``eval_s``: round 3's wall time minus round 2's (server test set and client evaluation);
- ``overhead_s``: the process's wall time minus three rounds of training and one evaluation (Python,
  Ray and client start-up, the first round's warm-up, the initial model, writing the run directory).

A run of R rounds evaluating every E rounds is then expected to take
``overhead_s + R * train_s + n_eval * eval_s`` with ``n_eval = ceil(R / E)`` evaluated rounds (the last
is always evaluated), and the grid the sum over its runs divided by ``--jobs``. The model assumes that
runs with the same strategy and privacy mode cost the same per round (seeds, learning rates, data
splits and epsilon barely change the work), and that the machine stays as busy as during calibration.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlora.compare.grid import Task
from fedlora.core.config import ExperimentConfig
from fedlora.core.records.rundir import read_rounds
from fedlora.run.processes import DIE_WITH_PARENT


class CalibrationError(RuntimeError):
    """A calibration run failed; the message names it and its last log line."""


@dataclass(frozen=True)
class Calibration:
    """Measured costs of one kind of run, in seconds."""

    overhead_s: float
    train_s: float
    eval_s: float

    def run_seconds(self, cfg: ExperimentConfig) -> float:
        """Expected wall seconds of a run of ``cfg`` (rounds and evaluate_every from its federation)."""
        fed = cfg.federation
        evaluated = math.ceil(fed.rounds / fed.evaluate_every)
        return self.overhead_s + fed.rounds * self.train_s + evaluated * self.eval_s


def cost_key(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Runs with the same key are taken to cost the same per round: (strategy, privacy mode), plus the
    schedule when rounds are not plain synchronous ones (a deadline leaves clients out; a FedBuff step
    trains ``schedule.buffer`` clients)."""
    key = (cfg.strategy.name, cfg.privacy.mode)
    schedule = cfg.schedule
    if schedule.mode != "sync":
        return (*key, schedule.mode)
    return (*key, "deadline") if schedule.deadline_s or schedule.over_select else key


def measure(task: Task, workdir: Path) -> Calibration:
    """Run ``task``'s config for 3 rounds (evaluating in the third) in ``workdir``; raises
    CalibrationError when the run fails."""
    config = workdir / "calibration.toml"
    config.write_text(task.config.to_toml(), encoding="utf-8")
    run_dir = workdir / "run"
    command = [
        sys.executable, "-m", "fedlora.cli", "run", str(config), "--out", str(run_dir), "--overwrite",
        "--set", "federation.rounds=3", "--set", "federation.evaluate_every=3",
    ]  # fmt: skip
    log = workdir / "calibration.log"
    started = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.call(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=DIE_WITH_PARENT,
        )
    wall = time.monotonic() - started
    rows = read_rounds(run_dir) if (run_dir / "rounds.jsonl").is_file() else []
    if code != 0 or len(rows) != 3:
        lines = [x for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        raise CalibrationError(
            f"the calibration run of '{task.label}' failed (exit {code}): "
            f"{(lines or ['no output'])[-1][:300]}"
        )
    train = float(rows[1]["wall_s"])
    evaluation = max(0.0, float(rows[2]["wall_s"]) - train)
    return Calibration(overhead_s=max(0.0, wall - 3 * train - evaluation), train_s=train, eval_s=evaluation)


@dataclass(frozen=True)
class Estimate:
    """The calibrations by cost key, and the expected seconds of every run still to do."""

    calibrations: dict[tuple[str, ...], Calibration]
    seconds: dict[str, float]
    """Task key -> expected wall seconds."""
    jobs: int

    @property
    def total_s(self) -> float:
        """Expected wall seconds of the whole grid (runs spread over ``jobs`` slots)."""
        return sum(self.seconds.values()) / self.jobs

    def per_key(self, tasks: list[Task]) -> list[tuple[tuple[str, ...], int, Calibration, float]]:
        """Per cost key: (key, its number of runs among ``tasks``, its calibration, their expected
        minutes in total)."""
        rows = []
        for key, cal in self.calibrations.items():
            keys = [t.key for t in tasks if cost_key(t.config) == key]
            rows.append((key, len(keys), cal, sum(self.seconds[k] for k in keys) / 60))
        return rows


def estimate(
    tasks: list[Task],
    jobs: int = 1,
    *,
    on_calibration: Callable[[Task], None] | None = None,
    on_measured: Callable[[Task, Calibration], None] | None = None,
    measure_with: Callable[[Task, Path], Calibration] | None = None,
) -> Estimate:
    """Calibrate one run per cost key of ``tasks`` (in a temporary directory; ``measure_with`` defaults
    to :func:`measure`) and estimate them all."""
    calibrations: dict[tuple[str, ...], Calibration] = {}
    for task in tasks:
        key = cost_key(task.config)
        if key in calibrations:
            continue
        if on_calibration is not None:
            on_calibration(task)
        with tempfile.TemporaryDirectory(prefix="fedlora-estimate-") as workdir:
            calibrations[key] = (measure_with or measure)(task, Path(workdir))
        if on_measured is not None:
            on_measured(task, calibrations[key])
    seconds = {t.key: calibrations[cost_key(t.config)].run_seconds(t.config) for t in tasks}
    return Estimate(calibrations, seconds, max(1, jobs))
