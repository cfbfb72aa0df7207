"""``fedlora deploy`` (SuperNodes on loopback, a SuperNode with its warm trainer, a node's key pair, health
checks, the federation's status) and ``fedlora models``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlora.cli.common import fail
from fedlora.core.config import ConfigError

models_app = typer.Typer(help="Prepare offline base models (see docs/llm.md).", no_args_is_help=True)


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
        fail(str(exc))
    what = "converted (weights dequantised from 4-bit) into" if done else "already converted:"
    typer.echo(f"{what} {folder}")


deploy_app = typer.Typer(
    help="Run the same ClientApp on real SuperNodes (TLS, authenticated nodes); see docs/deploy.md.",
    no_args_is_help=True,
)


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
    trainer: Annotated[
        bool,
        typer.Option(help="a warm trainer per SuperNode (keeps torch, the model and the data loaded)"),
    ] = True,
) -> None:
    """Bring up a SuperLink (TLS, node authentication) and N SuperNodes on loopback until Ctrl-C."""
    files = tuple(data or ())
    count = nodes if nodes is not None else (len(files) or 3)
    if count < 1:
        fail(f"--nodes {count} is invalid: expected an integer >= 1")
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
        fail(str(exc))
    try:
        serve(
            directory,
            count,
            federation,
            echo=typer.echo,
            data_paths=files,
            experiment=experiment,
            overrides=overrides,
            trainer=trainer,
        )
    except DeployError as exc:
        fail(str(exc), code=1)


@deploy_app.command("supernode", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def deploy_supernode(
    command: Annotated[
        list[str], typer.Argument(help="the SuperNode's command line, after --: flower-supernode ARGS")
    ],
    trainer: Annotated[
        bool, typer.Option(help="start the node's warm trainer (--no-trainer: each message trains itself)")
    ] = True,
    socket_dir: Annotated[
        Path | None, typer.Option(help="where the trainer's private socket folder goes (default: TMPDIR)")
    ] = None,
) -> None:
    """Start this node's warm trainer, then run the SuperNode (it replaces this process).

    The trainer keeps torch, the base model and the node's tokenised data loaded; each message's
    ClientApp process hands its message to it over a Unix socket only the node's user can open, and
    the trainer ends with the SuperNode. Example: fedlora deploy supernode -- flower-supernode
    --superlink operator.example.org:8000 --root-certificates ca.crt ...
    """
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.trainer import DeployError, launch_supernode

    try:
        launch_supernode(command, trainer=trainer, socket_dir=socket_dir)
    except DeployError as exc:
        fail(str(exc))


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
    from fedlora.run.credentials import DeployError, make_node_key

    try:
        public = make_node_key(key, comment)
    except DeployError as exc:
        fail(str(exc))
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
        fail(f"no healthy Flower process answers at {address}", code=1)
    typer.echo(f"{address}: serving")


@deploy_app.command("status")
def deploy_status(
    superlink: Annotated[
        str | None,
        typer.Argument(help="the connection's name in $FLWR_HOME/config.toml (default: its default)"),
    ] = None,
    runs: Annotated[int, typer.Option(help="how many of the newest runs to show")] = 3,
) -> None:
    """The federation as the SuperLink sees it: its SuperNodes (online or not, last heartbeat), its runs
    and the current run's round. Uses the connection `flwr` uses (FLWR_HOME)."""
    if runs < 1:
        fail(f"--runs {runs} is invalid: expected an integer >= 1")
    # start-up: imported when the command runs, so `fedlora --help` stays fast
    from fedlora.run.status import DeployError, federation_status, status_lines

    try:
        status = federation_status(superlink)
    except DeployError as exc:
        fail(str(exc), code=1)
    for line in status_lines(status, runs):
        typer.echo(line)
