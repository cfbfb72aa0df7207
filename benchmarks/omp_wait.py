"""Two trainings sharing the cores, with OpenMP's default wait policy and with ``OMP_WAIT_POLICY=PASSIVE``,
side by side in one run.

``make test`` runs two pytest-xdist workers on a 2-core machine, and each starts processes whose torch
uses two threads (Ray actors with ``client_cpus = 2``, the CLI, in-process federations); ``fedlora
compare --jobs 2`` runs two such runs at once. GNU OpenMP (torch's CPU build) lets a thread that
finished its share of a parallel region spin for a while before it sleeps; when more threads than
cores want to run, the spinning ones take the cores from the ones with work.

Each trial starts ``--procs`` processes at once; each builds the real MiniLM with LoRA on q and v
(fedlora's default experiment), sets ``--threads`` torch threads and times ``--steps`` AdamW steps on
random batches of 8 x 32 tokens. Reported per policy: the median over trials of the slowest process's
time (the trial's wall time), and the ratio default / passive. ``--procs 1`` shows the policy's cost
where nothing competes. The 1-minute load average is printed before and after.

Usage, from the repository root: ``python benchmarks/omp_wait.py [--procs 2] [--threads 2] [--trials 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from fedlora.tasks.models import get_model
from fedlora.core.config import from_dict
torch.set_num_threads({threads})
torch.manual_seed(0)
model = get_model(from_dict({{}}))
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(1000, 20000, (8, 32))
labels = torch.randint(0, 3, (8,))
started = time.perf_counter()
for _ in range({steps}):
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(time.perf_counter() - started)
"""


def trial(policy: str | None, procs: int, threads: int, steps: int) -> float:
    """The slowest of ``procs`` concurrent processes' training time, seconds (model loading excluded)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    code = WORKER.format(root=str(ROOT), threads=threads, steps=steps)
    running = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(procs)
    ]
    times = []
    for proc in running:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"a worker failed (exit {proc.returncode})")
        times.append(float(out.strip().splitlines()[-1]))
    return max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2, help="concurrent processes per trial (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per process (default 30)")
    parser.add_argument("--trials", type=int, default=3, help="trials per policy, alternating (default 3)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    results: dict[str, list[float]] = {"default": [], "PASSIVE": []}
    for _ in range(args.trials):
        for name in results:
            started = time.perf_counter()
            results[name].append(
                trial(None if name == "default" else name, args.procs, args.threads, args.steps)
            )
            took = time.perf_counter() - started
            print(f"  {name:8s} slowest process {results[name][-1]:6.1f} s (trial {took:.0f} s)")
    medians = {name: statistics.median(times) for name, times in results.items()}
    print(
        f"{args.procs} processes x {args.threads} threads, {args.steps} steps each; median of {args.trials}:"
    )
    for name, value in medians.items():
        print(f"  OMP_WAIT_POLICY={name:8s} {value:6.1f} s")
    print(f"ratio default / PASSIVE: {medians['default'] / medians['PASSIVE']:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
