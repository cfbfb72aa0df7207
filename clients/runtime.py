"""What a client process keeps between messages: the parsed experiment, its model and its data.

Flower starts a ClientApp per message (deployment) or reuses a Ray actor process (simulation);
either way everything here is built once per process and reused across rounds.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedlora.core.config import ExperimentConfig
from fedlora.core.data import token_cache
from fedlora.core.model import offsets
from fedlora.core.model.adapters import set_checkpointing
from fedlora.core.model.arrays import State, fresh_lora, from_arrays, kind_of, orthogonal_a
from fedlora.core.model.weights import model_dir
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.plan import ClientPlan
from fedlora.core.records.store import ClientStore
from fedlora.core.training.loops import Encoded
from fedlora.privacy.mechanisms import registry as mechanisms
from fedlora.tasks.models import get_model, initial_state
from fedlora.tasks.registry import task_of

if TYPE_CHECKING:
    from flwr.app import ConfigRecord, Message, RecordDict
    from peft import PeftModel


@dataclass(frozen=True)
class ClientData:
    """A client's tokenised train and validation splits."""

    train: Encoded
    val: Encoded


@functools.lru_cache(maxsize=4)
def parse_experiment(text: str) -> ExperimentConfig:
    """Parse the experiment TOML sent by the server (cached: every message carries the same text)."""
    return ExperimentConfig.from_toml(text)


