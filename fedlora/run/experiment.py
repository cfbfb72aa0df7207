"""The one experiment loader: every entry point (``fedlora run``, ``flwr run .``, ``fedlora compare``,
deployed nodes) loads and checks an experiment here, before any process starts or anything is written.

:func:`load_experiment` parses the file and overrides and applies the rules that need the strategy
registry; :func:`preflight` checks what needs the disk or the machine (model directory and weights,
LoRA targets against the model's modules, GPUs, data splits, privacy against the client sizes). Both
raise :class:`~fedlora.core.config.ConfigError` with one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedlora.core.config import TARGET_PRESETS, ConfigError, ExperimentConfig, load_config
from fedlora.core.model.targets import PRESETS, preset_family, target_suffixes, unmatched
from fedlora.core.model.weights import linear_weight_names, model_dir, model_label, weight_shapes
from fedlora.privacy.mechanisms import mechanism_for
from fedlora.tasks import registry as tasks
from strategies import registry

if TYPE_CHECKING:
    from fedlora.core.data.splits import FederatedSplits


def load_experiment(path: Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment file (or the defaults) with ``section.key=value`` overrides, fully checked
    against the configuration rules and the chosen strategy (its options, its privacy modes)."""
    return check_strategy(load_config(path, overrides))


def check_strategy(cfg: ExperimentConfig) -> ExperimentConfig:
    """Validate the task (its name and its own rules) and the strategy: its name, its options (filled with
    defaults), the privacy modes it allows."""
    return registry.validate(tasks.validate(cfg))


def preflight(cfg: ExperimentConfig, *, simulation: bool = False) -> ExperimentConfig:
    """Checks that read the disk or the machine, cheapest first: GPUs, the model directory and its
    weights, the LoRA targets against the model's module names, the data (every value of a file, see
    :mod:`fedlora.core.data.sources`) and its splits, privacy against client sizes.

    Returns ``cfg`` resolved for the run: file paths in ``[data]`` made absolute and ``data.labels``
    filled in from the data, so that every client (a deployed one reads only its own file) builds the
    same classifier head. Use the returned config from here on.

    ``simulation``: this process will run the clients on Ray (``fedlora run``); without
    ``federation.ray_address`` that Ray is started here, so ``federation.client_gpus`` must find a GPU
    here. A ``flwr run`` ServerApp leaves it off: its host may have no GPU while the clients do.
    """
    if simulation and not cfg.federation.ray_address:
        check_cpus(cfg)
        check_gpus(cfg)
    check_model(cfg)
    cfg, splits = check_data(cfg)
    mechanism_for(cfg).preflight(splits.train_sizes())
    check_secure_weights(cfg, splits.train_sizes())
    return cfg


def check_secure_weights(cfg: ExperimentConfig, client_sizes: list[int] | tuple[int, ...]) -> None:
    """Under secure aggregation the clients' quantised weights are summed in the field too: the m largest
    (num-examples / secure_aggregation.max_weight, times 2**quantization_bits) must not wrap around it."""
    sa = cfg.secure_aggregation
    if not sa.enabled:
        return
    mechanism = mechanism_for(cfg)
    m = cfg.federation.clients_per_round()
    weights = sorted((mechanism.client_weight(n) for n in client_sizes), reverse=True)[:m]
    levels, modulus = 2**sa.quantization_bits, 2**sa.modulus_bits
    if sum(round(w / sa.max_weight * levels) for w in weights) >= modulus:
        need = sum(weights) * levels / modulus
        raise ConfigError(
            f"secure_aggregation.max_weight = {sa.max_weight:g} is too small: the {m} largest clients' "
            f"weights (up to {weights[0]:g} examples) sum past the field 2**{sa.modulus_bits} once "
            f"quantised; set secure_aggregation.max_weight > {need:g}"
        )


def check_data(cfg: ExperimentConfig) -> tuple[ExperimentConfig, FederatedSplits]:
    """Read the data and build the splits (every value of a file is checked, see
    :mod:`fedlora.core.data.sources`); returns the config with absolute paths and ``data.labels`` filled in,
    and the splits."""
    from fedlora.core.data.splits import get_splits  # start-up: datasets takes about 1 s to import

    cfg = resolve_paths(cfg)
    try:
        splits = get_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
        labels = tasks.task_of(cfg).class_names()
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=list(labels))), splits


