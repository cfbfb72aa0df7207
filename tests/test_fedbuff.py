"""FedBuff on the virtual clock, without a model: clients answer with known updates, so each server step
can be checked against a hand computation of the staleness-weighted update."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.core.config import ConfigError, load_config
from fedlora.core.model.arrays import from_arrays, to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.run.buffered import BufferedLoop, stale_update
from fedlora.run.experiment import check_strategy
from strategies import registry

ONE_CLASS = 'devices.classes=[{name="same", share=1.0, speed=1.0}]'
START = {
    "layer.lora_A.weight": torch.zeros(2, 3),
    "layer.lora_B.weight": torch.zeros(3, 2),
    "classifier.weight": torch.zeros(2, 2),
}


def delta(pid: int) -> float:
    """The update client ``pid`` always makes: every entry moves by this much."""
    return (pid + 1) / 100


class AnsweringGrid:
    """Flower's Grid contract: each client replies with what it received plus :func:`delta`."""

    def __init__(self) -> None:
        self.replies: dict[str, Message] = {}
        self.pushed: list[int] = []

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            pid = int(message.content[protocol.CONFIG][protocol.ASSIGNED_PARTITION])  # type: ignore[arg-type]
            self.pushed.append(pid)
            arrays = {k: v + delta(pid) for k, v in from_arrays(message.content[protocol.ARRAYS]).items()}
            metrics = {protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 1.0, protocol.PARTITION_ID: pid}
            content = RecordDict(
                {protocol.ARRAYS: to_arrays(arrays), protocol.METRICS: MetricRecord(metrics)}
            )
            self.replies[message.metadata.message_id] = Message(content, reply_to=message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def loop(*extra: str) -> tuple[BufferedLoop, AnsweringGrid]:
    cfg = check_strategy(
        load_config(
            None,
            [
                ONE_CLASS,
                "federation.num_clients=8",
                "lora.rank=2",
                "federation.min_clients=1",
                'schedule.mode="fedbuff"',
                "schedule.concurrency=3",
                "schedule.buffer=2",
                *extra,
            ],
        )
    )
    strategy = registry.get("fedit")(cfg, START)
    strategy.sampler.assigns = True
    grid = AnsweringGrid()
    return BufferedLoop(grid, cfg, strategy, evaluate=None, config=ConfigRecord()), grid  # type: ignore[arg-type]


def test_stale_update_is_the_weighted_difference() -> None:
    current, start = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([0.0, 1.0])}
    got = stale_update(current, start, {"x": torch.tensor([0.5, 3.0])}, staleness=3, server_lr=0.8)
    torch.testing.assert_close(got["x"], torch.tensor([1.0 + 0.4 * 0.5, 2.0 + 0.4 * 2.0]))


def test_each_step_is_the_hand_computed_staleness_weighted_update(task_identity) -> None:  # type: ignore[no-untyped-def]
    """Equal trips: three clients start at t=0; each step takes the next two to arrive, a new client
    starting in each freed slot with the model of that moment. By hand, the staleness of the steps'
    updates is [0, 0], [1, 1] (the third first client and the first replacement, both on version 0),
    [2, 1] (the second replacement, version 0, and the client that started after step 1)."""
    run, _ = loop("schedule.server_lr=0.5")
    x = {k: v.clone().double() for k, v in START.items()}
    staleness = []
    for step in (1, 2, 3):
        metrics, _ = run.train_phase(step, time.monotonic())
        rows = [r for r in run.strategy.client_rows if r["status"] == "ok"]
        assert metrics["num_clients"] == 2 and len(rows) == 2
        staleness.append(metrics["staleness"])
        step_sum = sum(delta(r["partition_id"]) / math.sqrt(1 + r["staleness"]) for r in rows)
        x = {k: v + 0.5 * step_sum / 2 for k, v in x.items()}  # p_k = 1/2: equal example counts
        got = from_arrays(run.arrays)
        for key in START:
            torch.testing.assert_close(got[key].double(), x[key], rtol=0, atol=1e-6)
    assert staleness == [[0, 0], [1, 1], [2, 1]]
    assert sorted(r["staleness"] for r in run.strategy.client_rows) == [1, 2]


def test_arrival_order_and_virtual_times_are_the_same_every_run(task_identity) -> None:  # type: ignore[no-untyped-def]
    classes = 'devices.classes=[{name="a", share=0.5, speed=1.0}, {name="b", share=0.5, speed=0.3, drop=0.3}]'
    seen = []
    for _ in range(2):
        run, grid = loop(classes, "federation.num_clients=20", "schedule.concurrency=6")
        times = [run.train_phase(step, time.monotonic())[0] for step in range(1, 6)]
        seen.append(([(t["virtual_time_s"], t["staleness"], t["num_offline"]) for t in times], grid.pushed))
    assert seen[0] == seen[1]
    assert [t for t, _, _ in seen[0][0]] == sorted(t for t, _, _ in seen[0][0])


def test_fedbuff_refuses_a_strategy_that_is_not_a_weighted_sum() -> None:
    with pytest.raises(ConfigError, match="fedbuff' needs a strategy whose aggregate is a weighted sum"):
        check_strategy(
            load_config(
                None, [ONE_CLASS, 'schedule.mode="fedbuff"', 'strategy.name="flora"', "schedule.buffer=5"]
            )
        )
