"""Typed experiment configuration: one parser for the CLI, the ServerApp and the ClientApp.

An experiment is a TOML file whose tables mirror the dataclasses below
(``[data]``, ``[model]``, ``[lora]``, ``[train]``, ``[federation]``, ``[strategy]``, ``[privacy]``,
``[robustness]``, ``[faults]``, ``[compression]``, and ``[devices]``, ``[schedule]`` from
:mod:`fedlora.core.devices.profiles`),
plus ``--set section.key=value`` overrides. Unknown keys, wrong types and
impossible values raise :class:`ConfigError` with one line that names the key,
the value got and the valid choices.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedlora.core.devices.profiles import DevicesConfig, ScheduleConfig, check_devices
from fedlora.core.errors import ConfigError
from fedlora.core.reliability import FaultsConfig, RobustnessConfig, check_faults
from fedlora.core.transport import (
    CompressionConfig,
    SecureAggregationConfig,
    check_compression,
    check_secure,
)
from fedlora.core.typed_toml import apply_overrides, build, check, help_field, read_toml

PARTITIONERS = ("natural", "dirichlet", "iid", "shards")
TWEETS = "tweets"
"""``data.source`` naming the packaged tweets corpus."""
TARGET_PRESETS = ("qv", "qkvo", "vo", "mlp")
TASK_DATA_KEYS = ("template", "response")
"""``[data]`` keys that only some tasks read (each task names those it reads; others refuse them)."""
OPTIMIZERS = ("adamw", "sgd")
"""``compression.uplink`` / ``downlink`` values (:mod:`fedlora.core.model.codecs`)."""
CORPUS_SIZE = 38_158
"""Tweets in the corpus (docs/data.md); lets the config refuse impossible sizes before loading it (other
sources are checked once loaded, by the experiment's pre-flight)."""


_help = help_field


def _is_host_port(text: str) -> bool:
    """Whether ``text`` is ``HOST:PORT`` with a non-empty host and a port in 1..65535."""
    host, _, port = text.rpartition(":")
    return bool(host) and " " not in host and port.isdigit() and 1 <= int(port) <= 65535


_check = check


@dataclass
class DataConfig:
    """The labelled texts (the packaged tweets, or a file of your own) and how clients share them."""

    source: str = _help(
        "'tweets' (the packaged corpus) or a path to a CSV, JSON Lines or Parquet file or a "
        "Dataset.save_to_disk directory (relative to the working directory)",
        TWEETS,
    )
    text: str = _help("column holding the text", "text")
    text_pair: str = _help("column holding a second text (sentence pairs); empty = single texts", "")
    label: str = _help("column holding the label (strings or integers)", "label")
    labels: list[str] = field(
        default_factory=list,
        metadata={
            "help": "class names in label-id order; empty = inferred from data.source (sorted; the tweets: "
            "negative, neutral, positive) and filled in before the run starts"
        },
    )
    test_path: str = _help(
        "a separate labelled test file (same columns and formats); empty = a stratified held-out split", ""
    )
    partitioner: str = _help(
        "how examples are split between clients: natural (by data.partition_by), dirichlet, iid or shards",
        "natural",
    )
    partition_by: str = _help(
        "column whose values are the clients for partitioner = natural (one client per value, or values "
        "grouped when there are fewer clients)",
        "source",
    )
    alpha: float = _help("Dirichlet concentration for partitioner = dirichlet (lower = more label skew)", 0.5)
    shards_per_client: int = _help(
        "label-sorted shards per client for partitioner = shards (McMahan et al.'s pathological split)", 2
    )
    test_size: int = _help("examples in the stratified global held-out test set", 1000)
    val_fraction: float = _help("fraction of each client's examples kept as its own validation split", 0.1)
    max_length: int = _help("maximum tokens per example (longer ones are truncated)", 48)
    max_examples: int = _help("use a stratified subset of this many examples (0 = all)", 0)
    template: str = _help(
        "task = causal-lm: the prompt made of each example, with {text} (and {text_pair}) in it, e.g. "
        "'Tweet: {text}\\nSentiment:'; empty = the text itself",
        "",
    )
    response: str = _help(
        "task = causal-lm: column holding each example's response (free text); empty = the label's name "
        "is the response, and accuracy ranks the label names by likelihood",
        "",
    )

    def __post_init__(self) -> None:
        for key in ("source", "text", "label"):
            _check(bool(getattr(self, key).strip()), f"data.{key}", getattr(self, key), "a non-empty string")
        _check(
            self.text_pair not in (self.text, self.label),
            "data.text_pair",
            self.text_pair,
            "a column other than data.text and data.label, or empty",
        )
        _check(self.label != self.text, "data.label", self.label, "a column other than data.text")
        _check(
            not self.labels or (len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels)),
            "data.labels",
            self.labels,
            "at least two distinct class names, or empty (inferred from the data)",
        )
        _check(
            self.partitioner in PARTITIONERS,
            "data.partitioner",
            self.partitioner,
            f"one of {', '.join(PARTITIONERS)}",
        )
        _check(
            self.partitioner != "natural" or bool(self.partition_by.strip()),
            "data.partition_by",
            self.partition_by,
            "a column name (partitioner = natural splits clients by its values)",
        )
        _check(self.alpha > 0, "data.alpha", self.alpha, "a number > 0")
        _check(
            self.shards_per_client >= 1, "data.shards_per_client", self.shards_per_client, "an integer >= 1"
        )
        _check(self.test_size >= 10, "data.test_size", self.test_size, "an integer >= 10")
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "a number in [0, 1)")
        _check(8 <= self.max_length <= 512, "data.max_length", self.max_length, "an integer in [8, 512]")
        _check(
            self.max_examples >= 0, "data.max_examples", self.max_examples, "0 (all) or a positive integer"
        )

    @property
    def tweets(self) -> bool:
        """Whether the source is the packaged tweets corpus."""
        return self.source == TWEETS


