"""Peak memory of a simulation against its number of virtual clients, at the same clients per round.

Runs ``fedlora run`` once per client count and samples the resident memory (RSS) of the whole process
tree (CLI, Ray's daemons, the ClientApp actors) every 0.2 s. Prints the peaks (summed over processes,
the largest process, and the CLI process alone, which holds the server, Flower's per-node state and
the strategy), and the ratio of the summed peak to the smallest count's (target for 1,000 clients:
at most 1.2), and the wall time of the first and the last round (``rounds.jsonl``). Usage:
``python benchmarks/memory.py [--clients 10 100 1000] [--per-round 4] [--set data.partitioner='"iid"']``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> tuple[int, int, int]:
    """(sum, max, own) of RSS bytes over ``proc`` and all its descendants; own is ``proc``'s."""
    sizes = []
    own = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            continue
        if p.pid == proc.pid:
            own = sizes[-1]
    return sum(sizes), max(sizes, default=0), own


def measure(num_clients: int, per_round: int, rounds: int, steps: int, sets: list[str]) -> dict[str, float]:
    """Run one simulation; returns its peak summed, single-process and CLI-process RSS (MB), wall time
    of the command and of its first and last rounds (s)."""
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
        *[x for s in sets for x in ("--set", s)],
        "--out",
        str(out),
    ]
    start = time.monotonic()
    proc = psutil.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_sum = peak_max = peak_own = 0
    while proc.poll() is None:
        total, largest, own = tree_rss(proc)
        peak_sum, peak_max, peak_own = max(peak_sum, total), max(peak_max, largest), max(peak_own, own)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"run with {num_clients} clients failed: {proc.stderr.read().decode()[-2000:]}")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return {
        "round1_s": rows[0]["wall_s"],
        "last_round_s": rows[-1]["wall_s"],
        "peak_sum_mb": peak_sum / 2**20,
        "peak_max_mb": peak_max / 2**20,
        "peak_cli_mb": peak_own / 2**20,
        "wall_s": time.monotonic() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="more experiment overrides (KEY=VALUE)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    results = {n: measure(n, args.per_round, args.rounds, args.steps, args.set) for n in args.clients}
    base = results[args.clients[0]]["peak_sum_mb"]
    print(f"{args.per_round} clients per round, {args.rounds} rounds, {args.steps} local steps")
    head = f"{'clients':>8} {'peak sum MB':>12} {'largest MB':>11} {'CLI MB':>7} {'wall s':>8}"
    print(f"{head} {'round 1 s':>10} {'last round s':>13} {'ratio':>6}")
    for n, r in results.items():
        print(
            f"{n:>8} {r['peak_sum_mb']:>12.0f} {r['peak_max_mb']:>11.0f} {r['peak_cli_mb']:>7.0f} "
            f"{r['wall_s']:>8.1f} {r['round1_s']:>10.1f} {r['last_round_s']:>13.1f} "
            f"{r['peak_sum_mb'] / base:>6.2f}"
        )
    print(f"load average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
