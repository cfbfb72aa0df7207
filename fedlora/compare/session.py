"""``fedlora compare`` from a grid file to a report: what to run, the tuning phase, one phase of runs on
Ray heads of the comparison's own, and the report at the end. The CLI sequences these and prints.

A comparison has one phase of runs, or two with ``compare.tune_seeds``: every setting of every cell at
the tuning seeds, then each cell's chosen setting (best mean validation accuracy) at the other seeds.
Every run of both phases is checked before the first one starts.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.compare.grid import Grid, Setting, Task, load_grid
from fedlora.compare.ray_head import RayHead, worker_ports
from fedlora.compare.runner import (
    Comparison,
    Event,
    Source,
    choose_settings,
    comparable,
    execute,
    plan,
    prepare,
    resolved_config,
)
from fedlora.compare.seeds import Progress, progress
from fedlora.compare.tuner import RESULTS as TUNING_RESULTS
from fedlora.compare.tuner import Tuner
from fedlora.core.config import ConfigError
from fedlora.core.records.rundir import atomic_write, read_rounds, read_summary
from fedlora.report.results import is_finished
from fedlora.report.tuning import validation_accuracy
from fedlora.report.writer import STOPPING, collect, write_report
from fedlora.run.experiment import preflight


@dataclass(frozen=True)
class Plan:
    """A comparison before it runs: its grid, directory, this phase's runs, and those after tuning."""

    grid: Grid
    extra: list[str]
    """``--set`` overrides applied to every run."""
    root: Path
    tasks: list[Task]
    todo: list[Task]
    done: list[Task]
    later: list[Task]
    """With ``compare.tune_seeds``: the runs after tuning (each cell's first setting standing in for
    the chosen one until the tuning runs have finished)."""

    @property
    def on_a_cluster(self) -> bool:
        """Whether the grid (or ``--set``) names a Ray cluster for its runs."""
        return any(t.config.federation.ray_address for t in self.tasks)


def plan_comparison(
    grid_file: Path,
    extra: list[str],
    *,
    out: Path | None = None,
    seeds: list[int] | None = None,
    overwrite: bool = False,
) -> Plan:
    """Load and check the grid and every run (``seeds`` replaces the grid's), delete the comparison
    directory first with ``overwrite``, and split the runs into finished and to do. Raises ConfigError,
    FileNotFoundError or ValueError with one line; nothing is written before every run is checked."""
    grid = load_grid(grid_file)
    if seeds is not None:
        grid = with_seeds(grid, seeds)
    if grid.search is not None:  # the trials' extreme values and the seeds' runs, checked now
        checked([*grid.trial_checks(extra), *grid.all_tasks(extra)])
    tasks = checked(grid.tasks(extra))
    root = out or Path("runs") / grid.name
    if overwrite and root.exists():
        if any(root.iterdir()) and not (root / "comparison.json").is_file():
            raise ConfigError(
                f"'{root}' is not a comparison directory; refusing to delete it with --overwrite"
            )
        shutil.rmtree(root)
    todo, done = plan(tasks, root)
    return Plan(grid, extra, root, tasks, todo, done, after_tuning(grid, extra, tasks, root))


def with_seeds(grid: Grid, seeds: list[int]) -> Grid:
    """``grid`` run at ``seeds``; its tuning seeds become those of them it tuned on (or the first); a
    search keeps its tuning seed."""
    if grid.search is not None:
        return dataclasses.replace(grid, seeds=seeds)
    tune_seeds = [s for s in grid.tune_seeds if s in seeds] or seeds[:1]
    return dataclasses.replace(grid, seeds=seeds, tune_seeds=tune_seeds if grid.tune_seeds else [])


def search_budget(grid: Grid, extra: list[str]) -> list[Task]:
    """The most trials a search can run (every cell's budget of trials, none pruned), each at the first
    extreme of the ranges: what ``--estimate`` and ``--dry-run`` count before the search starts."""
    if grid.search is None:
        return []
    return [
        grid.trial(c, n, grid.search_of(c).extremes()[0], extra)
        for c in grid.cells
        for n in range(grid.search.budget.trials)
    ]


def start_search(comparison: Plan) -> Tuner:
    """The search of every cell (``compare.tune`` with ranges), resumed from ``tuning/journal.log``; the
    manifest is written first (``fedlora report`` reads it)."""
    prepare(comparison.grid, [], comparison.root)
    return Tuner(comparison.grid, comparison.extra, comparison.root)


