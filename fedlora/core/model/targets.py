"""LoRA targets: which modules LoRA can adapt, the presets of each model family, and the one resolver that
pre-flight (on the module tree built on the meta device, :mod:`fedlora.core.model.tree`) and training (on
the loaded model, :func:`fedlora.core.model.adapters.inject_lora`) share.

A module is adaptable when it is an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2's layers, whose
weight is stored transposed: peft's ``fan_in_fan_out``) inside the base model. Embeddings never are, nor
are the heads (a classifier's head is trained whole; a language model's head stays frozen).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from fedlora.core.config import TARGET_PRESETS, ConfigError


@dataclass(frozen=True)
class Family:
    """How a model family names its attention projections (q, k, v and the output o, or one fused qkv
    projection) and its feed-forward layers; module-name suffixes."""

    query: str = ""
    key: str = ""
    value: str = ""
    fused: str = ""
    """One projection computing q, k and v together (GPT-2's ``c_attn``): no ``vo`` preset then."""
    output: str = ""
    mlp: tuple[str, ...] = ()

    def presets(self) -> dict[str, list[str]]:
        """Preset name -> suffixes: ``qv``, ``qkvo``, ``vo`` (not with a fused projection) and ``mlp``."""
        if self.fused:
            attention = {"qv": [self.fused], "qkvo": [self.fused, self.output]}
        else:
            attention = {
                "qv": [self.query, self.value],
                "qkvo": [self.query, self.key, self.value, self.output],
                "vo": [self.value, self.output],
            }
        return {**attention, "mlp": list(self.mlp)}

    def attention(self) -> list[str]:
        """The attention projections, in q, k, v, o order."""
        names = [self.fused] if self.fused else [self.query, self.key, self.value]
        return [*names, self.output]


BERT = Family("query", "key", "value", output="attention.output.dense", mlp=("intermediate.dense",))
LLAMA = Family("q_proj", "k_proj", "v_proj", output="o_proj", mlp=("gate_proj", "up_proj", "down_proj"))
FUSED_QKV = Family(fused="query_key_value", output="attention.dense", mlp=("dense_h_to_4h", "dense_4h_to_h"))
BLOOM = Family(fused="query_key_value", output="self_attention.dense", mlp=("dense_h_to_4h", "dense_4h_to_h"))

#: ``config.model_type`` -> the family's naming. Other model types are matched by their module names
#: against these (a new Llama-style family works unlisted).
FAMILIES: dict[str, Family] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), BERT),
    "distilbert": Family("q_lin", "k_lin", "v_lin", output="out_lin", mlp=("lin1", "lin2")),
    "deberta-v2": Family(
        "query_proj", "key_proj", "value_proj", output="attention.output.dense", mlp=("intermediate.dense",)
    ),
    **dict.fromkeys(
        ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2"), LLAMA
    ),
    "opt": Family("q_proj", "k_proj", "v_proj", output="out_proj", mlp=("fc1", "fc2")),
    "gptj": Family("q_proj", "k_proj", "v_proj", output="out_proj", mlp=("fc_in", "fc_out")),
    "phi": Family("q_proj", "k_proj", "v_proj", output="self_attn.dense", mlp=("fc1", "fc2")),
    "gpt2": Family(fused="c_attn", output="attn.c_proj", mlp=("c_fc", "mlp.c_proj")),
    "phi3": Family(fused="qkv_proj", output="o_proj", mlp=("gate_up_proj", "down_proj")),
    "gpt_neox": FUSED_QKV,
    **dict.fromkeys(("falcon", "bloom"), BLOOM),
}


@dataclass(frozen=True)
class Presets:
    """The presets one model has: ``name`` says whose naming they follow (its model type)."""

    name: str
    presets: dict[str, list[str]] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)
    fused: str = ""


@dataclass(frozen=True)
class Targets:
    """``lora.targets`` resolved on a module tree: the suffixes asked for (a preset expanded), the full
    names of the modules they match, and whether those are transposed ``Conv1D`` layers."""

    names: list[str]
    modules: list[str]
    fan_in_fan_out: bool


def base_prefix(tree: nn.Module) -> str:
    """The name of the base model inside a task model (``bert``, ``model``, ``transformer``); empty when
    the tree is the base model itself."""
    prefix = str(getattr(tree, "base_model_prefix", ""))
    return prefix if prefix and hasattr(tree, prefix) else ""


def head_modules(tree: nn.Module) -> list[str]:
    """The task model's own top-level modules outside its base model that hold weights: a classifier's
    head (``classifier``; DistilBERT's ``pre_classifier``; DeBERTa-v2's ``pooler``) or an LM head."""
    prefix = base_prefix(tree)
    if not prefix:
        return []
    return [
        name
        for name, child in tree.named_children()
        if name != prefix and any(True for _ in child.parameters())
    ]


