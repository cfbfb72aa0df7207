"""Evaluation of a causal LM on prompt + response examples (:class:`fedlora.core.training.prompts.LmEncoded`).

- **Loss and perplexity**: the mean cross-entropy per response token over all response tokens of the
  split (teacher forcing), and exp of it.
- **Accuracy** (closed-set responses: the label names): each label name is scored as the response after
  the example's prompt by its summed token log-likelihood, log p(c_1 | prompt) + log p(c_2 | prompt, c_1)
  + ...; the highest wins (ties: the first label). Deterministic: no sampling. The prompt is run once per
  example and its key/value cache is shared by every candidate, so evaluation costs about one forward
  pass per example whatever the number of labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from fedlora.core.training.loops import IGNORE, Scores, macro_f1, mixed_precision

if TYPE_CHECKING:
    from torch import nn


class LmEncoded(Protocol):
    """What evaluation reads of a split of :class:`fedlora.core.training.prompts.LmEncoded`
    (declared here, not imported: that module calls this one)."""

    @property
    def ids(self) -> tuple[tuple[int, ...], ...]: ...

    @property
    def labels(self) -> torch.Tensor: ...

    @property
    def candidates(self) -> tuple[tuple[int, ...], ...]: ...

    def __len__(self) -> int: ...

    def batch(self, index: list[int] | torch.Tensor) -> dict[str, torch.Tensor]: ...

    def prompt(self, i: int) -> tuple[int, ...]: ...


@torch.no_grad()
def candidate_logprobs(
    model: nn.Module, prompt: Sequence[int], candidates: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Summed log-likelihood (natural log) of each candidate token sequence after ``prompt``, shape
    (len(candidates),), float32. One forward pass over the prompt, one over all continuations."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].float().log_softmax(-1)
    scores = torch.stack([first[c[0]] for c in candidates]).cpu()
    width = max(len(c) for c in candidates) - 1
    if width == 0:
        return scores
    k = len(candidates)
    name = "cache" if hasattr(out, "cache") else "past_key_values"  # transformers 5.x renamed it
    cache = getattr(out, name)
    cache.batch_repeat_interleave(k)
    ids = torch.zeros((k, width), dtype=torch.long)
    mask = torch.zeros((k, len(prompt) + width), dtype=torch.long)
    mask[:, : len(prompt)] = 1
    for j, c in enumerate(candidates):
        ids[j, : len(c) - 1] = torch.tensor(list(c[:-1]))
        mask[j, len(prompt) : len(prompt) + len(c) - 1] = 1
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **{name: cache}
    ).logits.float()
    logp = logits.log_softmax(-1).cpu()
    for j, c in enumerate(candidates):
        rest = torch.tensor(list(c[1:]), dtype=torch.long)
        scores[j] += logp[j, torch.arange(len(rest)), rest].sum()
    return scores


def brute_force_logprob(model: nn.Module, prompt: Sequence[int], candidate: Sequence[int]) -> float:
    """The summed log-likelihood of ``candidate`` after ``prompt`` from one plain forward pass over both
    (no cache): the reference :func:`candidate_logprobs` is tested against."""
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompt, *candidate]], device=device)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1).cpu()
    n = len(prompt)
    return float(sum(logp[n - 1 + t, token] for t, token in enumerate(candidate)))


def score_lm(model: nn.Module, data: LmEncoded, *, batch_size: int = 32) -> Scores:
    """Response loss, perplexity, and (closed-set) likelihood-ranking accuracy and macro-F1 of ``model``
    over ``data``; nan where not defined (an empty split; accuracy of free-text responses)."""
    if len(data) == 0:
        return Scores(math.nan, math.nan, math.nan, math.nan)
    was_training = model.training
    model.eval()
    try:
        with mixed_precision(next(model.parameters()).device):
            if data.candidates:
                return _ranked(model, data)
            loss = _teacher_forced(model, data, batch_size)
    finally:
        model.train(was_training)
    return Scores(loss, math.nan, math.nan, math.exp(min(loss, 700.0)))


def _ranked(model: nn.Module, data: LmEncoded) -> Scores:
    """Accuracy by ranking the label names; the loss is that of each example's own label."""
    predicted = torch.empty(len(data), dtype=torch.long)
    nll, tokens = 0.0, 0
    for i in range(len(data)):
        scores = candidate_logprobs(model, data.prompt(i), data.candidates)
        predicted[i] = int(scores.argmax())
        own = int(data.labels[i])
        nll -= float(scores[own])
        tokens += len(data.candidates[own])
    loss = nll / tokens
    accuracy = int((predicted == data.labels).sum()) / len(data)
    return Scores(loss, accuracy, macro_f1(data.labels, predicted), math.exp(min(loss, 700.0)))


@torch.no_grad()
def _teacher_forced(model: nn.Module, data: LmEncoded, batch_size: int) -> float:
    """Mean cross-entropy per response token over all of ``data``."""
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    nll, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size])
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits[:, :-1]
        target = batch["labels"][:, 1:].to(device)
        nll += float(
            torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                target.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
        )
        tokens += int((target != IGNORE).sum())
    return nll / max(tokens, 1)
