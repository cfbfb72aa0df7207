"""The ``fedlora`` command line: parse, call the library, print. Heavy imports happen lazily."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

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
    overwrite: Annotated[bool, typer.Option(help="replace an existing run directory")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="continue RUN_DIR after its last finished round (its config.toml is used)"),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's own logs")] = False,
) -> None:
    """Fine-tune with LoRA across simulated clients and write a run directory."""
    from fedlora.config import ConfigError, load_config
    from fedlora.records import RunDirectory, RunDirError

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
            _fail(f"--resume takes everything from RUN_DIR/config.toml; drop {', '.join(given)}")
    if experiment is None and DEFAULT_EXPERIMENT.is_file():
        experiment = DEFAULT_EXPERIMENT
    try:
        if resume is not None:
            run_dir = RunDirectory(resume)
            cfg = run_dir.resumable_config()
        else:
            cfg = load_config(experiment, overrides)
        _check_model(cfg.model.path)
        _check_data(cfg)
        _check_privacy(cfg)
        if resume is None:
            run_dir = RunDirectory(out or Path("runs") / cfg.name)
            run_dir.create(cfg, overwrite=overwrite)
    except (ConfigError, RunDirError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    _simulate_with_progress(cfg, run_dir, verbose=verbose, resume=resume is not None)


def _check_data(cfg: Any) -> None:
    """Splits that cannot be made (an empty client, too few tweets), before anything is written."""
    from fedlora.data import get_splits

    get_splits(cfg.data, cfg.federation.num_clients, cfg.seed)


def _check_privacy(cfg: Any) -> None:
    """Privacy settings that depend on the data (delta against client sizes) or the budget."""
    if not cfg.privacy.enabled:
        return
    from fedlora.data import get_splits
    from fedlora.privacy import check

    splits = get_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
    check(cfg, [len(splits.client_train(i)) for i in range(cfg.federation.num_clients)])


def _check_model(path: str) -> None:
    from fedlora.models import model_dir

    model_dir(path)


def _simulate_with_progress(cfg: Any, run_dir: Any, *, verbose: bool, resume: bool = False) -> None:
    from rich.console import Console

    from fedlora.simulation import simulate

    console = Console()
    fed = cfg.federation
    console.print(
        f"[bold]fedlora[/] {cfg.name}: strategy [cyan]{cfg.strategy.name}[/], {fed.num_clients} clients "
        f"({fed.clients_per_round()} per round), {fed.rounds} rounds, partitioner {cfg.data.partitioner} "
        f"-> {run_dir.path}",
        soft_wrap=True,
    )

    def on_round(row: dict[str, Any]) -> None:
        console.print(
            f"round {row['round']:>3}/{fed.rounds}  clients {row['num_clients']:>3}  "
            f"train_loss {row['train_loss']:.4f}  eval_loss {row['eval_loss']:.4f}  "
            f"eval_acc [bold]{100 * row['eval_accuracy']:.2f}%[/]  "
            f"up {row['uplink_bytes'] / 1e6:.2f} MB  down {row['downlink_bytes'] / 1e6:.2f} MB  "
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
    except Exception as exc:  # one line for the user; the cause in full with --verbose
        cause = exc.__cause__ or exc
        _fail(
            f"the run failed: {type(cause).__name__}: {cause} (finished rounds are kept; continue with "
            f"--resume {run_dir.path} once fixed, or rerun with --verbose for details)",
            code=1,
        )
    if run_dir.summary_path.is_file():
        from fedlora.records import read_summary

        s = read_summary(run_dir.path)
        console.print(
            f"[green]done[/] in {s['wall_s']:.1f} s: "
            f"final eval_accuracy {100 * s['final_eval_accuracy']:.2f}% "
            f"(best {100 * s['best_eval_accuracy']:.2f}% in round {s['best_round']}; "
            f"majority class {100 * s['majority_accuracy']:.2f}%) -> {run_dir.path}",
            soft_wrap=True,
        )
    else:
        _fail(f"the run ended without a summary; see {run_dir.rounds_path} (rerun with --verbose)", code=1)


def _fault_progress(row: dict[str, Any]) -> str:
    """Failed and rejected clients, and retries, in a progress line (empty when all went well)."""
    parts = [f"{row[k]} {k[4:]}" for k in ("num_failed", "num_rejected") if row.get(k)]
    if row.get("attempts", 1) > 1:
        parts.append(f"attempt {row['attempts']}")
    return f"  [yellow]{', '.join(parts)}[/]" if parts else ""


def _privacy_progress(row: dict[str, Any]) -> str:
    """The privacy part of a progress line (empty when DP is off)."""
    if "epsilon" not in row:
        return ""
    declined = f"  declined {int(row['num_declined'])}" if row.get("num_declined") else ""
    return f"  [magenta]eps {row['epsilon']:.2f}[/] (delta {row['delta']:g}){declined}"


@app.command("config")
def show_config(
    experiment: Annotated[
        Path | None, typer.Argument(help="experiment TOML file (default: built-in defaults)")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: section.key=value")] = None,
) -> None:
    """Print the fully resolved experiment as TOML (what a run would write to config.toml)."""
    from fedlora.config import ConfigError, load_config

    try:
        typer.echo(load_config(experiment, list(set_ or [])).to_toml(), nl=False)
    except ConfigError as exc:
        _fail(str(exc))


@app.command()
def strategies() -> None:
    """List the aggregation strategies with a one-line description (and which allow dp-updates)."""
    from strategies.registry import available

    for name, cls in available().items():
        dp = "  [dp-sgd, dp-updates]" if cls.linear_aggregate else "  [dp-sgd]"
        typer.echo(f"{name:<12} {cls.description}{dp}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
