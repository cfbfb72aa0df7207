"""Regression on a numeric label: the label column's values are numbers (star ratings 1-5, scores 0-10,
...) and a one-output head learns to predict them, with the mean squared error as its loss.

Dropped into ``fedlora/tasks/`` this file is all it takes: the task registry finds it, ``fedlora tasks``
lists it, and ``task = "regression"`` runs it with every strategy (the head travels like a classifier's).
The labels stay the data layer's class names (``data.labels``, sorted numerically), so splits, label
skew and the per-client counts work unchanged; this task reads each name as its number. Scores: the
loss is the mean squared error, accuracy the share of examples whose prediction rounds to their own
value (the nearest label value), macro-F1 over those nearest values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel

from fedlora.core.config import ConfigError
from fedlora.core.model.loading import load_classifier
from fedlora.core.training.loops import Encoded, Scores, encode, macro_f1
from fedlora.tasks.base import Task
from fedlora.tasks.registry import register

if TYPE_CHECKING:
    import datasets
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class NumericEncoded(Encoded):
    """Texts with class ids (``labels``) and the number each class id stands for (``values``)."""

    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def loss_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the head's one output against the examples' values."""
        target = self.values.to(logits.device)[labels]
        return torch.nn.functional.mse_loss(logits[:, 0].float(), target)

    @torch.no_grad()
    def scores(self, model: nn.Module, *, batch_size: int) -> Scores:
        """MSE, and accuracy and macro-F1 of the nearest label value to each prediction."""
        if len(self) == 0:
            return Scores(math.nan, math.nan, math.nan)
        was_training = model.training
        model.eval()
        outputs = []
        for start in range(0, len(self), batch_size):
            batch = self.batch(list(range(start, min(start + batch_size, len(self)))))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            outputs.append(logits[:, 0].float().cpu())
        predictions = torch.cat(outputs)
        model.train(was_training)
        target = self.values[self.labels]
        nearest = (predictions[:, None] - self.values[None, :]).abs().argmin(1)
        accuracy = float((nearest == self.labels).float().mean())
        return Scores(float(((predictions - target) ** 2).mean()), accuracy, macro_f1(self.labels, nearest))


@register("regression")
class Regression(Task):
    """A one-output head predicts each example's number; the label names are the numbers."""

    description = "a one-output head predicts the label's number (mean squared error)"
    ghost_clipping = False  # Opacus's ghost clipping would apply cross-entropy, not the squared error

    def class_names(self) -> tuple[str, ...]:
        """The label names, each of which must be a number (ConfigError naming the first that is not)."""
        names = super().class_names()
        for name in names:
            try:
                float(name)
            except ValueError:
                raise ConfigError(
                    f"task = 'regression' reads each label as a number, but data.label has {name!r}; "
                    "use a numeric label column or task = 'classification'"
                ) from None
        return names

    def model_key(self) -> tuple[object, ...]:
        """The label values (they decide what the head's output means)."""
        return self.class_names()

    def load_model(self, seed: int) -> PreTrainedModel:
        """The folder with a new one-output head (from ``seed``)."""
        model = load_classifier(self.cfg.model.path, num_labels=1, seed=seed)
        model.config.problem_type = "regression"
        return model

    def load_trained(self, directory: Path) -> PeftModel:
        """The adapter and its one-output head on the base model, in eval mode."""
        model = PeftModel.from_pretrained(load_classifier(self.cfg.model.path, num_labels=1), str(directory))
        model.eval()
        return model

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> Encoded:
        """Texts truncated to ``data.max_length`` tokens, with class ids and each class's number."""
        plain = encode(ds, tokenizer, self.cfg.data.max_length)
        values = torch.tensor([float(n) for n in ds.features["label"].names])
        return NumericEncoded(ids=plain.ids, labels=plain.labels, pad_id=plain.pad_id, values=values)
