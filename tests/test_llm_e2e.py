"""Every strategy and both DP modes complete a 2-round causal-LM run on the tiny random Llama, and what
the run leaves behind works: the adapter reloads on AutoModelForCausalLM, `fedlora generate` answers,
FFA-LoRA's A never moved, a stopped run resumes as if never stopped.

Each run: 3 clients (2 sampled), 2 rounds of 2 local steps, federated in the test process (``federate``:
the product's server and ClientApp code, without Ray); the run whose adapter is reloaded and asked to
generate is a real `fedlora run` on Ray (one actor), so the causal-LM client also runs in a Ray worker.
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
    "dp-sgd": ("ffa-lora", ["privacy.mode=dp-sgd", "privacy.noise_multiplier=0.5"]),
    "dp-updates": ("fedit", ["privacy.mode=dp-updates", "privacy.noise_multiplier=0.1"]),
}
EXTRA = {"flora": ["strategy.options.ranks=[2,4]"]}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, synthetic_tweets) -> Path:  # type: ignore[no-untyped-def]
    """The synthetic tweets as a CSV with label names and three sources."""
    import pandas as pd

    from fedlora.core.data.sources import write_table

    frame = pd.DataFrame({"text": synthetic_tweets["text"], "sentiment": synthetic_tweets["label"]})
    frame["sentiment"] = frame["sentiment"].map(dict(enumerate(["negative", "neutral", "positive"])))
    frame["source"] = [f"s{i % 3}" for i in range(len(frame))]
    return write_table(frame, tmp_path_factory.mktemp("llm-data") / "tweets.csv")


def settings(model: str, source: Path) -> list[str]:
    """The overrides of every run here (``--set`` values)."""
    return [
        *("federation.num_clients=3", "federation.rounds=2", "task=causal-lm", f"model.path={model}"),
        *(f"data.source={source}", "data.label=sentiment", f'data.template="{TEMPLATE}"'),
        *("data.test_size=12", "federation.fraction=0.67", "train.local_steps=2", "train.batch_size=4"),
        *("federation.client_cpus=2", "lora.rank=2", "lora.targets=qkvo"),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama, source, federate):  # type: ignore[no-untyped-def]
    """``runs(strategy, privacy, *overrides)``: the directory of that run, made in process on first use."""
    from fedlora.run.experiment import load_experiment, preflight

    base = tmp_path_factory.mktemp("llm-runs")
    done: dict[tuple[str, ...], Path] = {}

    def get(name: str, privacy: str = "none", *more: str) -> Path:
        if (name, privacy, *more) not in done:
            out = base / "-".join([name, privacy, *more]).replace("=", "_")
            extra = PRIVACY[privacy][1] if privacy != "none" else EXTRA.get(name, [])
            overrides = [*settings(tiny_llama.path, source), f"strategy.name={name}", *extra, *more]
            done[name, privacy, *more] = federate(preflight(load_experiment(None, overrides)), out)
        return done[name, privacy, *more]

    return get


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama, source, run_in_process) -> Path:  # type: ignore[no-untyped-def]
    """A FedIT causal-LM run through `fedlora run` on Ray (one client actor)."""
    out = tmp_path_factory.mktemp("llm-ray") / "fedit"
    sets = [a for s in [*settings(tiny_llama.path, source), "strategy.name=fedit"] for a in ("--set", s)]
    proc = run_in_process("run", *sets, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


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
    from fedlora.core.config import ExperimentConfig
    from fedlora.tasks.models import initial_state

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
def test_adapter_loads_on_auto_model_for_causal_lm_and_generates(ray_run, tiny_llama, run_in_process) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = ray_run
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2] and all(r["num_clients"] == 2 for r in rows)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama.path), str(out / "adapter")
    )
    ids = torch.tensor([[2, 50, 60]])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] > 3
    proc = run_in_process("generate", str(out), "good flight")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == proc.stdout.strip().splitlines()[-1]  # one line: the answer


@pytest.mark.e2e
def test_resume_continues_a_causal_lm_run_as_if_never_stopped(runs, federate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A run stopped after round 1 (its checkpoint, no summary) and resumed gives the rounds of the run
    that never stopped."""
    import shutil

    stopped = tmp_path / "stopped"
    shutil.copytree(runs("fedit", "none", "federation.rounds=1"), stopped)
    (stopped / "summary.json").unlink()
    config = stopped / "config.toml"
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 2"))
    from fedlora.core.records.rundir import RunDirectory
    from fedlora.run.experiment import preflight

    federate(preflight(RunDirectory(stopped).resumable_config()), stopped, resume=True)
    timing = ("wall_s", "aggregate_s", "attempts")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _rows(stopped)]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in _rows(runs("fedit"))]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two-column instruction pairs (prompt, response) as a CSV, with odd quoting in some prompts."""
    import pandas as pd

    from fedlora.core.data.sources import write_table

    words = ["good", "great", "bad", "late", "flight", "gate"]
    prompts = [
        f'repeat "{w}" twice, please' if i % 2 else f"repeat {w} twice" for i, w in enumerate(words * 8)
    ]
    responses = [f"{w} {w}" for w in words * 8]
    frame = pd.DataFrame({"prompt": prompts, "response": responses})
    return write_table(frame, tmp_path_factory.mktemp("pairs") / "pairs.csv")


@pytest.mark.e2e
def test_instruction_pairs_train_and_generate_answers(
    pairs, tiny_llama, federate, run_in_process, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """A CSV of prompt/response pairs with task = causal-lm and data.response: the loader and pre-flight
    accept it (no class names are needed), a run trains on the responses, and `fedlora generate`
    answers from the run directory."""
    from fedlora.run.experiment import load_experiment, preflight

    overrides = [
        *("task=causal-lm", f"model.path={tiny_llama.path}", f"data.source={pairs}", "data.text=prompt"),
        *("data.response=response", "data.partitioner=iid", "data.test_size=12", "federation.num_clients=2"),
        *(
            "federation.rounds=2",
            "train.local_steps=3",
            "train.batch_size=4",
            "lora.rank=2",
            "lora.targets=qv",
        ),
    ]
    cfg = preflight(load_experiment(None, overrides))
    assert cfg.data.labels == []  # free text: no classes to fill in
    out = federate(cfg, tmp_path / "pairs-run")
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["eval_perplexity"] > 1 and r["train_loss"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["zero_shot"]["eval_perplexity"] > rows[-1]["eval_perplexity"]  # it learned something
    proc = run_in_process("generate", str(out), "repeat good twice")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.strip() and "\n" not in proc.stdout.strip()
