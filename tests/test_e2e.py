"""End to end: `fedlora run` on the real model and tweets, simulated on Flower's Ray backend."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
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
    "data.test_size=200",
    "--set",
    "data.max_length=48",
    "--set",
    "federation.fraction_evaluate=1.0",
]


class Descendants:
    """Every process started under ``pid`` while it runs (sampled every 0.2 s in a thread), so a test
    can check that a command leaves nothing behind without counting other jobs' processes."""

    def __init__(self, pid: int) -> None:
        self.root = pid
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while psutil.pid_exists(self.root):
            try:
                children = psutil.Process(self.root).children(recursive=True)
            except psutil.Error:
                break
            for child in children:
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault((child.pid, child.create_time()), child)
            time.sleep(0.2)

    def left(self, timeout: float = 10.0) -> list[int]:
        """PIDs still running after ``timeout`` seconds (zombies count as gone)."""
        self._thread.join(timeout)
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=timeout)
        return [p.pid for p in alive if _running(p)]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "run", *SMALL, "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started = Descendants(proc.pid)
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
    from fedlora.core.records import read_rounds, read_summary

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
    from fedlora.core.adapters import initial_state
    from fedlora.core.arrays import payload_bytes, to_arrays
    from fedlora.core.config import ExperimentConfig

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
    from fedlora.core.data import get_splits
    from fedlora.core.models import load_classifier, load_tokenizer
    from fedlora.core.training import encode, evaluate

    cfg = ExperimentConfig.from_toml((run_dir / "config.toml").read_text())
    torch.set_num_threads(2)
    model = PeftModel.from_pretrained(load_classifier("", num_labels=3, seed=123), str(run_dir / "adapter"))
    test = get_splits(cfg.data, cfg.federation.num_clients, cfg.seed).test
    loss, accuracy = evaluate(model, encode(test, load_tokenizer(""), cfg.data.max_length))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert accuracy == summary["final_eval_accuracy"]
    assert loss == pytest.approx(summary["final_eval_loss"], rel=1e-4)


@pytest.mark.e2e
def test_same_seed_same_metrics_with_client_sampling(tmp_path: Path) -> None:
    """Clients are sampled by partition id with the seeded RNG, and replies summed in a fixed order."""
    args = [
        "--clients",
        "4",
        "--rounds",
        "2",
        "--set",
        "federation.fraction=0.5",
        "--set",
        "train.local_steps=1",
    ]
    args += ["--set", "data.max_examples=2000", "--set", "data.test_size=100"]
    rows = []
    for name in ("a", "b"):
        proc = subprocess.run(
            [sys.executable, "-m", "fedlora.cli", "run", *args, "--out", str(tmp_path / name)],
            capture_output=True, text=True, cwd=ROOT, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = (tmp_path / name / "rounds.jsonl").read_text().splitlines()
        rows.append(
            [{k: v for k, v in json.loads(x).items() if k not in ("wall_s", "aggregate_s")} for x in lines]
        )
    assert rows[0] == rows[1]
    assert all(r["num_clients"] == 2 for r in rows[0])
