"""What every ``fedlora`` command shares: the one-line error and the console's styling."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> None:
    """Print ``error: MESSAGE`` on stderr and exit with ``code`` (2: bad input, 1: the work failed)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def markup(text: str, style: str) -> str:
    """Rich console markup for a styled part of a progress line."""
    return f"[{style}]{text}[/]"