@dataclass
class ModelConfig:
    """The pretrained base model."""

    path: str = _help("local Hugging Face model directory; empty = the packaged all-MiniLM-L6-v2", "")


@dataclass
class LoraConfig:
    """LoRA adapters injected with peft."""

    rank: int = _help("LoRA rank r", 8)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)", 16.0)
    dropout: float = _help("dropout on the LoRA branch input", 0.05)
    rslora: bool = _help("use rank-stabilised scaling alpha/sqrt(r)", False)
    targets: list[str] = field(
        default_factory=lambda: ["qv"],
        metadata={"help": "adapted linear layers: a preset (qv, qkvo, vo, mlp) or module names"},
    )

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank", self.rank, "an integer >= 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "a number > 0")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a number in [0, 1)")
        _check(
            len(self.targets) > 0,
            "lora.targets",
            self.targets,
            f"a preset ({', '.join(TARGET_PRESETS)}) or a list of module names",
        )


@dataclass
class TrainConfig:
    """Local training on each sampled client."""

    local_steps: int = _help("optimizer steps per client per round (used when local_epochs = 0)", 8)
    local_epochs: float = _help("passes over the client's train split per round; 0 = use local_steps", 0.0)
    batch_size: int = _help("examples per optimizer step", 16)
    lr: float = _help("learning rate", 5e-3)
    optimizer: str = _help("adamw or sgd", "adamw")
    weight_decay: float = _help("decoupled weight decay (adamw) or L2 (sgd)", 0.0)
    gradient_checkpointing: bool = _help(
        "recompute activations in the backward pass: less memory for larger models, more time", False
    )

    def __post_init__(self) -> None:
        _check(self.local_steps >= 1, "train.local_steps", self.local_steps, "an integer >= 1")
        _check(self.local_epochs >= 0, "train.local_epochs", self.local_epochs, "a number >= 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _check(
            self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}"
        )
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")


AUTO = -1.0
"""``federation.fraction_evaluate``'s default: the strategy decides (the experiment loader resolves it)."""


