"""LoRA targets per model family: what counts as a target (Linear and Conv1D, never embeddings or heads),
the presets of each family (fused projections included), the one resolver pre-flight and training share,
the refusals of families that cannot be trained, and folders that already hold a head."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
from safetensors.torch import load_file

from fedlora.core.config import ConfigError, LoraConfig, from_dict
from fedlora.core.model.adapters import inject_lora, set_base_offsets
from fedlora.core.model.loading import load_classifier
from fedlora.core.model.targets import FAMILIES, adaptable, presets_of, resolve
from fedlora.core.model.tree import model_tree
from fedlora.run.experiment import check_model, model_notice
from tests.families import save_config, save_family

BERT = MappingProxyType(
    {
        "qv": ["query", "value"],
        "qkvo": ["query", "key", "value", "attention.output.dense"],
        "vo": ["value", "attention.output.dense"],
        "mlp": ["intermediate.dense"],
    }
)
LLAMA = MappingProxyType(
    {
        "qv": ["q_proj", "v_proj"],
        "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "vo": ["v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj"],
    }
)
GPT2_PRESETS = {"qv": ["c_attn"], "qkvo": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"]}
EXPECTED = {
    **dict.fromkeys(("bert", "roberta", "electra"), BERT),
    "distilbert": {
        "qv": ["q_lin", "v_lin"],
        "qkvo": ["q_lin", "k_lin", "v_lin", "out_lin"],
        "vo": ["v_lin", "out_lin"],
        "mlp": ["lin1", "lin2"],
    },
    "deberta-v2": {
        "qv": ["query_proj", "value_proj"],
        "qkvo": ["query_proj", "key_proj", "value_proj", "attention.output.dense"],
        "vo": ["value_proj", "attention.output.dense"],
        "mlp": ["intermediate.dense"],
    },
    "gpt2": GPT2_PRESETS,
    "phi3": {"qv": ["qkv_proj"], "qkvo": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
    "gpt_neox": {
        "qv": ["query_key_value"],
        "qkvo": ["query_key_value", "attention.dense"],
        "mlp": ["dense_h_to_4h", "dense_4h_to_h"],
    },
    "opt": {
        "qv": ["q_proj", "v_proj"],
        "qkvo": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "vo": ["v_proj", "out_proj"],
        "mlp": ["fc1", "fc2"],
    },
    "gptj": {
        "qv": ["q_proj", "v_proj"],
        "qkvo": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "vo": ["v_proj", "out_proj"],
        "mlp": ["fc_in", "fc_out"],
    },
    "phi": {
        "qv": ["q_proj", "v_proj", "fc1", "fc2"],  # peft's default for phi
        "qkvo": ["q_proj", "k_proj", "v_proj", "self_attn.dense"],
        "vo": ["v_proj", "self_attn.dense"],
        "mlp": ["fc1", "fc2"],
    },
    "bloom": {
        "qv": ["query_key_value"],
        "qkvo": ["query_key_value", "self_attention.dense"],
        "mlp": ["dense_h_to_4h", "dense_4h_to_h"],
    },
    "falcon": {
        "qv": ["query_key_value"],
        "qkvo": ["query_key_value", "self_attention.dense"],
        "mlp": ["dense_h_to_4h", "dense_4h_to_h"],
    },
    **dict.fromkeys(("llama", "qwen2", "qwen3", "mistral", "gemma"), LLAMA),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """``folder(family, kind="base")``: a tiny random model folder, built once per module."""
    root = tmp_path_factory.mktemp("families")
    built: dict[tuple[str, str], str] = {}

    def get(family: str, kind: str = "base") -> str:
        if (family, kind) not in built:
            built[family, kind] = save_family(root / f"{family}-{kind}", family, kind=kind)
        return built[family, kind]

    return get


def _cfg(path: str, *, causal: bool = False, targets: list[str] | None = None):  # type: ignore[no-untyped-def]
    return from_dict(
        {
            "task": "causal-lm" if causal else "classification",
            "model": {"path": path},
            "lora": {"targets": targets or ["qv"]},
        }
    )


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_presets_of_each_family_match_one_module_per_layer(tmp_path: Path, family: str) -> None:
    tree = model_tree(save_config(tmp_path / family, family), causal=False)  # config.json alone
    presets = presets_of(tree)
    assert presets.presets == dict(EXPECTED[family])
    for preset, suffixes in presets.presets.items():
        assert len(resolve(tree, [preset]).modules) == 2 * len(suffixes), preset  # 2 layers


def test_gpt2_conv1d_layers_are_targets_and_embeddings_never_are(folder) -> None:  # type: ignore[no-untyped-def]
    """GPT-2's attention is one fused Conv1D (c_attn): the issue's `lora.targets = ["c_attn"]` passes
    pre-flight and trains, with peft's fan_in_fan_out; wte/wpe and the head are no targets."""
    path = folder("gpt2")
    tree = model_tree(path, causal=False)
    names = adaptable(tree)
    assert all(names.values()) and len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert not [n for n in names if "wte" in n or "wpe" in n or n == "score"]
    targets = resolve(tree, ["c_attn"])
    assert targets.fan_in_fan_out and targets.modules == [f"transformer.h.{i}.attn.c_attn" for i in (0, 1)]
    check_model(_cfg(path, targets=["c_attn"]))
    model = inject_lora(load_classifier(path, num_labels=3), LoraConfig(rank=2, targets=["c_attn"]), seed=0)
    layer = model.get_submodule("base_model.model.transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out and tuple(layer.lora_A["default"].weight.shape) == (2, 32)
    assert tuple(layer.lora_B["default"].weight.shape) == (96, 2)


def test_a_preset_missing_from_a_family_says_which_presets_it_has(folder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as err:
        check_model(_cfg(folder("gpt2"), targets=["vo"]))
    assert str(err.value) == (
        "lora.targets: preset 'vo' does not exist for gpt2 models (its attention has one fused projection, "
        "c_attn); valid attention projections: c_attn, attn.c_proj; other linear layers: c_proj, c_fc; "
        "or a preset of gpt2: qv, qkvo, mlp"
    )


def test_an_unknown_name_lists_the_family_presets_not_a_generic_list(folder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as err:
        check_model(_cfg(folder("deberta-v2"), targets=["query"]))
    message = str(err.value)
    assert "module 'query' not found" in message and "(did you mean 'query_proj'?)" in message
    assert message.endswith("or a preset of deberta-v2: qv, qkvo, vo, mlp")


@pytest.mark.parametrize("family", ["gpt2", "phi3", "distilbert", "opt", "deberta-v2"])
def test_preflight_and_training_resolve_the_same_modules(folder, family: str) -> None:  # type: ignore[no-untyped-def]
    path = folder(family)
    for preset in presets_of(model_tree(path, causal=False)).presets:
        meta = resolve(model_tree(path, causal=False), [preset])
        loaded = resolve(load_classifier(path, num_labels=3), [preset])
        assert meta == loaded, preset


def test_qv_is_peft_default_where_peft_has_the_family() -> None:
    """peft's own default targets are the ``qv`` preset; the family table agrees with them (Phi: peft's
    default adds the feed-forward fc1 and fc2, and wins)."""
    covered = [t for t in FAMILIES if t in PEFT_DEFAULTS and t != "phi"]
    assert len(covered) >= 12
    for model_type in covered:
        assert FAMILIES[model_type].presets()["qv"] == PEFT_DEFAULTS[model_type], model_type


def test_unknown_and_unbuildable_configs_are_refused_in_one_line(tmp_path: Path, folder) -> None:  # type: ignore[no-untyped-def]
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((Path(folder("phi3")) / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "pad_token_id": 10_000}))
    for path, fragment in [
        (unknown, "cannot read the config.json of"),
        (broken, "transformers cannot build a phi3 model from the config.json of"),
    ]:
        with pytest.raises(ConfigError) as err:
            model_tree(str(path), causal=False)
        assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_family_without_the_task_class_is_refused(tmp_path: Path) -> None:
    """DistilBERT has no causal-LM class, ViT no sequence-classification class."""
    for family, causal, fragment in [
        ("distilbert", True, "is a distilbert model, which has no causal-LM class in transformers; use a"),
        ("vit", False, "is a vit model, which has no sequence-classification class in transformers;"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            model_tree(save_config(tmp_path / family, family), causal=causal)


def test_a_folder_with_a_head_gets_a_new_one_and_a_notice(folder) -> None:  # type: ignore[no-untyped-def]
    """A 2-label DistilBERT classifier for a 3-label task: new pre_classifier and classifier (from the
    seed, the same on every load), the encoder's weights as saved; a notice names what is replaced."""
    path = folder("distilbert", "head")
    saved = load_file(str(Path(path) / "model.safetensors"))
    first, second = (load_classifier(path, labels=["a", "b", "c"], seed=3) for _ in range(2))
    assert first.classifier.weight.shape == (3, 32)
    assert not torch.equal(first.pre_classifier.weight, saved["pre_classifier.weight"])
    assert torch.equal(first.pre_classifier.weight, second.pre_classifier.weight)
    assert torch.equal(first.classifier.weight, second.classifier.weight)
    q = "distilbert.transformer.layer.0.attention.q_lin.weight"
    assert torch.equal(first.get_parameter(q), saved[q])
    cfg = _cfg(path)
    cfg.data.labels = ["a", "b", "c"]
    assert model_notice(cfg) == (
        f"model.path: '{path}' holds a classification head (pre_classifier, classifier, 2 labels, "
        "DistilBertForSequenceClassification); this run trains a new one for its 3 labels in its place"
    )


def test_the_new_head_travels_whole(folder) -> None:  # type: ignore[no-untyped-def]
    """Every module of a new head is trained and saved with the adapter (DeBERTa-v2's pooler too), so a
    reloaded adapter does not depend on how the loader initialised it."""
    model = inject_lora(load_classifier(folder("deberta-v2", "head"), num_labels=3), LoraConfig(), seed=0)
    heads = {k.split(".modules_to_save.")[0] for k in model.state_dict() if ".modules_to_save." in k}
    assert heads == {"base_model.model.pooler", "base_model.model.classifier"}


def test_notices_for_a_causal_lm_and_none_for_a_bare_encoder(folder) -> None:  # type: ignore[no-untyped-def]
    llama, bert = _cfg(folder("llama")), _cfg(folder("bert"))
    llama.data.labels = bert.data.labels = ["x", "y"]
    assert model_notice(llama).endswith(
        "is a causal language model (LlamaForCausalLM); its language-model head is left out and a new "
        "classification head for the run's 2 labels goes on top"
    )
    assert model_notice(bert) == ""


def test_weights_that_do_not_hold_the_config_layers_are_refused(tmp_path: Path, folder) -> None:  # type: ignore[no-untyped-def]
    """A folder whose config says Llama and whose weights are GPT-2's."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text((Path(folder("llama")) / "config.json").read_text())
    (mixed / "model.safetensors").write_bytes((Path(folder("gpt2")) / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"do not hold the layers its config.json describes \(no weight"):
        check_model(_cfg(str(mixed)))


def test_base_offsets_go_into_conv1d_weights_transposed(folder) -> None:  # type: ignore[no-untyped-def]
    """FedEx-LoRA and FLoRA fold s*B@A (d_out x d_in) into frozen weights; GPT-2's Conv1D stores
    d_in x d_out. Folding B@A and zeroing B must leave the outputs unchanged."""
    model = inject_lora(load_classifier(folder("gpt2"), num_labels=3), LoraConfig(rank=2, alpha=2.0), seed=0)
    model.eval()
    torch.manual_seed(1)
    offsets = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            b = module.lora_B["default"].weight
            b.data.normal_()
            offsets[f"{name}.base_layer.weight"] = (b @ module.lora_A["default"].weight).detach().clone()
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        set_base_offsets(model, offsets)
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.zero_()
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
