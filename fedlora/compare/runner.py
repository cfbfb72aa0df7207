"""Run a comparison grid: one ``fedlora run`` process per (cell, seed), resumable and interruptible.

Layout of a comparison directory::

    comparison.json          the grid's cells, seeds and target (what `fedlora report` reads)
    configs/<cell>/seed-N.toml   each run's fully resolved experiment
    runs/<cell>/seed-N/      each run's directory (config.toml, rounds.jsonl, summary.json, adapter/)
    logs/<cell>/seed-N.log   each run's console output
    comparison.csv, comparison.md, *.png, report.html

A run with a ``summary.json`` and the same resolved config is finished and skipped on a re-run; an
unfinished one continues from its last checkpointed round (``fedlora run --resume``), or starts
again if it never finished a round. Runs are separate processes, ``jobs`` at a time, each attached to a
Ray head of the comparison (:mod:`fedlora.compare.ray_head`, one per job slot) or starting its own Ray;
the Ray address is where a run executes, not what it computes, so it is left out when configs are
compared. The first SIGINT/SIGTERM stops the runs gracefully, a second stops every process by PID at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedlora.compare.grid import Grid, Setting, Task
from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.records.rundir import RunDirectory, RunDirError, atomic_write, read_rounds
from fedlora.report import tuning
from fedlora.report.results import is_finished, write_json
from fedlora.run.processes import DIE_WITH_PARENT, ProcessTracker

POLL_S = 0.2


@dataclass(frozen=True)
class Event:
    """Progress reported to the caller: a run started, finished, failed, was skipped or interrupted."""

    kind: str
    task: Task
    seconds: float = 0.0
    detail: str = ""


class Source(Protocol):
    """Where the runs to start come from: a fixed list (:class:`Queue`) or a search that asks for trials as
    slots free up and stops weak ones early (:class:`fedlora.compare.tuner.Tuner`)."""

    def take(self) -> Task | None:
        """The next run to start now (None: none now)."""

    def exhausted(self) -> bool:
        """No run will come any more (once the running ones end)."""

    def watch(self, task: Task, run_dir: Path) -> bool:
        """Called while ``task`` runs: True to stop it early (SIGTERM; it ends as ``pruned``)."""

    def ended(self, event: Event) -> None:
        """A run ended (finished, failed, pruned or interrupted)."""


class Queue:
    """A fixed list of runs, in order."""

    def __init__(self, tasks: list[Task]) -> None:
        self.tasks = list(tasks)

    def take(self) -> Task | None:
        return self.tasks.pop(0) if self.tasks else None

    def exhausted(self) -> bool:
        return not self.tasks

    def watch(self, task: Task, run_dir: Path) -> bool:
        return False

    def ended(self, event: Event) -> None:
        return None


@dataclass
class Comparison:
    """Paths of one comparison directory."""

    root: Path

    def run_dir(self, task: Task) -> Path:
        return self.root / "runs" / task.key

    def config_file(self, task: Task) -> Path:
        return self.root / "configs" / f"{task.key}.toml"

    def log_file(self, task: Task) -> Path:
        return self.root / "logs" / f"{task.key}.log"


def plan(tasks: list[Task], root: Path) -> tuple[list[Task], list[Task]]:
    """Split tasks into (to run, already finished); refuse finished runs made with another config."""
    where = Comparison(root)
    todo, done, clashes = [], [], []
    for task in tasks:
        run_dir = where.run_dir(task)
        if not is_finished(run_dir):
            todo.append(task)
        elif _same_config(run_dir, task):
            done.append(task)
        else:
            clashes.append(task.key)
    if clashes:
        raise ConfigError(
            f"{len(clashes)} finished run(s) in '{root}' used a different config (e.g. {clashes[0]}); "
            "pass --overwrite to start the comparison again, or --out DIR to keep both"
        )
    return todo, done


def comparable(cfg: ExperimentConfig) -> dict[str, Any]:
    """What decides a run's results: the config without ``federation.ray_address`` (where it ran)."""
    data = cfg.to_dict()
    data.get("federation", {}).pop("ray_address", None)
    return data


