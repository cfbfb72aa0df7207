"""``task = "causal-lm"``: a decoder language model learns to write the response after the prompt.

Each example becomes a prompt (``data.template`` filled with its text) and a response: the label's name,
or the ``data.response`` column of two-column instruction pairs (:mod:`fedlora.core.training.prompts`).
The loss covers the response tokens only; scores are the response loss, perplexity and, when responses
are label names, accuracy by ranking the names by likelihood (:mod:`fedlora.core.training.likelihood`).
The untouched model is evaluated first (round 0, zero-shot), and ``fedlora generate`` answers prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from fedlora.core.config import ConfigError
from fedlora.core.model.adapters import load_trained_lm
from fedlora.core.model.loading import load_causal_lm, load_tokenizer
from fedlora.core.model.weights import model_label
from fedlora.core.training.prompts import chat_parts, encode_lm, prompt_ids, prompt_text
from fedlora.tasks.base import Task
from fedlora.tasks.registry import register

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from fedlora.core.training.loops import Encoded, Scores


@register("causal-lm")
class CausalLm(Task):
    """Instruction tuning of a decoder: prompt in, response out; the LM head stays frozen."""

    description = "a decoder LLM learns to write the response after the prompt (docs/llm.md)"
    peft_task_type = "CAUSAL_LM"
    data_keys = ("template", "response")
    zero_shot = True
    ghost_clipping = False  # the loss is a mean over each sequence's response tokens
    long_evaluation = True

    def check_config(self) -> None:
        """A template names ``{text}`` (and ``{text_pair}`` only with a pair column); free-text responses
        come from their own column and cannot be split by label."""
        super().check_config()
        data = self.cfg.data
        if data.template and "{text}" not in data.template:
            raise ConfigError(
                f"data.template = {data.template!r} is invalid: expected a prompt with {{text}} in it, e.g. "
                "'Tweet: {text}\\nSentiment:'"
            )
        if data.template and "{text_pair}" in data.template and not data.text_pair:
            raise ConfigError("data.template names {text_pair} but data.text_pair is empty; set the column")
        if data.response and data.response in (data.text, data.text_pair):
            raise ConfigError(
                f"data.response = {data.response!r} is invalid: expected a column other than data.text and "
                "data.text_pair"
            )
        if data.response and data.partitioner in ("dirichlet", "shards"):
            raise ConfigError(
                f"data.partitioner = {data.partitioner!r} splits by label, but free-text responses "
                "(data.response) have none; use natural or iid"
            )

    def check_model(self, directory: Path, config: dict[str, Any]) -> None:
        """The folder's family must have a causal-LM class and not be an encoder (BERT-style models have
        an LM head for masked tokens; as a decoder they would see the tokens they predict)."""
        family = str(config.get("model_type", ""))
        decoder = family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
            family not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or bool(config.get("is_decoder"))
        )
        if not decoder:
            raise ConfigError(
                f"task = 'causal-lm' needs a decoder language model, but {model_label(self.cfg.model.path)} "
                f"is a {family or 'model of no known family'} "
                f"({', '.join(map(str, config.get('architectures') or ['no architecture named']))}); set "
                "model.path to a decoder folder (Llama, Qwen2, Mistral, Phi-3, Gemma, GPT-2, GPT-NeoX, OPT, "
                "...; e.g. model.path = 'smollm2') or task = 'classification'"
            )

    def class_names(self) -> tuple[str, ...]:
        """The label names that are the responses; none for free-text responses (``data.response``)."""
        return () if self.cfg.data.response else super().class_names()

    @property
    def has_classes(self) -> bool:
        """Free-text responses have no classes to count."""
        return not self.cfg.data.response

    def load_model(self, seed: int) -> PreTrainedModel:
        """The folder as a causal LM; nothing new is initialised."""
        return load_causal_lm(self.cfg.model.path, seed=seed)

    def load_trained(self, directory: Path) -> PeftModel:
        """The adapter on its causal LM, in eval mode."""
        return load_trained_lm(directory, self.cfg.model.path)

    def encode(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> Encoded:
        """Prompt + response ids, the loss on the response only (label names are the candidates)."""
        data, names = self.cfg.data, ds.features["label"].names
        return encode_lm(ds, tokenizer, data.max_length, template=data.template, labels=names)

    def round_metrics(self, scores: Scores | None) -> dict[str, float | None]:
        """``eval_perplexity``: exp of the mean response loss."""
        return {"eval_perplexity": scores.perplexity if scores else None}

    def summary_metrics(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """``final_eval_perplexity``: the last evaluated round's."""
        scored = [r for r in rows if r.get("eval_perplexity") is not None] or rows
        return {"final_eval_perplexity": scored[-1].get("eval_perplexity") if scored else None}

    def generate(self, model: PeftModel, text: str, *, max_new_tokens: int, raw: bool) -> str:
        """Greedy decoding after ``text`` filled into ``data.template`` (unless ``raw``) and the
        tokenizer's chat template, as in training; special tokens are left out of the answer."""
        tokenizer = load_tokenizer(self.cfg.model.path)
        prompt, _ = chat_parts(tokenizer, text if raw else prompt_text(self.cfg.data.template, text), "")
        ids = torch.tensor([prompt_ids(tokenizer, [prompt])[0]])
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()
