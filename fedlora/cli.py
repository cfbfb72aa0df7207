"""The ``fedlora`` command line: parse, call the library, print. Heavy imports happen lazily."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedlora.core.config import ConfigError, apply_overrides, from_dict
from fedlora.core.records.rundir import RunDirectory, RunDirError, read_summary
from fedlora.run.failure import failure_message

app = typer.Typer(
    help="Federated LoRA fine-tuning of pretrained transformers, simulated on Flower and Ray.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_EXPERIMENT = Path("sims/quickstart.toml")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def run(
    experiment: Annotated[
        Path | None, typer.Argument(help="experiment TOML file (default: sims/quickstart.toml)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key: section.key=value (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run directory (default: runs/<name>)")] = None,
    clients: Annotated[int | None, typer.Option(help="shortcut for --set federation.num_clients=N")] = None,
    rounds: Annotated[int | None, typer.Option(help="shortcut for --set federation.rounds=N")] = None,
    strategy: Annotated[str | None, typer.Option(help="shortcut for --set strategy.name=NAME")] = None,
    seed: Annotated[int | None, typer.Option(help="shortcut for --set seed=N")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="attach to a running Ray cluster (HOST:PORT of its head); allowed with --resume"),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue RUN_DIR after its last finished round (its config.toml is used)"),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's own logs")] = False,
) -> None:
    """Fine-tune with LoRA across simulated clients and write a run directory."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.experiment import load_experiment, preflight

    overrides = list(set_ or [])
    for key, value in (
        ("federation.num_clients", clients),
        ("federation.rounds", rounds),
        ("strategy.name", strategy),
        ("seed", seed),
    ):
        if value is not None:
            overrides.append(f"{key}={value}" if not isinstance(value, str) else f'{key}="{value}"')
    if ray_address is not None and resume is None:
        overrides.append(f'federation.ray_address="{ray_address}"')
    if resume is not None:
        given = [name for name, v in (("EXPERIMENT", experiment), ("--out", out)) if v is not None]
        given += ["--set or a shortcut"] if overrides else []
        given += ["--overwrite"] if overwrite else []
        if given:
            _fail(f"--resume takes everything from RUN_DIR/config.toml; drop {', '.join(given)}")
    if experiment is None and DEFAULT_EXPERIMENT.is_file():
        experiment = DEFAULT_EXPERIMENT
    try:
        if resume is not None:
            run_dir = RunDirectory(resume)
            cfg = run_dir.resumable_config()
            if ray_address is not None:  # where the rest runs, not what it computes: allowed on resume
                attach = [f'federation.ray_address="{ray_address}"']
                cfg = from_dict(apply_overrides(cfg.to_dict(), attach))
        else:
            cfg = load_experiment(experiment, overrides)
        cfg = preflight(cfg, simulation=True)  # every check before the run directory is touched
        # start-up: Ray and Flower's simulation take seconds to import; a bad experiment fails first
        from fedlora.run.simulation import check_ray_address

        check_ray_address(cfg.federation.ray_address)
        if resume is None:
            run_dir = RunDirectory(out or Path("runs") / cfg.name)
            run_dir.create(cfg, overwrite=overwrite)
    except (ConfigError, RunDirError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    _simulate_with_progress(cfg, run_dir, verbose=verbose, resume=resume is not None)


def _simulate_with_progress(cfg: Any, run_dir: Any, *, verbose: bool, resume: bool = False) -> None:
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from rich.console import Console

    from fedlora.run.simulation import simulate

    console = Console()
    fed = cfg.federation
    console.print(
        f"[bold]fedlora[/] {cfg.name}: strategy [cyan]{cfg.strategy.name}[/], {fed.num_clients} clients "
        f"({fed.clients_per_round()} per round), {fed.rounds} rounds, {_data_line(cfg.data)} "
        f"-> {run_dir.path}",
        soft_wrap=True,
    )

    def on_round(row: dict[str, Any]) -> None:
        console.print(
            f"round {row['round']:>3}/{fed.rounds}  clients {row['num_clients']:>3}  "
            f"train_loss {row['train_loss']:.4f}  "
            + _eval_progress(row)
            + f"up {row['uplink_bytes'] / 1e6:.2f} MB  down {row['downlink_bytes'] / 1e6:.2f} MB  "
            f"{row['wall_s']:.1f} s" + _privacy_progress(row) + _fault_progress(row),
            soft_wrap=True,
        )

    try:
        console.print("[dim]starting Ray and the clients (about 10 s)...[/]")
        simulate(cfg, run_dir, on_round, verbose=verbose, resume=resume)
    except KeyboardInterrupt:
        # simulate() has stopped Ray and every process it started; Flower's ServerApp thread may still
        # wait for replies that will never come, so leave without joining it.
        console.print(
            f"[yellow]interrupted[/]: Ray stopped; finished rounds are in {run_dir.rounds_path} "
            f"(continue with: fedlora run --resume {run_dir.path})",
            soft_wrap=True,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except Exception as exc:  # one line for the user: the cause, and --resume only if a round finished
        _fail(failure_message(exc, run_dir), code=1)
    if run_dir.summary_path.is_file():
        s = read_summary(run_dir.path)
        zero = s.get("zero_shot")
        console.print(
            f"[green]done[/] in {s['wall_s']:.1f} s: "
            f"final eval_accuracy {_pct(s['final_eval_accuracy'])} "
            f"(best {_pct(s['best_eval_accuracy'])} in round {s['best_round']}; "
            f"majority class {_pct(s['majority_accuracy'])}"
            + (f"; zero-shot {_pct(zero['eval_accuracy'])}" if zero else "")
            + f"), final macro-F1 {_pct(s['final_eval_macro_f1'])} "
            f"(majority class {_pct(s['majority_macro_f1'])})"
            + (f", perplexity {s['final_eval_perplexity']:.3f}" if s.get("final_eval_perplexity") else "")
            + f" -> {run_dir.path}",
            soft_wrap=True,
        )
    else:
        _fail(f"the run ended without a summary; see {run_dir.rounds_path} (rerun with --verbose)", code=1)


def _pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals; 'n/a' for a missing (null or nan) one."""
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:.2f}%"


def _data_line(data: Any) -> str:
    """The data part of the start line: source, partitioner, number of classes."""
    source = "the tweets" if data.tweets else Path(data.source).name
    split = f"natural by {data.partition_by}" if data.partitioner == "natural" else data.partitioner
    return f"{source} ({len(data.labels)} labels), partitioner {split}"


def _fault_progress(row: dict[str, Any]) -> str:
    """Failed and rejected clients, and retries, in a progress line (empty when all went well)."""
    parts = [f"{row[k]} {k[4:]}" for k in ("num_failed", "num_rejected") if row.get(k)]
    if row.get("attempts", 1) > 1:
        parts.append(f"attempt {row['attempts']}")
    return f"  [yellow]{', '.join(parts)}[/]" if parts else ""


def _eval_progress(row: dict[str, Any]) -> str:
    """The test-set part of a round's progress line ("not evaluated" between evaluation rounds; "n/a"
    for an accuracy a causal-LM task with free-text responses does not have)."""
    if row.get("eval_loss") is None:
        return "[dim]not evaluated (federation.evaluate_every)[/]  "
    return (
        f"eval_loss {row['eval_loss']:.4f}  eval_acc [bold]{_pct(row['eval_accuracy'])}[/]  "
        f"macro_f1 {_pct(row['eval_macro_f1'])}  "
        + (f"ppl {row['eval_perplexity']:.3f}  " if row.get("eval_perplexity") is not None else "")
    )


def _privacy_progress(row: dict[str, Any]) -> str:
    """The privacy part of a progress line (empty when DP is off)."""
    if "epsilon" not in row:
        return ""
    declined = f"  declined {int(row['num_declined'])}" if row.get("num_declined") else ""
    return f"  [magenta]eps {row['epsilon']:.2f}[/] (delta {row['delta']:g}){declined}"


@app.command()
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
            help="start one local Ray head per job slot for the whole grid and attach every run to it, "
            "or let every run start and stop its own Ray (default: a head left behind when the "
            "comparison is SIGKILLed was seen once)",
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
    from fedlora.compare.grid import load_grid
    from fedlora.compare.runner import choose_settings, plan, prepare

    try:
        grid = load_grid(grid_file)
        if seeds is not None:
            chosen_seeds = _seed_list(seeds)
            tune_seeds = [s for s in grid.tune_seeds if s in chosen_seeds] or chosen_seeds[:1]
            grid = dataclasses.replace(
                grid, seeds=chosen_seeds, tune_seeds=tune_seeds if grid.tune_seeds else []
            )
        extra = list(set_ or [])
        tasks = _checked(grid.tasks(extra))
        root = out or Path("runs") / grid.name
        if overwrite and root.exists():
            if any(root.iterdir()) and not (root / "comparison.json").is_file():
                raise ConfigError(
                    f"'{root}' is not a comparison directory; refusing to delete it with --overwrite"
                )
            shutil.rmtree(root)
        todo, done = plan(tasks, root)
        later = _after_tuning(grid, extra, tasks, root)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    if dry_run:
        for task in tasks:
            typer.echo(f"{'done' if task in done else 'todo'}  {task.label:<40} seed {task.seed}")
        if later:
            typer.echo(f"then {len(later)} run(s) of each cell's chosen setting at the other seeds")
        return
    if estimate:
        _print_estimate(grid, [*todo, *later], len(done), jobs)
        return
    # a grid (or --set) that names a Ray cluster runs there; otherwise the comparison brings its own
    shared = shared_ray and not any(t.config.federation.ray_address for t in tasks)
    prepare(grid, tasks, root)
    _compare_with_progress(grid, todo, done, root, jobs=jobs, verbose=verbose, shared_ray=shared)
    if grid.tune_seeds:  # the tuning runs have finished (else the call above exits): the chosen ones next
        chosen = choose_settings(grid, tasks, root)
        typer.echo(
            f"tuned on seed(s) {', '.join(map(str, grid.tune_seeds))}: "
            + "; ".join(f"{cell} -> {setting.label}" for cell, setting in chosen.items())
        )
        rest = [t for t in _checked(grid.tasks(extra, chosen)) if t not in tasks]
        todo, done = plan(rest, root)
        prepare(grid, [*tasks, *rest], root)
        what = f"{len(chosen)} cells x their chosen setting x {len(grid.after_tuning_seeds)} other seeds"
        _compare_with_progress(
            grid, todo, done, root, jobs=jobs, verbose=verbose, shared_ray=shared, what=what
        )


def _after_tuning(grid: Any, extra: list[str], tasks: list[Any], root: Path) -> list[Any]:
    """With ``compare.tune_seeds``: the runs still to do after tuning (each cell's chosen setting at the
    other seeds), all checked now; until the tuning runs finish, each cell's first setting stands in."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.compare.runner import choose_settings, plan

    if not grid.tune_seeds:
        return []
    chosen = choose_settings(grid, tasks, root)
    if len(chosen) == len(grid.cells):
        return plan([t for t in _checked(grid.tasks(extra, chosen)) if t not in tasks], root)[0]
    return [t for t in _checked(grid.all_tasks(extra)) if t not in tasks]


def _checked(tasks: list[Any]) -> list[Any]:
    """The tasks with every distinct config checked once, as each run's own `fedlora run` will; the runs
    write the resolved config (absolute paths, labels), so finished runs are compared with that."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.experiment import preflight

    resolved = {
        text: preflight(config, simulation=True)
        for text, config in {t.config.to_toml(): t.config for t in tasks}.items()
    }
    return [dataclasses.replace(t, config=resolved[t.config.to_toml()]) for t in tasks]


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
        typer.echo(
            f"calibrating {cost_key(task.config)[0]} / privacy {cost_key(task.config)[1]}: 3 rounds of "
            f"'{task.label}' seed {task.seed}..."
        )

    def measured(task: Any, cal: Any) -> None:
        typer.echo(
            f"  start-up {cal.overhead_s:.1f} s, training {cal.train_s:.1f} s per round, "
            f"evaluation {cal.eval_s:.1f} s per evaluated round (load average now {os.getloadavg()[0]:.2f})"
        )

    try:
        result = estimate_grid(todo, jobs, on_calibration=announce, on_measured=measured)
    except CalibrationError as exc:
        _fail(str(exc), code=1)
        return
    typer.echo(
        f"\n{'strategy / privacy':<28} {'runs':>5} {'start-up s':>11} {'train s/round':>14} "
        f"{'eval s/eval':>12} {'expected min':>13}"
    )
    for key, cal in result.calibrations.items():
        keys = [t.key for t in todo if cost_key(t.config) == key]
        minutes = sum(result.seconds[k] for k in keys) / 60
        typer.echo(
            f"{' / '.join(key):<28} {len(keys):>5} {cal.overhead_s:>11.1f} {cal.train_s:>14.1f} "
            f"{cal.eval_s:>12.1f} {minutes:>13.1f}"
        )
    typer.echo(
        f"\n{grid.name}: {len(todo)} runs to do ({done} finished), {jobs} at a time: expected about "
        f"{result.total_s / 60:.0f} min of wall time (calibration took {time.monotonic() - started:.0f} s; "
        f"load average {load:.2f} before it, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs)"
    )


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds '{text}' is invalid: expected integers separated by commas, e.g. 0,1,2"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds '{text}' is invalid: list at least one seed, each once")
    return seeds


def _shape(grid: Any) -> str:
    """``6 cells x 2 tuning settings x 5 seeds`` (with ``tune_seeds``: the tuning seeds only)."""
    seeds = grid.tune_seeds or grid.seeds
    tuning = f"{len(grid.settings)} tuning settings x " if grid.settings else ""
    return f"{len(grid.cells)} cells x {tuning}{len(seeds)} seed{'s' * (len(seeds) > 1)}"


def _compare_with_progress(
    grid: Any,
    todo: list[Any],
    done: list[Any],
    root: Path,
    *,
    jobs: int,
    verbose: bool,
    shared_ray: bool,
    what: str = "",
) -> None:
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedlora.compare.ray_head import RayHeadError
    from fedlora.compare.runner import Event, execute

    console = Console()
    total = len(todo) + len(done)
    console.print(
        f"[bold]fedlora compare[/] {grid.name}: {what or _shape(grid)} = "
        f"{total} runs, {len(done)} already finished, {jobs} at a time -> {root}",
        soft_wrap=True,
    )
    durations: list[float] = []
    failed: list[str] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[left]}"), console=console, transient=False) as progress:
        bar = progress.add_task("runs", total=total, completed=len(done), left="")

        def on_event(event: Event) -> None:
            name = f"{event.task.label} (seed {event.task.seed})"
            if event.kind == "started":
                progress.update(bar, description=f"running {name}")
                return
            if event.kind == "finished":
                durations.append(event.seconds)
                progress.advance(bar)
                console.print(
                    f"[green]done[/] {name} in {event.seconds:.0f} s{_final_accuracy(root, event.task)}"
                )
            elif event.kind == "failed":
                failed.append(name)
                progress.advance(bar)
                console.print(
                    f"[red]failed[/] {name}: {event.detail} (log: {root / 'logs' / event.task.key}.log)"
                )
            else:
                console.print(f"[yellow]interrupted[/] {name}; it will start again on the next run")
            remaining = total - int(progress.tasks[0].completed)
            if not remaining:
                progress.update(bar, description="all runs finished", left="")
            elif durations:
                left = sum(durations) / len(durations) * remaining / jobs
                progress.update(bar, left=f"about {max(1, round(left / 60))} min left")

        heads: list[Any] = []
        try:
            addresses = _start_heads(console, heads, root, min(jobs, len(todo))) if shared_ray else None
            finished = execute(todo, root, on_event, jobs=jobs, verbose=verbose, ray_addresses=addresses)
        except RayHeadError as exc:
            _fail(f"{exc} (or pass --ray-per-run)", code=1)
        except KeyboardInterrupt:  # while the head was starting: no run has started yet
            finished = False
        finally:
            for head in heads:
                head.stop()
    _write_comparison_report(console, root)
    if not finished:
        console.print(f"[yellow]interrupted[/]: re-run the same command to resume ({root})")
        raise typer.Exit(130)
    if failed:
        _fail(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix and re-run to resume", code=1)


def _start_heads(console: Any, heads: list[Any], root: Path, count: int) -> list[str]:
    """Start ``count`` local Ray heads (one per job slot), appending each to ``heads`` as it starts, so
    that the caller stops every one, even after an interruption; returns their addresses."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.compare.ray_head import RayHead, worker_ports

    started = time.monotonic()
    for i in range(count):
        log = root / "logs" / (f"ray-head-{i}.log" if count > 1 else "ray-head.log")
        head = RayHead(log, worker_ports=worker_ports(i))
        heads.append(head)
        head.start()
    if heads:
        where = ", ".join(h.address for h in heads)
        console.print(
            f"[dim]Ray: {len(heads)} local head(s) for the whole grid at {where} "
            f"(started in {time.monotonic() - started:.1f} s); every run attaches to one[/]",
            soft_wrap=True,
        )
    return [h.address for h in heads]


def _final_accuracy(root: Path, task: Any) -> str:
    summary = read_summary(root / "runs" / task.key)
    return f": final accuracy {100 * summary['final_eval_accuracy']:.1f}%"


def _write_comparison_report(console: Any, root: Path) -> None:
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.report.writer import collect, write_report

    try:
        found = collect([root])
    except ConfigError:
        return  # nothing finished yet
    files = write_report(found, root, command=" ".join(["fedlora", *sys.argv[1:]]))
    console.print(f"report: {files['html']}  table: {files['markdown']}  data: {files['csv']}")


@app.command()
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
        _fail(f"--target {target} is invalid: expected a fraction in (0, 1], e.g. 0.6")
    try:
        found = collect(dirs, target, baseline)
    except ConfigError as exc:
        _fail(str(exc))
        return
    default = dirs[0] if len(dirs) == 1 and (dirs[0] / MANIFEST).is_file() else Path("report")
    files = write_report(found, out or default, command=" ".join(["fedlora", *sys.argv[1:]]))
    typer.echo(files["markdown"].read_text(encoding="utf-8"))
    for unfinished in found.unfinished:
        typer.secho(f"left out (not finished): {unfinished}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {', '.join(str(p) for p in files.values())}")


@app.command("data")
def show_data(
    experiment: Annotated[
        Path | None, typer.Argument(help="experiment TOML file (default: sims/quickstart.toml)")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value")] = None,
    clients: Annotated[int | None, typer.Option(help="shortcut for --set federation.num_clients=N")] = None,
    png: Annotated[
        Path | None,
        typer.Option(help="where to write the plot of label shares (default: runs/<name>-data.png)"),
    ] = None,
) -> None:
    """Show the split a run would use: per client its examples and label histogram, the test set; and
    write a PNG of label shares per client."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.report.splits import plot_label_shares, split_table
    from fedlora.run.experiment import check_data, load_experiment

    overrides = list(set_ or []) + ([f"federation.num_clients={clients}"] if clients is not None else [])
    if experiment is None and DEFAULT_EXPERIMENT.is_file():
        experiment = DEFAULT_EXPERIMENT
    try:
        cfg, splits = check_data(load_experiment(experiment, overrides))
    except ConfigError as exc:
        _fail(str(exc))
        return
    data = cfg.data
    typer.echo(
        f"{cfg.name}: {_data_line(data)}, {splits.num_clients} clients, seed {cfg.seed}, "
        f"test set {'data.test_path' if data.test_path else 'held out'} ({len(splits.test)} examples)"
    )
    typer.echo(split_table(splits, data))
    path = plot_label_shares(
        splits, png or Path("runs") / f"{cfg.name}-data.png", f"{cfg.name}: label shares per client"
    )
    typer.echo(f"wrote {path}")


@app.command("config")
def show_config(
    experiment: Annotated[
        Path | None, typer.Argument(help="experiment TOML file (default: built-in defaults)")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value")] = None,
) -> None:
    """Print the fully resolved experiment as TOML (what a run would write to config.toml)."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.experiment import load_experiment

    try:
        typer.echo(load_experiment(experiment, list(set_ or [])).to_toml(), nl=False)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def strategies() -> None:
    """List the aggregation strategies with a one-line description and the DP modes each allows."""
    from strategies import registry  # start-up: the registry imports every strategy (torch)

    for name, cls in registry.available().items():
        modes = [m for m in registry.privacy_modes(name) if m != "none"]
        typer.echo(f"{name:<12} {cls.description}  [{', '.join(modes)}]")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="a finished causal-lm run directory")],
    prompt: Annotated[str, typer.Argument(help="the text to answer (filled into the run's data.template)")],
    max_new_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 16,
    raw: Annotated[bool, typer.Option(help="send PROMPT as it is, without the run's data.template")] = False,
) -> None:
    """Print the fine-tuned model's answer to PROMPT (greedy decoding; causal-lm runs)."""
    if max_new_tokens < 1:
        _fail(f"--max-new-tokens {max_new_tokens} is invalid: expected an integer >= 1")
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.generate import generate as answer

    try:
        typer.echo(answer(run_dir, prompt, max_new_tokens=max_new_tokens, raw=raw))
    except (ConfigError, FileNotFoundError) as exc:
        _fail(str(exc))


