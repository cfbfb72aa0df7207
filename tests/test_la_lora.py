"""LA-LoRA: which factor each local step updates (plain and DP-SGD training), that DP-SGD clips and noises
only the step's factor and the head, and the strategy's plan, checks and aggregate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.core.config import ConfigError, LoraConfig, PrivacyConfig, TrainConfig, from_dict
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.core.model.adapters import adapter_state, inject_lora, load_adapter_state, set_trainable
from fedlora.core.model.loading import load_classifier, load_tokenizer
from fedlora.core.protocol.plan import ClientPlan
from fedlora.core.training.alternation import Alternation, factor_of_step, set_alternation
from fedlora.core.training.loops import Encoded, encode, train_local
from fedlora.privacy.dp_sgd import PrivateTrainer, train_private
from fedlora.privacy.mechanisms import registry as mechanisms
from fedlora.run.experiment import check_strategy, load_experiment, preflight
from strategies import registry
from strategies.aggregation import weighted_average
from tests.helpers import client_state


@pytest.fixture(scope="module")
def data(tiny_bert, synthetic_tweets) -> Encoded:  # type: ignore[no-untyped-def]
    return encode(synthetic_tweets, load_tokenizer(tiny_bert.path), 32)


def _model(path: str, every: int) -> torch.nn.Module:
    """A LoRA classifier with B non-zero (so A has a gradient from the first step), no dropout."""
    model = inject_lora(load_classifier(path, num_labels=3, seed=0), LoraConfig(dropout=0.0), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    set_trainable(model)
    set_alternation(model, every)
    return model


def _kinds(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The kinds of tensors that changed: 'lora_A', 'lora_B', 'classifier'."""
    return {k.rsplit(".", 2)[-2] for k in before if not torch.equal(before[k], after[k])}


def test_the_schedule_starts_with_b_and_switches_every_k_steps() -> None:
    assert [factor_of_step(i, 1)[-1] for i in range(5)] == list("BABAB")
    assert [factor_of_step(i, 2)[-1] for i in range(7)] == list("BBAABBA")
    plan = ClientPlan(rank=4, alternate_every=3)
    assert ClientPlan.from_config(plan.to_config()) == plan
    with pytest.raises(ValueError, match="alternate_every -1"):
        ClientPlan(rank=4, alternate_every=-1)


@pytest.mark.parametrize("private", [False, True])
@pytest.mark.parametrize("every", [1, 2])
def test_each_local_step_updates_only_its_factor_and_the_head(
    data, tiny_bert, every: int, private: bool
) -> None:  # type: ignore[no-untyped-def]
    """Known answer, recorded step by step: the rounds of 1..5 steps from one start share their first steps
    (same seed, same batches), so the change from n - 1 to n steps is step n's own update."""
    model = _model(tiny_bert.path, every)
    start = adapter_state(model)
    states = [start]
    for steps in range(1, 6):
        load_adapter_state(model, start)
        train = TrainConfig(local_steps=steps, batch_size=8, lr=0.05)
        if private:
            privacy = PrivacyConfig(mode="dp-sgd", noise_multiplier=1.0)
            train_private(model, data, train, privacy, noise_multiplier=1.0, seed=0)
        else:
            train_local(model, data, train, seed=0)
        states.append(adapter_state(model))
        assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # restored
    for step in range(5):
        assert _kinds(states[step], states[step + 1]) == {factor_of_step(step, every), "classifier"}, step


