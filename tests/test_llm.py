"""task = "causal-lm" on the tiny random Llama: prompts and responses, the loss mask, truncation,
likelihood-ranking accuracy against brute force, bfloat16 folders, config errors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from fedlora.core.config import ConfigError, ExperimentConfig, from_dict
from fedlora.core.model.adapters import adapter_state, load_adapter_state, set_trainable
from fedlora.core.model.arrays import from_arrays, to_arrays
from fedlora.core.model.loading import load_tokenizer
from fedlora.core.training.likelihood import brute_force_logprob, candidate_logprobs
from fedlora.core.training.loops import IGNORE, score, sequence_loss, train_local
from fedlora.core.training.prompts import LmEncoded, chat_parts, encode_lm
from fedlora.run.experiment import check_strategy, load_experiment
from fedlora.tasks.models import get_model
from fedlora.tasks.registry import task_of

TEMPLATE = "tweet: {text} sentiment:"
LABELS = ["negative", "neutral", "positive"]


def _cfg(path: str, **data: object) -> ExperimentConfig:
    return from_dict(
        {
            "task": "causal-lm",
            "model": {"path": path},
            "data": {"template": TEMPLATE, "labels": LABELS, **data},
            "train": {"local_steps": 3, "batch_size": 8, "lr": 1e-2},
        }
    )


@pytest.fixture(scope="module")
def encoded(tiny_llama, synthetic_tweets) -> LmEncoded:  # type: ignore[no-untyped-def]
    cfg = _cfg(tiny_llama.path)
    data = task_of(cfg).encode(synthetic_tweets.select(range(24)), load_tokenizer(tiny_llama.path))
    assert isinstance(data, LmEncoded)
    return data


def test_labels_cover_the_response_tokens_only(encoded: LmEncoded) -> None:
    batch = encoded.batch(list(range(8)))
    for j in range(8):
        row, start = encoded.ids[j], encoded.prompt_lens[j]
        covered = (batch["labels"][j] != IGNORE).nonzero().flatten().tolist()
        assert covered == list(range(start, len(row)))  # not the prompt, not the padding
        assert batch["labels"][j, start : len(row)].tolist() == list(row[start:])
        assert tuple(row[start:]) == encoded.candidates[int(encoded.labels[j])]  # the label's name


def test_changing_the_prompt_labels_changes_nothing(tiny_llama, encoded: LmEncoded) -> None:  # type: ignore[no-untyped-def]
    """Whatever the logits and labels at prompt positions say, the loss and its mask are the same."""
    model = get_model(_cfg(tiny_llama.path))
    batch = encoded.batch(list(range(8)))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    base = sequence_loss(logits, batch["labels"])
    other_logits, other_labels = logits.clone(), batch["labels"].clone()
    generator = torch.Generator().manual_seed(1)
    for j in range(8):
        start = encoded.prompt_lens[j]
        other_logits[j, : start - 1] = torch.randn(other_logits[j, : start - 1].shape, generator=generator)
        other_labels[j, :start] = torch.randint(0, 50, (start,), generator=generator)  # prompt tokens'
        other_labels[j, :start] = IGNORE  # ... the encoder's mask puts them back
    assert torch.equal((other_labels != IGNORE), (batch["labels"] != IGNORE))
    assert float(sequence_loss(other_logits, other_labels)) == pytest.approx(float(base), abs=1e-6)
    prompt_rows = LmEncoded(
        ids=tuple((9,) * 5 + encoded.ids[j][encoded.prompt_lens[j] :] for j in range(8)),
        labels=encoded.labels[:8],
        pad_id=encoded.pad_id,
        prompt_lens=(5,) * 8,
    )
    changed = prompt_rows.batch(list(range(8)))["labels"]
    for j in range(8):  # other prompt tokens: the same response labels, shifted to the new boundary
        assert changed[j][changed[j] != IGNORE].tolist() == list(encoded.ids[j][encoded.prompt_lens[j] :])


def test_truncation_keeps_the_response(tiny_llama, synthetic_tweets) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_tokenizer(tiny_llama.path)
    ds = synthetic_tweets.select(range(12))
    full = encode_lm(ds, tokenizer, 512, template=TEMPLATE, labels=LABELS)
    short = encode_lm(ds, tokenizer, 16, template=TEMPLATE, labels=LABELS)
    for j in range(12):
        assert len(short.ids[j]) <= 16
        response = full.ids[j][full.prompt_lens[j] :]
        assert short.ids[j][short.prompt_lens[j] :] == response  # the whole response
        assert short.prompt(j) == full.prompt(j)[-short.prompt_lens[j] :]  # the end of the prompt


def test_chat_template_wraps_prompt_and_response(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    tokenizer = load_tokenizer(tiny_llama.path).__class__.from_pretrained(tiny_llama.path)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt, response = chat_parts(tokenizer, "tweet: good sentiment:", "positive")
    assert prompt == "<user>tweet: good sentiment:</s><assistant>"
    assert response == "positive</s>"


def test_ranking_equals_brute_force(tiny_llama, encoded: LmEncoded) -> None:  # type: ignore[no-untyped-def]
    model = get_model(_cfg(tiny_llama.path))
    model.eval()
    predicted = []
    for i in range(len(encoded)):
        fast = candidate_logprobs(model, encoded.prompt(i), encoded.candidates)
        slow = [brute_force_logprob(model, encoded.prompt(i), c) for c in encoded.candidates]
        assert fast.tolist() == pytest.approx(slow, abs=1e-4)
        predicted.append(max(range(len(slow)), key=lambda k: slow[k]))
    scores = score(model, encoded)
    brute = sum(p == int(y) for p, y in zip(predicted, encoded.labels, strict=True)) / len(encoded)
    assert scores.accuracy == brute
    assert scores.perplexity == pytest.approx(math.exp(scores.loss))


def test_training_lowers_the_response_loss_and_keeps_the_lm_head(tiny_llama, encoded: LmEncoded) -> None:  # type: ignore[no-untyped-def]
    cfg = _cfg(tiny_llama.path)
    model = get_model(cfg)
    state = adapter_state(model)
    assert state and all(".lora_" in k for k in state)  # only adapters: no head travels
    head = model.get_base_model().lm_head.weight.detach().clone()
    before = score(model, encoded).loss
    train_local(model, encoded, dataclasses.replace(cfg.train, local_steps=10), seed=0)
    after = score(model, encoded).loss
    assert after < before
    assert torch.equal(model.get_base_model().lm_head.weight, head)
    load_adapter_state(model, state)  # the cached model goes back as it was


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_bfloat16_folder_trains_in_float32(tiny_llama, synthetic_tweets, tmp_path: Path, task: str) -> None:  # type: ignore[no-untyped-def]
    """A model folder saved in bfloat16 trains; the adapters are float32 and become Flower arrays."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama.path).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama.path).save_pretrained(folder)
    cfg = _cfg(str(folder)) if task == "causal-lm" else from_dict({"model": {"path": str(folder)}})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=LABELS))
    model = get_model(cfg)
    set_trainable(model)
    data = task_of(cfg).encode(synthetic_tweets.select(range(16)), load_tokenizer(str(folder)))
    loss, _ = train_local(model, data, dataclasses.replace(cfg.train, local_steps=1), seed=0)
    state = adapter_state(model)
    assert math.isfinite(loss)
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert from_arrays(to_arrays(state)).keys() == state.keys()


