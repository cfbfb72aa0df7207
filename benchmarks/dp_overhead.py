"""Time of one DP-SGD step over one plain step, on the quickstart model and batch (MiniLM, LoRA r=8 on
query/value, batch 16, length <= 48, one torch thread as in a client actor).

Plain and private steps alternate in one process on the same batches, so machine noise hits both
alike; the ratio is of the medians. Usage: ``python benchmarks/dp_overhead.py [--steps 30]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from fedlora.core.config import DataConfig, LoraConfig, TrainConfig
from fedlora.core.data.splits import get_splits
from fedlora.core.model.adapters import inject_lora
from fedlora.core.model.loading import load_classifier, load_tokenizer
from fedlora.core.training.loops import encode, make_optimizer
from fedlora.privacy.dp_sgd import PrivateTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (after 3 warm-up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["hooks", "ghost"])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = encode(get_splits(DataConfig(), 10, 0).client_train(0), load_tokenizer(""), 48)
    batches = [data.batch(list(range(i * args.batch, (i + 1) * args.batch))) for i in range(args.steps + 3)]
    train = TrainConfig(batch_size=args.batch)

    plain = inject_lora(load_classifier("", num_labels=3, seed=0), LoraConfig(), seed=0)
    plain.train()
    optimizer = make_optimizer(plain, train)

    def plain_step(batch: dict[str, torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        plain(**batch).loss.backward()
        optimizer.step()

    trainers = {}
    for mode in args.modes:
        model = inject_lora(load_classifier("", num_labels=3, seed=0), LoraConfig(), seed=0)
        trainers[mode] = PrivateTrainer(
            model, train, noise_multiplier=1.0, clip_norm=1.0, expected_batch=args.batch, mode=mode
        )
    times: dict[str, list[float]] = {"plain": [], **{m: [] for m in args.modes}}
    for i, batch in enumerate(batches):
        variants = [("plain", plain_step)] + [(m, trainers[m].step) for m in args.modes]
        for name, step in variants:
            start = time.perf_counter()
            step(dict(batch))
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    print(f"{'variant':>8} {'median s':>9} {'ratio':>6}")
    for name, values in times.items():
        print(f"{name:>8} {statistics.median(values):9.3f} {statistics.median(values) / base:6.2f}")


if __name__ == "__main__":
    main()
