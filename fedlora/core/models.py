"""Base model loading from local directories (offline), with a per-process cache."""

from __future__ import annotations

import functools

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora.core.weights import model_dir


@functools.cache
def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, loaded once per process; a pad token is added if the model has none."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(path)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path: str, num_labels: int, seed: int) -> PreTrainedModel:
    """A fresh sequence classifier on the pretrained weights; the new head is initialised from ``seed``.

    The model is returned in train mode (Opacus and dropout both need it).
    """
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir(path)), num_labels=num_labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    model.train()
    return model
