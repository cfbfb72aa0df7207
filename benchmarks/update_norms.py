"""Clipping and noise for user-level DP in a cross-device round: client update norms against the noise.

Trains ``--clients`` clients of ``sims/cross_device_dp.toml``'s split (10,000 IID clients of 3-4 tweets)
for one round from the initial adapter, in this process, with the ClientApp's own functions, and prints
for each local optimiser setting: the number of coordinates that travel (d), the clients' update norms
(median, min, max), the norm of the mean of the updates clipped at the median, and the norm of the
Gaussian noise that dp-updates adds to the mean of m clients, sigma * C / m * sqrt(d), with sigma
calibrated to epsilon 3 at delta 1e-5 over the preset's rounds (RDP) and C the median norm.

Usage: ``python benchmarks/update_norms.py [--clients 24]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from overhead import train_client  # a client's update as the ClientApp makes it, shared with overhead.py

from fedlora.compare.grid import load_grid
from fedlora.privacy import accounting
from fedlora.run.experiment import load_experiment
from fedlora.tasks.models import get_model, initial_state
from strategies import registry

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "AdamW lr 5e-3": ["train.optimizer='adamw'", "train.lr=5e-3"],
    "SGD lr 0.5": ["train.optimizer='sgd'", "train.lr=0.5"],
    "SGD lr 0.5, FFA-LoRA": ["train.optimizer='sgd'", "train.lr=0.5", "strategy.name='ffa-lora'"],
}


def norms(experiment: Path, sets: list[str], clients: int) -> tuple[int, torch.Tensor, float]:
    """(d, the clients' update norms, norm of the mean of the updates clipped at the median norm)."""
    cfg = load_experiment(experiment, sets)
    strategy = registry.get(cfg.strategy.name)(cfg, initial_state(cfg))
    model, text = get_model(cfg), cfg.to_toml()
    sent = strategy.outgoing(strategy.global_state)
    updates = []
    for pid in range(clients):
        update, _ = train_client(model, strategy, text, pid, 1, sent)
        updates.append(torch.cat([(update[k].float() - sent[k].float()).flatten() for k in sorted(update)]))
    stacked = torch.stack(updates)
    size = stacked.norm(dim=1)
    clip = float(size.median())
    clipped = stacked * torch.clamp(clip / size, max=1.0)[:, None]
    return stacked.shape[1], size, float(clipped.mean(0).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = load_grid(ROOT / "sims" / "cross_device_dp.toml")
    base = [s for s in grid.overrides if not s.startswith(("train.optimizer", "train.lr"))]
    cfg = load_experiment(grid.experiment, base)
    fed = cfg.federation
    m = fed.clients_per_round()
    sigma = accounting.calibrate(3.0, 1e-5, m / fed.num_clients, fed.rounds, "rdp")
    print(f"{args.clients} clients, round 1; m = {m} of N = {fed.num_clients}, sigma = {sigma:.3f}")
    print(f"{'setting':<22} {'d':>7} {'median':>7} {'min':>6} {'max':>6} {'|mean clipped|':>15} {'noise':>6}")
    for name, sets in SETTINGS.items():
        d, size, mean = norms(grid.experiment, [*base, *sets], args.clients)
        noise = sigma * float(size.median()) / m * math.sqrt(d)
        print(
            f"{name:<22} {d:>7} {float(size.median()):>7.3f} {float(size.min()):>6.3f} "
            f"{float(size.max()):>6.3f} {mean:>15.3f} {noise:>6.3f}"
        )


if __name__ == "__main__":
    main()
