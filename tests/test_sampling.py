"""Which nodes a round talks to: virtual nodes are assigned partitions (no message to any other node),
deployed nodes are asked theirs once; either way the same seed samples the same partitions."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients.node import partition_id as _partition_id
from fedlora.core.config import from_dict
from fedlora.core.model.arrays import to_arrays
from fedlora.core.protocol import keys as protocol
from strategies import registry
from tests.helpers import client_state


class Grid:
    """A grid of ``n`` nodes (ids 1000 + 7 i, not in partition order) that records what it sends and
    answers QUERY messages as deployed nodes would (node ``1000 + 7 i`` holds partition ``n - 1 - i``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return [1000 + 7 * i for i in reversed(range(self.n))]

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        """Keep the messages; Flower's grids give each an id when pushing it, as here."""
        ids = []
        for m in messages:
            m.metadata._message_id = f"m{len(self.sent)}"  # no public setter: the grid's job
            self.sent.append(m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        replies = []
        for m in (m for m in self.sent if m.metadata.message_id in set(ids)):
            pid = self.n - 1 - (m.metadata.dst_node_id - 1000) // 7
            metrics = MetricRecord({protocol.PARTITION_ID: pid})
            replies.append(Message(RecordDict({protocol.METRICS: metrics}), reply_to=m))
        return replies


def _strategy(clients: int, fraction: float):  # type: ignore[no-untyped-def]
    cfg = from_dict(
        {"lora": {"rank": 4}, "federation": {"num_clients": clients, "fraction": fraction, "min_clients": 2}}
    )
    return registry.get("fedit")(cfg, {k: v.float() for k, v in client_state(1).items()})


def _train_messages(strategy, grid: Grid, server_round: int) -> list[Message]:  # type: ignore[no-untyped-def]
    arrays = to_arrays(strategy.global_state)
    return list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))


def _partitions(messages: list[Message]) -> list[int]:
    return [int(m.content[protocol.CONFIG][protocol.ASSIGNED_PARTITION]) for m in messages]  # type: ignore[arg-type]


def test_virtual_nodes_are_workers_given_partitions_without_any_query(task_identity: None) -> None:
    """10,000 clients on a pool of 4 workers: each round the sampled partitions go to the workers in
    order, each message names its partition, and no other message is sent."""
    strategy, grid = _strategy(10_000, 0.0004), Grid(4)
    strategy.sampler.assigns = True
    seen = set()
    for server_round in (1, 2, 3):
        messages = _train_messages(strategy, grid, server_round)
        assert len(grid.sent) == 0  # nothing sent beyond the round's own messages
        assert [m.metadata.dst_node_id for m in messages] == sorted(grid.get_node_ids())
        partitions = _partitions(messages)
        assert partitions == sorted(partitions) and len(set(partitions)) == 4
        assert all(0 <= p < 10_000 for p in partitions)
        seen.update(partitions)
    assert len(seen) > 4  # a new sample every round


def test_the_pool_is_two_nodes_per_actor_at_most_the_largest_round() -> None:
    from fedlora.privacy.mechanisms import mechanism_for
    from fedlora.server.sampling import virtual_nodes

    def pool(workers: int = 1000, **federation: object) -> int:
        cfg = from_dict({"federation": {"num_clients": 10_000, "fraction": 0.0004, **federation}})
        return virtual_nodes(cfg, mechanism_for(cfg), workers)

    assert pool() == 4
    assert pool(fraction_evaluate=0.001) == 10
    assert pool(min_clients=6) == 6
    assert pool(fraction=1.0) == pool(fraction_evaluate=1.0) == 2000
    assert pool(workers=2, fraction=0.05) == 4  # 500 clients per round on 2 actors: 4 nodes
    assert pool(workers=1) == 2
    dp = from_dict(
        {
            "federation": {"num_clients": 10_000, "fraction": 0.03},
            "privacy": {"mode": "dp-updates", "noise_multiplier": 1.0},
        }
    )
    # Poisson with q = 0.03: mean 300, sd sqrt(300 * 0.97) = 17.06; mean + 6 sd = 402.3
    assert virtual_nodes(dp, mechanism_for(dp), 1000) == 403
    assert virtual_nodes(dp, mechanism_for(dp), 2) == 4


def test_a_round_larger_than_the_pool_deals_partitions_to_the_workers_in_turn(task_identity: None) -> None:
    """500 clients on 4 virtual nodes: each node gets every 4th partition, each partition once."""
    strategy, grid = _strategy(2_000, 0.25), Grid(4)
    strategy.sampler.assigns = True
    messages = _train_messages(strategy, grid, 1)
    partitions = _partitions(messages)
    assert len(messages) == 500 and len(set(partitions)) == 500
    nodes = sorted(grid.get_node_ids())
    assert [m.metadata.dst_node_id for m in messages] == [nodes[i % 4] for i in range(500)]
    one = _train_messages(strategy, Grid(1), 2)  # fewer nodes than min_clients: still workers, no error
    assert len({m.metadata.dst_node_id for m in one}) == 1 and len(set(_partitions(one))) == 500


def test_assigned_and_asked_partitions_sample_the_same_clients(task_identity: None) -> None:
    """Same seed: the partitions sampled round by round do not depend on how nodes learn them."""
    virtual, deployed = _strategy(40, 0.1), _strategy(40, 0.1)
    virtual.sampler.assigns = True
    grid_v, grid_d = Grid(4), Grid(40)
    for server_round in (1, 2, 3):
        assigned = _partitions(_train_messages(virtual, grid_v, server_round))
        asked = _train_messages(deployed, grid_d, server_round)
        node_of = deployed.sampler.partitions(grid_d)
        by_node = {node: pid for pid, node in node_of.items()}
        assert assigned == sorted(by_node[m.metadata.dst_node_id] for m in asked)
        assert all(protocol.ASSIGNED_PARTITION not in m.content[protocol.CONFIG] for m in asked)
    assert [m.metadata.message_type for m in grid_d.sent] == [MessageType.QUERY] * 40  # asked once


def _context(**node_config: object) -> Context:
    return Context(run_id=1, node_id=5, node_config=dict(node_config), state=RecordDict(), run_config={})  # type: ignore[arg-type]


def test_a_client_plays_the_assigned_partition_unless_it_has_its_own_file() -> None:
    node = _context(**{protocol.NODE_PARTITION_ID: 3, protocol.NODE_NUM_PARTITIONS: 10})
    assert _partition_id(node, ConfigRecord({}), 10) == 3
    assert _partition_id(node, ConfigRecord({protocol.ASSIGNED_PARTITION: 7}), 10) == 7
    owner = _context(**{protocol.NODE_PARTITION_ID: 0, protocol.NODE_DATA_PATH: "/data/mine.csv"})
    with pytest.raises(ValueError, match="own data-path and plays no other partition"):
        _partition_id(owner, ConfigRecord({protocol.ASSIGNED_PARTITION: 1}), 10)
