"""Local training and evaluation loops over tokenised examples (plain PyTorch, CPU or CUDA).

On a CUDA GPU with bfloat16 support the forward passes run under bf16 autocast (mixed precision):
weights, gradients and optimizer state stay float32 and the loss is computed in float32, so no
gradient scaling is needed. On the CPU nothing changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedlora.core.config import TrainConfig
from fedlora.core.training.alternation import Alternation

if TYPE_CHECKING:
    import datasets
    from torch import nn
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
"""Token label that no loss covers (prompt and padding of a causal-LM example; torch's ignore_index)."""


@dataclass(frozen=True)
class Encoded:
    """Token ids (unpadded, truncated) and labels of a split; batches are padded on the fly."""

    ids: tuple[tuple[int, ...], ...]
    labels: torch.Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Input ids, attention mask and labels for ``index``, padded to the longest row."""
        rows = [self.ids[int(i)] for i in index]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[j, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[index]}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of ``model`` on ``batch``: :meth:`loss_of` its logits."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return self.loss_of(logits, batch["labels"])

    def loss_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean over the batch of each example's loss (cross-entropy of its class); a per-example
        mean, so that DP-SGD clips one example's gradient (Opacus's mean-reduction contract). Splits of
        other tasks override it."""
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    def scores(self, model: nn.Module, *, batch_size: int) -> Scores:
        """Loss, accuracy and macro-F1 of ``model`` on this split (see :func:`score`)."""
        return _classification_scores(model, self, batch_size=batch_size)


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM loss: each sequence's mean cross-entropy over its response tokens (``labels`` not
    IGNORE; the logits at t predict the token at t + 1), averaged over the sequences. A per-sequence
    mean, so that DP-SGD clips one example's gradient (Opacus's mean-reduction contract)."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(target.shape)
    counts = (target != IGNORE).sum(1).clamp(min=1)
    return (nll.sum(1) / counts).mean()


def encode(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Tokenise the ``text`` column, with ``text_pair`` as the second segment when the dataset has one
    (a pair is truncated to ``max_length`` tokens in all, longest first), and keep the ``label`` column."""
    texts = list(ds["text"])
    pairs = list(ds["text_pair"]) if "text_pair" in ds.column_names else None
    ids = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"] if texts else []
    labels = torch.tensor(list(ds["label"]), dtype=torch.long)
    return Encoded(ids=tuple(tuple(r) for r in ids), labels=labels, pad_id=int(tokenizer.pad_token_id))


def num_steps(train: TrainConfig, num_examples: int) -> int:
    """Optimizer steps this round: ``local_steps``, or ``ceil(local_epochs * n / batch_size)``."""
    if train.local_epochs > 0:
        return max(1, math.ceil(train.local_epochs * num_examples / train.batch_size))
    return train.local_steps


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless epochs of shuffled batches (the last short batch of an epoch is kept)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def mixed_precision(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on a CUDA device that supports it; a no-op context on the CPU and older GPUs."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def train_local(model: nn.Module, data: Encoded, train: TrainConfig, *, seed: int) -> tuple[float, int]:
    """Run this round's local steps; returns (mean training loss, examples seen).

    A fresh optimizer is made every round (clients keep no optimizer state between rounds). With the
    model's ``alternate_every`` set (LA-LoRA, :mod:`fedlora.core.training.alternation`) the steps alternate
    between training B and training A.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout
    model.train()
    optimizer = make_optimizer(model, train)
    batches = _shuffled_batches(len(data), train.batch_size, generator)
    total, seen = 0.0, 0
    steps = num_steps(train, len(data))
    with Alternation(model) as alternation:
        for step in range(steps):
            alternation.before_step(step)
            batch = {k: v.to(device) for k, v in data.batch(next(batches)).items()}
            optimizer.zero_grad(set_to_none=True)
            with mixed_precision(device):
                loss = data.loss(model, batch)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch["labels"])
            seen += len(batch["labels"])
    return total / max(seen, 1), seen


@dataclass(frozen=True)
class Scores:
    """Evaluation of a model on a split; every field is nan for an empty split."""

    loss: float
    """Mean cross-entropy (causal-LM: per response token, over all response tokens of the split)."""
    accuracy: float
    """Fraction of examples predicted right, in [0, 1]."""
    macro_f1: float
    """Unweighted mean over classes of F1, in [0, 1] (scikit-learn's ``f1_score(average="macro")``: the
    classes that occur in the labels or the predictions; a class with no true or predicted example
    scores 0)."""
    perplexity: float = math.nan
    """exp(loss) for a causal LM (nan for classification)."""


def score(model: nn.Module, data: Encoded, *, batch_size: int = 128) -> Scores:
    """Loss, accuracy and macro-F1 of ``model`` over ``data`` (and perplexity for a causal-LM split,
    whose accuracy ranks the label names by likelihood: :mod:`fedlora.core.training.likelihood`)."""
    return data.scores(model, batch_size=batch_size)


@torch.no_grad()
def _classification_scores(model: nn.Module, data: Encoded, *, batch_size: int) -> Scores:
    if len(data) == 0:
        return Scores(math.nan, math.nan, math.nan)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    predicted = torch.empty(len(data), dtype=torch.long)
    # Sorting by length keeps padding (and CPU time) low; the order does not change the result.
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in data.batch(index).items()}
        with mixed_precision(device):
            out = model(**batch)
        loss_sum += float(out.loss) * len(batch["labels"])
        predicted[index] = out.logits.argmax(-1).cpu()
    model.train(was_training)
    accuracy = int((predicted == data.labels).sum()) / len(data)
    return Scores(loss_sum / len(data), accuracy, macro_f1(data.labels, predicted))


def macro_f1(labels: torch.Tensor, predicted: torch.Tensor) -> float:
    """scikit-learn's macro-averaged F1 of integer predictions against integer labels, in [0, 1]."""
    # start-up: scikit-learn takes 1-2 s to import; only evaluation needs it, not a training client
    from sklearn.metrics import f1_score

    return float(f1_score(labels.numpy(), predicted.numpy(), average="macro", zero_division=0.0))


def evaluate(model: nn.Module, data: Encoded, *, batch_size: int = 128) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (fraction in [0, 1]) over ``data``; (nan, nan) if empty."""
    scores = score(model, data, batch_size=batch_size)
    return scores.loss, scores.accuracy
