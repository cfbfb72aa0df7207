"""End to end: `fedlora run` on the real model and tweets, simulated on Flower's Ray backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROUND_KEYS = {
    "round",
    "strategy",
    "num_clients",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "uplink_bytes",
    "downlink_bytes",
    "wall_s",
}
SMALL = [
    "--clients",
    "3",
    "--rounds",
    "2",
    "--set",
    "train.local_steps=2",
    "--set",
    "data.max_examples=3000",
    "--set",
    "data.test_size=100",
    "--set",
    "data.max_length=32",
    "--set",
    "federation.fraction_evaluate=1.0",
    "--set",
    "federation.client_cpus=2",  # one Ray actor runs all three clients: one model load instead of two
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, start_cli, follow_descendants) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("e2e") / "run"
    proc = start_cli("run", *SMALL, "--out", str(out))
    started = follow_descendants(proc.pid)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert "round   2/2" in output
    assert started.seen, "the run started no process (Ray) that the check could follow"
    left = started.left()
    assert not left, f"processes left running: {left}"
    return out


@pytest.mark.e2e
def test_run_directory_contract(run_dir: Path) -> None:
    assert {p.name for p in run_dir.iterdir()} >= {"config.toml", "rounds.jsonl", "summary.json", "adapter"}
    from fedlora.core.records.rundir import read_rounds, read_summary

    rows = read_rounds(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row) >= ROUND_KEYS, ROUND_KEYS - set(row)
        assert row["num_clients"] == 3 and row["strategy"] == "fedit"
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        assert 0.0 <= row["client_eval_accuracy"] <= 1.0
    summary = read_summary(run_dir)
    assert summary["final_eval_accuracy"] == rows[-1]["eval_accuracy"]
    assert summary["best_eval_accuracy"] == max(r["eval_accuracy"] for r in rows)
    assert summary["total_uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    assert 0.3 < summary["majority_accuracy"] < 0.5
    assert {"flwr", "torch", "peft", "transformers"} <= set(summary["versions"])


@pytest.mark.e2e
def test_traffic_is_the_exact_adapter_payload(run_dir: Path) -> None:
    from fedlora.core.config import ExperimentConfig
    from fedlora.core.model.arrays import payload_bytes, to_arrays
    from fedlora.tasks.models import initial_state

    cfg = ExperimentConfig.from_toml((run_dir / "config.toml").read_text())
    per_client = payload_bytes(to_arrays(initial_state(cfg)))
    trainable = sum(v.numel() for v in initial_state(cfg).values())
    assert trainable == 6 * 2 * (8 * 384 + 384 * 8) + 3 * 384 + 3  # LoRA on q, v of 6 layers + head
    for row in (json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()):
        assert row["uplink_bytes"] == 3 * per_client
        assert row["downlink_bytes"] == 2 * 3 * per_client  # train and evaluate messages to 3 clients


@pytest.mark.e2e
def test_saved_adapter_reproduces_the_reported_accuracy(run_dir: Path) -> None:
    from peft import PeftModel

    from fedlora.core.config import ExperimentConfig
    from fedlora.core.data.splits import get_splits
    from fedlora.core.model.loading import load_classifier, load_tokenizer
    from fedlora.core.training.loops import encode, evaluate

    cfg = ExperimentConfig.from_toml((run_dir / "config.toml").read_text())
    model = PeftModel.from_pretrained(load_classifier("", num_labels=3, seed=123), str(run_dir / "adapter"))
    test = get_splits(cfg.data, cfg.federation.num_clients, cfg.seed).test
    loss, accuracy = evaluate(model, encode(test, load_tokenizer(""), cfg.data.max_length))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert accuracy == summary["final_eval_accuracy"]
    assert loss == pytest.approx(summary["final_eval_loss"], rel=1e-4)
