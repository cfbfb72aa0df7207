"""Examples as prompts and responses for a causal language model (``task = "causal-lm"``).

Each example becomes a prompt (``data.template`` filled with its text, e.g. "Tweet: {text}\\nSentiment:")
and a response (the label's name, or the ``data.response`` column). When the tokenizer has a chat
template, the prompt is a user turn followed by the assistant header and the response is the assistant
turn (with its end-of-turn tokens); otherwise the prompt is the text after the BOS token and the
response is a space, the answer and EOS. The prompt and the response are tokenised separately, so the
boundary between them is exact: the loss covers the response tokens only. Examples longer than
``data.max_length`` tokens lose the beginning of their prompt, never their response (the instruction's
cue just before the response is kept).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedlora.core.training.likelihood import score_lm
from fedlora.core.training.loops import IGNORE, Encoded, Scores, sequence_loss

if TYPE_CHECKING:
    import datasets
    from torch import nn
    from transformers import PreTrainedTokenizerBase

RESPONSE = "response"
"""Column of a loaded source holding free-text responses (``data.response``)."""


@dataclass(frozen=True)
class LmEncoded(Encoded):
    """Prompt + response token ids per example; ``labels`` are class ids (all 0 for free-text responses).

    ``prompt_lens[i]``: how many of ``ids[i]`` are prompt. ``candidates``: the token ids of every label
    name as a response (closed-set tasks; empty for free text), scored after each prompt for accuracy.
    """

    prompt_lens: tuple[int, ...] = ()
    candidates: tuple[tuple[int, ...], ...] = ()

    def batch(self, index: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Input ids and attention mask padded on the right, and token labels: the ids of the response
        tokens, :data:`~fedlora.core.training.loops.IGNORE` on prompt and padding."""
        out = super().batch(index)
        labels = torch.full_like(out["input_ids"], IGNORE)
        for j, i in enumerate(index):
            row = self.ids[int(i)]
            start = self.prompt_lens[int(i)]
            labels[j, start : len(row)] = torch.tensor(row[start:], dtype=torch.long)
        out["labels"] = labels
        return out

    def loss_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each sequence's mean cross-entropy over its response tokens, averaged over the batch."""
        return sequence_loss(logits, labels)

    def scores(self, model: nn.Module, *, batch_size: int) -> Scores:
        """Response loss, perplexity and likelihood-ranking accuracy
        (:mod:`fedlora.core.training.likelihood`)."""
        return score_lm(model, self, batch_size=min(batch_size, 32))

    def prompt(self, i: int) -> tuple[int, ...]:
        """The prompt tokens of example ``i``."""
        return self.ids[i][: self.prompt_lens[i]]


def prompt_text(template: str, text: str, text_pair: str = "") -> str:
    """The prompt of one example: ``template`` filled with its text (and pair); the text if no template."""
    if not template:
        return text
    return template.replace("{text}", text).replace("{text_pair}", text_pair)


def chat_parts(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> tuple[str, str]:
    """``(prompt, response)`` as the model sees them: through the tokenizer's chat template (a user turn
    and the assistant's header; the assistant's answer with its end-of-turn), else unchanged but for a
    space before the response."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt, " " + response
    user = [{"role": "user", "content": prompt}]
    head = str(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False))
    full = str(
        tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
    )
    if not full.startswith(head):
        raise ValueError("the tokenizer's chat template does not start an answer with the generation prompt")
    return head, full[len(head) :]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts as :func:`chat_parts` makes them (BOS first when there is no chat template
    and the tokenizer has one)."""
    if not prompts:
        return []
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if getattr(tokenizer, "chat_template", None) or bos is None:
        return [list(r) for r in ids]
    return [[bos, *r] for r in ids]


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    """Token ids of a response part from :func:`chat_parts`: EOS (or SEP) appended without a chat
    template (with one, the template's end-of-turn is already in the text)."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "chat_template", None):
        return ids
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return ids + ([end] if end is not None else [])


def encode_lm(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    template: str,
    labels: Sequence[str],
) -> LmEncoded:
    """Tokenise ``ds`` (columns text, [text_pair], label, [response]) as prompt + response.

    Without a ``response`` column the responses are the names ``labels[label]`` and every label name is
    a candidate; the prompts are then cut to leave room for the longest candidate, so that each
    candidate is scored after the same prompt tokens the model trained on.
    """
    texts = list(ds["text"])
    pairs = list(ds["text_pair"]) if "text_pair" in ds.column_names else [""] * len(texts)
    class_ids = list(ds["label"])
    free = RESPONSE in ds.column_names
    answers = list(ds[RESPONSE]) if free else [labels[c] for c in class_ids]
    triples = zip(texts, pairs, answers, strict=True)
    parts = [chat_parts(tokenizer, prompt_text(template, t, p), a) for t, p, a in triples]
    heads = prompt_ids(tokenizer, [h for h, _ in parts])
    tails = _cached_responses(tokenizer)
    candidates = () if free else tuple(tuple(tails(chat_parts(tokenizer, "", n)[1])) for n in labels)
    room = max((len(c) for c in candidates), default=0)
    rows, lens = [], []
    for head, (_, answer) in zip(heads, parts, strict=True):
        tail = tails(answer)
        keep = max(1, max_length - (room or len(tail)))
        head = head[-keep:]
        rows.append(tuple(head + tail[: max(1, max_length - len(head))]))
        lens.append(len(head))
    return LmEncoded(
        ids=tuple(rows),
        labels=torch.tensor(class_ids, dtype=torch.long),
        pad_id=int(tokenizer.pad_token_id),
        prompt_lens=tuple(lens),
        candidates=tuple(c[: max(1, max_length - 1)] for c in candidates),
    )


def _cached_responses(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], list[int]]:
    """:func:`response_ids` memoised for one encoding (label names repeat)."""

    @functools.cache
    def ids(text: str) -> list[int]:
        return response_ids(tokenizer, text)

    return lambda text: list(ids(text))
