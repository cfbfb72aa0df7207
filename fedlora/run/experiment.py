"""The one experiment loader: every entry point (``fedlora run``, ``flwr run .``, ``fedlora compare``,
deployed nodes) loads and checks an experiment here, before any process starts or anything is written.

:func:`load_experiment` parses the file and overrides and applies the rules that need the strategy
registry; :func:`preflight` checks what needs the disk or the machine (model directory and weights,
LoRA targets against the model's modules, GPUs, data splits, privacy against the client sizes). Both
raise :class:`~fedlora.core.config.ConfigError` with one line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedlora.core.config import ConfigError, ExperimentConfig, load_config
from fedlora.core.model.loading import load_tokenizer
from fedlora.core.model.targets import resolve
from fedlora.core.model.tree import head_notice, missing_weights, model_tree
from fedlora.core.model.weights import model_dir, model_label, weight_shapes
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
    cfg = registry.validate(tasks.validate(cfg))
    if cfg.schedule.mode == "fedbuff" and not registry.get(cfg.strategy.name).linear_aggregate:
        raise ConfigError(
            f"schedule.mode = 'fedbuff' needs a strategy whose aggregate is a weighted sum; "
            f"'{cfg.strategy.name}' is not one (use {', '.join(registry.linear_strategies())})"
        )
    return cfg


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

    Once every check has passed, a one-line notice goes to stderr when the classifier's new head replaces
    one the model folder holds (:func:`model_notice`).
    """
    if simulation and not cfg.federation.ray_address:
        check_cpus(cfg)
        check_gpus(cfg)
    check_model(cfg)
    cfg, splits = check_data(cfg)
    mechanism_for(cfg).preflight(splits.train_sizes())
    check_secure_weights(cfg, splits.train_sizes())
    notice = model_notice(cfg)
    if notice:
        _note_once(notice)
    return cfg


@functools.cache
def _note_once(message: str) -> None:
    """Print a notice on stderr, once per process (a comparison checks many runs of one model)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


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
    """The model directory has a config.json and readable weights, transformers has a class for the task
    and the folder's family, and ``lora.targets`` resolves on the task's module tree, built on the meta
    device from config.json (no weight read), with the function training uses
    (:func:`fedlora.core.model.targets.resolve`); the adapted layers' weights must be in the folder."""
    try:
        directory = model_dir(cfg.model.path)
        keys = list(weight_shapes(directory))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    check_task_model(cfg, directory)  # the task's own, more specific line first
    tree = model_tree(cfg.model.path, _causal(cfg))
    targets = resolve(tree, cfg.lora.targets, model_label(cfg.model.path))
    missing = missing_weights(tree, targets.modules, keys)
    if missing:
        raise ConfigError(
            f"model.path: the weights of {model_label(cfg.model.path)} do not hold the layers its "
            f"config.json describes (no weight for {missing[0]}); copy the model's files again from the "
            "original, config.json and weights together"
        )
    check_tokenizer(cfg, tree)


def check_tokenizer(cfg: ExperimentConfig, tree: torch.nn.Module) -> None:
    """The folder has a tokenizer with a vocabulary (transformers builds one of special tokens only from a
    folder without tokenizer files, without a word), and every id it can produce has a row in the
    model's input embeddings (added tokens without resized embeddings would fail in the first batch)."""
    label = model_label(cfg.model.path)
    try:
        tokenizer = load_tokenizer(cfg.model.path)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"model.path: {label} has no tokenizer transformers can load ({_first_line(exc)}); copy the "
            "tokenizer files saved with the model into the folder"
        ) from None
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ConfigError(
            f"model.path: {label} has no tokenizer vocabulary (transformers built one of its "
            f"{len(tokenizer)} special tokens only, so every word would be unknown); copy the tokenizer "
            "files saved with the model (tokenizer.json, vocab.txt, ...) into the folder"
        )
    embeddings = getattr(tree, "get_input_embeddings", lambda: None)()  # a transformers model's
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ConfigError(
            f"model.path: the tokenizer of {label} has {len(tokenizer)} tokens but the model's input "
            f"embeddings have {rows} rows (ids from {rows} on would fail in training); use the tokenizer "
            "saved with these weights, or resize the embeddings (model.resize_token_embeddings) and save both"
        )


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def model_notice(cfg: ExperimentConfig) -> str:
    """A one-line notice when the run's classifier head replaces what the folder holds (a classification
    head of any size, or a causal LM's head); empty otherwise and for causal-lm. ``cfg`` as
    :func:`preflight` returns it (``data.labels`` filled in)."""
    if _causal(cfg):
        return ""
    keys = list(weight_shapes(model_dir(cfg.model.path)))
    return head_notice(cfg.model.path, model_tree(cfg.model.path, False), keys, len(cfg.data.labels))


def _causal(cfg: ExperimentConfig) -> bool:
    """Whether the task's model is a causal LM (else a sequence classifier, whose head is new)."""
    return tasks.task_of(cfg).peft_task_type == "CAUSAL_LM"


def check_task_model(cfg: ExperimentConfig, directory: Path) -> None:
    """The task's own check of the model folder (e.g. causal-lm needs a decoder)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    tasks.task_of(cfg).check_model(directory, config if isinstance(config, dict) else {})
