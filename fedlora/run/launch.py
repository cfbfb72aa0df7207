"""What ``fedlora run`` does before the first round: the experiment checked, the run directory made.

Every check runs before the run directory is touched, so a bad experiment leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

from fedlora.core.config import ExperimentConfig, from_dict
from fedlora.core.records.rundir import RunDirectory
from fedlora.core.typed_toml import apply_overrides
from fedlora.run.experiment import load_experiment, preflight

DEFAULT_EXPERIMENT = Path("sims/quickstart.toml")


def default_experiment(experiment: Path | None) -> Path | None:
    """``experiment``, or ``sims/quickstart.toml`` when none is given and it exists here (else None:
    the built-in defaults)."""
    if experiment is None and DEFAULT_EXPERIMENT.is_file():
        return DEFAULT_EXPERIMENT
    return experiment


def prepare_run(
    experiment: Path | None,
    overrides: list[str],
    *,
    out: Path | None = None,
    overwrite: bool = False,
    resume: Path | None = None,
    ray_address: str | None = None,
) -> tuple[ExperimentConfig, RunDirectory]:
    """The checked config of a simulation and its run directory: a new one (``out``, default
    ``runs/<name>``), or with ``resume`` that run's own directory and config. ``ray_address`` attaches
    the run to a Ray cluster; on resume it is the one setting that may change (where the rest runs, not
    what it computes).

    Raises ConfigError, RunDirError, FileNotFoundError or ValueError with a one-line message.
    """
    attach = [f'federation.ray_address="{ray_address}"'] if ray_address is not None else []
    if resume is not None:
        run_dir = RunDirectory(resume)
        cfg = run_dir.resumable_config()
        if attach:
            cfg = from_dict(apply_overrides(cfg.to_dict(), attach))
    else:
        cfg = load_experiment(default_experiment(experiment), [*overrides, *attach])
    cfg = preflight(cfg, simulation=True)  # every check before the run directory is touched
    # start-up: Ray and Flower's simulation take seconds to import; a bad experiment fails first
    from fedlora.run.simulation import check_ray_address

    check_ray_address(cfg.federation.ray_address)
    if resume is None:
        run_dir = RunDirectory(out or Path("runs") / cfg.name)
        run_dir.create(cfg, overwrite=overwrite)
    return cfg, run_dir
