"""LoRA injection, target presets, and adapter arrays <-> model (real MiniLM and a tiny Llama)."""

from __future__ import annotations

import pytest
import torch

from fedlora.core.adapters import adapter_state, inject_lora, load_adapter_state, resolve_targets
from fedlora.core.arrays import (
    from_arrays,
    is_head,
    is_lora_a,
    is_lora_b,
    layer_of,
    lora_scale,
    payload_bytes,
    to_arrays,
)
from fedlora.core.config import LoraConfig
from fedlora.core.models import load_classifier


@pytest.fixture(scope="module")
def minilm():  # type: ignore[no-untyped-def]
    return inject_lora(load_classifier("", num_labels=3, seed=0), LoraConfig(), seed=0)


@pytest.fixture(scope="module")
def plain_minilm():  # type: ignore[no-untyped-def]
    return load_classifier("", num_labels=3, seed=0)


def tiny_llama():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


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
    plain_minilm, preset: str, bert: list[str], llama: list[str]
) -> None:  # type: ignore[no-untyped-def]
    assert resolve_targets(plain_minilm, [preset]) == bert
    assert resolve_targets(tiny_llama(), [preset]) == llama


def test_unknown_target_names_the_problem(plain_minilm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"no linear layer named \['q_proj'\]"):
        resolve_targets(plain_minilm, ["q_proj"])


def test_qkvo_adapts_four_projections_per_layer() -> None:
    model = inject_lora(load_classifier("", num_labels=3, seed=0), LoraConfig(targets=["qkvo"]), seed=0)
    layers = {layer_of(k) for k in adapter_state(model) if is_lora_a(k)}
    assert len(layers) == 6 * 4
    assert any(k.endswith("attention.output.dense") for k in layers)


def test_llama_gets_adapters_and_a_trainable_head() -> None:
    model = inject_lora(tiny_llama(), LoraConfig(rank=2, targets=["qkvo"]), seed=0)
    state = adapter_state(model)
    assert sum(is_lora_a(k) for k in state) == 2 * 4
    assert [k for k in state if is_head(k)] == ["base_model.model.score.weight"]


def test_only_adapters_and_head_are_trainable(minilm) -> None:  # type: ignore[no-untyped-def]
    trainable = [n for n, p in minilm.named_parameters() if p.requires_grad]
    assert trainable
    assert all(".lora_" in n or ".classifier." in n for n in trainable)
    shapes = {k: tuple(v.shape) for k, v in adapter_state(minilm).items()}
    a = next(k for k in shapes if is_lora_a(k))
    b = next(k for k in shapes if is_lora_b(k))
    assert shapes[a] == (8, 384) and shapes[b] == (384, 8)
    assert sum(is_lora_a(k) for k in shapes) == sum(is_lora_b(k) for k in shapes) == 12


def test_lora_b_starts_at_zero_and_a_does_not(minilm) -> None:  # type: ignore[no-untyped-def]
    state = adapter_state(minilm)
    assert all(float(v.abs().sum()) == 0.0 for k, v in state.items() if is_lora_b(k))
    assert all(float(v.abs().sum()) > 0.0 for k, v in state.items() if is_lora_a(k))


def test_same_seed_same_initial_adapter() -> None:
    one = adapter_state(inject_lora(load_classifier("", num_labels=3, seed=3), LoraConfig(), seed=3))
    two = adapter_state(inject_lora(load_classifier("", num_labels=3, seed=3), LoraConfig(), seed=3))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_arrays_round_trip_exactly_and_bytes_are_counted(minilm) -> None:  # type: ignore[no-untyped-def]
    state = {k: torch.randn_like(v) for k, v in adapter_state(minilm).items()}
    record = to_arrays(state)
    back = from_arrays(record)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    raw = sum(v.numel() * v.element_size() for v in state.values())
    assert (
        raw < payload_bytes(record) < raw + 200 * len(state)
    )  # payload = raw data + a small header per array


def test_load_adapter_state_sets_the_model(minilm) -> None:  # type: ignore[no-untyped-def]
    target = {k: torch.full_like(v, 0.5) for k, v in adapter_state(minilm).items()}
    load_adapter_state(minilm, target)
    now = adapter_state(minilm)
    assert all(torch.equal(now[k], target[k]) for k in target)


def test_load_adapter_state_rejects_foreign_keys(minilm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KeyError, match="lacks"):
        load_adapter_state(minilm, {"base_model.model.nope.lora_A.weight": torch.zeros(1)})


def test_lora_scale_conventions() -> None:
    assert lora_scale(LoraConfig(rank=8, alpha=16)) == 2.0
    assert lora_scale(LoraConfig(rank=16, alpha=16, rslora=True)) == 4.0


def test_saved_adapter_loads_with_peft(minilm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    state = {k: torch.randn_like(v) * 0.01 for k, v in adapter_state(minilm).items()}
    load_adapter_state(minilm, state)
    minilm.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(load_classifier("", num_labels=3, seed=99), str(tmp_path))
    again = adapter_state(loaded)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_any_local_model_directory_trains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A Llama-style model saved to a local directory (with a tokenizer) goes through the same path."""
    import shutil

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fedlora.core.adapters import get_model
    from fedlora.core.config import from_dict
    from fedlora.core.data import get_splits
    from fedlora.core.models import load_tokenizer
    from fedlora.core.training import encode, evaluate, train_local
    from fedlora.core.weights import model_dir

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(model_dir("") / name, tmp_path / name)  # reuse MiniLM's tokenizer: no hub needed
    cfg = from_dict({"model": {"path": str(tmp_path)}, "lora": {"targets": ["qkvo"], "rank": 4}})
    model = get_model(cfg)
    assert get_model(cfg) is model  # built once per process
    assert sum(".lora_A." in k for k in adapter_state(model)) == 2 * 4
    split = get_splits(cfg.data, 2, 0).client_train(0).select(range(64))
    data = encode(split, load_tokenizer(str(tmp_path)), 32)
    before = adapter_state(model)
    train_local(model, data, cfg.train, seed=0)
    after = adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in after if ".lora_B." in k)
    assert 0.0 <= evaluate(model, data)[1] <= 1.0