@dataclass
class FederationConfig:
    """Clients, rounds, sampling and simulation resources."""

    num_clients: int = _help("virtual clients (SuperNodes) in the federation", 10)
    rounds: int = _help("federated rounds", 8)
    fraction: float = _help("fraction of clients sampled for training each round", 1.0)
    min_clients: int = _help("fewest clients sampled, and fewest valid replies a round needs", 2)
    fraction_evaluate: float = _help(
        "fraction of clients that evaluate on their validation split each round; 0 = off; -1 (default) = "
        "the strategy's choice: 1 for a strategy whose clients keep state of their own (FedSA-LoRA: "
        "judged by personalised accuracy), else 0",
        AUTO,
    )
    evaluate_every: int = _help(
        "evaluate (test set, and clients with fraction_evaluate > 0) every N rounds; the last round always", 1
    )
    client_cpus: float = _help(
        "CPUs reserved per simulated client (Ray actor); torch uses this many threads", 1.0
    )
    client_gpus: float = _help("GPUs per simulated client; fractions pack several actors on one GPU", 0.0)
    round_timeout: float = _help("seconds to wait for replies in a round", 3600.0)
    ray_address: str = _help(
        "Ray cluster to attach to: HOST:PORT of its head (`ray start --head`); empty = start a local Ray",
        "",
    )

    def __post_init__(self) -> None:
        _check(self.num_clients >= 1, "federation.num_clients", self.num_clients, "an integer >= 1")
        _check(self.rounds >= 1, "federation.rounds", self.rounds, "an integer >= 1")
        _check(0.0 < self.fraction <= 1.0, "federation.fraction", self.fraction, "a number in (0, 1]")
        _check(self.min_clients >= 1, "federation.min_clients", self.min_clients, "an integer >= 1")
        _check(
            self.min_clients <= self.num_clients,
            "federation.min_clients",
            self.min_clients,
            f"at most federation.num_clients ({self.num_clients})",
        )
        _check(
            0.0 <= self.fraction_evaluate <= 1.0 or self.fraction_evaluate == AUTO,
            "federation.fraction_evaluate",
            self.fraction_evaluate,
            "a number in [0, 1], or -1 for the strategy's choice",
        )
        _check(self.evaluate_every >= 1, "federation.evaluate_every", self.evaluate_every, "an integer >= 1")
        _check(self.client_cpus > 0, "federation.client_cpus", self.client_cpus, "a number > 0")
        _check(self.client_gpus >= 0, "federation.client_gpus", self.client_gpus, "a number >= 0")
        _check(
            self.round_timeout > 0, "federation.round_timeout", self.round_timeout, "a number of seconds > 0"
        )
        _check(
            self.ray_address == "" or _is_host_port(self.ray_address),
            "federation.ray_address",
            self.ray_address,
            "HOST:PORT of a Ray head node (e.g. 10.0.0.5:6379), or empty to start a local Ray",
        )

    def clients_per_round(self, fraction: float | None = None) -> int:
        """Clients sampled per round: int(fraction * num_clients) (default ``fraction``), at least
        min_clients and at most num_clients."""
        share = self.fraction if fraction is None else fraction
        return min(self.num_clients, max(self.min_clients, int(share * self.num_clients)))


@dataclass
class StrategyConfig:
    """The server-side aggregation strategy; ``options`` are checked by the strategy itself."""

    name: str = _help("aggregation strategy (see `fedlora strategies`)", "fedit")
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "strategy-specific options"})


