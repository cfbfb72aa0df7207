"""Wall time of ``fedlora run`` over a plain single-process PyTorch loop doing the same work.

The plain loop (``--plain``, run in its own process) is the physical limit on this machine: one
Python process, no Flower, no Ray, torch using every core. It does exactly what the federation
does, with the same library functions, seeds and data: every round it trains the same sampled
clients for the same local steps from the same global adapter, averages them as FedIT does and
evaluates on the same held-out test set. Both are timed from outside, start-up included (imports,
model loading, data splits; for ``fedlora run`` also Ray, the actors and the run directory).

As a check that the work is the same, both print the final accuracy (equal up to float rounding:
the plain loop uses more torch threads per step). Runs alternate plain, federated, plain, ... and
the ratio is of the medians; the load average is printed (other processes on the machine slow
both). Usage: ``python benchmarks/overhead.py [--clients 20] [--rounds 3] [--steps 10] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(args: argparse.Namespace) -> list[str]:
    """The experiment both sides run (the quickstart experiment plus these)."""
    return [
        f"federation.num_clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"federation.fraction={args.fraction}",
        f"train.local_steps={args.steps}",
        f"data.test_size={args.test_size}",
        'strategy.name="fedit"',
    ]


def train_client(model, strategy, text: str, pid: int, server_round: int, sent):  # type: ignore[no-untyped-def]
    """Client ``pid``'s update in round ``server_round`` as the ClientApp makes it (its plan, the start
    state plus what was ``sent``, its split of the experiment ``text``, its seed), on ``model``;
    returns the arrays it would send back and its number of training examples."""
    from clients.runtime import client_seed, data_for, start_state
    from fedlora.core.model.adapters import adapter_state, load_adapter_state, set_trainable
    from fedlora.core.training.loops import train_local

    cfg = strategy.cfg
    plan = strategy.client_plan(pid, server_round)
    state = start_state(cfg, plan)
    state.update(sent)
    load_adapter_state(model, state)
    set_trainable(model, plan.freeze)
    data = data_for(text, pid)
    train_local(model, data.train, cfg.train, seed=client_seed(cfg, server_round, pid))
    trained = adapter_state(model)
    return {k: trained[k] for k in plan.reply_keys(sent, trained)}, float(len(data.train))


def train_clients(model, strategy, text: str, clients: list[int], server_round: int):  # type: ignore[no-untyped-def]
    """:func:`train_client` for each of ``clients`` in turn, from what the strategy sends this round;
    returns their updates and their normalised weights (by training examples)."""
    from strategies.aggregation import normalised_weights

    sent = strategy.outgoing(strategy.global_state)
    updates, counts = [], []
    for pid in clients:
        update, count = train_client(model, strategy, text, pid, server_round, sent)
        updates.append(update)
        counts.append(count)
    return updates, normalised_weights(counts)


def plain_loop(sets: list[str], threads: int) -> float:
    """The federation's work in one process, no Flower or Ray; returns the final eval accuracy."""
    import torch

    from fedlora.run.evaluation import Evaluator
    from fedlora.run.experiment import load_experiment
    from fedlora.tasks.models import get_model, initial_state
    from strategies import registry

    torch.set_num_threads(threads)
    cfg = load_experiment(ROOT / "sims" / "quickstart.toml", sets)
    text = cfg.to_toml()
    strategy = registry.get(cfg.strategy.name)(cfg, initial_state(cfg))
    evaluate = Evaluator(cfg)
    model = get_model(cfg)
    rng = random.Random(cfg.seed)  # the strategy's sampling: same seed, same calls
    fed = cfg.federation
    accuracy = float("nan")
    for server_round in range(1, fed.rounds + 1):
        clients = list(range(fed.num_clients))
        if fed.fraction < 1.0:
            clients = sorted(rng.sample(clients, min(fed.num_clients, fed.clients_per_round())))
        updates, weights = train_clients(model, strategy, text, clients, server_round)
        strategy.global_state = {
            **strategy.global_state,
            **strategy.aggregate(strategy.global_state, updates, weights),
        }
        accuracy = evaluate(strategy.global_state, {}).accuracy
    return accuracy


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of a command run from the repository root (fails loudly)."""
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {proc.stderr[-2000:]}")
    return wall, proc.stdout


def run_plain(sets: list[str], threads: int) -> tuple[float, float]:
    wall, out = timed([sys.executable, __file__, "--plain", "--threads", str(threads), *sets])
    return wall, float(out.strip().splitlines()[-1])


def run_federated(sets: list[str]) -> tuple[float, float, float]:
    """(process wall s, wall s inside the federation, final accuracy) of one ``fedlora run``."""
    out = Path(tempfile.mkdtemp(prefix="fedlora-overhead-")) / "run"
    flags = [x for s in sets for x in ("--set", s)]
    wall, _ = timed([sys.executable, "-m", "fedlora.cli", "run", *flags, "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    return wall, float(summary["wall_s"]), float(summary["final_eval_accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.5, help="share of clients sampled per round")
    parser.add_argument("--steps", type=int, default=10, help="local steps per client per round")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (plain, then federated)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, plain loop")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.plain:  # the child process: run the loop and print the accuracy
        print(plain_loop(rest, args.threads))
        return
    sets = overrides(args)
    load = os.getloadavg()[0]
    plain: list[tuple[float, float]] = []
    federated: list[tuple[float, float, float]] = []
    for _ in range(args.repeats):
        plain.append(run_plain(sets, args.threads))
        federated.append(run_federated(sets))
    plain_s = statistics.median(w for w, _ in plain)
    fed_s = statistics.median(w for w, _, _ in federated)
    inside_s = statistics.median(i for _, i, _ in federated)
    print(
        f"{args.clients} clients, fraction {args.fraction}, {args.rounds} rounds, {args.steps} local steps, "
        f"{os.cpu_count()} CPUs; plain loop with {args.threads} torch threads"
    )
    print(f"plain loop   wall s: {' '.join(f'{w:.1f}' for w, _ in plain)}  (accuracy {plain[-1][1]:.4f})")
    print(
        f"fedlora run  wall s: {' '.join(f'{w:.1f}' for w, _, _ in federated)}  "
        f"(inside the federation {inside_s:.1f} s; accuracy {federated[-1][2]:.4f})"
    )
    print(f"overhead ratio (median fedlora run / median plain loop): {fed_s / plain_s:.3f}")
    print(f"start-up and shut-down outside the federation: {fed_s - inside_s:.1f} s")
    print(f"load average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
