"""LoRA target presets and module-name matching, without torch or transformers (pre-flight uses them)."""

from __future__ import annotations

from fedlora.core.config import TARGET_PRESETS

#: Module-name suffixes per preset, for BERT-style and Llama-style blocks (Llama covers Qwen and Mistral,
#: which name their projections the same way). ``mlp`` is the feed-forward block.
PRESETS: dict[str, dict[str, list[str]]] = {
    "bert": {
        "qv": ["query", "value"],
        "qkvo": ["query", "key", "value", "attention.output.dense"],
        "vo": ["value", "attention.output.dense"],
        "mlp": ["intermediate.dense"],
    },
    "llama": {
        "qv": ["q_proj", "v_proj"],
        "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "vo": ["v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj"],
    },
}


def preset_family(names: list[str]) -> str:
    """'llama' or 'bert': which attention naming the linear layer ``names`` follow."""
    return "llama" if any(n.endswith("q_proj") for n in names) else "bert"


def target_suffixes(targets: list[str], names: list[str]) -> list[str]:
    """``targets`` as module-name suffixes: a preset resolved for the model's family, or the names given."""
    if len(targets) == 1 and targets[0] in TARGET_PRESETS:
        return list(PRESETS[preset_family(names)][targets[0]])
    return list(targets)


def unmatched(suffixes: list[str], names: list[str]) -> list[str]:
    """The suffixes that match no name (a suffix matches a whole name or its dotted tail)."""
    return [s for s in suffixes if not any(n == s or n.endswith("." + s) for n in names)]
