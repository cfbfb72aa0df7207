"""Synchronous rounds without device profiles, before and after the virtual clock: the ratio of their
round times, side by side in one run.

The code before is a git revision (``--before``, e.g. the commit before the clock landed), checked out
into a temporary worktree; the code after is this checkout. Each run is a child process with that
checkout first on ``PYTHONPATH``, federating in-process (the tests' ``InProcessGrid``: the real round
loop, strategy and ClientApp, no Ray) on a tiny random BERT, many clients per round and one small local
step each, so the server's per-round and per-message work is as large a share of a round as it gets.
Runs alternate before / after (and after with one device class, the clock on) ``--repeats`` times; each
reports the sum of its rounds' ``wall_s`` (round 1 excluded: model loading) and the CPU seconds of the
whole federation in its process (less sensitive to other load on the machine than wall time); the
ratios are of the medians, and the paired ratio the median of each repeat's ratio to the run before it
(robust to load that drifts during the benchmark).

Usage: ``python benchmarks/clock_overhead.py --before REV [--clients 200] [--per-round 100]
[--rounds 4] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_CLASS = 'devices.classes=[{name="same", share=1.0}]'


def child(args: argparse.Namespace) -> None:
    """One federation in this process with the code on ``sys.path`` first; prints its round seconds."""
    import json as _json

    from fedlora.core.data.tweets import TOPICS
    from fedlora.run.experiment import load_experiment, preflight
    from tests.conftest import federate_in_process

    overrides = [
        f'model.path="{args.model}"',
        f'data.source="{args.data}"',
        'data.label="topic"',
        f"data.labels={_json.dumps(sorted(TOPICS))}",
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=20",
        "data.val_fraction=0.0",
        f"federation.num_clients={args.clients}",
        f"federation.fraction={args.per_round / args.clients}",
        f"federation.rounds={args.rounds}",
        "train.local_steps=1",
        "train.batch_size=2",
        *([ONE_CLASS] if args.clock else []),
    ]
    cfg = preflight(load_experiment(None, overrides))
    with tempfile.TemporaryDirectory() as out:
        cpu = time.process_time()
        run = federate_in_process(cfg, Path(out) / "run")
        cpu = time.process_time() - cpu
        rows = [_json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    print(_json.dumps({"round_s": sum(r["wall_s"] for r in rows[1:]), "cpu_s": cpu}))


def prepare(work: Path, clients: int) -> tuple[Path, Path]:
    """The tiny model directory and the topics CSV every run uses."""
    from fedlora.core.data.sources import write_table
    from fedlora.core.data.tweets import topics_frame
    from tests.conftest import _save_model

    model = _save_model(
        work / "tiny-bert",
        "bert",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    data = write_table(topics_frame(per_topic=max(12, clients // 2), users=3, seed=0), work / "topics.csv")
    return Path(model.path), data


def run_child(code: Path, args: argparse.Namespace, model: Path, data: Path, clock: bool) -> dict[str, float]:
    """Round seconds and CPU seconds of one child federation with ``code`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--model={model}",
        f"--data={data}",
        f"--clients={args.clients}",
        f"--per-round={args.per_round}",
        f"--rounds={args.rounds}",
        *(["--clock"] if clock else []),
    ]
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: float(v) for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", help="git revision of the code before the virtual clock")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clock", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not args.before:
        parser.error("--before REV is required (the revision to compare against)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        before = work / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True
        )
        try:
            model, data = prepare(work, args.clients)
            times: dict[str, list[dict[str, float]]] = {"before": [], "after": [], "after, clock on": []}
            for _ in range(args.repeats):
                times["before"].append(run_child(before, args, model, data, clock=False))
                times["after"].append(run_child(ROOT, args, model, data, clock=False))
                times["after, clock on"].append(run_child(ROOT, args, model, data, clock=True))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=True)
    print(
        f"load average {os.getloadavg()[0]:.2f}; {args.clients} clients, {args.per_round} per round, "
        f"rounds 2-{args.rounds} timed, {args.repeats} repeats (median)"
    )
    for key, what in (("round_s", "round wall s"), ("cpu_s", "process CPU s")):
        base = statistics.median(r[key] for r in times["before"])
        for name, runs in times.items():
            values = [r[key] for r in runs]
            median = statistics.median(values)
            spread = ", ".join(f"{v:.2f}" for v in values)
            paired = statistics.median(r[key] / b[key] for r, b in zip(runs, times["before"], strict=True))
            print(
                f"{what:>14} {name:>16}: {median:7.2f}  (runs: {spread})  ratio to before "
                f"{median / base:.3f}, paired (median of per-repeat ratios) {paired:.3f}"
            )


if __name__ == "__main__":
    main()
