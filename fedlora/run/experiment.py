"""The one experiment loader: every entry point (``fedlora run``, ``flwr run .``, ``fedlora compare``,
deployed nodes) loads and checks an experiment here, before any process starts or anything is written.

:func:`load_experiment` parses the file and overrides and applies the rules that need the strategy
registry; :func:`preflight` checks what needs the disk (model directory, data splits, privacy against
the client sizes). Both raise :class:`~fedlora.core.config.ConfigError` with one line.
"""

from __future__ import annotations

from pathlib import Path

from fedlora.core.config import ConfigError, ExperimentConfig, load_config
from strategies import registry


def load_experiment(path: Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment file (or the defaults) with ``section.key=value`` overrides, fully checked
    against the configuration rules and the chosen strategy (its options, its privacy modes)."""
    return check_strategy(load_config(path, overrides))


def check_strategy(cfg: ExperimentConfig) -> ExperimentConfig:
    """Validate the strategy: its name, its options (filled with defaults), the privacy modes it allows."""
    return registry.validate(cfg)


def preflight(cfg: ExperimentConfig) -> None:
    """Checks that read the disk: the model directory, the data splits, privacy against client sizes."""
    from fedlora.core.data import get_splits
    from fedlora.core.models import model_dir

    try:
        model_dir(cfg.model.path)
        splits = get_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if cfg.privacy.enabled:
        from fedlora.privacy.settings import check

        check(cfg, [len(splits.client_train(i)) for i in range(cfg.federation.num_clients)])
