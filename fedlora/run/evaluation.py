"""Server-side evaluation of the global adapter on the test set (held out, or ``data.test_path``).

For ``task = "causal-lm"`` the scores are the response loss, perplexity and likelihood-ranking accuracy
of :mod:`fedlora.core.training.likelihood`; with free-text responses accuracy and the majority
baseline are nan. The server process then uses ``federation.client_cpus`` torch threads, like a
client: with torch's default (every core) a CPU shared with the client actors or other work spends
most of the time spinning (with two threads on the busy 2-core machine the
quickstart's zero-shot evaluation of 100 examples was not done after 5
CPU-minutes, where one thread scores an example in about 0.6 CPU-s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import PeftModel

from fedlora.core.config import ExperimentConfig
from fedlora.core.data.splits import get_splits, majority_accuracy
from fedlora.core.model.adapters import load_adapter_state, set_base_offsets
from fedlora.core.model.arrays import State, fold_cores
from fedlora.core.model.cores import set_cores
from fedlora.core.model.loading import load_tokenizer
from fedlora.core.training.loops import Scores, macro_f1, score
from fedlora.tasks.models import get_model
from fedlora.tasks.registry import task_of


@dataclass
class Evaluator:
    """Evaluates a global adapter on the experiment's test set (encoded once)."""

    cfg: ExperimentConfig
    majority_accuracy: float = field(init=False)
    """Accuracy of always predicting the test set's most frequent label."""
    majority_macro_f1: float = field(init=False)
    """Macro-F1 of always predicting the test set's most frequent label."""

    def __post_init__(self) -> None:
        test = get_splits(self.cfg.data, self.cfg.federation.num_clients, self.cfg.seed).test
        task = task_of(self.cfg)
        if task.long_evaluation:  # torch's default threads would oversubscribe a CPU shared with clients
            torch.set_num_threads(max(1, int(self.cfg.federation.client_cpus)))
        self.test = task.encode(test, load_tokenizer(self.cfg.model.path))
        labels = self.test.labels
        if not task.has_classes:  # free-text responses: no classes to count
            self.majority_accuracy = self.majority_macro_f1 = float("nan")
            return
        self.majority_accuracy = majority_accuracy(test)
        majority = torch.full_like(labels, int(torch.bincount(labels).argmax())) if len(labels) else labels
        self.majority_macro_f1 = macro_f1(labels, majority) if len(labels) else float("nan")

    def __call__(self, state: State, base_offsets: State) -> Scores:
        """Loss, accuracy and macro-F1 of the adapter ``state`` over W0 + ``base_offsets`` on the test set."""
        return score(global_model(self.cfg, state, base_offsets), self.test)


def global_model(cfg: ExperimentConfig, state: State, base_offsets: State) -> PeftModel:
    """The process's model holding the global adapter and base offsets, in peft's plain form: a core R
    (Fed-SB) is folded into A (B (R A) = B R A), so the saved adapter loads with ``PeftModel``."""
    model = get_model(cfg)
    set_cores(model, False)  # in-process clients may share this model and have added cores
    set_base_offsets(model, base_offsets)
    load_adapter_state(model, fold_cores(state))
    return model
