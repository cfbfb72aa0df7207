"""Aggregation time per round for each strategy (LoRA-FAIR included) as a share of the round time.

1. Runs ``fedlora run`` once (FedIT, the quickstart experiment unless ``--set`` says otherwise) and
   takes the median round wall time and the server's own aggregation time from ``rounds.jsonl``
   (rounds after the first, which includes the actors' start-up).
2. Times every strategy's server-side work on replies of the real shapes (``synthetic.py``):
   deserialising the clients' arrays and ``aggregate`` (LoRA-FAIR's per-layer solve, FedEx-LoRA's
   residual, FLoRA's stacking), median of ``--repeats``.

The share of strategy S is ``t_S / (round_s - t_fedit_run + t_S)``: the measured round with FedIT's
aggregation swapped for S's. Usage: ``python benchmarks/server_cost.py [--rounds 3] [--repeats 5]
[--run-dir runs/x]`` (``--run-dir`` reads an existing run instead of starting one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import aggregate, config, make_strategy, play_round

from strategies.registry import available

ROOT = Path(__file__).resolve().parents[1]


def measured_round(run_dir: Path | None, rounds: int, overrides: list[str]) -> tuple[Path, int, float, float]:
    """(run dir, clients per round, median round s, median aggregation s) of a real FedIT run."""
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="fedlora-cost-")) / "run"
        sets = [x for o in overrides for x in ("--set", o)]
        cmd = [
            sys.executable,
            "-m",
            "fedlora.cli",
            "run",
            "--rounds",
            str(rounds),
            *sets,
            "--out",
            str(run_dir),
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    return (
        run_dir,
        int(statistics.median(r["num_clients"] for r in later)),
        statistics.median(r["wall_s"] for r in later),
        statistics.median(r["aggregate_s"] for r in later),
    )


def aggregation_time(name: str, clients: int, overrides: list[str], repeats: int) -> float:
    """Median seconds of one round's server-side work for strategy ``name`` (round 2 onwards)."""
    strategy = make_strategy(config(name, overrides))
    times = []
    for server_round in range(1, repeats + 2):
        played = play_round(strategy, server_round, list(range(clients)))
        start = time.perf_counter()
        aggregate(strategy, played)
        if server_round > 1:  # the first call pays one-off costs (allocations, lazy imports)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the measured FedIT run")
    parser.add_argument("--repeats", type=int, default=5, help="timed aggregations per strategy")
    parser.add_argument("--run-dir", type=Path, default=None, help="read this run instead of starting one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    args = parser.parse_args()
    run_dir, clients, round_s, run_agg = measured_round(args.run_dir, args.rounds, args.overrides)
    print(
        f"measured FedIT run {run_dir}: {clients} clients per round, round {round_s:.2f} s (median), "
        f"aggregation inside it {1000 * run_agg:.1f} ms"
    )
    print(f"{'strategy':<12} {'aggregate ms':>13} {'share of round':>15}")
    for name in available():
        t = aggregation_time(name, clients, args.overrides, args.repeats)
        print(f"{name:<12} {1000 * t:>13.1f} {100 * t / (round_s - run_agg + t):>14.2f}%")


if __name__ == "__main__":
    main()