def set_threads(num_cpus: float) -> None:
    """One torch thread per reserved CPU (an oversubscribed actor is many times slower)."""
    threads = max(1, int(num_cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def model_for(cfg: ExperimentConfig) -> PeftModel:
    """The process's LoRA model for this experiment (built once), on the GPU when one is visible."""

    model = get_model(cfg)
    if torch.cuda.is_available() and cfg.federation.client_gpus > 0:
        model.to("cuda")
    set_checkpointing(model, cfg.train.gradient_checkpointing)
    return model


@functools.lru_cache(maxsize=8)
def _client_data(text: str, partition_id: int, data_path: str) -> ClientData:
    """The tokenised train and validation splits (cached: see :func:`data_for`)."""
    cfg = parse_experiment(text)
    directory = token_cache.cache_dir()
    key = token_cache.key_for(cfg, partition_id, data_path, model_dir(cfg.model.path)) if directory else ""
    cached = token_cache.load(directory, key) if directory else None
    if cached is not None:
        return ClientData(*cached)
    data = _tokenise(cfg, partition_id, data_path)
    if directory:
        token_cache.save(directory, key, data.train, data.val)
    return data


def _tokenise(cfg: ExperimentConfig, partition_id: int, data_path: str) -> ClientData:
    """Read, split and tokenise this client's data (what the token cache saves a fresh process)."""
    # start-up: reading and splitting imports datasets, pandas and pyarrow (about 1 CPU-second), and the
    # tokenizer loads its files; a ClientApp process whose splits are in the token cache needs neither
    from fedlora.core.data.sources import load_node_file
    from fedlora.core.data.splits import get_splits, split_of_file
    from fedlora.core.model.loading import load_tokenizer

    if data_path:  # a deployed node with its own file: nothing else is read
        train, val = split_of_file(load_node_file(data_path, cfg.data), cfg.data.val_fraction, cfg.seed)
    else:
        splits = get_splits(cfg.data, cfg.federation.num_clients, cfg.seed)
        train, val = splits.client_train(partition_id), splits.client_val(partition_id)
    tokenizer, task = load_tokenizer(cfg.model.path), task_of(cfg)
    return ClientData(train=task.encode(train, tokenizer), val=task.encode(val, tokenizer))


def data_for(text: str, partition_id: int, data_path: str = "") -> ClientData:
    """The client's tokenised splits, computed once per process and partition: from its own file
    ``data_path`` (the node config's ``data-path``, split into train and val like a partition), else
    partition ``partition_id`` of the experiment's ``data.source``. Where FEDLORA_CACHE_DIR is set
    they are also kept on the node's disk (:mod:`fedlora.core.data.token_cache`) for the next process."""
    cfg = parse_experiment(text)
    if not 0 <= partition_id < cfg.federation.num_clients:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{cfg.federation.num_clients - 1} "
            "(federation.num_clients); fix the SuperNode's --node-config"
        )
    return _client_data(text, partition_id, data_path)


def label_counts(cfg: ExperimentConfig, split: Encoded) -> dict[str, list[int]]:
    """``{label-counts: [examples of each label]}`` for a reply's metrics; empty under differential
    privacy or secure aggregation (see :data:`fedlora.core.protocol.keys.LABEL_COUNTS`)."""
    if (
        mechanisms.get(cfg.privacy.mode).private
        or cfg.secure_aggregation.enabled
        or not task_of(cfg).has_classes
    ):
        return {}
    counts = torch.bincount(split.labels, minlength=len(cfg.data.labels))
    return {protocol.LABEL_COUNTS: [int(c) for c in counts]}


def client_seed(cfg: ExperimentConfig, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed per (experiment seed, round, client)."""
    return (cfg.seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**31)


def start_state(cfg: ExperimentConfig, plan: ClientPlan) -> State:
    """The adapter before this round's arrays are applied: the seeded initial one, or a fresh draw."""
    state = initial_state(cfg)
    if plan.a_init == "orthogonal":
        state = orthogonal_a(state, seed=cfg.seed)
    return state if plan.reinit_seed is None else fresh_lora(state, seed=plan.reinit_seed)


def load_local(store: ClientStore, plan: ClientPlan, *, include_current: bool = False) -> State:
    """The tensors this node kept from earlier rounds (only the kinds the plan keeps local); with
    ``include_current`` also those kept in this round (evaluation after training)."""

    if not plan.keep_local:
        return {}
    kept = store.load_arrays(protocol.LOCAL_ADAPTER, include_current=include_current) or {}
    return {k: v for k, v in kept.items() if kind_of(k) in plan.keep_local}


def save_local(store: ClientStore, plan: ClientPlan, state: State) -> None:
    """Keep the plan's local kinds in the client's store (it outlives this process)."""
    if plan.keep_local:
        kept = {k: v for k, v in state.items() if kind_of(k) in plan.keep_local}
        store.save_arrays(protocol.LOCAL_ADAPTER, kept)


def base_offsets(content: RecordDict, config: ConfigRecord, store: ClientStore) -> State:
    """The offsets to this client's frozen base weights for this message.

    Without an offsets version in the config (FedEx-LoRA, FLoRA with ``downlink = 'merged'``) they are the
    full offsets the message carries (none: W0). With one (FLoRA's stacked downlink), the client holds
    its offsets in its store: full offsets replace them; stacked factors are merged on top
    (:func:`fedlora.core.model.offsets.apply_stacks`), skipping versions it already holds. The result is kept
    with its version. Raises ValueError when the stored offsets are older than the stacks apply to.
    """
    full = content.array_records.get(protocol.BASE_OFFSETS)
    version = config.get(protocol.OFFSETS_VERSION)
    if version is None:
        return from_arrays(full) if full is not None else {}
    version = int(version)  # type: ignore[arg-type]
    if full is not None:
        current = from_arrays(full)
    else:
        current, have = offsets.unpack(store.load_arrays(protocol.OFFSETS_STATE, include_current=True))
        stacks = content.array_records.get(protocol.BASE_STACKS)
        since = int(config.get(protocol.OFFSETS_SINCE, version))  # type: ignore[arg-type]
        if have < since or have > version:
            raise ValueError(
                f"this client's base offsets are at version {have}, but the server's stacked factors take "
                f"version {since} to {version}: its state store is out of step with the server"
            )
        if have == version:
            return current
        current = offsets.apply_stacks(current, from_arrays(stacks) if stacks is not None else {}, after=have)
    store.save_arrays(protocol.OFFSETS_STATE, offsets.pack(current, version))
    return current


STARTUP_LOG = "FEDLORA_STARTUP_LOG"
"""Environment variable: a file to which :func:`log_startup` appends one JSON line per message."""
_messages_seen = 0
cpu_offset = 0.0
"""Added to this process's CPU time in the start-up log: a warm trainer sets it per message
(:func:`clients.warm.charge_cpu`) so that ``cpu_s`` is that message's cost, not the trainer's total."""


def log_startup(message: Message) -> None:
    """Measure client start-up: append the seconds from the server creating ``message`` until now
    (local training starts next) to the file named by FEDLORA_STARTUP_LOG; nothing when it is unset.

    Used by ``benchmarks/client_startup.py``; ``fresh`` is true for a process's first message, whose
    ``cpu_s`` is then the CPU cost of starting the process (imports, model, data), which a busy
    machine does not inflate the way it inflates ``startup_s``.
    """
    global _messages_seen
    _messages_seen += 1
    path = os.environ.get(STARTUP_LOG)
    if not path:
        return
    row = {
        "round": int(message.content[protocol.CONFIG][protocol.SERVER_ROUND]),  # type: ignore[arg-type,index]
        "startup_s": time.time() - message.metadata.created_at,
        "cpu_s": time.process_time() + cpu_offset,  # CPU seconds this process has used so far
        "pid": os.getpid(),
        "fresh": _messages_seen == 1,
    }
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(row) + "\n")
