"""``fedlora compare`` (a grid of runs with a progress bar, estimate, dry run) and ``fedlora report``."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedlora.cli.common import fail
from fedlora.core.config import ConfigError


def compare(
    grid_file: Annotated[
        Path, typer.Argument(help="grid TOML file with a [compare] table (see sims/compare_*.toml)")
    ],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key in every run: section.key=value")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="comparison directory (default: runs/<grid name>)")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="runs at the same time")] = 1,
    shared_ray: Annotated[
        bool,
        typer.Option(
            "--shared-ray/--ray-per-run",
            help="start one local Ray head per job slot for the whole grid and attach every run to it "
            "(the heads stop with the comparison), or let every run start and stop its own Ray",
        ),
    ] = False,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds, replacing the grid's")] = None,
    overwrite: Annotated[bool, typer.Option(help="delete the comparison directory and start again")] = False,
    dry_run: Annotated[bool, typer.Option(help="list the runs and exit")] = False,
    estimate: Annotated[
        bool,
        typer.Option(
            help="time a 3-round calibration run per (strategy, privacy mode), print the grid's expected "
            "wall time and exit (writes nothing but temporary files)"
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option(help="pass --verbose to every run (logs in DIR/logs/)")] = False,
) -> None:
    """Run every cell of a grid at every seed, then write tables, plots and report.html.

    Finished runs are skipped, so re-running an interrupted comparison resumes it.
    """
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.compare import session
    from fedlora.compare.runner import prepare

    started = time.monotonic()
    try:
        chosen_seeds = _seed_list(seeds) if seeds is not None else None
        plan = session.plan_comparison(
            grid_file, list(set_ or []), out=out, seeds=chosen_seeds, overwrite=overwrite
        )
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        return
    trials = session.search_budget(plan.grid, plan.extra)
    chosen_later = plan.grid.all_tasks(plan.extra) if trials else []
    if dry_run:
        if trials:
            typer.echo(
                f"a search per cell first: at most {len(trials)} trials in all at seed "
                f"{plan.grid.tune_seeds[0]} (fewer run to the end: successive halving stops weak ones), "
                f"then {len(chosen_later)} runs of each cell's chosen values at seeds "
                + ", ".join(map(str, plan.grid.seeds))
            )
        for task in plan.tasks:
            typer.echo(f"{'done' if task in plan.done else 'todo'}  {task.label:<40} seed {task.seed}")
        if plan.later:
            typer.echo(f"then {len(plan.later)} run(s) of each cell's chosen setting at the other seeds")
        return
    if estimate:
        _print_estimate(plan.grid, [*trials, *chosen_later, *plan.todo, *plan.later], len(plan.done), jobs)
        return
    # a grid (or --set) that names a Ray cluster runs there; otherwise the comparison brings its own
    shared = shared_ray and not plan.on_a_cluster
    grid, root = plan.grid, plan.root
    chosen: dict[str, Any] = {}
    if grid.search is not None:
        plan, chosen = _search_with_progress(plan, len(trials), jobs=jobs, verbose=verbose, shared_ray=shared)
    prepare(grid, plan.tasks, root)
    _compare_with_progress(grid, plan.todo, plan.done, root, jobs=jobs, verbose=verbose, shared_ray=shared)
    if grid.tune_seeds and grid.search is None:  # the listed settings' tuning runs have finished (else the
        # call above exits): the chosen ones next
        chosen, todo, done = session.tuned(plan)
        typer.echo(
            f"tuned on seed(s) {', '.join(map(str, grid.tune_seeds))}: "
            + "; ".join(f"{cell} -> {setting.label}" for cell, setting in chosen.items())
        )
        what = f"{len(chosen)} cells x their chosen setting x {len(grid.after_tuning_seeds)} other seeds"
        _compare_with_progress(
            grid, todo, done, root, jobs=jobs, verbose=verbose, shared_ray=shared, what=what
        )
    if grid.stop is not None:
        _seeds_until_clear(plan, chosen, started, jobs=jobs, verbose=verbose, shared_ray=shared)


def _search_with_progress(
    plan: Any, most: int, *, jobs: int, verbose: bool, shared_ray: bool
) -> tuple[Any, dict[str, Any]]:
    """Every cell's search (``compare.tune`` with ranges), then each cell's choice printed with its edge
    flags; returns the comparison of the chosen values at every seed, and the choices."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.compare import session

    tuner = session.start_search(plan)
    what = f"search of {len(plan.grid.cells)} cells, at most {most} trials"
    _compare_with_progress(
        plan.grid, tuner, [None] * tuner.trials_ended(), plan.root, jobs=jobs, verbose=verbose,
        shared_ray=shared_ray, what=what, total=most,
    )  # fmt: skip
    try:
        plan, chosen = session.after_search(plan, tuner)
    except ConfigError as exc:
        fail(str(exc), code=1)
    found = {c["cell"]: c for c in session.search_results(plan.root)}
    for cell, setting in chosen.items():
        edges = found.get(cell, {}).get("edges") or []
        flag = f"  [on the edge: {'; '.join(edges)}]" if edges else ""
        typer.echo(f"tuned {cell} -> {setting.label} (validation {100 * found[cell]['value']:.1f}%){flag}")
    return plan, chosen


