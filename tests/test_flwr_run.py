"""`flwr run .` from the repository root runs the same ServerApp and ClientApp (local simulation).

The test starts the local SuperLink itself (the command `flwr run` would start, on the same ports), so
it knows the PID and stops it, and everything it spawned, by process group when done.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _wait_healthy(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "flower-superlink exited at start"
        try:
            if httpx.get("http://127.0.0.1:39091/health", timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("local SuperLink did not become healthy")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM then SIGKILL the SuperLink's process group (its ServerApp, simulation and Ray)."""
    pgid = proc.pid
    members = (
        [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        if proc.poll() is None
        else []
    )
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    _, alive = psutil.wait_procs([psutil.Process(p) for p in members if psutil.pid_exists(p)], timeout=15)
    for p in alive:
        p.kill()


@pytest.mark.e2e
def test_flwr_run_dot_completes_a_run(tmp_path: Path) -> None:
    try:
        if httpx.get("http://127.0.0.1:39091/health", timeout=1).is_success:
            pytest.skip("another local SuperLink already listens on 39091")
    except httpx.HTTPError:
        pass
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    home.mkdir()
    env = _env(home)
    superlink = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            "127.0.0.1:39093",
            "--host",
            "127.0.0.1",
            "--port",
            "39091",
            "--database",
            ":flwr-in-memory:",
            "--disable-runtime-dependency-installation",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_healthy(superlink)
        overrides = ";".join(
            [
                "federation.rounds=1",
                "federation.num_clients=3",
                "train.local_steps=1",
                "data.test_size=100",
                "data.max_examples=1500",
            ]
        )
        proc = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "local",
                "--stream",
                "--federation-config",
                "num-supernodes=3 client-resources-num-cpus=1",
                "--run-config",
                f"overrides='{overrides}' out-dir='{out}'",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs = list(out.glob("quickstart-*"))
        assert len(runs) == 1, proc.stdout[-3000:]
        assert (runs[0] / "summary.json").is_file(), proc.stdout[-3000:]
        assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()
        streamed = proc.stdout + proc.stderr  # the ServerApp's progress, as `flwr run --stream` shows it
        assert "round   1/1  training: 3/3 clients replied, elapsed" in streamed, streamed[-3000:]
        assert "round   1/1  clients   3  train_loss" in streamed, streamed[-3000:]
    finally:
        _stop_group(superlink)
        shutil.rmtree(home, ignore_errors=True)
    assert superlink.poll() is not None
