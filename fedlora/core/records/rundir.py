"""The run directory: ``config.toml``, ``rounds.jsonl``, ``summary.json`` and ``adapter/``.

Writers never overwrite an existing run unless asked; ``rounds.jsonl`` is appended and flushed
after every round, so an interrupted run keeps every finished round.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from fedlora.core.config import ExperimentConfig

PACKAGES = ("fedlora", "flwr", "torch", "transformers", "peft", "opacus", "ray", "datasets", "flwr-datasets")


class RunDirError(RuntimeError):
    """The run directory cannot be used (exists already, or is not writable)."""


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide results."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDirectory:
    """Writer for one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def rounds_path(self) -> Path:
        return self.path / "rounds.jsonl"

    @property
    def clients_path(self) -> Path:
        """One JSON object per client reply: round, phase, partition, status and the reply's metrics."""
        return self.path / "clients.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    @property
    def base_offsets_path(self) -> Path:
        """Offsets folded into the frozen base weights (FedEx-LoRA, FLoRA), keyed by peft weight names."""
        return self.path / "base_offsets.safetensors"

    @property
    def checkpoint_path(self) -> Path:
        """The server's checkpoint after the last finished round (:mod:`fedlora.run.checkpoint`)."""
        return self.path / "checkpoint.safetensors"

    @property
    def client_state_path(self) -> Path:
        """Simulated clients' state between rounds, versioned by round (:mod:`fedlora.core.records.store`)."""
        return self.path / "client_state"

    def create(self, cfg: ExperimentConfig, *, overwrite: bool = False) -> None:
        """Create the directory and write ``config.toml``; refuse an existing run unless ``overwrite``."""
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise RunDirError(
                    f"run directory '{self.path}' already exists; pass --overwrite to replace it "
                    "or --out DIR to write elsewhere"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / "config.toml", cfg.to_toml())
        self.rounds_path.touch()
        self.clients_path.touch()

    def append_round(self, row: dict[str, Any]) -> None:
        """Append one round's record to ``rounds.jsonl`` and flush it to disk."""
        with self.rounds_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append_clients(self, rows: list[dict[str, Any]]) -> None:
        """Append one round's client rows to ``clients.jsonl`` (flushed to disk)."""
        with self.clients_path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())

    def resumable_config(self) -> ExperimentConfig:
        """The run's config, when the run can be resumed: it has a checkpoint and no summary yet."""
        config = self.path / "config.toml"
        if not config.is_file():
            raise RunDirError(f"'{self.path}' is not a run directory (no config.toml); pass one to --resume")
        if self.summary_path.is_file():
            raise RunDirError(
                f"run '{self.path}' has finished already (summary.json exists); nothing to resume"
            )
        if not self.checkpoint_path.is_file():
            raise RunDirError(
                f"run '{self.path}' has no checkpoint (it stopped before round 1 finished); "
                "start it again with --overwrite"
            )
        return ExperimentConfig.from_toml(config.read_text(encoding="utf-8"))

    def keep_rounds(self, last_round: int, last_row: dict[str, Any]) -> list[dict[str, Any]]:
        """Rewrite ``rounds.jsonl`` (atomically) to rounds 1..``last_round``, the last one being
        ``last_row`` (a crash may fall between writing the checkpoint and appending its row), and
        ``clients.jsonl`` to the same rounds; returns the rounds' rows."""
        rows = [r for r in _readable_rows(self.rounds_path) if r["round"] < last_round]
        rows.append({k: _clean(v) for k, v in last_row.items()})
        if [r["round"] for r in rows] != list(range(1, last_round + 1)):
            raise RunDirError(f"'{self.rounds_path}' does not hold rounds 1..{last_round - 1}; cannot resume")
        atomic_write(self.rounds_path, "".join(json.dumps(r) + "\n" for r in rows))
        clients = [r for r in _readable_rows(self.clients_path) if r["round"] <= last_round]
        atomic_write(self.clients_path, "".join(json.dumps(r) + "\n" for r in clients))
        return rows

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        atomic_write(
            self.summary_path, json.dumps({k: _clean(v) for k, v in summary.items()}, indent=2) + "\n"
        )


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (readers never see half)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _readable_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file that parse (a crash may have cut the last one short)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_clients(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``clients.jsonl`` that parse (none for runs made before it existed)."""
    return _readable_rows(Path(run_dir) / "clients.jsonl")


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of a run's ``rounds.jsonl``."""
    lines = (Path(run_dir) / "rounds.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's ``summary.json``."""
    return dict(json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8")))