def _seeds_until_clear(
    plan: Any, chosen: dict[str, Any], started: float, *, jobs: int, verbose: bool, shared_ray: bool
) -> None:
    """``compare.stop``: one more seed in every cell while some comparison is undecided (and the rule's
    seeds and minutes allow), each with its progress bar and report."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.compare import session

    seeds = list(plan.grid.seeds)
    while True:
        found = session.seed_progress(plan, seeds, elapsed_s=time.monotonic() - started, jobs=jobs)
        if found.next_seed is None:
            typer.echo(f"stopped after {len(seeds)} seeds: {found.reason}")
            session.write_comparison_report(plan.root, command=" ".join(["fedlora", *sys.argv[1:]]))
            return
        typer.echo(f"{found.reason}: adding seed {found.next_seed}")
        seeds.append(found.next_seed)
        plan, new = session.seed_phase(plan, chosen, seeds)
        what = f"{len(new)} cells x seed {found.next_seed}"
        _compare_with_progress(
            plan.grid, plan.todo, plan.done, plan.root, jobs=jobs, verbose=verbose, shared_ray=shared_ray,
            what=what,
        )  # fmt: skip


def _print_estimate(grid: Any, todo: list[Any], done: int, jobs: int) -> None:
    """Calibrate, then print the expected wall time of the runs still to do (``compare --estimate``)."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.compare.estimate import CalibrationError, cost_key
    from fedlora.compare.estimate import estimate as estimate_grid

    if not todo:
        typer.echo(f"{grid.name}: all {done} runs are finished; nothing to estimate")
        return
    started = time.monotonic()
    load = os.getloadavg()[0]

    def announce(task: Any) -> None:
        strategy, privacy, *schedule = cost_key(task.config)
        typer.echo(
            f"calibrating {strategy} / privacy {privacy}{''.join(f' / {s}' for s in schedule)}: "
            f"3 rounds of '{task.label}' seed {task.seed}..."
        )

    def measured(task: Any, cal: Any) -> None:
        typer.echo(
            f"  start-up {cal.overhead_s:.1f} s, training {cal.train_s:.1f} s per round, "
            f"evaluation {cal.eval_s:.1f} s per evaluated round (load average now {os.getloadavg()[0]:.2f})"
        )

    try:
        result = estimate_grid(todo, jobs, on_calibration=announce, on_measured=measured)
    except CalibrationError as exc:
        fail(str(exc), code=1)
        return
    typer.echo(
        f"\n{'strategy / privacy':<28} {'runs':>5} {'start-up s':>11} {'train s/round':>14} "
        f"{'eval s/eval':>12} {'expected min':>13}"
    )
    for key, runs, cal, minutes in result.per_key(todo):
        typer.echo(
            f"{' / '.join(key):<28} {runs:>5} {cal.overhead_s:>11.1f} {cal.train_s:>14.1f} "
            f"{cal.eval_s:>12.1f} {minutes:>13.1f}"
        )
    if grid.stop is not None:
        first = [t for t in todo if t.trial is None and t.seed == grid.seeds[0]]
        per_seed = sum(result.seconds[t.key] for t in first) / max(1, jobs) / 60
        more = grid.stop.max_seeds - len(grid.seeds)
        typer.echo(
            f"\nthen, until every comparison is decided: about {per_seed:.0f} min per added seed, at most "
            f"{more} more seeds ({more * per_seed:.0f} min)"
            + (f", and no seed past {grid.stop.max_minutes:g} min in all" if grid.stop.max_minutes else "")
        )
    typer.echo(
        f"\n{grid.name}: {len(todo)} runs to do ({done} finished), {jobs} at a time: expected about "
        f"{result.total_s / 60:.0f} min of wall time (calibration took {time.monotonic() - started:.0f} s; "
        f"load average {load:.2f} before it, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs)"
    )


