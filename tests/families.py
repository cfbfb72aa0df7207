"""Tiny random models of many transformers families, saved as real model folders, and the conformance
cell that federates one of them (tests/test_conformance.py, benchmarks/conformance.py).

Every folder holds a character-level WordPiece tokenizer (any text tokenises, about 130 tokens) and a
model of hidden size 32, 2 layers and 2 heads built from transformers' own config class, saved with
``save_pretrained`` in float32 or bfloat16, as the base model, the causal LM, or a classifier with a
2-label head (a folder "with a head of another size" for a 3-label task).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *string.ascii_lowercase,
    *string.digits,
    *string.punctuation,
    *(f"##{c}" for c in string.ascii_lowercase + string.digits),
]
SPECIAL = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
VOCAB_SIZE = len(VOCAB) + 11
"""Room for the special tokens a family's own tokenizer class adds (transformers picks Qwen2's for a
qwen2 folder, which adds ``<|endoftext|>``)."""
SIZE = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 80,
}
DECODER = {**SIZE, **SPECIAL, "num_key_value_heads": 1}
FOLDER_KINDS = ("base", "head")
"""``base``: the base model (an encoder) or the causal LM (a decoder); ``head``: a 2-label classifier."""


def _configs() -> dict[str, Callable[[], Any]]:
    """Family -> its config class called with tiny sizes (imported lazily: transformers' families)."""
    import transformers as t

    v = VOCAB_SIZE
    return {
        "bert": lambda: t.BertConfig(**SIZE, pad_token_id=0),
        "distilbert": lambda: t.DistilBertConfig(
            vocab_size=v, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=80
        ),
        "roberta": lambda: t.RobertaConfig(**SIZE, pad_token_id=0),
        "deberta-v2": lambda: t.DebertaV2Config(**SIZE, pad_token_id=0),
        "electra": lambda: t.ElectraConfig(**SIZE, embedding_size=32, pad_token_id=0),
        "gpt2": lambda: t.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=80, **SPECIAL),
        "gpt_neox": lambda: t.GPTNeoXConfig(**SIZE, **SPECIAL),
        "opt": lambda: t.OPTConfig(
            vocab_size=v,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            ffn_dim=64,
            max_position_embeddings=80,
            word_embed_proj_dim=32,
            **SPECIAL,
        ),
        "llama": lambda: t.LlamaConfig(**DECODER),
        "qwen2": lambda: t.Qwen2Config(**DECODER),
        "mistral": lambda: t.MistralConfig(**DECODER),
        "phi3": lambda: t.Phi3Config(**DECODER),
        "gemma": lambda: t.GemmaConfig(**DECODER, head_dim=16),
        "falcon": lambda: t.FalconConfig(
            vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **SPECIAL
        ),
        # presets checked in tests/test_targets.py, not in the matrix
        "gptj": lambda: t.GPTJConfig(
            vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=80, rotary_dim=8, **SPECIAL
        ),
        "phi": lambda: t.PhiConfig(**SIZE, **SPECIAL),
        "bloom": lambda: t.BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=2, **SPECIAL),
        "qwen3": lambda: t.Qwen3Config(**DECODER, head_dim=16),
        # refused: XLNet keeps its attention weights as raw tensors, ViT is no text model
        "xlnet": lambda: t.XLNetConfig(vocab_size=v, d_model=32, n_layer=2, n_head=2, d_inner=64, **SPECIAL),
        "vit": lambda: t.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=8,
            patch_size=4,
        ),
    }


FAMILIES = (
    "bert",
    "distilbert",
    "roberta",
    "deberta-v2",
    "electra",
    "gpt2",
    "gpt_neox",
    "opt",
    "llama",
    "qwen2",
    "mistral",
    "phi3",
    "gemma",
    "falcon",
    "xlnet",
    "vit",
)
DECODERS = (
    *("gpt2", "gpt_neox", "opt", "llama", "qwen2", "mistral", "phi3", "gemma", "falcon", "xlnet"),
    *("gptj", "phi", "bloom", "qwen3"),
)
"""Families with a causal-LM class in transformers (XLNet's is refused for its targets)."""


def save_tokenizer(directory: Path) -> None:
    """The character-level WordPiece tokenizer, saved into ``directory``."""
    from transformers import BertTokenizerFast

    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(str(directory / "vocab.txt"), do_lower_case=True, model_max_length=64)
    tokenizer.save_pretrained(directory)


