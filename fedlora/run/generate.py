"""``fedlora generate``: the answer of a causal-LM run's fine-tuned model to a prompt (greedy decoding)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model.adapters import load_trained_lm, set_base_offsets
from fedlora.core.model.loading import load_tokenizer
from fedlora.core.records.rundir import RunDirectory
from fedlora.core.training.prompts import chat_parts, prompt_ids, prompt_text


def run_config(run_dir: Path) -> ExperimentConfig:
    """The config of a finished causal-LM run; ConfigError (one line) for anything else."""
    directory = RunDirectory(run_dir)
    config = directory.path / "config.toml"
    if not config.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no config.toml)")
    cfg = ExperimentConfig.from_toml(config.read_text(encoding="utf-8"))
    if not cfg.causal:
        raise ConfigError(f"run '{run_dir}' has task = {cfg.task!r}; fedlora generate needs a causal-lm run")
    if not (directory.adapter_path / "adapter_config.json").is_file():
        raise ConfigError(f"run '{run_dir}' has no adapter/ yet (it has not finished)")
    return cfg


def generate(run_dir: Path, text: str, *, max_new_tokens: int = 16, raw: bool = False) -> str:
    """The fine-tuned model's greedy answer to ``text``, filled into the run's ``data.template`` (unless
    ``raw``) and its tokenizer's chat template, as in training. ``max_new_tokens``: at most this many
    tokens are generated (default 16); special tokens are left out of the answer."""
    cfg = run_config(run_dir)
    directory = RunDirectory(run_dir)
    model = load_trained_lm(directory.adapter_path, cfg.model.path)
    if directory.base_offsets_path.is_file():  # FedEx-LoRA, FLoRA: updates folded into the base weights
        set_base_offsets(model, load_file(str(directory.base_offsets_path)))
    tokenizer = load_tokenizer(cfg.model.path)
    prompt, _ = chat_parts(tokenizer, text if raw else prompt_text(cfg.data.template, text), "")
    ids = torch.tensor([prompt_ids(tokenizer, [prompt])[0]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()