def _seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list of distinct integers (ConfigError naming the option otherwise)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds '{text}' is invalid: expected integers separated by commas, e.g. 0,1,2"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds '{text}' is invalid: list at least one seed, each once")
    return seeds


def _compare_with_progress(
    grid: Any,
    todo: Any,
    done: list[Any],
    root: Path,
    *,
    jobs: int,
    verbose: bool,
    shared_ray: bool,
    what: str = "",
    total: int | None = None,
) -> None:
    """One phase of a comparison with a progress bar, a line per run that ends, and the report after."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedlora.compare import session
    from fedlora.compare.ray_head import RayHeadError
    from fedlora.compare.runner import Event

    console = Console()
    tally = session.Tally(total=len(todo) + len(done) if total is None else total, completed=len(done))
    console.print(
        f"[bold]fedlora compare[/] {grid.name}: {what or session.shape(grid)} = "
        f"{tally.total} runs, {len(done)} already finished, {jobs} at a time -> {root}",
        soft_wrap=True,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[left]}"), console=console, transient=False) as progress:
        bar = progress.add_task("runs", total=tally.total, completed=len(done), left="")

        def on_event(event: Event) -> None:
            name = escape(session.name(event.task))  # a tuned run's label has [brackets]
            if event.kind == "started":
                progress.update(bar, description=f"running {name}")
                return
            tally.count(event)
            if event.kind == "finished":
                progress.advance(bar)
                console.print(
                    f"[green]done[/] {name} in {event.seconds:.0f} s: {session.outcome(root, event.task)}"
                )
            elif event.kind == "pruned":
                progress.advance(bar)
                console.print(f"[dim]pruned[/] {name} after {event.seconds:.0f} s (successive halving)")
            elif event.kind == "failed":
                progress.advance(bar)
                console.print(
                    f"[red]failed[/] {name}: {event.detail} (log: {root / 'logs' / event.task.key}.log)"
                )
            else:
                console.print(f"[yellow]interrupted[/] {name}; it will start again on the next run")
            minutes = tally.minutes_left(jobs)
            if tally.completed == tally.total:
                progress.update(bar, description="all runs finished", left="")
            elif minutes is not None:
                progress.update(bar, left=f"about {minutes} min left")

        def on_heads(addresses: list[str], seconds: float) -> None:
            console.print(
                f"[dim]Ray: {len(addresses)} local head(s) for the whole grid at {', '.join(addresses)} "
                f"(started in {seconds:.1f} s); every run attaches to one[/]",
                soft_wrap=True,
            )

        try:
            finished = session.run_phase(
                todo, root, on_event, jobs=jobs, verbose=verbose, shared_ray=shared_ray, on_heads=on_heads
            )
        except RayHeadError as exc:
            fail(f"{exc} (or pass --ray-per-run)", code=1)
    files = session.write_comparison_report(root, command=" ".join(["fedlora", *sys.argv[1:]]))
    if files is not None:
        console.print(f"report: {files['html']}  table: {files['markdown']}  data: {files['csv']}")
    if not finished:
        console.print(f"[yellow]interrupted[/]: re-run the same command to resume ({root})")
        raise typer.Exit(130)
    if tally.failed:
        fail(
            f"{len(tally.failed)} run(s) failed: {', '.join(tally.failed)}; fix and re-run to resume", code=1
        )


def report(
    dirs: Annotated[
        list[Path], typer.Argument(help="run or comparison directories (or folders holding them)")
    ],
    out: Annotated[
        Path | None, typer.Option(help="where to write (default: the comparison directory, or ./report)")
    ] = None,
    target: Annotated[
        float | None,
        typer.Option(help="accuracy (0-1) for the rounds-to-target column (default: the grid's, or 0.6)"),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="cell label the others are compared with per seed (default: the grid's, or the first)"
        ),
    ] = None,
) -> None:
    """Rebuild tables and plots from existing runs, without running anything."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.report.writer import MANIFEST, collect, write_report

    if target is not None and not 0 < target <= 1:
        fail(f"--target {target} is invalid: expected a fraction in (0, 1], e.g. 0.6")
    try:
        found = collect(dirs, target, baseline)
    except ConfigError as exc:
        fail(str(exc))
        return
    default = dirs[0] if len(dirs) == 1 and (dirs[0] / MANIFEST).is_file() else Path("report")
    files = write_report(found, out or default, command=" ".join(["fedlora", *sys.argv[1:]]))
    typer.echo(files["markdown"].read_text(encoding="utf-8"))
    for unfinished in found.unfinished:
        typer.secho(f"left out (not finished): {unfinished}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {', '.join(str(p) for p in files.values())}")
