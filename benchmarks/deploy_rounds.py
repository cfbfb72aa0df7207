"""Deployed rounds against the same rounds in simulation, on one machine, one after the other.

The same experiment (three clients, all sampled each round; quickstart's local training: 8 steps of
batch 16, max_length 48; 1,500 tweets, 300 of them the server's test set; ``data.partitioner = "iid"``)
runs twice:

- **simulated**: ``fedlora run`` on Flower's simulation engine (Ray; two actors on a 2-core machine,
  one torch thread each, as every simulation here), client i training on partition i of the pool;
- **deployed**: :class:`fedlora.run.deploy.LocalDeployment` (a SuperLink with TLS and node
  authentication, three SuperNodes), each node given partition i of the same pool as its own file (the
  rows client i trains on in simulation, as ``deploy/ci.sh`` makes them), with or without the nodes'
  warm trainers (``--trainer``).

Reported per run: each round's ``wall_s`` from ``rounds.jsonl`` (the server's time for the round:
sending, local training, replies, aggregation, evaluation), and the ratio deployed / simulated of the
medians over rounds >= 2 and of round 1 (which includes building the model in each trainer or actor).
The 1-minute load average is printed; other jobs on the machine inflate both, so compare within one
invocation.

Usage, from the repository root: ``python benchmarks/deploy_rounds.py [--rounds 4] [--trainer on]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlora.core.data.splits import LABELS, build_splits  # noqa: E402
from fedlora.run.deploy import LocalDeployment  # noqa: E402
from fedlora.run.experiment import load_experiment  # noqa: E402

NODES = 3


def overrides(rounds: int) -> list[str]:
    """The experiment of both runs (on sims/quickstart.toml)."""
    return [
        f"federation.num_clients={NODES}",
        f"federation.rounds={rounds}",
        'data.partitioner="iid"',
        "data.max_examples=1500",
        "data.test_size=300",
    ]


def node_files(folder: Path, job: list[str]) -> list[Path]:
    """Partition i of the experiment's pool as node i's own CSV file."""
    cfg = load_experiment(ROOT / "sims" / "quickstart.toml", job)
    splits = build_splits(cfg.data, NODES, cfg.seed)
    paths = []
    for i in range(NODES):
        path = folder / f"node-{i}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for row in [*splits.client_train(i), *splits.client_val(i)]:
                writer.writerow([row["text"], LABELS[row["label"]]])
        paths.append(path)
    return paths


def walls(run_dir: Path) -> list[float]:
    """Each round's wall_s."""
    lines = (run_dir / "rounds.jsonl").read_text().splitlines()
    return [float(json.loads(line)["wall_s"]) for line in lines]


def simulate(work: Path, job: list[str]) -> list[float]:
    """The simulated run's round times."""
    out = work / "simulated"
    args = [
        sys.executable,
        "-m",
        "fedlora.cli",
        "run",
        str(ROOT / "sims" / "quickstart.toml"),
        "--out",
        str(out),
    ]
    for item in job:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"the simulation failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return walls(out)


def deploy(work: Path, job: list[str], files: list[Path], trainer: bool) -> list[float]:
    """The deployed run's round times."""
    out = work / "deployed"
    with LocalDeployment(
        work / "deployment", NODES, app_dir=ROOT, data_paths=tuple(files), trainer=trainer
    ) as d:
        config = f"overrides='{';'.join(job)}' out-dir='{out}'"
        proc = d.flwr("run", ".", d.federation, "--stream", "--run-config", config, timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"the deployed run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (run_dir,) = list(out.iterdir())
    return walls(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each run (default 4)")
    parser.add_argument("--trainer", choices=("on", "off"), default="on", help="warm trainers on the nodes")
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit("error: --rounds must be at least 2 (round 1 is reported apart)")
    job = overrides(args.rounds)
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="fedlora-rounds-") as tmp:
        work = Path(tmp)
        files = node_files(work, job)
        simulated = simulate(work, job)
        load.append(os.getloadavg()[0])
        deployed = deploy(work, job, files, args.trainer == "on")
        load.append(os.getloadavg()[0])
    print(f"{'run':<10} " + " ".join(f"{f'round {i + 1}':>9}" for i in range(args.rounds)))
    for name, times in (("simulated", simulated), ("deployed", deployed)):
        print(f"{name:<10} " + " ".join(f"{t:>8.1f}s" for t in times))
    later = statistics.median(deployed[1:]) / statistics.median(simulated[1:])
    first = deployed[0] / simulated[0]
    trainer = "with warm trainers" if args.trainer == "on" else "without trainers"
    print(f"deployed ({trainer}) / simulated: rounds >= 2 (medians) {later:.2f}x, round 1 {first:.2f}x")
    loads = ", ".join(f"{x:.2f}" for x in load)
    print(f"load average (1 min): {loads} (start, between, end); {os.cpu_count()} CPUs")
    print(f"command: python benchmarks/deploy_rounds.py --rounds {args.rounds} --trainer {args.trainer}")


if __name__ == "__main__":
    main()