@pytest.mark.parametrize(
    ("data", "task", "needle"),
    [
        ({"template": "Tweet: {text}"}, "classification", "data.template"),
        ({"response": "answer"}, "classification", "data.response"),
        ({"template": "no placeholder"}, "causal-lm", "{text}"),
        ({"response": "answer", "partitioner": "dirichlet"}, "causal-lm", "data.partitioner"),
        ({}, "generation", "task"),
    ],
)
def test_bad_llm_settings_fail_in_one_line(data: dict[str, str], task: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("{", r"\{").replace("}", r"\}")) as info:
        check_strategy(from_dict({"task": task, "data": data}))
    assert "\n" not in str(info.value)


def test_a_classifier_folder_is_refused_for_causal_lm(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    from fedlora.run.experiment import check_model

    cfg = from_dict({"task": "causal-lm", "model": {"path": tiny_bert.path}})
    with pytest.raises(ConfigError, match="needs a decoder language model"):
        check_model(cfg)


def test_mlp_preset_resolves_to_llama_names(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    from fedlora.core.model.adapters import resolve_targets
    from fedlora.core.model.loading import load_causal_lm

    model = load_causal_lm(tiny_llama.path)
    assert resolve_targets(model, ["mlp"]) == ["gate_proj", "up_proj", "down_proj"]
    assert resolve_targets(model, ["qkvo"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_free_text_responses_from_two_columns(tiny_llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    from fedlora.core.data.sources import write_table
    from fedlora.core.data.splits import build_splits

    rows = [{"question": f"q {i} good", "answer": "great" if i % 2 else "bad"} for i in range(40)]
    path = write_table(pd.DataFrame(rows), tmp_path / "qa.csv")
    cfg = _cfg(
        tiny_llama.path,
        source=str(path),
        text="question",
        response="answer",
        labels=[],
        template="",
        partitioner="iid",
        test_size=10,
    )
    splits = build_splits(cfg.data, 2, 0)
    data = task_of(cfg).encode(splits.test, load_tokenizer(tiny_llama.path))
    assert isinstance(data, LmEncoded) and not data.candidates
    scores = score(get_model(cfg), data)
    assert math.isnan(scores.accuracy) and scores.perplexity == pytest.approx(math.exp(scores.loss))


def test_token_cache_keeps_prompt_lengths_and_candidates(encoded: LmEncoded, tmp_path: Path) -> None:
    from fedlora.core.data import token_cache

    token_cache.save(tmp_path, "k", encoded, encoded)
    loaded = token_cache.load(tmp_path, "k")
    assert loaded is not None
    train, _ = loaded
    assert isinstance(train, LmEncoded)
    assert (train.ids, train.prompt_lens, train.candidates) == (
        encoded.ids,
        encoded.prompt_lens,
        encoded.candidates,
    )
    assert torch.equal(train.labels, encoded.labels)


def test_generate_refuses_what_is_not_a_finished_causal_lm_run(tmp_path: Path) -> None:
    from fedlora.core.records.rundir import RunDirectory
    from fedlora.run.generate import run_config

    with pytest.raises(ConfigError, match="not a run directory"):
        run_config(tmp_path / "nothing")
    classification = tmp_path / "cls"
    RunDirectory(classification).create(ExperimentConfig())
    with pytest.raises(ConfigError, match="needs a causal-lm run"):
        run_config(classification)
    unfinished = tmp_path / "lm"
    RunDirectory(unfinished).create(from_dict({"task": "causal-lm"}))
    with pytest.raises(ConfigError, match="no adapter"):
        run_config(unfinished)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama, encoded: LmEncoded) -> None:  # type: ignore[no-untyped-def]
    from fedlora.core.model.adapters import set_checkpointing

    model = get_model(_cfg(tiny_llama.path))
    model.eval()  # no LoRA dropout: both passes see the same function
    batch = encoded.batch(list(range(8)))
    grads = []
    for enabled in (False, True):
        set_checkpointing(model, enabled)
        assert model.get_base_model().is_gradient_checkpointing == enabled
        model.zero_grad(set_to_none=True)
        model.train()
        for module in model.modules():  # training mode for checkpointing, without dropout
            if isinstance(module, torch.nn.Dropout):
                module.eval()
        encoded.loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    set_checkpointing(model, False)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_gradient_checkpointing_with_dp_sgd_is_refused() -> None:
    with pytest.raises(ConfigError, match="gradient_checkpointing"):  # the dp-sgd mechanism's check
        load_experiment(
            None,
            ["train.gradient_checkpointing=true", "privacy.mode='dp-sgd'", "privacy.noise_multiplier=1.0"],
        )
