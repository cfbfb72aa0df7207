"""Accuracy against bytes for compressed updates: the quickstart setting, shortened, run with each
codec on paired seeds (the same seed gives the same split, initial adapter and sampling), as real
``fedlora run`` processes.

Each variant compresses both ways (``compression.uplink`` and ``downlink``); ``int8-ef`` adds error
feedback. Prints, per variant, the final test accuracy of every seed, the bytes of the whole run (up and
down, from ``rounds.jsonl``) and their share of the uncompressed run's, then each variant's paired
accuracy difference against ``none`` with its 95% t interval over the seeds.

Usage: ``python benchmarks/compression.py [--seeds 0 1 2] [--variants none fp16 int8]
[--set key=value ...] [--out DIR]``.
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

from fedlora.report.paired import t_interval

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "federation.rounds=4",
    "train.local_steps=4",
    "federation.evaluate_every=2",
    "data.partitioner='iid'",
    "train.lr=1e-2",
]
"""The quickstart (10 clients, all sampled, batch 16) cut to 4 rounds of 4 local steps, a quarter of its
training, on an IID split at lr 1e-2: about 100 s a run on an idle 2-core machine. The quickstart's own
split (by tweet source) and lr 5e-3 stay at the majority class for this long (42.4% at seed 0), so they
could not show what compression costs."""
VARIANTS = {
    "none": [],
    "fp16": ['compression.uplink="fp16"', 'compression.downlink="fp16"'],
    "bf16": ['compression.uplink="bf16"', 'compression.downlink="bf16"'],
    "int8": ['compression.uplink="int8"', 'compression.downlink="int8"'],
    "int8-ef": [
        'compression.uplink="int8"',
        'compression.downlink="int8"',
        "compression.error_feedback=true",
    ],
}


def run(variant: str, seed: int, extra: list[str], out: Path) -> dict[str, float]:
    """One ``fedlora run`` of the quickstart with ``variant``'s codecs: final accuracy, bytes, wall time."""
    sets = [*SHORT, *extra, *VARIANTS[variant], f"seed={seed}"]
    cmd = [sys.executable, "-m", "fedlora.cli", "run", "sims/quickstart.toml", "--out", str(out)]
    cmd += [arg for s in sets for arg in ("--set", s)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return {
        "accuracy": float(rows[-1]["eval_accuracy"]),
        "uplink": float(sum(r["uplink_bytes"] for r in rows)),
        "downlink": float(sum(r["downlink_bytes"] for r in rows)),
        "wall": wall,
    }


def report(results: dict[str, dict[int, dict[str, float]]], seeds: list[int]) -> None:
    """The accuracy and bytes table, then the paired differences against ``none``."""
    base = results["none"]
    print(f"{'variant':>8} {'accuracy % per seed':>24} {'mean':>6} {'up MB':>8} {'down MB':>8} {'bytes':>6}")
    for variant, by_seed in results.items():
        accs = [100 * by_seed[s]["accuracy"] for s in seeds]
        up = sum(by_seed[s]["uplink"] for s in seeds) / len(seeds)
        down = sum(by_seed[s]["downlink"] for s in seeds) / len(seeds)
        full = sum(base[s]["uplink"] + base[s]["downlink"] for s in seeds) / len(seeds)
        per_seed = " ".join(f"{a:5.1f}" for a in accs)
        print(
            f"{variant:>8} {per_seed:>24} {sum(accs) / len(accs):6.1f} {up / 1e6:8.2f} {down / 1e6:8.2f} "
            f"{(up + down) / full:6.3f}"
        )
    print("\npaired accuracy difference against none (points), 95% t interval over seeds:")
    for variant, by_seed in results.items():
        if variant == "none":
            continue
        diffs = [100 * (by_seed[s]["accuracy"] - base[s]["accuracy"]) for s in seeds]
        ci = t_interval(diffs)
        assert ci is not None
        bounds = f"[{ci.low:+.2f}, {ci.high:+.2f}]" if ci.low is not None and ci.high is not None else "n/a"
        listed = " ".join(f"{d:+.1f}" for d in diffs)
        print(f"{variant:>8} {listed:>20}  mean {ci.mean:+.2f}  95% CI {bounds}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["none", "fp16", "int8"], choices=list(VARIANTS))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra override")
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()
    if "none" not in args.variants:
        args.variants.insert(0, "none")
    out = args.out or Path(tempfile.mkdtemp(prefix="fedlora-compression-"))
    load = os.getloadavg()[0]
    results: dict[str, dict[int, dict[str, float]]] = {v: {} for v in args.variants}
    for seed in args.seeds:  # seeds outermost: the variants of one seed share the machine's state
        for variant in args.variants:
            results[variant][seed] = got = run(variant, seed, args.extra, out / f"{variant}-s{seed}")
            print(f"{variant} seed {seed}: {100 * got['accuracy']:.1f}% in {got['wall']:.0f} s", flush=True)
    print(f"\nsettings: sims/quickstart.toml with {' '.join(SHORT + args.extra)}; runs in {out}")
    report(results, args.seeds)
    print(f"load average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
