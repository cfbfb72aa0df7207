"""Base model loading from local directories (offline), with a per-process cache.

Models are loaded in float32 whatever dtype their folder holds (most published LLM checkpoints are
bfloat16): the LoRA adapters then train and travel in float32, and on a CUDA GPU the forward passes run
under bf16 autocast (:func:`fedlora.core.training.loops.mixed_precision`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora.core.model.targets import head_modules
from fedlora.core.model.weights import model_dir, model_label


@functools.cache
def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, loaded once per process; a pad token is added if the model has none."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(path)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(
    path: str, num_labels: int | None = None, seed: int = 0, *, labels: Sequence[str] = ()
) -> PreTrainedModel:
    """A fresh sequence classifier on the pretrained weights; the new head is initialised from ``seed``.

    ``labels``: the class names in label-id order; they become the model config's ``id2label`` and
    ``label2id`` (saved with the adapter, so a reloaded model predicts names). Without them, give
    ``num_labels`` (the names are then LABEL_0, LABEL_1, ...). The model is returned in train mode (Opacus
    and dropout both need it).

    A folder that already holds a classification head (of any size: a classifier saved for other labels)
    gets a new head all the same, initialised as transformers initialises a missing one; a causal LM's
    head is left out. A mismatch anywhere else is an error: the weights do not fit the config.
    """
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    if labels:
        names = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    elif num_labels is not None:
        names = {"num_labels": num_labels}
    else:
        raise ValueError("load_classifier needs labels or num_labels")
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir(path)),
        dtype=torch.float32,
        ignore_mismatched_sizes=True,  # a head of another size: checked below, then replaced
        output_loading_info=True,
        **names,
    )
    heads = head_modules(model)
    mismatched = sorted(key for key, *_ in info["mismatched_keys"] if not _under(key, heads))
    if mismatched:
        raise ValueError(
            f"model.path: {model_label(path)} has weights whose shapes do not fit its config.json "
            f"({mismatched[0]}, ...); copy the model's files again from the original"
        )
    if any(key not in info["missing_keys"] for key in _head_keys(model, heads)):  # the folder had a head
        _new_head(model, heads, seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    model.train()
    return model


def _under(key: str, modules: Sequence[str]) -> bool:
    """Whether the state-dict ``key`` belongs to one of ``modules``."""
    return any(key.startswith(f"{m}.") for m in modules)


def _head_keys(model: PreTrainedModel, heads: list[str]) -> list[str]:
    """The state-dict keys of the head modules."""
    return [f"{head}.{name}" for head in heads for name, _ in model.get_submodule(head).named_parameters()]


def _new_head(model: PreTrainedModel, heads: list[str], seed: int) -> None:
    """Initialise the head modules afresh from ``seed``, as transformers initialises missing weights
    (its ``_init_weights`` skips tensors flagged as loaded: the flags are cleared first)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for head in heads:
            for module in model.get_submodule(head).modules():
                module.__dict__.pop("_is_hf_initialized", None)
                for param in module.parameters(recurse=False):
                    param.__dict__.pop("_is_hf_initialized", None)
                model._init_weights(module)


def load_causal_lm(path: str, seed: int = 0) -> PreTrainedModel:
    """A pretrained causal language model (``task = "causal-lm"``) in float32 and train mode; nothing new
    is initialised (``seed`` only fixes torch's generator, as for :func:`load_classifier`). Its LM head
    stays frozen under LoRA. A pad token id is set from the tokenizer when the config has none."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir(path)), dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    model.train()
    return model
