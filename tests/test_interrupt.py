"""Ctrl-C (SIGINT) or `kill` (SIGTERM) stops a run: exit 130, finished rounds kept, no Ray left.

The first signal stops gracefully (the clients' current messages finish, Flower shuts Ray down);
a second one stops every process by PID at once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

WAYS = {
    "ctrl-c": (signal.SIGINT, True, 1),  # a terminal sends SIGINT to the whole process group
    "kill": (signal.SIGTERM, False, 1),
    "kill-twice": (signal.SIGTERM, False, 2),
}


@pytest.mark.e2e
@pytest.mark.parametrize("way", list(WAYS))
def test_interrupt_stops_ray_and_keeps_finished_rounds(
    way: str, tmp_path: Path, start_cli, follow_descendants
) -> None:  # type: ignore[no-untyped-def]
    sig, to_group, times = WAYS[way]
    out = tmp_path / "run"
    args = ["--clients", "3", "--rounds", "20", "--set", "train.local_steps=1"]
    args += ["--set", "data.max_examples=2000", "--set", "data.test_size=100", "--out", str(out)]
    args += ["--set", "data.max_length=32", "--set", "federation.client_cpus=2"]  # one Ray actor
    proc = start_cli("run", *args, start_new_session=True)
    started = follow_descendants(proc.pid)
    rounds = out / "rounds.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if rounds.is_file() and rounds.read_text().count("\n") >= 1:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-2000:]
    for _ in range(times):
        os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output[-2000:]
    assert "stopping" in output
    kept = rounds.read_text().count("\n")
    assert 1 <= kept < 20
    assert not started.left(), output[-2000:]
