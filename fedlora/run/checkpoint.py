"""The server's checkpoint: everything a federation needs to continue after its last finished round.

One safetensors file in the run directory holds the global adapter (``global/<key>``), the offsets
folded into the frozen base weights (``offsets/<key>``, FedEx-LoRA and FLoRA), and, in its JSON
metadata, the round number, the strategy's other state (sampling RNG, privacy accountant), the
round's ``rounds.jsonl`` row and the wall time so far. It is written to a temporary file in the same
directory and moved into place with ``os.replace``, so a crash leaves either the old or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from fedlora.core.model.arrays import State

_META = "fedlora"
_GROUPS = ("global", "offsets")


@dataclass
class Checkpoint:
    """The state after round ``round`` finished."""

    round: int
    global_state: State
    base_offsets: State = field(default_factory=dict)
    strategy: dict[str, Any] = field(default_factory=dict)
    """JSON-able strategy state (sampling RNG, privacy accountant)."""
    row: dict[str, Any] = field(default_factory=dict)
    """The round's ``rounds.jsonl`` row (so a crash between writing both loses nothing)."""
    wall_s: float = 0.0
    """Seconds the run had taken when the checkpoint was written."""


def save(path: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (temporary file in the same directory + ``os.replace``)."""

    tensors = {f"global/{k}": v.detach().clone().contiguous() for k, v in ckpt.global_state.items()}
    tensors.update({f"offsets/{k}": v.detach().clone().contiguous() for k, v in ckpt.base_offsets.items()})
    meta = {"round": ckpt.round, "strategy": ckpt.strategy, "row": ckpt.row, "wall_s": ckpt.wall_s}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META: json.dumps(meta, allow_nan=True)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save`."""

    groups: dict[str, State] = {g: {} for g in _GROUPS}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})[_META])
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            group, key = name.split("/", 1)
            groups[group][key] = f.get_tensor(name)
    return Checkpoint(
        round=int(meta["round"]),
        global_state=groups["global"],
        base_offsets=groups["offsets"],
        strategy=meta["strategy"],
        row=meta["row"],
        wall_s=float(meta["wall_s"]),
    )
