"""LoRA injection, target presets, and adapter arrays <-> model (tiny random BERT and Llama directories)."""

from __future__ import annotations

import pytest
import torch

from fedlora.core.config import ConfigError, LoraConfig
from fedlora.core.model.adapters import adapter_state, inject_lora, load_adapter_state, resolve_targets
from fedlora.core.model.arrays import (
    from_arrays,
    is_head,
    is_lora_a,
    is_lora_b,
    layer_of,
    lora_scale,
    payload_bytes,
    to_arrays,
)
from fedlora.core.model.loading import load_classifier


@pytest.fixture(scope="module")
def bert(tiny_bert):  # type: ignore[no-untyped-def]
    return inject_lora(load_classifier(tiny_bert.path, num_labels=3, seed=0), LoraConfig(), seed=0)


@pytest.fixture(scope="module")
def plain_bert(tiny_bert):  # type: ignore[no-untyped-def]
    return load_classifier(tiny_bert.path, num_labels=3, seed=0)


@pytest.fixture(scope="module")
def plain_llama(tiny_llama):  # type: ignore[no-untyped-def]
    return load_classifier(tiny_llama.path, num_labels=3, seed=0)


@pytest.mark.parametrize(
    ("preset", "bert", "llama"),
    [
        ("qv", ["query", "value"], ["q_proj", "v_proj"]),
        (
            "qkvo",
            ["query", "key", "value", "attention.output.dense"],
            ["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
        ("vo", ["value", "attention.output.dense"], ["v_proj", "o_proj"]),
    ],
)
def test_presets_resolve_for_bert_and_llama(
    plain_bert, plain_llama, preset: str, bert: list[str], llama: list[str]
) -> None:  # type: ignore[no-untyped-def]
    assert resolve_targets(plain_bert, [preset]) == bert
    assert resolve_targets(plain_llama, [preset]) == llama


def test_unknown_target_names_the_problem(plain_bert) -> None:  # type: ignore[no-untyped-def]
    """Training raises pre-flight's one line (the same resolver), naming what fits."""
    with pytest.raises(ConfigError) as err:
        resolve_targets(plain_bert, ["q_proj"])
    assert str(err.value) == (
        "lora.targets: module 'q_proj' not found in the model; valid attention projections: query, key, "
        "value, attention.output.dense; other linear layers: dense; or a preset of bert: qv, qkvo, vo, mlp"
    )


def test_qkvo_adapts_four_projections_per_layer(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    model = inject_lora(
        load_classifier(tiny_bert.path, num_labels=3, seed=0), LoraConfig(targets=["qkvo"]), seed=0
    )
    layers = {layer_of(k) for k in adapter_state(model) if is_lora_a(k)}
    assert len(layers) == tiny_bert.config.num_hidden_layers * 4
    assert any(k.endswith("attention.output.dense") for k in layers)


def test_llama_gets_adapters_and_a_trainable_head(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    model = inject_lora(
        load_classifier(tiny_llama.path, num_labels=3, seed=0), LoraConfig(rank=2, targets=["qkvo"]), seed=0
    )
    state = adapter_state(model)
    assert sum(is_lora_a(k) for k in state) == tiny_llama.config.num_hidden_layers * 4
    assert [k for k in state if is_head(k)] == ["base_model.model.score.weight"]


def test_lora_goes_into_q_proj_and_v_proj_of_a_saved_llama(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """peft injects LoRA into the q and v projections of a Llama directory; the base stays frozen."""
    model = inject_lora(load_classifier(tiny_llama.path, num_labels=3, seed=0), LoraConfig(rank=4), seed=0)
    layers = sorted(layer_of(k) for k in adapter_state(model) if is_lora_a(k))
    n_layers = tiny_llama.config.num_hidden_layers
    assert layers == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{proj}"
        for i in range(n_layers)
        for proj in ("q_proj", "v_proj")
    )
    hidden, kv = tiny_llama.config.hidden_size, tiny_llama.config.num_key_value_heads
    v_out = kv * hidden // tiny_llama.config.num_attention_heads  # grouped-query attention: fewer v heads
    state = adapter_state(model)
    assert tuple(state[f"{layers[0]}.lora_A.weight"].shape) == (4, hidden)
    assert tuple(state[f"{layers[1]}.lora_B.weight"].shape) == (v_out, 4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".score." in n for n in trainable)


def test_only_adapters_and_head_are_trainable(bert, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    trainable = [n for n, p in bert.named_parameters() if p.requires_grad]
    assert trainable
    assert all(".lora_" in n or ".classifier." in n for n in trainable)
    shapes = {k: tuple(v.shape) for k, v in adapter_state(bert).items()}
    a = next(k for k in shapes if is_lora_a(k))
    b = next(k for k in shapes if is_lora_b(k))
    hidden = tiny_bert.config.hidden_size
    assert shapes[a] == (8, hidden) and shapes[b] == (hidden, 8)
    adapted = 2 * tiny_bert.config.num_hidden_layers  # query and value of every layer
    assert sum(is_lora_a(k) for k in shapes) == sum(is_lora_b(k) for k in shapes) == adapted


def test_lora_b_starts_at_zero_and_a_does_not(bert) -> None:  # type: ignore[no-untyped-def]
    state = adapter_state(bert)
    assert all(float(v.abs().sum()) == 0.0 for k, v in state.items() if is_lora_b(k))
    assert all(float(v.abs().sum()) > 0.0 for k, v in state.items() if is_lora_a(k))


def test_same_seed_same_initial_adapter(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    one = adapter_state(
        inject_lora(load_classifier(tiny_bert.path, num_labels=3, seed=3), LoraConfig(), seed=3)
    )
    two = adapter_state(
        inject_lora(load_classifier(tiny_bert.path, num_labels=3, seed=3), LoraConfig(), seed=3)
    )
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_arrays_round_trip_exactly_and_bytes_are_counted(bert) -> None:  # type: ignore[no-untyped-def]
    state = {k: torch.randn_like(v) for k, v in adapter_state(bert).items()}
    record = to_arrays(state)
    back = from_arrays(record)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    raw = sum(v.numel() * v.element_size() for v in state.values())
    assert (
        raw < payload_bytes(record) < raw + 200 * len(state)
    )  # payload = raw data + a small header per array


def test_load_adapter_state_sets_the_model(bert) -> None:  # type: ignore[no-untyped-def]
    target = {k: torch.full_like(v, 0.5) for k, v in adapter_state(bert).items()}
    load_adapter_state(bert, target)
    now = adapter_state(bert)
    assert all(torch.equal(now[k], target[k]) for k in target)


def test_load_adapter_state_rejects_foreign_keys(bert) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyError, match="lacks"):
        load_adapter_state(bert, {"base_model.model.nope.lora_A.weight": torch.zeros(1)})


def test_adapter_state_keys_are_peft_keys_listed_once_per_model(bert, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from fedlora.core.model import adapters

    expected = list(adapter_state(bert))
    assert adapters.adapter_state_keys(bert) == expected
    calls = []
    monkeypatch.setattr(adapters, "get_peft_model_state_dict", lambda model: calls.append(1) or {})
    assert adapters.adapter_state_keys(bert) == expected and calls == []  # the model's keys, kept
    with pytest.raises(KeyError, match="lacks"):  # and still checked against them
        load_adapter_state(bert, {"base_model.model.nope.lora_A.weight": torch.zeros(1)})


def test_adapter_state_keys_follow_cores_added_and_removed(bert) -> None:  # type: ignore[no-untyped-def]
    """Fed-SB adds an r x r core to every adapted layer after its warm-up (and a later message may come
    without it): the listed keys follow the model, or loading R would fail as 'keys the model lacks'."""
    from fedlora.core.model import adapters, cores

    before = adapters.adapter_state_keys(bert)
    cores.set_cores(bert, True)
    with_cores = adapters.adapter_state_keys(bert)
    assert with_cores == list(adapter_state(bert)) and any(".lora_R." in k for k in with_cores)
    cores.set_cores(bert, False)
    assert adapters.adapter_state_keys(bert) == before


def test_lora_scale_conventions() -> None:
    assert lora_scale(LoraConfig(rank=8, alpha=16)) == 2.0
    assert lora_scale(LoraConfig(rank=16, alpha=16, rslora=True)) == 4.0


def test_saved_adapter_loads_with_peft(bert, tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    state = {k: torch.randn_like(v) * 0.01 for k, v in adapter_state(bert).items()}
    load_adapter_state(bert, state)
    bert.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(load_classifier(tiny_bert.path, num_labels=3, seed=99), str(tmp_path))
    again = adapter_state(loaded)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_any_local_model_directory_trains(tiny_llama, synthetic_tweets) -> None:  # type: ignore[no-untyped-def]
    """A Llama-style model saved to a local directory (with a tokenizer) goes through the same path."""
    from fedlora.core.config import from_dict
    from fedlora.core.model.loading import load_tokenizer
    from fedlora.core.training.loops import encode, evaluate, train_local
    from fedlora.tasks.models import get_model

    cfg = from_dict({"model": {"path": tiny_llama.path}, "lora": {"targets": ["qkvo"], "rank": 4}})
    model = get_model(cfg)
    assert get_model(cfg) is model  # built once per process
    assert sum(".lora_A." in k for k in adapter_state(model)) == 2 * 4
    data = encode(synthetic_tweets.select(range(64)), load_tokenizer(tiny_llama.path), 32)
    before = adapter_state(model)
    train_local(model, data, cfg.train, seed=0)
    after = adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in after if ".lora_B." in k)
    assert 0.0 <= evaluate(model, data)[1] <= 1.0