def save_family(directory: Path, family: str, *, kind: str = "base", dtype: str = "float32") -> str:
    """A random ``family`` model of ``kind`` (:data:`FOLDER_KINDS`) saved in ``dtype`` with the tokenizer;
    returns the folder as a string (what ``model.path`` takes)."""
    import transformers as t

    config = _configs()[family]()
    config.initializer_range = 0.2  # features that depend on the input, so that logits differ
    if kind == "head":
        config.num_labels = 2
        auto: Any = t.AutoModelForSequenceClassification
    elif family in DECODERS:
        auto = t.AutoModelForCausalLM
    else:
        auto = t.AutoModel
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = auto.from_config(config)
    directory.mkdir(parents=True)
    model.to(getattr(torch, dtype)).save_pretrained(directory)
    save_tokenizer(directory)
    return str(directory)


def save_config(directory: Path, family: str) -> str:
    """Only the ``config.json`` of a tiny ``family`` model (enough for its meta-device module tree)."""
    config = _configs()[family]()
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    return str(directory)


@dataclass(frozen=True)
class Cell:
    """One conformance cell: a family, a task, the folder's dtype and kind, and the strategy."""

    family: str
    task: str
    dtype: str
    kind: str
    strategy: str

    @property
    def folder(self) -> str:
        """The folder's name for this cell's model (shared by cells that use the same folder)."""
        kind = "head" if self.kind == "head" else "base"
        return f"{self.family}-{kind}-{self.dtype}"


EXPECTED_REFUSALS = {
    ("xlnet", "classification"): "xlnet models have no attention projection LoRA can adapt",
    ("xlnet", "causal-lm"): "xlnet models have no attention projection LoRA can adapt",
    ("vit", "classification"): "is a vit model, which has no sequence-classification class",
    ("bert", "causal-lm"): "task = 'causal-lm' needs a decoder language model",
    ("distilbert", "causal-lm"): "task = 'causal-lm' needs a decoder language model",
}
"""The cells pre-flight must refuse, and a fragment of each one's line."""


ROTATED = frozenset(
    {
        *(
            (f, "classification")
            for f in ("distilbert", "roberta", "deberta-v2", "gpt2", "opt", "phi3", "gemma")
        ),
        *((f, "causal-lm") for f in ("gpt_neox", "llama", "qwen2", "mistral", "falcon")),
    }
)
"""The family x task pairs whose fast cell is FFA-LoRA on a bfloat16 folder (with a 2-label head for
classification); the others' fast cell is FedIT on a float32 folder without one. Each pair's other cell
is in the e2e tier. DistilBERT, RoBERTa and DeBERTa-v2 with a head are the folders of issue 27."""


def cells() -> list[tuple[Cell, bool]]:
    """Every cell and whether it belongs to the fast tier: per family and task, FedIT on a float32 folder
    without a classification head and FFA-LoRA on a bfloat16 folder (with a 2-label head for
    classification), one of the two fast (:data:`ROTATED`); the refused pairs once, fast."""
    found = []
    for family in FAMILIES:
        for task in ("classification", "causal-lm"):
            if (family, task) in EXPECTED_REFUSALS:
                found.append((Cell(family, task, "float32", "base", "fedit"), True))
            elif task == "classification" or family in DECODERS:
                rotated = (family, task) in ROTATED
                kind = "head" if task == "classification" else "base"
                found.append((Cell(family, task, "float32", "base", "fedit"), not rotated))
                found.append((Cell(family, task, "bfloat16", kind, "ffa-lora"), rotated))
    return found


TEXTS = [
    ("the flight was good, thanks", "positive"),
    ("great crew, love it", "positive"),
    ("happy with the seat", "positive"),
    ("bad delay again", "negative"),
    ("awful service, lost my bag", "negative"),
    ("i hate this airline", "negative"),
    ("gate 12 today", "neutral"),
    ("my flight is at 9", "neutral"),
    ("news on the seat map", "neutral"),
]


def write_data(directory: Path) -> Path:
    """A small labelled CSV (36 rows, three classes) for the cells."""
    import pandas as pd

    rows = [{"text": f"{text} {i}", "label": label} for i in range(4) for text, label in TEXTS]
    path = directory / "texts.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def overrides(cell: Cell, model: str, data: Path) -> list[str]:
    """One round of two clients, one local step each, a 10-example test set, short sequences."""
    common = [
        f'model.path="{model}"',
        f'data.source="{data}"',
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=10",
        "data.val_fraction=0.0",
        f'strategy.name="{cell.strategy}"',
        "federation.num_clients=2",
        "federation.rounds=1",
        "train.local_steps=1",
        "train.batch_size=4",
        "lora.rank=2",
    ]
    if cell.task == "causal-lm":
        common += ['task="causal-lm"', 'data.template="Tweet: {text} Sentiment:"']
    return common


PROBES = ["good flight today", "awful delay, lost bag"]
"""Texts both models predict for after the run (the reloaded adapter must match the run's own model)."""


