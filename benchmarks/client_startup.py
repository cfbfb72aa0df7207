"""Client start-up cost: seconds from the server creating a train message to the client's first
training step, in simulation (Ray actors that live for the whole run) and in deployment (SuperNodes,
which start a fresh ClientApp process for every message).

Both runs use the same small experiment (``--nodes`` clients, all sampled, ``--rounds`` rounds of one
local step on 1,500 tweets) on this machine, one after the other; the ClientApp appends one line per
message to a log (``clients.runtime.log_startup``, enabled by FEDLORA_STARTUP_LOG). Round 1 includes
loading the model and data in both modes; later rounds show the steady state, where simulation
reuses the warm process and deployment pays the whole start-up again. "start-up CPU s" is the CPU
time a process had used at its first training step (median over fresh processes): unlike the wall
times, it barely depends on what else the machine runs.

Usage: ``python benchmarks/client_startup.py [--nodes 3] [--rounds 3]`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.runtime import STARTUP_LOG  # noqa: E402
from fedlora.run.deploy import LocalDeployment  # noqa: E402


def overrides(nodes: int, rounds: int) -> list[str]:
    """The experiment both modes run."""
    return [
        f"federation.num_clients={nodes}",
        f"federation.rounds={rounds}",
        "train.local_steps=1",
        "data.max_examples=1500",
        "data.test_size=100",
    ]


def simulate(work: Path, nodes: int, rounds: int) -> list[dict[str, float]]:
    """Run the experiment with ``fedlora run`` (Ray simulation); return the start-up log rows."""
    log = work / "simulation.jsonl"
    sets = [arg for o in overrides(nodes, rounds) for arg in ("--set", o)]
    cmd = [sys.executable, "-m", "fedlora.cli", "run", *sets, "--out", str(work / "sim-run")]
    env = {**os.environ, STARTUP_LOG: str(log), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"simulation failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return _rows(log)


def deploy(work: Path, nodes: int, rounds: int) -> list[dict[str, float]]:
    """Run the experiment on a loopback deployment (TLS, authenticated SuperNodes) with ``flwr run``."""
    log = work / "deployment.jsonl"
    os.environ[STARTUP_LOG] = str(log)  # inherited by the SuperNodes and their ClientApp processes
    with LocalDeployment(work / "deployment", nodes, app_dir=ROOT) as deployment:
        run_config = f"overrides='{';'.join(overrides(nodes, rounds))}' out-dir='{work / 'dep-runs'}'"
        proc = deployment.flwr(
            "run", ".", deployment.federation, "--stream", "--run-config", run_config, timeout=900
        )
    if proc.returncode != 0:
        sys.exit(f"deployment run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return _rows(log)


def _rows(log: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def summarise(rows: list[dict[str, float]]) -> tuple[float, float, int, int, float]:
    """(median start-up s in round 1, median in later rounds, messages, fresh processes,
    median CPU seconds a fresh process used before its first step)."""
    first = [r["startup_s"] for r in rows if r["round"] == 1]
    later = [r["startup_s"] for r in rows if r["round"] > 1]
    fresh = [r["cpu_s"] for r in rows if r["fresh"]]
    return statistics.median(first), statistics.median(later), len(rows), len(fresh), statistics.median(fresh)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=3, help="clients (SuperNodes), all sampled each round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds (at least 2: round 1 is the cold start)"
    )
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit("error: --rounds must be at least 2 (round 1 is the cold start)")
    with tempfile.TemporaryDirectory(prefix="fedlora-startup-") as tmp:
        work = Path(tmp)
        results = {
            "simulation": simulate(work, args.nodes, args.rounds),
            "deployment": deploy(work, args.nodes, args.rounds),
        }
    print(
        f"{'mode':<11} {'messages':>8} {'processes':>9} {'round 1 s':>10} {'later rounds s':>15} "
        f"{'start-up CPU s':>15}"
    )
    medians = {}
    for mode, rows in results.items():
        first, later, messages, fresh, cpu = summarise(rows)
        medians[mode] = later
        print(f"{mode:<11} {messages:>8} {fresh:>9} {first:>10.2f} {later:>15.2f} {cpu:>15.2f}")
    ratio = medians["deployment"] / medians["simulation"]
    overhead = medians["deployment"] - medians["simulation"]
    print(f"ratio deployment / simulation (median, rounds >= 2): {ratio:.1f}x")
    print(f"extra start-up per round in deployment: {overhead:.2f} s per client (clients start in parallel)")


if __name__ == "__main__":
    main()
