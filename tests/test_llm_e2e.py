"""Every strategy and both DP modes complete a 2-round causal-LM run on the tiny random Llama, and what
the run leaves behind works: the adapter reloads on AutoModelForCausalLM, `fedlora generate` answers,
FFA-LoRA's A never moved.

Each run: 3 clients (2 sampled), 2 rounds of 2 local steps, one Ray actor, in the test process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from strategies import registry

TEMPLATE = "tweet: {text} sentiment:"
PRIVACY = {
    "dp-sgd": ("ffa-lora", ["--set", "privacy.mode=dp-sgd", "--set", "privacy.noise_multiplier=0.5"]),
    "dp-updates": ("fedit", ["--set", "privacy.mode=dp-updates", "--set", "privacy.noise_multiplier=0.1"]),
}
EXTRA = {"flora": ["--set", "strategy.options.ranks=[2,4]"], "fedsa-lora": []}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama, synthetic_tweets, run_in_process):  # type: ignore[no-untyped-def]
    """``runs(strategy, privacy)``: the directory of that run, made on first use."""
    import pandas as pd

    from fedlora.core.sources import write_table

    base = tmp_path_factory.mktemp("llm-runs")
    frame = pd.DataFrame({"text": synthetic_tweets["text"], "sentiment": synthetic_tweets["label"]})
    frame["sentiment"] = frame["sentiment"].map(dict(enumerate(["negative", "neutral", "positive"])))
    frame["source"] = [f"s{i % 3}" for i in range(len(frame))]
    source = write_table(frame, base / "tweets.csv")
    common = [
        *("--clients", "3", "--rounds", "2"),
        *("--set", "task=causal-lm", "--set", f"model.path={tiny_llama.path}"),
        *("--set", f"data.source={source}", "--set", "data.label=sentiment"),
        *("--set", f'data.template="{TEMPLATE}"', "--set", "data.test_size=12"),
        *("--set", "federation.fraction=0.67", "--set", "train.local_steps=2", "--set", "train.batch_size=4"),
        *("--set", "federation.client_cpus=2", "--set", "lora.rank=2", "--set", "lora.targets=qkvo"),
    ]
    done: dict[tuple[str, ...], Path] = {}

    def get(name: str, privacy: str = "none", *more: str) -> Path:
        if (name, privacy, *more) not in done:
            out = base / "-".join([name, privacy, *more]).replace("=", "_")
            extra = PRIVACY[privacy][1] if privacy != "none" else EXTRA.get(name, [])
            args = [*common, "--strategy", name, *extra, *(a for m in more for a in ("--set", m))]
            proc = run_in_process("run", *args, "--out", str(out))
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            done[name, privacy, *more] = out
        return done[name, privacy, *more]

    return get


def _rows(out: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(registry.available()))
def test_every_strategy_completes_a_causal_lm_run(runs, name: str) -> None:  # type: ignore[no-untyped-def]
    out = runs(name)
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["eval_perplexity"] > 1 and 0 <= r["eval_accuracy"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_shot"]["round"] == 0 and 0 <= summary["zero_shot"]["eval_accuracy"] <= 1
    arrays = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert arrays and all(".lora_" in k for k in arrays)  # no head: the LM head stays frozen


@pytest.mark.e2e
@pytest.mark.parametrize("privacy", sorted(PRIVACY))
def test_both_dp_modes_complete_a_causal_lm_run(runs, privacy: str) -> None:  # type: ignore[no-untyped-def]
    rows = _rows(runs(PRIVACY[privacy][0], privacy))
    assert [r["round"] for r in rows] == [1, 2]
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"]


@pytest.mark.e2e
def test_ffa_lora_a_is_bit_identical_after_the_run(runs, tiny_llama) -> None:  # type: ignore[no-untyped-def]
    from fedlora.core.adapters import initial_state
    from fedlora.core.config import ExperimentConfig

    out = runs("ffa-lora")
    cfg = ExperimentConfig.from_toml((out / "config.toml").read_text())
    start = initial_state(cfg)
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a_keys = [k for k in start if ".lora_A." in k]
    assert a_keys
    for key in a_keys:
        saved_key = key.replace(".default", "")
        assert torch.equal(saved[saved_key], start[key])


@pytest.mark.e2e
def test_adapter_loads_on_auto_model_for_causal_lm_and_generates(runs, tiny_llama, run_in_process) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = runs("fedit")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama.path), str(out / "adapter")
    )
    ids = torch.tensor([[2, 50, 60]])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] > 3
    proc = run_in_process("generate", str(out), "good flight")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == proc.stdout.strip().splitlines()[-1]  # one line: the answer


@pytest.mark.e2e
def test_resume_continues_a_causal_lm_run_as_if_never_stopped(runs, run_in_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run stopped after round 1 (its checkpoint, no summary) and resumed gives the rounds of the run
    that never stopped."""
    import shutil

    stopped = tmp_path / "stopped"
    shutil.copytree(runs("fedit", "none", "federation.rounds=1"), stopped)
    (stopped / "summary.json").unlink()
    config = stopped / "config.toml"
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 2"))
    proc = run_in_process("run", "--resume", str(stopped))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    timing = ("wall_s", "aggregate_s", "attempts")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _rows(stopped)]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in _rows(runs("fedit"))]
