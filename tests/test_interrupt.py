"""Ctrl-C (SIGINT) or `kill` (SIGTERM) stops a run: exit 130, finished rounds kept, no Ray left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_e2e import ROOT, ray_processes


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_ray_and_keeps_finished_rounds(sig: signal.Signals, tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = ray_processes()
    args = ["--clients", "3", "--rounds", "20", "--set", "train.local_steps=1"]
    args += ["--set", "data.max_examples=2000", "--set", "data.test_size=100", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "run", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )  # fmt: skip
    rounds = out / "rounds.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if rounds.is_file() and rounds.read_text().count("\n") >= 1:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output[-2000:]
    assert "interrupted" in output
    kept = rounds.read_text().count("\n")
    assert 1 <= kept < 20
    time.sleep(1)
    assert not (ray_processes() - before)
