"""DP-SGD with Opacus on LoRA (tiny random BERT): exactness against plain steps and per-example loops."""

from __future__ import annotations

import pytest
import torch

from fedlora.core.config import LoraConfig, PrivacyConfig, TrainConfig
from fedlora.core.model.adapters import adapter_state, inject_lora, set_trainable
from fedlora.core.model.loading import load_classifier, load_tokenizer
from fedlora.core.training.loops import encode
from fedlora.privacy.dp_sgd import PrivateTrainer, poisson_sample, sample_rate, train_private


@pytest.fixture(scope="module")
def data(tiny_bert, synthetic_tweets):  # type: ignore[no-untyped-def]
    return encode(synthetic_tweets, load_tokenizer(tiny_bert.path), 48)


@pytest.fixture(scope="module")
def path(tiny_bert) -> str:  # type: ignore[no-untyped-def]
    return tiny_bert.path


def _model(path: str, freeze: frozenset[str] = frozenset()) -> torch.nn.Module:
    model = inject_lora(load_classifier(path, num_labels=3, seed=0), LoraConfig(dropout=0.0), seed=0)
    # B starts at zero in peft; give it values so that A's gradient is not zero either.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    set_trainable(model, freeze)
    for module in model.modules():  # exact comparisons: no random dropout masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _plain_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], train: TrainConfig) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=train.lr)
    model.train()
    model(**batch).loss.backward()
    opt.step()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("freeze", [frozenset(), frozenset({"lora_A"})])
def test_zero_noise_huge_clip_step_equals_plain_step(data, path, mode: str, freeze: frozenset[str]) -> None:  # type: ignore[no-untyped-def]
    """Catches Opacus/peft bugs that silently corrupt LoRA updates (also with FFA-LoRA's frozen A)."""
    train = TrainConfig(optimizer="sgd", lr=0.5)
    batch = data.batch(list(range(8)))
    plain = _model(path, freeze)
    _plain_step(plain, dict(batch), train)
    private = _model(path, freeze)
    with PrivateTrainer(
        private, train, noise_multiplier=0.0, clip_norm=1e6, expected_batch=8, mode=mode
    ) as t:
        t.step(dict(batch))
    want, got = adapter_state(plain), adapter_state(private)
    start = adapter_state(_model(path, freeze))
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    changed = [k for k in want if not torch.equal(want[k], start[k])]
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)
    assert all("lora_A" not in k for k in changed) if freeze else any("lora_A" in k for k in changed)
    assert not any(hasattr(p, "grad_sample") for p in private.parameters())  # hooks removed


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_virtual_batches_give_the_same_step(data, path, mode: str) -> None:  # type: ignore[no-untyped-def]
    """A Poisson batch split into physical chunks of 3 is clipped per example and stepped once."""
    train = TrainConfig(optimizer="sgd", lr=0.5)
    batch = data.batch(list(range(8)))
    states = []
    for physical in (0, 3):
        model = _model(path)
        with PrivateTrainer(
            model,
            train,
            noise_multiplier=0.0,
            clip_norm=0.05,
            expected_batch=8,
            mode=mode,
            max_physical_batch=physical,
        ) as t:
            t.step(dict(batch))
        states.append(adapter_state(model))
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], atol=1e-6), key


def test_per_sample_gradients_match_one_example_at_a_time(data, path) -> None:  # type: ignore[no-untyped-def]
    batch = data.batch(list(range(4)))
    model = _model(path)
    reference = []
    for i in range(4):
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in batch.items()}
        # One example at its own padded length: the other rows' padding must not change its gradient.
        width = int(one["attention_mask"].sum())
        one = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in one.items()}
        model.train()
        model(**one).loss.backward()
        reference.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad()
    trainer = PrivateTrainer(model, TrainConfig(), noise_multiplier=0.0, clip_norm=1e6, expected_batch=4)
    with trainer:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = trainer.criterion(trainer.module(**inputs).logits, labels)
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                for i in range(4):
                    assert torch.allclose(p.grad_sample[i], reference[i][name], atol=1e-6), name


def test_clipping_bounds_each_example_and_noise_has_the_stated_std(data, wide_bert) -> None:  # type: ignore[no-untyped-def]
    """With lr 1 and SGD the update is minus the privatised mean gradient; check both of its parts.

    On a random BERT as wide and deep as MiniLM: the noise's std is measured over as many coordinates."""
    train = TrainConfig(optimizer="sgd", lr=1.0)
    batch = data.batch(list(range(8)))
    # No noise and a tiny clip: every example contributes a vector of norm exactly C, so |update| <= C.
    model = _model(wide_bert.path)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])
    with PrivateTrainer(model, train, noise_multiplier=0.0, clip_norm=1e-3, expected_batch=8) as t:
        t.step(dict(batch))
    after = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert float((after - before).norm()) <= 1e-3 * (1 + 1e-5)
    # Empty sample: the update is pure noise of std sigma * C / expected batch per coordinate.
    model = _model(wide_bert.path)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])
    with PrivateTrainer(model, train, noise_multiplier=2.0, clip_norm=0.5, expected_batch=8, seed=3) as t:
        t.step(None)
    after = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    std = float((after - before).std())
    want = 2.0 * 0.5 / 8
    assert len(after) > 70_000  # relative error of the std ~ 1 / sqrt(2 n) < 0.3%
    assert abs(std - want) < 0.02 * want


def test_poisson_sampling_rate_and_train_private_round(data, path) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    sizes = [len(poisson_sample(1000, 0.016, g)) for _ in range(2000)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 16) < 0.3  # std of the mean = 4 / sqrt(2000) = 0.09
    assert sample_rate(16, len(data)) == 16 / len(data)
    train = TrainConfig(local_steps=3, batch_size=4)
    done = train_private(
        _model(path),
        data,
        train,
        PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0),
        noise_multiplier=1.0,
        seed=0,
    )
    assert done.steps == 3 and done.entry == (1.0, 4 / len(data), 3)
    assert done.loss > 0 and done.seen > 0


def test_ffa_lora_a_stays_bit_identical_under_noisy_dp_sgd(data, path) -> None:  # type: ignore[no-untyped-def]
    """Noise lands only on trained parameters: FFA-LoRA's frozen A never moves."""
    model = _model(path, frozenset({"lora_A"}))
    before = adapter_state(model)
    train = TrainConfig(local_steps=3, batch_size=8, lr=0.05)
    privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=2.0)
    train_private(model, data, train, privacy, noise_multiplier=2.0, seed=0)
    after = adapter_state(model)
    for key in before:
        same = torch.equal(after[key], before[key])
        assert same if "lora_A" in key else not same, key
