"""The virtual clock's reference step cost: seconds of one local LoRA step on this machine, one torch
thread as in a client actor (the packaged MiniLM, LoRA r=8 on query/value, AdamW, real tweets padded to
at most ``--max-length`` tokens). Prints the median over ``--steps`` steps after 3 warm-up steps and the
``devices.step_cost_s`` value to put in an experiment (``[devices]``; docs/devices.md).

The clock never measures anything while a run goes (its times must not depend on the machine's load):
this script is how the constant is chosen. Run it on an idle machine.

Usage: ``python benchmarks/step_cost.py [--steps 30] [--batch 16] [--max-length 48]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch

from fedlora.core.config import DataConfig, LoraConfig, TrainConfig
from fedlora.core.data.splits import get_splits
from fedlora.core.model.adapters import inject_lora
from fedlora.core.model.loading import load_classifier, load_tokenizer
from fedlora.core.training.loops import encode, make_optimizer


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after 3 warm-up)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = encode(get_splits(DataConfig(), 10, 0).client_train(0), load_tokenizer(""), args.max_length)
    rows = list(range(len(data)))
    batches = [
        data.batch([rows[(i * args.batch + j) % len(rows)] for j in range(args.batch)])
        for i in range(args.steps + 3)
    ]
    model = inject_lora(load_classifier("", num_labels=3, seed=0), LoraConfig(), seed=0)
    model.train()
    optimizer = make_optimizer(model, TrainConfig(batch_size=args.batch))
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    load = os.getloadavg()[0]
    print(f"cpu: {cpu_name()}; load average {load:.2f}; batch {args.batch}, max length {args.max_length}")
    print(
        f"step seconds: median {median:.4f}, min {min(times):.4f}, max {max(times):.4f} ({len(times)} steps)"
    )
    print(f"devices.step_cost_s = {median:.3f}")


if __name__ == "__main__":
    main()
