"""Cross-device rounds: clients per second in a round of hundreds of small clients, ``fedlora run``
against a plain loop doing the same client updates in one process.

The experiment is the quickstart's model and tweets split IID over ``--clients`` clients of about
``--per-client`` examples each, ``--per-round`` of them sampled per round, one local step each (batch
= a client's whole split), FedIT, no client evaluation, a small test set. ``fedlora run`` runs
``--rounds`` rounds; its rate is the sampled clients over the ``wall_s`` of its last round (start-up and
round 1's actor start excluded; the round includes the server's test evaluation, which the plain loop
also does once). The plain loop (in its own process, one torch thread per core, no Flower, no Ray)
trains the last round's clients with the same library functions from the same global adapter and
averages them. Prints both rates, their ratio and the load average.

Usage: ``python benchmarks/cross_device.py [--clients 2000] [--per-round 500] [--rounds 2]``.
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

ROOT = Path(__file__).resolve().parents[1]


def overrides(args: argparse.Namespace) -> list[str]:
    """The experiment both sides run (the quickstart experiment plus these)."""
    test = 100
    return [
        f"federation.num_clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"federation.fraction={args.per_round / args.clients}",
        f"federation.min_clients={min(args.per_round, 2)}",
        "federation.fraction_evaluate=0.0",
        "train.local_steps=1",
        f"train.batch_size={args.per_client}",
        f"data.max_examples={args.clients * args.per_client + test}",
        f"data.test_size={test}",
        'data.partitioner="iid"',
        "data.val_fraction=0.0",
        'strategy.name="fedit"',
    ]


def plain_round(sets: list[str], server_round: int, threads: int) -> tuple[int, float]:
    """The clients of round ``server_round`` trained one after the other in this process, from the
    initial adapter, then averaged and evaluated; returns (clients, seconds)."""
    import torch
    from overhead import train_clients  # the plain loop's client updates, shared with overhead.py

    from fedlora.privacy.mechanisms import mechanism_for
    from fedlora.run.evaluation import Evaluator
    from fedlora.run.experiment import load_experiment, preflight
    from fedlora.server.sampling import ClientSampler
    from fedlora.tasks.models import get_model, initial_state
    from strategies import registry

    torch.set_num_threads(threads)
    cfg = preflight(load_experiment(ROOT / "sims" / "quickstart.toml", sets))
    text = cfg.to_toml()
    strategy = registry.get(cfg.strategy.name)(cfg, initial_state(cfg))
    evaluate = Evaluator(cfg)
    model = get_model(cfg)
    sampler = ClientSampler(cfg, mechanism_for(cfg))
    sampler.assigns = True

    class Pool:  # the sampler only needs the workers' ids
        def get_node_ids(self) -> list[int]:
            return list(range(cfg.federation.num_clients))

    for _ in range(server_round):
        clients = sorted(sampler.sample(Pool(), training=True))  # type: ignore[arg-type]
    start = time.perf_counter()
    updates, weights = train_clients(model, strategy, text, clients, server_round)
    aggregate = strategy.aggregate(strategy.global_state, updates, weights)
    evaluate({**strategy.global_state, **aggregate}, {})
    return len(clients), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--per-round", type=int, default=500, help="clients sampled per round")
    parser.add_argument("--per-client", type=int, default=4, help="examples per client")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, plain loop")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.plain:  # the child process
        n, seconds = plain_round(rest, args.rounds, args.threads)
        print(json.dumps({"clients": n, "seconds": seconds}))
        return
    sets = overrides(args)
    load = os.getloadavg()[0]
    child = [
        sys.executable,
        __file__,
        "--plain",
        "--threads",
        str(args.threads),
        "--rounds",
        str(args.rounds),
    ]
    proc = subprocess.run([*child, *sets], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed: {proc.stderr[-2000:]}")
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    out = Path(tempfile.mkdtemp(prefix="fedlora-cross-device-")) / "run"
    flags = [x for s in sets for x in ("--set", s)]
    cmd = [sys.executable, "-m", "fedlora.cli", "run", "sims/quickstart.toml", *flags, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fedlora run failed: {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    last = rows[-1]
    fed_rate = last["num_clients"] / last["wall_s"]
    plain_rate = plain["clients"] / plain["seconds"]
    print(
        f"{args.clients} clients of ~{args.per_client} examples, {args.per_round} per round, 1 local step, "
        f"{os.cpu_count()} CPUs"
    )
    times = ", ".join(f"{r['wall_s']:.1f}" for r in rows)
    print(f"round times (s): {times}")
    print(
        f"fedlora run, round {last['round']}: {last['num_clients']} clients in {last['wall_s']:.1f} s "
        f"= {fed_rate:.1f} clients/s"
    )
    print(
        f"plain loop, same clients: {plain['clients']} in {plain['seconds']:.1f} s "
        f"= {plain_rate:.1f} clients/s"
    )
    print(f"ratio plain / fedlora: {plain_rate / fed_rate:.2f}")
    print(f"load average (1 min) at start {load:.1f}, at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
