"""Which clients take part in a round: sampled by partition id with the run's seeded RNG.

Sampling by partition id, not by Flower's random node ids, makes runs with the same seed sample the
same clients. The partition of every node is asked once with a QUERY message and cached (asked again
only when the set of connected nodes changes).
"""

from __future__ import annotations

import random
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.core import protocol
from fedlora.core.config import ExperimentConfig
from fedlora.core.stopping import exchange
from fedlora.privacy.mechanisms import Mechanism
from fedlora.server.replies import RoundFailedError


class ClientSampler:
    """Seeded sampling of partitions; the privacy mechanism decides how training rounds sample."""

    def __init__(self, cfg: ExperimentConfig, mechanism: Mechanism) -> None:
        self.cfg = cfg
        self.mechanism = mechanism
        self.rng = random.Random(cfg.seed)
        self._node_of: dict[int, int] | None = None

    def partitions(self, grid: Grid) -> dict[int, int]:
        """partition id -> node id of every connected node (a QUERY to each node the first time)."""
        nodes = sorted(grid.get_node_ids())
        if self._node_of is None or set(self._node_of.values()) != set(nodes):
            ask = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
            found = {}
            for reply in exchange(grid, ask, self.cfg.federation.round_timeout):
                if not reply.has_error():
                    pid = int(reply.content[protocol.METRICS][protocol.PARTITION_ID])  # type: ignore[arg-type]
                    found[pid] = reply.metadata.src_node_id
            self._node_of = dict(sorted(found.items()))
        return self._node_of

    def set_partitions(self, node_of: dict[int, int]) -> None:
        """Use this partition id -> node id mapping instead of asking the nodes (kept until the set of
        connected nodes changes)."""
        self._node_of = dict(sorted(node_of.items()))

    def sample(self, grid: Grid, fraction: float | None = None, *, training: bool = False) -> dict[int, int]:
        """partition id -> node id of this round's clients.

        ``fraction`` defaults to ``federation.fraction``; at least ``federation.min_clients`` are taken;
        a fraction of 1 takes every node without drawing from the RNG. Training rounds sample as the
        privacy mechanism says (uniformly without replacement, or Poisson under dp-updates).
        """
        fed = self.cfg.federation
        connected = len(list(grid.get_node_ids()))
        if connected < fed.min_clients:
            raise RoundFailedError(
                f"only {connected} clients are connected but federation.min_clients = {fed.min_clients}"
            )
        node_of = self.partitions(grid)
        if (fraction if fraction is not None else fed.fraction) >= 1.0:
            return dict(node_of)
        want = min(len(node_of), fed.clients_per_round(fraction))
        if training:
            chosen = self.mechanism.sample(sorted(node_of), want, self.rng)
        else:
            chosen = sorted(self.rng.sample(sorted(node_of), want))
        return {pid: node_of[pid] for pid in chosen}

    def state(self) -> list[Any]:
        """The RNG state as JSON-able lists (for checkpoints)."""
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def restore(self, saved: list[Any]) -> None:
        """Continue the RNG from :meth:`state`."""
        version, internal, gauss = saved
        self.rng.setstate((version, tuple(internal), gauss))
