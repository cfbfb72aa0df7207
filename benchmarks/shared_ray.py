"""What a run of a comparison saves by attaching to the comparison's Ray head instead of starting its own.

Each sample is a fresh Python process doing what ``fedlora run`` does around its federation: import
Ray, start Ray as :func:`fedlora.run.simulation.simulate` does (``ray.init`` with the run's backend
settings, or attached to the head with ``federation.ray_address``), run one task on one worker (so a
worker process starts, as the client actors do), shut Ray down and wait for every process it started
(:class:`~fedlora.run.processes.ProcessTracker`). Own and attached samples alternate; the medians
and their difference are printed, with the head's one-off start-up, which the comparison pays once.

Usage: ``python benchmarks/shared_ray.py [--repeats 5]`` from the repository root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlora.compare.ray_head import RayHead  # noqa: E402

SAMPLE = """
import sys, time
start = time.perf_counter()
import ray
from fedlora.core.config import load_config
from fedlora.run.environment import quiet_environment
from fedlora.run.processes import ProcessTracker
from fedlora.run.simulation import _shutdown_ray, _start_ray, backend_config
quiet_environment()
address = sys.argv[1]
cfg = load_config(None, [f'federation.ray_address="{address}"'] if address else [])
with ProcessTracker():
    _start_ray(backend_config(cfg))
    ray.get(ray.remote(num_cpus=1)(lambda: 1).remote())
    _shutdown_ray()
print(time.perf_counter() - start)
"""


def sample(address: str) -> float:
    """Seconds of one fresh process: import Ray, start or attach, one task, shut down, wait."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", SAMPLE, address],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"a sample failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        head = RayHead(Path(tmp) / "head.log")
        started = time.perf_counter()
        head.start()
        head_s = time.perf_counter() - started
        own, attached = [], []
        try:
            for _ in range(args.repeats):
                own.append(sample(""))
                attached.append(sample(head.address))
        finally:
            head.stop()
    own_s, attached_s = statistics.median(own), statistics.median(attached)
    print(f"own Ray per run:      median {own_s:.1f} s  ({', '.join(f'{s:.1f}' for s in own)})")
    print(f"attached to the head: median {attached_s:.1f} s  ({', '.join(f'{s:.1f}' for s in attached)})")
    print(
        f"saved per run: {own_s - attached_s:.1f} s (ratio {own_s / attached_s:.2f}); "
        f"the head started once in {head_s:.1f} s"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