def resolved_config(run_dir: Path) -> dict[str, Any] | None:
    """What decides the results of the run in ``run_dir``, from its ``config.toml`` (keys added to fedlora
    since the run was made count at their defaults); None when it cannot be read."""
    try:
        written = ExperimentConfig.from_toml((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (ConfigError, OSError):
        return None
    return comparable(written)


def _same_config(run_dir: Path, task: Task) -> bool:
    """Whether the run's ``config.toml`` resolves to the task's config (so upgrading fedlora does not
    invalidate finished runs)."""
    return resolved_config(run_dir) == comparable(task.config)


def choose_settings(grid: Grid, tasks: list[Task], root: Path) -> dict[str, Setting]:
    """Per cell whose tuning runs (``tasks`` with a setting) have all finished, the setting with the best
    mean validation accuracy over them (:func:`fedlora.report.tuning.choose`, as the report chooses)."""
    where = Comparison(root)
    chosen = {}
    for cell in grid.cells:
        mine = [t for t in tasks if t.cell == cell and t.setting is not None]
        if not mine or not all(is_finished(where.run_dir(t)) for t in mine):
            continue
        scores: dict[str, list[float]] = {s.label: [] for s in grid.settings}
        for task in mine:
            score = tuning.validation_accuracy(read_rounds(where.run_dir(task)))
            if score is not None and task.setting is not None:
                scores[task.setting.label].append(score)
        label = tuning.choose(scores)
        if label is not None:
            chosen[cell.label] = next(s for s in grid.settings if s.label == label)
    return chosen


def prepare(grid: Grid, tasks: list[Task], root: Path) -> None:
    """Write the manifest and every run's resolved config (runs themselves write nothing yet)."""
    root.mkdir(parents=True, exist_ok=True)
    write_json(grid.manifest(), root / "comparison.json")
    for task in tasks:
        prepare_config(task, root)


def prepare_config(task: Task, root: Path) -> None:
    """Write ``task``'s resolved config where its run reads it (``configs/<key>.toml``)."""
    path = Comparison(root).config_file(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, task.config.to_toml())


def resumable(run_dir: Path, task: Task) -> bool:
    """An unfinished run with a checkpoint of the same config continues from its last round."""
    try:
        config = RunDirectory(run_dir).resumable_config()
    except (RunDirError, ConfigError, OSError):
        return False
    return comparable(config) == comparable(task.config)


def _command(task: Task, where: Comparison, verbose: bool, ray_address: str = "") -> list[str]:
    """``fedlora run --resume`` for a run interrupted after a round, else a fresh ``fedlora run``;
    with ``ray_address`` attached to that Ray head."""
    command = [sys.executable, "-m", "fedlora.cli", "run"]
    run_dir = where.run_dir(task)
    if resumable(run_dir, task):
        command += ["--resume", str(run_dir)]
    else:
        command += [str(where.config_file(task)), "--out", str(run_dir), "--overwrite"]
    if ray_address:
        command += ["--ray-address", ray_address]
    return command + (["--verbose"] if verbose else [])


def run_environment(jobs: int) -> dict[str, str]:
    """The environment of a run this comparison starts. With ``jobs`` > 1 the runs share the machine's
    cores, so OpenMP threads sleep as soon as they wait (``OMP_WAIT_POLICY=PASSIVE``, unless set
    already): GNU OpenMP's default spinning lets waiting threads take the cores from working ones
    (two trainings of two threads on two cores: 2.8x faster with it; one alone: 1.36x slower, hence
    only with ``jobs`` > 1; ``benchmarks/omp_wait.py``)."""
    env = {**os.environ, "COLUMNS": "160"}
    if jobs > 1:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _start(
    task: Task, where: Comparison, verbose: bool, ray_address: str = "", jobs: int = 1
) -> tuple[subprocess.Popen[bytes], Any]:
    log_path = where.log_file(task)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")  # a resumed run adds to its log
    command = _command(task, where, verbose, ray_address)
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C reaches only us; we forward one SIGTERM
        preexec_fn=DIE_WITH_PARENT,
        env=run_environment(jobs),
    )
    return proc, log


def _last_error(log: Path) -> str:
    """The run log's last line that mentions an error, else its last line (a failed run's reason)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:  # deleted or unreadable while the comparison ran: report, do not stop it
        return f"its log {log} cannot be read ({exc.strerror or exc})"
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1].strip()[:300]


class Stopper:
    """SIGINT/SIGTERM handling for the runner: the first asks runs to stop, the second kills them."""

    def __init__(self, tracker: ProcessTracker, running: Callable[[], list[subprocess.Popen[bytes]]]):
        self.requested = False
        self._tracker = tracker
        self._running = running

    def __call__(self, signum: int, frame: object) -> None:
        if not self.requested:
            self.requested = True
            os.write(2, b"stopping the running comparisons (send the signal again to force)\n")
            for proc in self._running():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            return
        self._tracker.sample()
        self._tracker.kill_now()
        os._exit(130)


def execute(
    tasks: list[Task] | Source,
    root: Path,
    on_event: Callable[[Event], None],
    *,
    jobs: int = 1,
    verbose: bool = False,
    ray_addresses: list[str] | None = None,
) -> bool:
    """Run ``tasks`` (a list, or a :class:`Source` of them), ``jobs`` at a time; returns False if
    interrupted. Failures are reported, not raised; a run the source stops early ends as ``pruned``.

    With ``ray_addresses`` (at least ``jobs`` of them) each running run attaches to a Ray head of its
    own: a head is lent to one run at a time, so runs never compete for one cluster's CPUs.
    """
    where = Comparison(root)
    source = Queue(tasks) if isinstance(tasks, list) else tasks
    free = list(ray_addresses or [])
    wanted = min(jobs, len(tasks)) if isinstance(tasks, list) else jobs
    if ray_addresses is not None and len(free) < wanted:
        raise ValueError(f"{len(free)} Ray heads for {jobs} runs at a time; start one per job")
    running: dict[int, tuple[Task, subprocess.Popen[bytes], Any, float, str]] = {}
    pruning: set[int] = set()
    in_main = threading.current_thread() is threading.main_thread()
    with ProcessTracker() as tracker:
        stopper = Stopper(tracker, lambda: [p for _, p, _, _, _ in running.values()])
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if in_main:
            for sig in previous:
                signal.signal(sig, stopper)
        try:
            while not source.exhausted() or running:
                while len(running) < jobs and not stopper.requested:
                    task = source.take()
                    if task is None:
                        break
                    address = free.pop(0) if free else ""
                    proc, log = _start(task, where, verbose, address, jobs)
                    running[proc.pid] = (task, proc, log, time.monotonic(), address)
                    on_event(Event("started", task))
                for pid, (task, proc, log, started, address) in list(running.items()):
                    if proc.poll() is None:
                        if pid not in pruning and source.watch(task, where.run_dir(task)):
                            pruning.add(pid)
                            with contextlib.suppress(ProcessLookupError):
                                proc.send_signal(signal.SIGTERM)
                        continue
                    log.close()
                    del running[pid]
                    if address:
                        free.append(address)
                    event = _outcome(task, proc.returncode, time.monotonic() - started, where)
                    if pid in pruning and event.kind == "interrupted":
                        event = Event("pruned", task, event.seconds)
                    source.ended(event)
                    on_event(event)
                if stopper.requested and not running:
                    break
                time.sleep(POLL_S)
        finally:
            if in_main:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    return not stopper.requested


def _outcome(task: Task, code: int, seconds: float, where: Comparison) -> Event:
    if code == 0 and is_finished(where.run_dir(task)):
        return Event("finished", task, seconds)
    if code in (130, -signal.SIGTERM, -signal.SIGINT):
        return Event("interrupted", task, seconds)
    return Event("failed", task, seconds, f"exit {code}: {_last_error(where.log_file(task))}")