def after_search(comparison: Plan, tuner: Tuner) -> tuple[Plan, dict[str, Setting]]:
    """Once the search has ended: each cell's chosen values (written to ``tuning.json``), and the
    comparison of the chosen values at every seed, checked. The best trial is that seed's run when it
    ran at a compared seed with the same config (copied, not run again)."""
    grid, root = comparison.grid, comparison.root
    chosen = tuner.choices()
    if missing := [c.label for c in grid.cells if c.label not in chosen]:
        raise ConfigError(
            f"no trial of {', '.join(missing)} finished (see {root / 'logs'}); the comparison cannot go on"
        )
    tasks = checked(grid.tasks(comparison.extra, chosen))
    for task in tasks:
        trial = root / "runs" / task.cell.slug / "tuning" / f"trial-{tuner.best[task.cell.label]}"
        target = Comparison(root).run_dir(task)
        reusable = task.seed == grid.tune_seeds[0] and is_finished(trial) and not target.exists()
        if reusable and resolved_config(trial) == comparable(task.config):
            shutil.copytree(trial, target, symlinks=True)
    todo, done = plan(tasks, root)
    prepare(grid, tasks, root)
    return dataclasses.replace(comparison, tasks=tasks, todo=todo, done=done, later=[]), chosen


def checked(tasks: list[Task]) -> list[Task]:
    """The tasks with every distinct config checked once, as each run's own `fedlora run` will; the runs
    write the resolved config (absolute paths, labels), so finished runs are compared with that."""
    resolved = {
        text: preflight(config, simulation=True)
        for text, config in {t.config.to_toml(): t.config for t in tasks}.items()
    }
    return [dataclasses.replace(t, config=resolved[t.config.to_toml()]) for t in tasks]


def after_tuning(grid: Grid, extra: list[str], tasks: list[Task], root: Path) -> list[Task]:
    """With ``compare.tune_seeds``: the runs still to do after tuning (each cell's chosen setting at the
    other seeds), all checked now; until the tuning runs finish, each cell's first setting stands in."""
    if not grid.tune_seeds or grid.search is not None:  # a search's later runs: search_budget, all_tasks
        return []
    chosen = choose_settings(grid, tasks, root)
    if len(chosen) == len(grid.cells):
        return plan([t for t in checked(grid.tasks(extra, chosen)) if t not in tasks], root)[0]
    return [t for t in checked(grid.all_tasks(extra)) if t not in tasks]


def tuned(comparison: Plan) -> tuple[dict[str, Setting], list[Task], list[Task]]:
    """Once the tuning runs have finished: each cell's chosen setting, and the runs of the chosen settings
    at the other seeds (to do, finished), their configs written."""
    grid, root = comparison.grid, comparison.root
    chosen = choose_settings(grid, comparison.tasks, root)
    rest = [t for t in checked(grid.tasks(comparison.extra, chosen)) if t not in comparison.tasks]
    todo, done = plan(rest, root)
    prepare(grid, [*comparison.tasks, *rest], root)
    return chosen, todo, done


def seed_progress(comparison: Plan, seeds: list[int], *, elapsed_s: float, jobs: int = 1) -> Progress:
    """With ``compare.stop``: whether another seed is needed after ``seeds`` (all run), from the finished
    runs; written to ``stopping.json`` (the report says why the comparison stopped). One seed is taken to
    cost the wall time of the last seed's runs spread over ``jobs``."""
    grid, root = comparison.grid, comparison.root
    if grid.stop is None:
        raise ValueError("seed_progress needs a grid with compare.stop")
    try:
        found = collect([root])
    except ConfigError:  # no run finished (all failed): another seed would fail the same way
        return Progress(seeds, [], 0, None, "no run finished")
    seed_s = sum(r.wall_s for r in found.results if r.seed == seeds[-1]) / max(1, jobs)
    found_progress = progress(found, grid.stop, seeds, elapsed_s=elapsed_s, seed_s=seed_s)
    atomic_write(root / STOPPING, json.dumps(found_progress.manifest(), indent=2) + "\n")
    return found_progress


def seed_phase(comparison: Plan, chosen: dict[str, Setting], seeds: list[int]) -> tuple[Plan, list[Task]]:
    """The comparison grown to ``seeds`` (its manifest rewritten), and the runs of the last of them (each
    cell's chosen setting when tuned), checked and split into to do and finished."""
    grid = with_seeds(comparison.grid, seeds)
    new = [t for t in checked(grid.tasks(comparison.extra, chosen or None)) if t.seed == seeds[-1]]
    todo, done = plan(new, comparison.root)
    prepare(grid, new, comparison.root)
    grown = dataclasses.replace(comparison, grid=grid, tasks=[*comparison.tasks, *new], todo=todo, done=done)
    return grown, new