def check_node_files(cfg: ExperimentConfig, paths: list[Path] | tuple[Path, ...]) -> None:
    """Each deployed node's own file, read as its ClientApp will read it, against the federation's
    label set (``cfg`` as :func:`preflight` returns it); ConfigError naming the file otherwise."""
    from fedlora.core.data.sources import load_node_file  # start-up: datasets takes about 1 s to import

    for path in paths:
        load_node_file(str(path), cfg.data, key="--data")


def resolve_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``data.source`` (unless ``tweets``) and ``data.test_path`` as absolute paths, so that processes
    started elsewhere (Ray workers, the ServerApp of ``flwr run``) read the same files."""
    data = cfg.data
    source = data.source if data.tweets else str(Path(data.source).expanduser().absolute())
    test_path = str(Path(data.test_path).expanduser().absolute()) if data.test_path else ""
    return dataclasses.replace(cfg, data=dataclasses.replace(data, source=source, test_path=test_path))


def check_cpus(cfg: ExperimentConfig) -> None:
    """``federation.client_cpus`` must fit this machine: a local Ray gets its CPUs, and no client actor
    fits when one needs more (Flower would stop with "ActorPool is empty" after Ray started)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cfg.federation.client_cpus > cpus:
        raise ConfigError(
            f"federation.client_cpus = {cfg.federation.client_cpus:g} but this machine has {cpus} CPUs; "
            f"set federation.client_cpus <= {cpus}, or attach to a larger Ray cluster with --ray-address"
        )


def check_gpus(cfg: ExperimentConfig) -> None:
    """``federation.client_gpus > 0`` needs a CUDA GPU visible here: a local Ray without one could never
    place the client actors."""
    gpus = cfg.federation.client_gpus
    if gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"federation.client_gpus = {gpus:g} but no CUDA GPU is visible on this machine (torch sees "
            "none); set federation.client_gpus = 0 or run where a GPU is visible"
        )


def check_model(cfg: ExperimentConfig) -> None:
    """The model directory has a config.json and readable weights, and every module ``lora.targets``
    names is a linear layer in them. Only the weights' headers are read, and the model's code is not
    imported (that alone takes seconds), so a wrong target fails fast."""
    try:
        directory = model_dir(cfg.model.path)
        shapes = weight_shapes(directory)
        check_targets(cfg.lora.targets, cfg.model.path, linear_weight_names(shapes))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    check_task_model(cfg, directory)


def check_task_model(cfg: ExperimentConfig, directory: Path) -> None:
    """The task's own check of the model folder (e.g. causal-lm needs a decoder)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    tasks.task_of(cfg).check_model(directory, config if isinstance(config, dict) else {})


def check_targets(targets: list[str], model_path: str, names: list[str]) -> None:
    """ConfigError naming the valid module names when a ``lora.targets`` entry matches no linear layer."""
    missing = unmatched(target_suffixes(targets, names), names)
    if not missing:
        return
    what = "module" if len(missing) == 1 else "modules"
    preset = f" (preset '{targets[0]}')" if len(targets) == 1 and targets[0] in TARGET_PRESETS else ""
    close = difflib.get_close_matches(missing[0], _leaves(names), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close and not preset else ""
    raise ConfigError(
        f"lora.targets: {what} {', '.join(repr(m) for m in missing)}{preset} not found in "
        f"{model_label(model_path)}{hint}; {_valid_targets(names)}"
    )


def _leaves(names: list[str]) -> list[str]:
    """The last component of each name, each once, in module order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


def _valid_targets(names: list[str]) -> str:
    """The target names this model accepts: its attention projections, other linear layers, presets."""
    attention = [s for s in PRESETS[preset_family(names)]["qkvo"] if not unmatched([s], names)]
    others = [leaf for leaf in _leaves(names) if leaf not in attention]
    parts = [f"valid attention projections: {', '.join(attention)}"] if attention else []
    parts += [f"other linear layers: {', '.join(others)}"] if others else []
    if attention:
        parts.append(f"or a preset: {', '.join(TARGET_PRESETS)}")
    return "; ".join(parts)