def adaptable(tree: nn.Module) -> dict[str, bool]:
    """Full name -> is a ``Conv1D``, for every module LoRA can adapt, in module order: linear layers and
    ``Conv1D`` of the base model, embeddings and their projections left out."""
    heads = head_modules(tree)
    under_heads = tuple(f"{h}." for h in heads)
    found = {}
    for name, module in tree.named_modules():
        if not isinstance(module, nn.Linear | Conv1D) or name in heads or name.startswith(under_heads):
            continue
        if any("embed" in part for part in name.split(".")):
            continue
        found[name] = isinstance(module, Conv1D)
    return found


def matches(suffix: str, names: list[str]) -> list[str]:
    """The names that are ``suffix`` or end with ``.suffix``."""
    return [n for n in names if n == suffix or n.endswith("." + suffix)]


def presets_of(tree: nn.Module) -> Presets:
    """The presets that fit this model: its family's (by ``config.model_type``, else the first family whose
    attention names it has), each kept only if all its names match an adaptable module. ``qv`` is peft's
    own default target set where peft has one for the model type."""
    names = list(adaptable(tree))
    model_type = str(getattr(getattr(tree, "config", None), "model_type", "") or "this model")
    family = FAMILIES.get(model_type) or next(
        (f for f in FAMILIES.values() if all(matches(s, names) for s in f.presets()["qv"])), None
    )
    found: dict[str, list[str]] = {}
    if family is not None:
        found = {p: s for p, s in family.presets().items() if s and all(matches(x, names) for x in s)}
    # start-up: importing peft's constants imports all of peft (about 3 s); only pre-flight's model
    # check and LoRA injection get here, never a config error
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    peft_default = list(PEFT_DEFAULTS.get(model_type, []))
    if peft_default and all(matches(s, names) for s in peft_default):
        found["qv"] = peft_default
    found = {p: found[p] for p in TARGET_PRESETS if p in found}
    attention = [s for s in family.attention() if matches(s, names)] if family and found else []
    return Presets(model_type, found, attention, family.fused if family and found else "")


def resolve(tree: nn.Module, targets: list[str], where: str = "the model") -> Targets:
    """``lora.targets`` (one preset, or module-name suffixes) on this module tree; ConfigError in one line
    naming what fits when a preset does not exist for the family or a name matches no adaptable module.
    ``where`` names the model in messages."""
    modules = adaptable(tree)
    names = list(modules)
    presets = presets_of(tree)
    if len(targets) == 1 and targets[0] in TARGET_PRESETS:
        if targets[0] not in presets.presets:
            raise ConfigError(_no_preset(targets[0], presets, names, where))
        suffixes = presets.presets[targets[0]]
    else:
        suffixes = list(targets)
    missing = [s for s in suffixes if not matches(s, names)]
    if missing:
        raise ConfigError(_not_found(missing, presets, names, where))
    chosen = [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]
    return Targets(suffixes, chosen, any(modules[n] for n in chosen))


def _no_preset(preset: str, presets: Presets, names: list[str], where: str) -> str:
    """Why ``preset`` does not fit, what this family has instead, and the names to use."""
    if not presets.presets:
        return (
            f"lora.targets: preset '{preset}' does not fit {where}: {presets.name} models have no attention "
            f"projection LoRA can adapt (no linear layer fedlora knows as q, k, v or o); name linear "
            f"layers in lora.targets ({', '.join(_leaves(names)) or 'it has none'}) or use another model"
        )
    why = f" (its attention has one fused projection, {presets.fused})" if presets.fused else ""
    return (
        f"lora.targets: preset '{preset}' does not exist for {presets.name} models{why}; "
        f"{_valid(presets, names)}"
    )


def _not_found(missing: list[str], presets: Presets, names: list[str], where: str) -> str:
    """The unmatched names, a close match for the first, and the names and presets that fit."""
    what = "module" if len(missing) == 1 else "modules"
    close = difflib.get_close_matches(missing[0], _leaves(names) + presets.attention, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"lora.targets: {what} {', '.join(repr(m) for m in missing)} not found in {where}{hint}; "
        f"{_valid(presets, names)}"
    )


def _valid(presets: Presets, names: list[str]) -> str:
    """The target names this model accepts: its attention projections, other linear layers, presets."""
    others = [leaf for leaf in _leaves(names) if leaf not in presets.attention]
    parts = [f"valid attention projections: {', '.join(presets.attention)}"] if presets.attention else []
    parts += [f"other linear layers: {', '.join(others)}"] if others else []
    if presets.presets:
        parts.append(f"or a preset of {presets.name}: {', '.join(presets.presets)}")
    return "; ".join(parts)


def _leaves(names: list[str]) -> list[str]:
    """The last component of each name, each once, in module order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