def reloaded_logits(adapter: Path, model_dir: str, task: str) -> tuple[list[list[int]], torch.Tensor]:
    """The docs' reload code (docs/data.md, docs/llm.md) run as written on ``adapter``: plain transformers
    and peft, the tokenizer from the adapter folder; returns the probes' token ids and logits."""
    doc = "data.md" if task == "classification" else "llm.md"
    code = doc_snippet(Path(__file__).resolve().parents[1] / "docs" / doc)
    scope: dict[str, Any] = {}
    code = code.replace('"runs/topics/adapter"', repr(str(adapter)))
    code = code.replace('"runs/llm-quickstart/adapter"', repr(str(adapter)))
    exec(code.replace('model_dir = "models/my-model"', f"model_dir = {model_dir!r}"), scope)
    batch = scope["tokenizer"](PROBES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return batch["input_ids"].tolist(), scope["model"](**batch).logits


def doc_snippet(doc: Path) -> str:
    """The Python block of ``doc`` that reloads an adapter with plain transformers and peft (the one that
    calls ``AutoTokenizer.from_pretrained(adapter)``)."""
    blocks = doc.read_text(encoding="utf-8").split("```python\n")[1:]
    found = [b.split("```", 1)[0] for b in blocks if "AutoTokenizer.from_pretrained(adapter)" in b]
    if len(found) != 1:
        raise AssertionError(f"{doc.name}: expected one reload snippet, found {len(found)}")
    return _dedent(found[0])


def _dedent(code: str) -> str:
    """A code block indented in a list item, at column 0."""
    import textwrap

    return textwrap.dedent(code)


def table(rows: list[tuple[Cell, str]]) -> str:
    """The conformance table as Markdown: family, task, dtype, folder, strategy, outcome."""
    lines = ["| family | task | dtype | folder | strategy | outcome |", "|---|---|---|---|---|---|"]
    for cell, outcome in rows:
        folder = {"base": "bare", "head": "2-label head"}[cell.kind]
        if cell.kind == "base" and cell.family in DECODERS:
            folder = "causal LM"
        lines.append(
            f"| {cell.family} | {cell.task} | {cell.dtype} | {folder} | {cell.strategy} | {outcome} |"
        )
    return "\n".join(lines)


def dump(rows: list[tuple[Cell, str]], path: Path) -> None:
    """The rows as JSON lines (for benchmarks/conformance.py)."""
    with path.open("w", encoding="utf-8") as f:
        for cell, outcome in rows:
            f.write(json.dumps({**cell.__dict__, "outcome": outcome}) + "\n")


def run_cell(cell: Cell, model: str, data: Path, out: Path, federate: Callable[..., Path]) -> str:
    """Pre-flight, one federated round (``federate``: the in-process federation of tests/conftest.py),
    then the saved adapter reloaded with the docs' plain transformers + peft code: its tokenizer and
    logits must equal the run's own. Returns "trains" or "refused: <pre-flight's line>"; raises
    AssertionError when a cell trains but does not reproduce."""
    from safetensors.torch import load_file

    from fedlora.core.config import ConfigError
    from fedlora.run.experiment import load_experiment, preflight

    try:
        cfg = preflight(load_experiment(None, overrides(cell, model, data)))
    except ConfigError as exc:
        return f"refused: {exc}"
    federate(cfg, out)
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in saved.items() if ".lora_B." in k]
    assert b and any(bool(v.abs().sum() > 0) for v in b), f"{cell}: no LoRA B moved from zero"
    ids, logits = run_logits(cfg, out)
    reloaded_ids, reloaded = reloaded_logits(out / "adapter", model, cell.task)
    assert reloaded_ids == ids, f"{cell}: the adapter folder's tokenizer differs from the run's"
    torch.testing.assert_close(reloaded, logits, rtol=1e-5, atol=1e-5, msg=f"{cell}: reloaded logits differ")
    return "trains"


def run_logits(cfg: Any, out: Path) -> tuple[list[list[int]], torch.Tensor]:
    """The probes' token ids and logits from the run's own final global model (as the server evaluates
    it, from the checkpoint) and the run's tokenizer."""
    from fedlora.core.model.loading import load_tokenizer
    from fedlora.core.records.rundir import RunDirectory
    from fedlora.run import checkpoint
    from fedlora.run.evaluation import global_model

    saved = checkpoint.load(RunDirectory(out).checkpoint_path)
    model = global_model(cfg, saved.global_state, saved.base_offsets)
    batch = load_tokenizer(cfg.model.path)(PROBES, return_tensors="pt", padding=True)
    model.eval()
    try:
        with torch.no_grad():
            return batch["input_ids"].tolist(), model(**batch).logits
    finally:
        model.train()
