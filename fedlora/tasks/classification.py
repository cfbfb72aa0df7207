"""``task = "classification"``: a new head on the pretrained model predicts each example's class.

The head has one output per class name (``data.labels``, or the names inferred from ``data.source``);
it is trained and travels with the adapters. Scores: cross-entropy, accuracy and macro-F1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.core.model.adapters import load_trained
from fedlora.core.model.loading import load_classifier
from fedlora.core.training.loops import encode
from fedlora.tasks.base import Task
from fedlora.tasks.registry import register

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedlora.core.training.loops import Encoded


@register("classification")
class Classification(Task):
    """A sequence classifier: the text (and text pair) in, one class out."""

    description = "a head on the model predicts the label (accuracy, macro-F1)"

    def model_key(self) -> tuple[object, ...]:
        """The class names: they size the head and name its outputs."""
        return self.class_names()

    def load_model(self, seed: int) -> PreTrainedModel:
        """The folder as a sequence classifier with a new head for the class names (from ``seed``)."""
        return load_classifier(self.cfg.model.path, seed=seed, labels=self.class_names())

    def load_trained(self, directory: Path) -> PeftModel:
        """The adapter on its base model; ``model.config.id2label`` maps an output to its class name."""
        return load_trained(directory, self.cfg.model.path)

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> Encoded:
        """Texts (and pairs) truncated to ``data.max_length`` tokens, with their class ids."""
        return encode(ds, tokenizer, self.cfg.data.max_length)
