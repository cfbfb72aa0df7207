"""The comparison's own Ray head: it starts, answers on its address, and never outlives the comparison,
whether stopped in order or when `fedlora compare` is killed with SIGKILL. No simulation runs here."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedlora.compare.ray_head import RayHead, worker_ports

HOLDER = """
import json, sys, time
from pathlib import Path
from fedlora.compare.ray_head import RayHead
head = RayHead(Path(sys.argv[1]))
head.start()
print(json.dumps({"address": head.address, "pids": head.pids(), "temp": str(head._temp)}), flush=True)
time.sleep(600)
"""


def answers(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.e2e
def test_a_head_stops_with_its_processes(tmp_path: Path) -> None:
    log = tmp_path / "head.log"
    log.write_text("Ray runtime started.\n")  # a resumed comparison's log: the earlier head's lines
    head = RayHead(log)
    with head:  # returns once *this* head has started, not on the earlier head's line
        assert answers(head.address)
        processes = [psutil.Process(p) for p in head.pids()]
        assert len(processes) > 3  # ray start, the GCS, the raylet and more
        temp = head._temp
        assert temp is not None and temp.is_dir()
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, [p.pid for p in alive]
    assert not answers(head.address) and not temp.exists()
    assert not (tmp_path / "head.log.tmpdir").exists()


@pytest.mark.e2e
def test_a_head_dies_with_a_comparison_killed_by_sigkill(tmp_path: Path, repo_root: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "head.log")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo_root,
        start_new_session=True,
    )
    line = ""
    try:
        line = holder.stdout.readline()  # type: ignore[union-attr]
        assert line, f"the head did not start: {(tmp_path / 'head.log').read_text()[-2000:]}"
        started = json.loads(line)
        tree = [psutil.Process(p) for p in started["pids"]]
        tree += [p for p in psutil.Process(holder.pid).children(recursive=True) if p not in tree]
        assert answers(started["address"])
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, f"Ray processes left after the comparison was killed: {[p.pid for p in alive]}"
        assert not answers(started["address"])
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=10)
        if line:
            temp = Path(json.loads(line)["temp"])
            assert temp.is_dir()  # a killed head leaves its temporary directory ...
            RayHead(tmp_path / "head.log")._remove_stale()  # ... until the next head with that log starts
            assert not temp.exists()


def test_side_by_side_heads_get_disjoint_worker_ports(tmp_path: Path) -> None:
    """Two heads with Ray's default worker range made a run abort binding a port the other head's worker
    held ("Address already in use"); each head of a comparison has its own range."""
    ranges = [worker_ports(i) for i in range(4)]
    ports = [set(range(low, high + 1)) for low, high in ranges]
    assert all(len(p) == 1000 for p in ports)
    assert all(not (a & b) for i, a in enumerate(ports) for b in ports[i + 1 :])
    assert all(high < 32768 and low > 19999 for low, high in ranges)  # not Ray's default, not ephemeral
    command = RayHead(tmp_path / "head.log", worker_ports=ranges[1]).command()
    assert command[command.index("--min-worker-port") + 1] == "21000"
    assert command[command.index("--max-worker-port") + 1] == "21999"


def test_a_heads_ports_are_distinct(tmp_path: Path) -> None:
    """Each port was picked free on its own, so two components could get the same one, and the head
    refused to start ("trying to use a port number ... used by other components"); they are distinct."""
    for _ in range(20):
        head = RayHead(tmp_path / "head.log")
        command = head.command()
        ports = [
            int(command[i + 1])
            for i, arg in enumerate(command)
            if arg.endswith("-port") and "worker" not in arg
        ]
        assert len(ports) == 8 and len(set(ports)) == 8 and head.port in ports
