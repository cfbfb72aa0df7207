"""The ``fedlora`` command line: each command parses its arguments, calls the layer below and prints.

Heavy imports (torch, transformers, peft, Ray, Flower's simulation) happen inside the commands, so
``fedlora --help`` stays fast. The commands live by what they drive: :mod:`fedlora.cli.run` (one
experiment), :mod:`fedlora.cli.compare` (grids and reports), :mod:`fedlora.cli.deploy` (SuperNodes,
base models).
"""

from __future__ import annotations

import typer

from fedlora.cli import compare, deploy, run

app = typer.Typer(
    help="Federated LoRA fine-tuning of pretrained transformers, simulated on Flower and Ray.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(run.run)
app.command()(compare.compare)
app.command()(compare.report)
app.command("data")(run.show_data)
app.command("config")(run.show_config)
app.command()(run.strategies)
app.command()(run.tasks)
app.command()(run.privacy)
app.command()(run.generate)
app.add_typer(deploy.models_app, name="models")
app.add_typer(deploy.deploy_app, name="deploy")


def main() -> None:
    """Console-script entry point."""
    app()
