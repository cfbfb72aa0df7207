"""The real SmolLM2-135M-Instruct: the GGUF conversion, and one small federated causal-LM run (in this
process) whose adapter a fresh process reloads to answer (`fedlora generate`)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

LABELS = ("negative", "neutral", "positive")


@pytest.fixture(scope="module")
def smollm2() -> str:
    """The converted folder (converted here the first time: 15-90 s)."""
    from fedlora.core.model.convert import convert_smollm2

    folder, _ = convert_smollm2()
    return str(folder)


def test_conversion_is_idempotent_and_unquantised(smollm2: str, run_in_process) -> None:  # type: ignore[no-untyped-def]
    from fedlora.core.model.convert import convert_smollm2, is_converted

    folder, converted = convert_smollm2()
    assert not converted and str(folder) == smollm2 and is_converted(folder)
    again = run_in_process("models", "convert-smollm2")
    assert again.returncode == 0 and again.stdout.strip() == f"already converted: {smollm2}"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]


def test_small_run_trains_and_generate_answers(smollm2: str, tmp_path, repo_root, federate, run_cli) -> None:  # type: ignore[no-untyped-def]
    """The federation in this process (the product's round loop and ClientApp, messages through Flower's
    protobuf form; test_llm_e2e.py runs a causal-LM federation on Ray), then a fresh process reloads the
    adapter and answers."""
    from fedlora.run.experiment import load_experiment, preflight

    out = tmp_path / "run"
    overrides = ["federation.num_clients=2", "federation.rounds=1", "data.max_examples=300"]
    overrides += ["data.test_size=12", "data.max_length=80", "train.local_steps=2", "train.batch_size=4"]
    overrides += ["federation.client_cpus=2"]
    cfg = load_experiment(repo_root / "sims" / "llm_quickstart.toml", overrides)
    federate(preflight(cfg, simulation=True), out)
    summary = json.loads((out / "summary.json").read_text())
    (row,) = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert 0 <= summary["zero_shot"]["eval_accuracy"] <= 1 and 0 <= row["eval_accuracy"] <= 1
    assert 1 < row["eval_perplexity"] < summary["zero_shot"]["eval_perplexity"]  # it learnt the format
    answer = run_cli("generate", str(out), "@united my bag is lost and nobody answers the phone", timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert any(label in answer.stdout.lower() for label in LABELS), answer.stdout
