"""Local training: only adapters and head change, and the loss falls (tiny model; once on the real one)."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.core.config import DataConfig, LoraConfig, TrainConfig
from fedlora.core.model.adapters import adapter_state, inject_lora
from fedlora.core.model.loading import load_classifier, load_tokenizer
from fedlora.core.training.loops import encode, evaluate, num_steps, train_local


@pytest.fixture(scope="module")
def small(tiny_bert, synthetic_tweets):  # type: ignore[no-untyped-def]
    """(train, test) synthetic tweets encoded for the tiny BERT."""
    tok = load_tokenizer(tiny_bert.path)
    return encode(synthetic_tweets.select(range(128)), tok, 48), encode(
        synthetic_tweets.select(range(128, 160)), tok, 48
    )


@pytest.fixture(params=["tiny", pytest.param("real", marks=pytest.mark.real_model)])
def model_and_data(request, tiny_bert, small):  # type: ignore[no-untyped-def]
    """(model path, encoded train split): the tiny BERT on synthetic tweets, or MiniLM on real ones."""
    if request.param == "tiny":
        return tiny_bert.path, small[0]
    from fedlora.core.data.splits import get_splits

    splits = get_splits(DataConfig(max_examples=600, test_size=100), 2, 0)
    return "", encode(splits.client_train(0), load_tokenizer(""), 48)


def test_batches_are_padded_and_masked(small) -> None:  # type: ignore[no-untyped-def]
    train, _ = small
    batch = train.batch([0, 1, 2])
    lengths = [len(train.ids[i]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["labels"].tolist() == train.labels[:3].tolist()


def test_num_steps_from_steps_or_epochs() -> None:
    assert num_steps(TrainConfig(local_steps=7), 1000) == 7
    assert num_steps(TrainConfig(local_epochs=1.0, batch_size=16), 100) == 7  # ceil(100 / 16)
    assert num_steps(TrainConfig(local_epochs=0.5, batch_size=10), 100) == 5


def test_training_changes_only_adapters_and_head_and_lowers_loss(model_and_data) -> None:  # type: ignore[no-untyped-def]
    path, train = model_and_data
    model = inject_lora(load_classifier(path, num_labels=3, seed=0), LoraConfig(), seed=0)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters_before = adapter_state(model)
    loss_before, _ = evaluate(model, train)
    mean_loss, seen = train_local(model, train, TrainConfig(local_steps=25, batch_size=16, lr=2e-3), seed=0)
    loss_after, _ = evaluate(model, train)
    assert seen == 25 * 16
    assert math.isfinite(mean_loss)
    assert loss_after < loss_before - 0.05
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), name
    after = adapter_state(model)
    changed = [k for k in after if not torch.equal(after[k], adapters_before[k])]
    assert len(changed) == len(after)  # every LoRA A, B and head tensor was trained


def test_training_is_reproducible_for_a_seed(small, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    train, _ = small
    runs = []
    for _ in range(2):
        model = inject_lora(load_classifier(tiny_bert.path, num_labels=3, seed=0), LoraConfig(), seed=0)
        train_local(model, train, TrainConfig(local_steps=3), seed=11)
        runs.append(adapter_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_evaluate_known_answer_on_empty_and_constant_model(small, tiny_bert, synthetic_tweets) -> None:  # type: ignore[no-untyped-def]
    _, test = small
    model = inject_lora(load_classifier(tiny_bert.path, num_labels=3, seed=0), LoraConfig(), seed=0)
    head = model.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # always predicts "negative"
    loss, acc = evaluate(model, test)
    assert acc == pytest.approx(float((test.labels == 0).float().mean()))
    assert loss > 0
    empty = encode(synthetic_tweets.select([]), load_tokenizer(tiny_bert.path), 48)
    assert all(math.isnan(x) for x in evaluate(model, empty))