def shape(grid: Grid) -> str:
    """``6 cells x 2 tuning settings x 5 seeds`` (with ``tune_seeds``: the tuning seeds only)."""
    seeds = grid.seeds if grid.search is not None else (grid.tune_seeds or grid.seeds)
    tuning = f"{len(grid.settings)} tuning settings x " if grid.settings else ""
    return f"{len(grid.cells)} cells x {tuning}{len(seeds)} seed{'s' * (len(seeds) > 1)}"


def run_phase(
    todo: list[Task] | Source,
    root: Path,
    on_event: Callable[[Event], None],
    *,
    jobs: int = 1,
    verbose: bool = False,
    shared_ray: bool = False,
    on_heads: Callable[[list[str], float], None] | None = None,
) -> bool:
    """Run ``todo``, ``jobs`` at a time; returns False if interrupted. With ``shared_ray`` one local Ray
    head per job slot serves the whole phase (``on_heads(addresses, seconds to start them)``), and every
    head is stopped on the way out, whatever happens. Raises RayHeadError when a head does not start."""
    heads: list[RayHead] = []
    try:
        addresses = None
        if shared_ray:
            started = time.monotonic()
            addresses = start_heads(heads, root, min(jobs, len(todo)) if isinstance(todo, list) else jobs)
            if heads and on_heads is not None:
                on_heads(addresses, time.monotonic() - started)
        return execute(todo, root, on_event, jobs=jobs, verbose=verbose, ray_addresses=addresses)
    except KeyboardInterrupt:  # while a head was starting: no run has started yet
        return False
    finally:
        for head in heads:
            head.stop()


def start_heads(heads: list[RayHead], root: Path, count: int) -> list[str]:
    """Start ``count`` local Ray heads (one per job slot), appending each to ``heads`` as it starts, so
    that the caller stops every one, even after an interruption; returns their addresses."""
    for i in range(count):
        log = root / "logs" / (f"ray-head-{i}.log" if count > 1 else "ray-head.log")
        head = RayHead(log, worker_ports=worker_ports(i))
        heads.append(head)
        head.start()
    return [h.address for h in heads]


@dataclass
class Tally:
    """A phase's finished and failed runs as they end, and the time it still needs."""

    total: int
    completed: int
    durations: list[float] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def count(self, event: Event) -> None:
        """Count a run that ended (finished, failed or pruned; an interrupted one will run again)."""
        if event.kind == "finished":
            self.durations.append(event.seconds)
        elif event.kind == "failed":
            self.failed.append(name(event.task))
        if event.kind in ("finished", "failed", "pruned"):
            self.completed += 1

    def minutes_left(self, jobs: int) -> int | None:
        """Whole minutes the remaining runs should take (at least 1), from the mean duration of the runs
        finished so far; None before the first one finishes or when none remain."""
        remaining = self.total - self.completed
        if not remaining or not self.durations:
            return None
        seconds = sum(self.durations) / len(self.durations) * remaining / jobs
        return max(1, round(seconds / 60))


def name(task: Task) -> str:
    """A run as progress lines name it: ``cell label (seed N)``."""
    return f"{task.label} (seed {task.seed})"


def final_accuracy(root: Path, task: Task) -> float:
    """A finished run's final test accuracy (a fraction)."""
    return float(read_summary(Comparison(root).run_dir(task))["final_eval_accuracy"])


def outcome(root: Path, task: Task) -> str:
    """What a finished run's progress line says: a trial's validation accuracy (what it is chosen on),
    else the final test accuracy."""
    run_dir = Comparison(root).run_dir(task)
    if task.trial is not None:
        value = validation_accuracy(read_rounds(run_dir))
        return "no client validation" if value is None else f"validation accuracy {100 * value:.1f}%"
    summary = read_summary(run_dir)
    if summary.get("accuracy_of") == "personalised":
        return f"final personalised accuracy {100 * float(summary['final_accuracy']):.1f}%"
    return f"final accuracy {100 * final_accuracy(root, task):.1f}%"


def search_results(root: Path) -> list[dict[str, Any]]:
    """``tuning.json``'s cells: chosen values, validation accuracy, edge flags, every trial."""
    path = root / TUNING_RESULTS
    return list(json.loads(path.read_text(encoding="utf-8"))["cells"]) if path.is_file() else []


def write_comparison_report(root: Path, command: str) -> dict[str, Path] | None:
    """Tables, plots and report.html of the runs finished so far (None: none has finished yet)."""
    try:
        found = collect([root])
    except ConfigError:
        return None
    return write_report(found, root, command=command)
