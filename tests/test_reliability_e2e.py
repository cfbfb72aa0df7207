"""End to end on the real model and tweets: faulty clients, and a run killed mid-round and resumed.

One configuration serves both claims: FedSA-LoRA (each client keeps its own B, so client state must
survive the restart), 10 clients of which 5 are sampled per round (so the sampling RNG must be
restored), 20% of clients raising and 10% sending NaN every round.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fedlora.core.records.rundir import read_rounds, read_summary

ROUNDS = 4
ARGS = ["--clients", "10", "--rounds", str(ROUNDS), "--strategy", "fedsa-lora"]
ARGS += ["--set", "federation.fraction=0.5", "--set", "train.local_steps=1"]
ARGS += ["--set", "train.batch_size=8", "--set", "data.max_length=32"]
ARGS += ["--set", "data.max_examples=1000", "--set", "data.test_size=60"]
ARGS += ["--set", "faults.raise_fraction=0.2", "--set", "faults.nan_fraction=0.1"]
ARGS += ["--set", "federation.client_cpus=2"]  # one Ray actor runs every client: one model load
TIMING = ("wall_s", "aggregate_s")


def _metrics(run_dir: Path) -> list[dict[str, object]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_rounds(run_dir)]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory, run_in_process) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("faults") / "run"
    proc = run_in_process("run", *ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.mark.e2e
def test_faulty_clients_are_dropped_and_every_round_completes(clean_run: Path) -> None:
    rows = read_rounds(clean_run)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        assert row["num_sampled"] == 5
        assert row["num_failed"] + row["num_rejected"] >= 1 or row["num_clients"] == 5
        assert row["num_clients"] == 5 - row["num_failed"] - row["num_rejected"] >= 2
        assert row["num_replied"] == 5 - row["num_failed"]
    assert sum(r["num_failed"] for r in rows) >= 1 and sum(r["num_rejected"] for r in rows) >= 1
    assert read_summary(clean_run)["rounds"] == ROUNDS


@pytest.mark.e2e
def test_sigkill_in_round_3_then_resume_gives_the_same_rounds(
    clean_run: Path, tmp_path: Path, start_cli, run_in_process
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    proc = start_cli(
        "run", *ARGS, "--out", str(out),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=False, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_round_3_client_state(out, proc)
    finally:
        killed = _kill_tree(proc)
    assert len(read_rounds(out)) == 2, "the kill did not land in round 3"
    assert not (out / "summary.json").exists()
    assert not [p for p in killed if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    resumed = run_in_process("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert _metrics(out) == _metrics(clean_run)
    assert _client_lines(out) == _client_lines(clean_run)  # no round's lines lost or written twice
    a, b = read_summary(out), read_summary(clean_run)
    assert a["final_eval_accuracy"] == b["final_eval_accuracy"]
    assert a["final_eval_loss"] == b["final_eval_loss"]


def _client_lines(run_dir: Path) -> list[str]:
    """clients.jsonl without the node ids (Flower draws them afresh in every run), in a fixed order."""
    rows = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    return sorted(json.dumps({k: v for k, v in r.items() if k != "node_id"}, sort_keys=True) for r in rows)


def _wait_for_round_3_client_state(out: Path, proc: subprocess.Popen[bytes]) -> None:
    """Block until a client has saved its round-3 state (round 3 is under way), while round 3 has
    not finished."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        if any((out / "client_state").glob("client-*/*.r3.*")):
            return
        time.sleep(0.02)
    raise AssertionError("round 3 never started")


def _kill_tree(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """SIGKILL the run and every process it started, by PID (a crash leaves no time to clean up);
    returns them, waited for."""
    root = psutil.Process(proc.pid)
    family = [root, *root.children(recursive=True)]
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(family[1:], timeout=30)
    return family