def test_without_alternation_every_step_trains_both_factors(data, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = _model(tiny_bert.path, 0)
    before = adapter_state(model)
    train_local(model, data, TrainConfig(local_steps=1, batch_size=8), seed=0)
    assert _kinds(before, adapter_state(model)) == {"lora_A", "lora_B", "classifier"}


def _plain_alternating_sgd(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float) -> None:
    """The reference: SGD on the trainable parameters, alternating factors, no privacy."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    with Alternation(model) as alternation:
        for step, batch in enumerate(batches):
            alternation.before_step(step)
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()


def test_dp_steps_with_zero_noise_and_a_huge_clip_equal_plain_alternating_steps(data, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    """Opacus's per-example gradients under the alternation (hooks mode) are the plain gradients: the
    swap of a frozen factor corrupts nothing."""
    batches = [data.batch(list(range(8 * i, 8 * i + 8))) for i in range(4)]
    plain = _model(tiny_bert.path, 1)
    _plain_alternating_sgd(plain, [dict(b) for b in batches], lr=0.5)
    private = _model(tiny_bert.path, 1)
    train = TrainConfig(optimizer="sgd", lr=0.5)
    with (
        PrivateTrainer(private, train, noise_multiplier=0.0, clip_norm=1e6, expected_batch=8) as trainer,
        Alternation(private) as alternation,
    ):
        for step, batch in enumerate(batches):
            alternation.before_step(step)
            trainer.step(dict(batch))
    want, got = adapter_state(plain), adapter_state(private)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)
    assert not any(hasattr(p, "grad_sample") for p in private.parameters())  # hooks removed


def test_dp_sgd_clips_each_example_over_the_steps_factor_and_the_head_only(data, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    """One B step (A frozen) with a small clip C and no noise: the update is the mean of the per-example
    gradients of (B, head) each clipped to C by its own norm; A's gradient takes no part in the norm."""
    clip, batch = 0.05, data.batch(list(range(4)))
    model = _model(tiny_bert.path, 1)
    start = adapter_state(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".lora_A." not in n]
    frozen_a = [p for n, p in model.named_parameters() if ".lora_A." in n]
    expected = {n: torch.zeros_like(p) for n, p in trainable}
    norms_with_a = []
    model.train()
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        model.zero_grad()
        model(**one).loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainable}  # type: ignore[union-attr]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        norms_with_a.append(torch.sqrt(norm**2 + sum(p.grad.pow(2).sum() for p in frozen_a)))  # type: ignore[union-attr]
        for n, g in grads.items():
            expected[n] += g * min(1.0, clip / float(norm)) / 4
    assert all(float(n) > clip for n in norms_with_a)  # clipping bites, and A's part would change it
    model.zero_grad()
    with (
        PrivateTrainer(
            model,
            TrainConfig(optimizer="sgd", lr=1.0),
            noise_multiplier=0.0,
            clip_norm=clip,
            expected_batch=4,
        ) as trainer,
        Alternation(model) as alternation,
    ):
        alternation.before_step(0)
        trainer.step(dict(batch))
    after = dict(model.named_parameters())
    for name, _ in trainable:
        torch.testing.assert_close(
            after[name].detach(), start_param(start, name) - expected[name], atol=1e-6, rtol=1e-5
        )
    assert _kinds(start, adapter_state(model)) == {"lora_B", "classifier"}


def start_param(start: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The value a model parameter had in ``start`` (peft state keys drop the adapter name)."""
    key = name.replace(".default.", ".").replace(".modules_to_save.", ".")
    return start[key]


# ----- the strategy ---------------------------------------------------------------------------------
def make(**sections: object):  # type: ignore[no-untyped-def]
    return check_strategy(from_dict({"strategy": {"name": "la-lora"}, "lora": {"rank": 4}, **sections}))


def test_plan_aggregate_and_checks() -> None:
    cfg = make(strategy={"name": "la-lora", "options": {"alternate_every": 2}})
    strategy = registry.get("la-lora")(cfg, client_state(9))
    assert strategy.client_plan(0, 1) == ClientPlan(
        rank=4, alternate_every=2
    )  # both factors sent and trained
    assert strategy.outgoing(strategy.global_state).keys() == strategy.global_state.keys()
    updates, weights = [client_state(1), client_state(2)], [1.0, 3.0]
    out = strategy.aggregate(strategy.global_state, updates, weights)
    for key, value in weighted_average(updates, weights).items():  # FedAvg of A, B and the head
        torch.testing.assert_close(out[key], value)
    assert registry.privacy_modes("la-lora") == sorted(mechanisms.available())
    with pytest.raises(ConfigError, match="alternate_every = 0 is invalid"):
        make(strategy={"name": "la-lora", "options": {"alternate_every": 0}})
    with pytest.raises(ConfigError, match=r"cannot run with privacy\.opacus_mode = .ghost.") as refused:
        make(privacy={"mode": "dp-sgd", "noise_multiplier": 1.0, "opacus_mode": "ghost"})
    assert "\n" not in str(refused.value)
    make(privacy={"mode": "dp-sgd", "noise_multiplier": 1.0, "opacus_mode": "hooks"})


@pytest.mark.e2e
def test_two_rounds_under_dp_updates_send_fedits_bytes(run_in_memory, tiny_bert, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Update-level DP protects its FedAvg; what travels is FedIT's (A, B and the head both ways)."""
    csv = write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path / "t.csv")
    overrides = [
        f'model.path="{tiny_bert.path}"',
        f'data.source="{csv}"',
        'data.label="topic"',
        f"data.labels={json.dumps(sorted(TOPICS))}",
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=12",
        'strategy.name="la-lora"',
        "federation.num_clients=3",
        "federation.fraction=0.67",
        "federation.rounds=2",
        "train.local_steps=3",
        'privacy.mode="dp-updates"',
        "privacy.noise_multiplier=0.5",
    ]
    run = run_in_memory(preflight(load_experiment(None, overrides)), "dp-updates")
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and 0 < rows[0]["epsilon"] < rows[1]["epsilon"]
    hidden, rank, layers = tiny_bert.config.hidden_size, 8, 2 * tiny_bert.config.num_hidden_layers
    per_client = (
        layers * 2 * (128 + rank * hidden * 4) + (128 + len(TOPICS) * hidden * 4) + (128 + len(TOPICS) * 4)
    )
    assert all(r["uplink_bytes"] == r["num_clients"] * per_client for r in rows)
