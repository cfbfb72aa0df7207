"""Which clients take part in a round: sampled by partition id with the run's seeded RNG.

Sampling by partition id, not by Flower's random node ids, makes runs with the same seed sample the
same clients. Deployed nodes each hold one partition: the partition of every node is asked once with a
QUERY message and cached (asked again only when the set of connected nodes changes). In a simulation
a client is a partition, and Flower's virtual SuperNodes are a small pool of interchangeable workers
(:func:`virtual_nodes`): each round the sampled partitions are handed to the workers in turn and each
message names its partition (:data:`fedlora.core.protocol.keys.ASSIGNED_PARTITION`). No node is asked
anything, and the cost of a round does not grow with the number of clients.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.core.config import ExperimentConfig
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.stopping import exchange
from fedlora.privacy.mechanisms import Mechanism
from fedlora.server.replies import RoundFailedError

NODES_PER_WORKER = 2
"""Virtual nodes per Ray actor: Flower's simulation engine hands out at most one message per node
every 0.1 s, so two per actor keep every actor's next message queued."""


def virtual_nodes(cfg: ExperimentConfig, mechanism: Mechanism, workers: int) -> int:
    """Flower virtual SuperNodes for a simulation whose Ray cluster holds ``workers`` client actors:
    ``NODES_PER_WORKER`` per actor, fewer when no round can sample that many partitions.

    A node is a worker, not a client: a round with more clients than nodes gives each node several
    messages (at most one per partition), which Flower queues and the actors run as they free up.
    Fewer nodes keep Flower's message dispatch cheap: each 0.1 s it scans every stored message once
    per node, so a pool as large as a 500-client round spent most of the server's CPU on that scan.
    """
    fed = cfg.federation
    if fed.fraction >= 1.0 or fed.fraction_evaluate >= 1.0:
        largest = fed.num_clients
    else:
        train = mechanism.most_sampled(fed.num_clients, fed.clients_per_round())
        evaluate = fed.clients_per_round(fed.fraction_evaluate) if fed.fraction_evaluate > 0 else 0
        largest = min(fed.num_clients, max(train, evaluate, fed.min_clients))
    return max(1, min(largest, NODES_PER_WORKER * workers))


class ClientSampler:
    """Seeded sampling of partitions; the privacy mechanism decides how training rounds sample."""

    def __init__(self, cfg: ExperimentConfig, mechanism: Mechanism) -> None:
        self.cfg = cfg
        self.mechanism = mechanism
        self.rng = random.Random(cfg.seed)
        self._node_of: dict[int, int] | None = None
        self.assigns = False
        """True for virtual nodes (a simulation): partitions are assigned to nodes, not asked."""
        self.available: Callable[[int], bool] | None = None
        """Training rounds sample only the partitions this says are available (the virtual clock's device
        availability); None: every partition."""
        self.over_select = 0.0
        """Training rounds sample this share more clients than federation.fraction says (the clock keeps
        the first to arrive)."""

    def partitions(self, grid: Grid) -> dict[int, int]:
        """partition id -> node id of every connected deployed node (a QUERY to each the first time)."""
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
        nodes = sorted(grid.get_node_ids())
        if not self.assigns and len(nodes) < min(fed.min_clients, fed.num_clients):
            raise RoundFailedError(
                f"only {len(nodes)} clients are connected but federation.min_clients = {fed.min_clients}"
            )
        node_of = None if self.assigns else self.partitions(grid)
        population: Sequence[int] = range(fed.num_clients) if node_of is None else sorted(node_of)
        if training and self.available is not None:
            population = [pid for pid in population if self.available(pid)]
        if (fraction if fraction is not None else fed.fraction) >= 1.0:
            chosen = list(population)
        else:
            want = min(len(population), self._wanted(fraction, training))
            if training:
                chosen = self.mechanism.sample(population, want, self.rng)
            else:
                chosen = sorted(self.rng.sample(population, want))
        if node_of is None:  # virtual nodes: the partitions dealt to the workers in turn
            return {pid: nodes[i % len(nodes)] for i, pid in enumerate(chosen)}
        return {pid: node_of[pid] for pid in chosen}

    def _wanted(self, fraction: float | None, training: bool) -> int:
        """Clients to sample: the fraction's count, over-selected in training rounds."""
        count = self.cfg.federation.clients_per_round(fraction)
        return math.ceil(count * (1.0 + self.over_select)) if training and self.over_select else count

    def state(self) -> list[Any]:
        """The RNG state as JSON-able lists (for checkpoints)."""
        version, internal, gauss = self.rng.getstate()
        return [version, list(internal), gauss]

    def restore(self, saved: list[Any]) -> None:
        """Continue the RNG from :meth:`state`."""
        version, internal, gauss = saved
        self.rng.setstate((version, tuple(internal), gauss))
