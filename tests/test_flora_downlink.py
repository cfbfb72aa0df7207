"""FLoRA's downlink is the stacked low-rank factors of its paper's protocol, counted exactly, and a client
that merges them holds the same base offsets as the server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, MessageType, RecordDict

from clients.runtime import base_offsets
from fedlora.core.config import from_dict
from fedlora.core.model.arrays import base_weight_name
from fedlora.core.protocol import keys as protocol
from fedlora.core.records.store import ClientStore
from fedlora.run.experiment import check_strategy
from fedlora.server.traffic import arrays_bytes
from strategies import registry
from tests.helpers import HEAD, LAYERS, client_state

D_IN = D_OUT = 64
RANK = 2
NPY_HEADER = 128  # bytes numpy's .npy format puts before every array's data (Flower's Array payload)


def make(**options: object):  # type: ignore[no-untyped-def]
    cfg = check_strategy(
        from_dict(
            {
                "strategy": {"name": "flora", "options": options},
                "lora": {"rank": RANK, "alpha": 4.0},
                "federation": {"num_clients": 4},
            }
        )
    )
    state = {k: v.float() for k, v in client_state(99, rank=RANK, d_in=D_IN, d_out=D_OUT).items()}
    return registry.get("flora")(cfg, state)


def updates(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.float() for k, v in client_state(seed + i, rank=RANK, d_in=D_IN, d_out=D_OUT).items()}
        for i in range(count)
    ]


class Client:
    """One client: its own state store, merging what its messages carry."""

    def __init__(self, root: Path, pid: int) -> None:
        self.root, self.pid = root, pid
        self.context = Context(run_id=1, node_id=pid, node_config={}, state=RecordDict(), run_config={})

    def receive(self, strategy, server_round: int, kind: str = MessageType.EVALUATE):  # type: ignore[no-untyped-def]
        message = strategy._messages(server_round, ConfigRecord({}), {self.pid: self.pid}, kind)[0]
        store = ClientStore(self.context, str(self.root), self.pid, server_round)
        offsets = base_offsets(message.content, message.content[protocol.CONFIG], store)
        return message, offsets


def head_bytes(strategy) -> int:  # type: ignore[no-untyped-def]
    return strategy.global_state[HEAD].numel() * 4 + NPY_HEADER


def assert_same(client: dict[str, torch.Tensor], server: dict[str, torch.Tensor]) -> None:
    assert set(client) == set(server)
    for key, value in server.items():
        torch.testing.assert_close(client[key], value, rtol=1e-6, atol=1e-7)


def test_downlink_is_the_stacked_factors_and_clients_rebuild_the_offsets(
    tmp_path: Path, task_identity: None
) -> None:
    strategy = make()
    clients = [Client(tmp_path, pid) for pid in range(4)]
    p = [0.2, 0.3, 0.5]
    # round 1: nothing merged yet, no offsets travel
    for c in clients[:3]:
        message, offsets = c.receive(strategy, 1, MessageType.TRAIN)
        assert offsets == {} and arrays_bytes(message.content) == head_bytes(strategy)
    strategy.confirm([0, 1, 2])
    strategy.aggregate(strategy.global_state, updates(10, 3), p)
    # evaluation of round 1: the stack of 3 clients of rank 2 per adapted layer, by hand
    stack_values = len(LAYERS) * (3 * RANK) * (D_IN + D_OUT)  # A_stack (6 x d_in) + B_stack (d_out x 6)
    for c in (clients[0], clients[3]):
        message, offsets = c.receive(strategy, 1)
        assert protocol.BASE_OFFSETS not in message.content
        expected = head_bytes(strategy) + 4 * stack_values + 2 * len(LAYERS) * NPY_HEADER
        assert arrays_bytes(message.content) == expected
        assert_same(offsets, strategy.base_offsets)
    strategy.confirm([0, 3])
    # the merged offsets equal sum_k p_k s_k B_k A_k (s = alpha / r = 2)
    first = updates(10, 3)
    for layer in LAYERS:
        exact = sum(
            pk * 2.0 * u[f"{layer}.lora_B.weight"].double() @ u[f"{layer}.lora_A.weight"].double()
            for pk, u in zip(p, first, strict=True)
        )
        torch.testing.assert_close(
            strategy.base_offsets[base_weight_name(layer)].double(), exact, rtol=1e-5, atol=1e-6
        )
    # round 2: client 0 is in step (no offsets at all), client 1 needs version 1's stack
    message, _ = clients[0].receive(strategy, 2, MessageType.TRAIN)
    assert arrays_bytes(message.content) == head_bytes(strategy)
    message, offsets = clients[1].receive(strategy, 2, MessageType.TRAIN)
    assert (
        arrays_bytes(message.content)
        == head_bytes(strategy) + 4 * stack_values + 2 * len(LAYERS) * NPY_HEADER
    )
    assert_same(offsets, strategy.base_offsets)
    strategy.confirm([0, 1])
    strategy.aggregate(strategy.global_state, updates(20, 2), [0.5, 0.5])
    # client 2 (at version 0) gets versions 1 and 2: 3 + 2 clients' factors; the others only version 2
    message, offsets = clients[2].receive(strategy, 2)
    both = len(LAYERS) * (5 * RANK) * (D_IN + D_OUT)
    assert arrays_bytes(message.content) == head_bytes(strategy) + 4 * both + 4 * len(LAYERS) * NPY_HEADER
    assert_same(offsets, strategy.base_offsets)
    for c in clients[:2]:
        message, offsets = c.receive(strategy, 2)
        two = len(LAYERS) * (2 * RANK) * (D_IN + D_OUT)
        assert arrays_bytes(message.content) == head_bytes(strategy) + 4 * two + 2 * len(LAYERS) * NPY_HEADER
        assert_same(offsets, strategy.base_offsets)


def test_full_offsets_when_cheaper_and_merged_mode_gives_the_same_offsets(
    tmp_path: Path, task_identity: None
) -> None:
    stacked, merged = make(), make(downlink="merged")
    for r in range(6):  # 6 rounds of 3 clients: 36 x 128 stacked values per layer > 64 x 64
        for s in (stacked, merged):
            s.aggregate(s.global_state, updates(100 + 10 * r, 3), [1.0, 1.0, 1.0])
    assert all(torch.equal(stacked.base_offsets[k], v) for k, v in merged.base_offsets.items())
    full = len(LAYERS) * (4 * D_IN * D_OUT + NPY_HEADER)
    for s in (stacked, merged):
        message, offsets = Client(tmp_path / s.options.downlink, 3).receive(s, 6)
        assert arrays_bytes(message.content) == head_bytes(s) + full
        assert_same(offsets, s.base_offsets)


def test_a_client_out_of_step_is_refused(tmp_path: Path, task_identity: None) -> None:
    strategy = make()
    strategy.aggregate(strategy.global_state, updates(10, 3), [1.0, 1.0, 1.0])
    strategy.synced[0] = 1  # the server believes client 0 holds version 1; its store is empty
    strategy.aggregate(strategy.global_state, updates(20, 3), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="out of step"):
        Client(tmp_path, 0).receive(strategy, 2)