models_app = typer.Typer(help="Prepare offline base models (see docs/llm.md).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("convert-smollm2")
def convert_smollm2(
    out: Annotated[
        Path | None,
        typer.Option(help="folder to write (default: where model.path = 'smollm2' looks)"),
    ] = None,
) -> None:
    """Convert the packaged SmolLM2-135M-Instruct GGUF (4-bit) into a safetensors folder, once."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.core.model.convert import convert_smollm2 as convert

    try:
        folder, done = convert(out)
    except FileNotFoundError as exc:
        _fail(str(exc))
    what = "converted (weights dequantised from 4-bit) into" if done else "already converted:"
    typer.echo(f"{what} {folder}")


deploy_app = typer.Typer(
    help="Run the same ClientApp on real SuperNodes (TLS, authenticated nodes); see docs/deploy.md.",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("local")
def deploy_local(
    nodes: Annotated[
        int | None, typer.Option(help="SuperNodes to start, one partition each (default 3)")
    ] = None,
    directory: Annotated[
        Path, typer.Option("--dir", help="certificates, keys, FLWR_HOME and logs go here")
    ] = Path(".deploy"),
    federation: Annotated[str, typer.Option(help="name of the SuperLink connection in FLWR_HOME")] = (
        "fedlora-local"
    ),
    data: Annotated[
        list[Path] | None,
        typer.Option(help="a node's own labelled file (repeat, one per node; the node reads only it)"),
    ] = None,
    experiment: Annotated[
        Path | None,
        typer.Option(help="experiment to check first (the --data files against its labels) and to print"),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key of --experiment")] = None,
) -> None:
    """Bring up a SuperLink (TLS, node authentication) and N SuperNodes on loopback until Ctrl-C."""
    files = tuple(data or ())
    count = nodes if nodes is not None else (len(files) or 3)
    if count < 1:
        _fail(f"--nodes {count} is invalid: expected an integer >= 1")
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.deploy import DeployError, check_data_paths, serve
    from fedlora.run.experiment import check_node_files, load_experiment, preflight

    overrides = tuple(set_ or ())
    try:
        files = check_data_paths(files, count)
        if experiment is not None:  # every check before any process starts
            cfg = load_experiment(experiment, [*overrides, f"federation.num_clients={count}"])
            check_node_files(preflight(cfg), files)
    except (DeployError, ConfigError) as exc:
        _fail(str(exc))
    try:
        serve(
            directory,
            count,
            federation,
            echo=typer.echo,
            data_paths=files,
            experiment=experiment,
            overrides=overrides,
        )
    except DeployError as exc:
        _fail(str(exc), code=1)


@deploy_app.command("keygen")
def deploy_keygen(
    key: Annotated[
        Path, typer.Argument(help="where to write this node's private key (KEY.pub gets the public key)")
    ] = Path("deploy/keys/supernode"),
    comment: Annotated[str, typer.Option(help="a name for the key, shown in the operator's list")] = (
        "supernode"
    ),
) -> None:
    """On a data owner's machine: make this SuperNode's key pair; print only the public key.

    The private key (OpenSSH ECDSA P-384, mode 0600) stays at KEY and never leaves this machine; send
    the printed line (also in KEY.pub) to the operator, who registers it with `flwr supernode register`.
    """
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.deploy import DeployError, make_node_key

    try:
        public = make_node_key(key, comment)
    except DeployError as exc:
        _fail(str(exc))
    typer.echo(public)
    typer.echo(f"private key: {key} (stays here); public key: {key}.pub (send it to the operator)", err=True)


@deploy_app.command("health")
def deploy_health(
    address: Annotated[str, typer.Option(help="the --health-server-address of a SuperLink or SuperNode")] = (
        "127.0.0.1:8081"
    ),
) -> None:
    """Exit 0 if the Flower process at ADDRESS reports SERVING, else 1 (the image's HEALTHCHECK)."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.deploy import healthy

    if not healthy(address):
        _fail(f"no healthy Flower process answers at {address}", code=1)
    typer.echo(f"{address}: serving")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
