"""The ServerApp: ``make_server_app`` for the in-process CLI, and ``app``, the Flower App entry point
used by ``flwr run .`` (it reads ``[tool.flwr.app.config]``). Both run :func:`run_federation`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.core.config import ExperimentConfig
from fedlora.core.records.rundir import RunDirectory
from fedlora.run.experiment import load_experiment, preflight
from fedlora.run.federation import run_federation
from fedlora.run.progress import Listener, log_listener

log = logging.getLogger(__name__)


def make_server_app(
    cfg: ExperimentConfig,
    run_dir: RunDirectory,
    listener: Listener | None = None,
    *,
    resume: bool = False,
    client_state_dir: Path | None = None,
) -> ServerApp:
    """A ServerApp bound to an already validated config and run directory (used by the CLI)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run_dir, listener, resume=resume, client_state_dir=client_state_dir)

    return server_app


def _app_path(path: str) -> Path:
    """``path`` as given if it exists, else relative to the app's root (where ``flwr run`` unpacked it)."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    return Path(__file__).resolve().parents[2] / given


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the experiment file, overrides and output from the run config."""
    run_config = context.run_config
    experiment = _app_path(str(run_config.get("experiment", "sims/quickstart.toml")))
    overrides = [o.strip() for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    cfg = preflight(load_experiment(experiment, overrides))
    out = Path(str(run_config.get("out-dir", "runs"))) / f"{cfg.name}-{int(time.time())}"
    run_dir = RunDirectory(out)
    run_dir.create(cfg)
    log.warning("fedlora: writing run directory %s", out.resolve())
    run_federation(grid, cfg, run_dir, log_listener(cfg.federation.rounds, log))
