"""Peak memory of a simulation against its number of virtual clients, at the same clients per round.

Runs ``fedlora run`` once per client count and samples the resident memory (RSS) of the whole process
tree (CLI, Ray's daemons, the ClientApp actors) every 0.2 s. Prints the peaks and their ratio to the
smallest count. Usage: ``python benchmarks/memory.py [--clients 10 100] [--per-round 4]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(sum, max) of RSS bytes over ``proc`` and all its descendants."""
    sizes = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            continue
    return sum(sizes), max(sizes, default=0)


def measure(num_clients: int, per_round: int, rounds: int, steps: int) -> dict[str, float]:
    """Run one simulation and return its peak summed RSS, peak single-process RSS (MB) and wall time (s)."""
    out = Path(tempfile.mkdtemp(prefix="fedlora-mem-")) / "run"
    cmd = [
        sys.executable,
        "-m",
        "fedlora.cli",
        "run",
        "--clients",
        str(num_clients),
        "--rounds",
        str(rounds),
        "--set",
        f"federation.fraction={per_round / num_clients}",
        "--set",
        f"federation.min_clients={per_round}",
        "--set",
        f"train.local_steps={steps}",
        "--set",
        "data.test_size=200",
        "--out",
        str(out),
    ]
    start = time.monotonic()
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_sum = peak_max = 0
    while proc.poll() is None:
        total, largest = tree_rss(proc)
        peak_sum, peak_max = max(peak_sum, total), max(peak_max, largest)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"run with {num_clients} clients failed: {proc.stderr.read().decode()[-2000:]}")
    return {
        "peak_sum_mb": peak_sum / 2**20,
        "peak_max_mb": peak_max / 2**20,
        "wall_s": time.monotonic() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    results = {n: measure(n, args.per_round, args.rounds, args.steps) for n in args.clients}
    base = results[args.clients[0]]["peak_sum_mb"]
    print(f"{'clients':>8} {'peak sum MB':>12} {'peak largest MB':>16} {'wall s':>8} {'ratio':>6}")
    for n, r in results.items():
        print(
            f"{n:>8} {r['peak_sum_mb']:>12.0f} {r['peak_max_mb']:>16.0f} {r['wall_s']:>8.1f} "
            f"{r['peak_sum_mb'] / base:>6.2f}"
        )


if __name__ == "__main__":
    main()
