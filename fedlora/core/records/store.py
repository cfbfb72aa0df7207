"""A client's state between rounds (FedSA-LoRA's local B, the DP-SGD accountant history).

With a state directory (the simulation passes one under the run directory; a deployed SuperNode
gets one with ``--node-config "state-dir=DIR"``) every save is a file versioned by round,
``<dir>/client-<partition>/<name>.r<round>.<ext>``, written atomically; a load in round t takes the
newest version from a round before t. So a client that saved round t's state before the server
crashed in round t replays round t from the same state as the first time, and a server resumed from
its checkpoint meets clients in step with it. Without a directory the state lives in the node's
Flower ``Context.state`` (lost when the federation restarts).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context

if TYPE_CHECKING:
    from fedlora.core.model.arrays import State

_VERSION = re.compile(r"^(?P<name>.+)\.r(?P<round>\d+)\.(?P<ext>safetensors|json)$")


class ClientStore:
    """Load and save named pieces of one client's state for one round."""

    def __init__(self, context: Context, root: str | None, partition_id: int, server_round: int) -> None:
        self.context = context
        self.dir = Path(root) / f"client-{partition_id}" if root else None
        self.round = server_round

    def load_arrays(self, name: str, *, include_current: bool = False) -> State | None:
        """The newest tensors saved under ``name`` before this round (or in it, with ``include_current``)."""
        # start-up: torch (safetensors) only where tensors are stored; secure-aggregation stages store none
        from safetensors.torch import load_file

        from fedlora.core.model.arrays import from_arrays

        if self.dir is None:
            record = self.context.state.array_records.get(name)
            return from_arrays(record) if record is not None else None
        path = self._latest(name, "safetensors", include_current)
        if path is None:
            return None

        return dict(load_file(str(path)))

    def save_arrays(self, name: str, state: State) -> None:
        """Keep ``state`` as this round's version of ``name``."""
        # start-up: as in load_arrays
        from safetensors.torch import save_file

        from fedlora.core.model.arrays import to_arrays

        if self.dir is None:
            self.context.state[name] = to_arrays(state)
            return

        self._write(name, "safetensors", lambda tmp: save_file(_plain(state), tmp))

    def load_config(self, name: str, *, include_current: bool = False) -> dict[str, Any] | None:
        """The newest JSON-able values saved under ``name`` before this round (or in it)."""
        if self.dir is None:
            record = self.context.state.config_records.get(name)
            return dict(record) if record is not None else None
        path = self._latest(name, "json", include_current)
        return dict(json.loads(path.read_text(encoding="utf-8"))) if path is not None else None

    def save_config(self, name: str, values: dict[str, Any]) -> None:
        """Keep ``values`` (lists of numbers or strings) as this round's version of ``name``."""
        if self.dir is None:
            self.context.state[name] = ConfigRecord(values)
            return
        self._write(name, "json", lambda tmp: Path(tmp).write_text(json.dumps(values), encoding="utf-8"))

    def delete(self, name: str) -> None:
        """Forget every version of ``name`` (secrets that must not outlive their round)."""
        if self.dir is None:
            self.context.state.config_records.pop(name, None)
            self.context.state.array_records.pop(name, None)
            return
        for ext in ("json", "safetensors"):
            for path in self._versions(name, ext).values():
                path.unlink(missing_ok=True)

    # ----- files ------------------------------------------------------------------------------
    def _versions(self, name: str, ext: str) -> dict[int, Path]:
        assert self.dir is not None
        found = {}
        for path in self.dir.glob(f"{name}.r*.{ext}") if self.dir.is_dir() else []:
            match = _VERSION.match(path.name)
            if match and match["name"] == name:
                found[int(match["round"])] = path
        return found

    def _latest(self, name: str, ext: str, include_current: bool) -> Path | None:
        limit = self.round + 1 if include_current else self.round
        rounds = [r for r in self._versions(name, ext) if r < limit]
        return self._versions(name, ext)[max(rounds)] if rounds else None

    def _write(self, name: str, ext: str, write: Any) -> None:
        """Write this round's version atomically, then drop versions a replay can no longer need
        (all but this one and the newest before it)."""
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, self.dir / f"{name}.r{self.round}.{ext}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        versions = self._versions(name, ext)
        older = sorted(r for r in versions if r < self.round)
        for r in older[:-1]:
            versions[r].unlink(missing_ok=True)


def _plain(state: State) -> State:
    """Contiguous CPU copies (safetensors refuses shared or strided storage)."""
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
