"""Plain helpers shared by several test files (test files never import each other: tests/test_layout.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from fedlora.core.data.sources import write_table

LAYERS = ("base_model.model.enc.0.query", "base_model.model.enc.0.value")
HEAD = "base_model.model.classifier.weight"


def client_state(seed: int, rank: int = 4, d_in: int = 12, d_out: int = 10) -> dict[str, torch.Tensor]:
    """A random float64 adapter (LoRA A and B on :data:`LAYERS`) and 3-class head, seeded."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in LAYERS:
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, d_in, generator=g, dtype=torch.float64)
        state[f"{layer}.lora_B.weight"] = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    state[HEAD] = torch.randn(3, d_out, generator=g, dtype=torch.float64)
    return state


def node_files(root: Path, frame: pd.DataFrame) -> list[Path]:
    """One file per deployed node (users 0-1, 2-3, 4-5 of ``frame``), in three formats."""
    names = ["node-0.csv", "node-1.parquet", "node-2.jsonl"]
    return [
        write_table(frame[frame["user"].isin([f"user-{2 * i}", f"user-{2 * i + 1}"])], root / name)
        for i, name in enumerate(names)
    ]
