"""``fedlora run`` (a simulation with live progress) and the commands around one experiment: ``data``,
``config``, ``strategies``, ``generate``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedlora.cli.common import fail, markup
from fedlora.core.config import ConfigError
from fedlora.core.records.rundir import RunDirError, read_summary
from fedlora.run.failure import failure_message


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
    from fedlora.run.launch import prepare_run

    overrides = list(set_ or [])
    for key, value in (
        ("federation.num_clients", clients),
        ("federation.rounds", rounds),
        ("strategy.name", strategy),
        ("seed", seed),
    ):
        if value is not None:
            overrides.append(f"{key}={value}" if not isinstance(value, str) else f'{key}="{value}"')
    if resume is not None:
        given = [name for name, v in (("EXPERIMENT", experiment), ("--out", out)) if v is not None]
        given += ["--set or a shortcut"] if overrides else []
        given += ["--overwrite"] if overwrite else []
        if given:
            fail(f"--resume takes everything from RUN_DIR/config.toml; drop {', '.join(given)}")
    try:
        cfg, run_dir = prepare_run(
            experiment, overrides, out=out, overwrite=overwrite, resume=resume, ray_address=ray_address
        )
    except (ConfigError, RunDirError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        return
    _simulate_with_progress(cfg, run_dir, verbose=verbose, resume=resume is not None)


class RoundStatus:
    """In a terminal, one transient line below the round lines: what the run is doing (the phase of the
    current round, with its clients replied out of sent) and the seconds since the round began, counting;
    in a pipe or a log file, nothing."""

    def __init__(self, console: Any, rounds: int) -> None:
        # start-up: imported when a run starts, so `fedlora --help` stays fast
        from rich.progress import Progress, TextColumn

        self.rounds = rounds
        columns = (TextColumn("{task.description}"), TextColumn("[dim]elapsed {task.elapsed:.0f} s[/]"))
        self.live = Progress(*columns, console=console, transient=True) if console.is_terminal else None
        self.task: Any = None

    def __enter__(self) -> RoundStatus:
        if self.live is not None:
            self.live.start()
            self.task = self.live.add_task("setting up the run", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def show(self, event: Any) -> None:
        """Show a :class:`fedlora.run.progress.RoundProgress`; a round's (new) training restarts the clock."""
        # start-up: imported when a run starts, so `fedlora --help` stays fast
        from fedlora.run.progress import progress_line

        if self.live is None:
            return
        if event.phase == "train" and event.replied == 0:
            self.live.reset(self.task)
        self.live.update(self.task, description=progress_line(event, self.rounds, elapsed=False))

    def round_done(self, server_round: int) -> None:
        """After a round's line: the next round is being prepared, or the run directory written."""
        if self.live is None:
            return
        last = server_round >= self.rounds
        what = "writing the adapter and the summary" if last else f"round {server_round + 1} starting"
        self.live.reset(self.task, description=what)


def _simulate_with_progress(cfg: Any, run_dir: Any, *, verbose: bool, resume: bool = False) -> None:
    """Run the simulation, printing its start, every round (and the zero-shot round 0), a live line in a
    terminal, and its summary; exit 130 when interrupted, 1 when it failed."""
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from rich.console import Console

    from fedlora.run.progress import Listener, round_line, start_line, summary_line
    from fedlora.run.simulation import simulate

    console = Console()
    fed = cfg.federation
    console.print(start_line(cfg, run_dir.path, markup), soft_wrap=True)

    try:
        console.print("[dim]starting Ray and the clients (about 10 s)...[/]")
        with RoundStatus(console, fed.rounds) as status:

            def show(row: dict[str, Any]) -> None:
                console.print(round_line(row, fed.rounds, markup), soft_wrap=True)
                status.round_done(row["round"])

            listener = Listener(on_round=show, on_progress=status.show, on_zero_shot=show)
            simulate(cfg, run_dir, listener, verbose=verbose, resume=resume)
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
        fail(failure_message(exc, run_dir), code=1)
    if not run_dir.summary_path.is_file():
        fail(f"the run ended without a summary; see {run_dir.rounds_path} (rerun with --verbose)", code=1)
    console.print(summary_line(read_summary(run_dir.path), run_dir.path, markup), soft_wrap=True)


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
    """Show the split a run would use and write a PNG of label shares per client.

    Per client its examples and label histogram, then the test set.
    """
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.report.splits import plot_label_shares, split_table
    from fedlora.run.experiment import check_data, load_experiment
    from fedlora.run.launch import default_experiment
    from fedlora.run.progress import data_line

    overrides = list(set_ or []) + ([f"federation.num_clients={clients}"] if clients is not None else [])
    try:
        cfg, splits = check_data(load_experiment(default_experiment(experiment), overrides))
    except ConfigError as exc:
        fail(str(exc))
        return
    data = cfg.data
    typer.echo(
        f"{cfg.name}: {data_line(data)}, {splits.num_clients} clients, seed {cfg.seed}, "
        f"test set {'data.test_path' if data.test_path else 'held out'} ({len(splits.test)} examples)"
    )
    typer.echo(split_table(splits, data))
    path = plot_label_shares(
        splits, png or Path("runs") / f"{cfg.name}-data.png", f"{cfg.name}: label shares per client"
    )
    typer.echo(f"wrote {path}")


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
        fail(str(exc))


def strategies() -> None:
    """List the aggregation strategies with a one-line description and the DP modes each allows."""
    from strategies import registry  # start-up: the registry imports every strategy (torch)

    for name, cls in registry.available().items():
        modes = registry.dp_modes(name)
        typer.echo(f"{name:<12} {cls.description}  [{', '.join(modes)}]")


def tasks() -> None:
    """List the tasks (``task``: what a model learns from the examples) with a one-line description."""
    from fedlora.tasks import registry  # start-up: the registry imports every task (torch, transformers)

    for name, cls in registry.available().items():
        typer.echo(f"{name:<16} {cls.description}")


def privacy() -> None:
    """List the privacy mechanisms (``privacy.mode``) with a one-line description."""
    from fedlora.privacy.mechanisms import registry  # start-up: imports torch and Opacus

    for mode, mechanism in registry.available().items():
        typer.echo(f"{mode:<12} {(mechanism.__doc__ or '').strip().splitlines()[0]}")


def generate(
    run_dir: Annotated[Path, typer.Argument(help="a finished causal-lm run directory")],
    prompt: Annotated[str, typer.Argument(help="the text to answer (filled into the run's data.template)")],
    max_new_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 16,
    raw: Annotated[bool, typer.Option(help="send PROMPT as it is, without the run's data.template")] = False,
) -> None:
    """Print the fine-tuned model's answer to PROMPT (greedy decoding; causal-lm runs)."""
    if max_new_tokens < 1:
        fail(f"--max-new-tokens {max_new_tokens} is invalid: expected an integer >= 1")
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.generate import generate as answer

    try:
        typer.echo(answer(run_dir, prompt, max_new_tokens=max_new_tokens, raw=raw))
    except (ConfigError, FileNotFoundError) as exc:
        fail(str(exc))