@dataclass
class PrivacyConfig:
    """Differential privacy: the ``[privacy]`` table. ``mode`` names a registered mechanism
    (:mod:`fedlora.privacy.mechanisms`), which reads the keys it needs, checks their values and refuses
    keys that are set but mean nothing to it; here only each key's range is checked.

    ``target_epsilon`` is the budget for the whole run; with ``noise_multiplier = 0`` the noise is
    calibrated so that the planned run (every round, every local step) spends exactly that budget.
    """

    mode: str = _help(
        "privacy mechanism: none, dp-sgd (sample-level, Opacus in each client), dp-updates (user-level), "
        "ddp (user-level, client noise under secure aggregation) or one added to fedlora/privacy/mechanisms/ "
        "(docs/privacy.md)",
        "none",
    )
    target_epsilon: float = _help(
        "privacy budget for the whole run; 0 = no budget (needs noise_multiplier)", 0.0
    )
    noise_multiplier: float = _help("Gaussian noise std over clip_norm; 0 = calibrate to target_epsilon", 0.0)
    clip_norm: float = _help(
        "L2 clip: per-example gradient (dp-sgd) or per-client update (dp-updates, ddp)", 1.0
    )
    delta: float = _help("delta of (epsilon, delta)-DP; must be below 1 / (examples or clients)", 1e-5)
    accountant: str = _help("privacy accountant by its name in Opacus's registry: rdp, prv or gdp", "rdp")
    opacus_mode: str = _help("Opacus per-sample gradient mode for dp-sgd: hooks or ghost", "hooks")
    max_physical_batch: int = _help(
        "dp-sgd: split Poisson batches into at most this many examples; 0 = off", 0
    )
    placement: str = _help("dp-updates: who clips and adds noise, server or client", "server")
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "keys only one mechanism reads (e.g. ddp's wrap_bound), checked by its Options "
            "(docs/privacy.md)"
        },
    )

    def __post_init__(self) -> None:
        _check(bool(self.mode.strip()), "privacy.mode", self.mode, "a privacy mechanism's name, e.g. 'none'")
        _check(self.target_epsilon >= 0, "privacy.target_epsilon", self.target_epsilon, "a number >= 0")
        _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", self.noise_multiplier, "a number >= 0")
        _check(self.clip_norm > 0, "privacy.clip_norm", self.clip_norm, "a number > 0")
        _check(0 < self.delta < 1, "privacy.delta", self.delta, "a number in (0, 1)")
        _check(
            self.max_physical_batch >= 0,
            "privacy.max_physical_batch",
            self.max_physical_batch,
            "an integer >= 0",
        )


@dataclass
class ExperimentConfig:
    """A whole experiment: everything a server and its clients need to agree on."""

    name: str = _help("run name; the run directory is runs/<name> unless --out is given", "quickstart")
    seed: int = _help("seed for data splits, adapter initialisation, sampling and training", 0)
    task: str = _help(
        "what the model learns (see `fedlora tasks`): classification (a head predicts the label) or "
        "causal-lm (a decoder LLM learns to write the response after the prompt; see docs/llm.md)",
        "classification",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        _check(bool(self.task.strip()), "task", self.task, "a registered task (see `fedlora tasks`)")

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config as plain TOML-able values."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The fully resolved config as TOML text (what ``config.toml`` holds)."""
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> ExperimentConfig:
        """Parse TOML text produced by :meth:`to_toml` or written by a user."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"experiment is not valid TOML: {exc}") from None
        return from_dict(data)


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from nested dicts."""
    config = build(ExperimentConfig, data, prefix="")
    _check_cross(config)
    return config


def _check_cross(config: ExperimentConfig) -> None:
    """Checks that involve more than one section."""
    _check_sizes(config)
    check_faults(config)
    check_compression(config)
    fed = config.federation
    check_devices(
        config.devices,
        config.schedule,
        lora_rank=config.lora.rank,
        local_epochs=config.train.local_epochs,
        privacy_mode=config.privacy.mode,
        clients_per_round=fed.clients_per_round(),
        num_clients=fed.num_clients,
    )
    check_secure(config)


def _check_sizes(config: ExperimentConfig) -> None:
    """Clients, examples and validation splits that cannot fit together."""
    data, fed = config.data, config.federation
    if fed.fraction_evaluate > 0 and data.val_fraction == 0:
        raise ConfigError(
            f"federation.fraction_evaluate = {fed.fraction_evaluate:g} needs client validation splits, "
            "but data.val_fraction = 0; set data.val_fraction > 0 or federation.fraction_evaluate = 0"
        )
    if not data.tweets or data.test_path:
        return  # sizes of a file are known once it is read (fedlora.core.data.splits)
    in_use = min(data.max_examples, CORPUS_SIZE) if data.max_examples else CORPUS_SIZE
    _check(
        data.test_size < in_use,
        "data.test_size",
        data.test_size,
        f"fewer than the {in_use} tweets in use (data.max_examples)",
    )
    pool = in_use - data.test_size
    _check(
        fed.num_clients <= pool,
        "federation.num_clients",
        fed.num_clients,
        f"at most the {pool} training tweets (data.max_examples - data.test_size)",
    )


def load_config(path: Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment file (or the defaults when ``path`` is None) and apply overrides."""
    data = read_toml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))
