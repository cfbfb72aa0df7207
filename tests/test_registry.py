"""Registry-driven tests: every registered strategy (built-in, or a new file in ``strategies/``) keeps
the contract the round loop relies on. Adding a strategy adds its cases here without editing this file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

import strategies
from fedlora.core.config import ConfigError, from_dict
from fedlora.core.model.arrays import State, from_arrays, kind_of, to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.plan import ClientPlan
from fedlora.privacy.mechanisms import registry as mechanisms
from fedlora.run.experiment import check_strategy
from strategies import registry
from strategies.base import LoraStrategy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "server_lr.py"
NAMES = sorted(registry.available())
LAYERS = ("enc.0.query", "enc.0.value", "enc.1.query")
HEAD = "classifier.weight"
NODES = 6


def global_state(rank: int = 4, d: int = 12, seed: int = 0) -> State:
    g = torch.Generator().manual_seed(seed)
    state: State = {}
    for layer in LAYERS:
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, d, generator=g)
        state[f"{layer}.lora_B.weight"] = torch.randn(d, rank, generator=g)
    state[HEAD] = torch.randn(3, d, generator=g)
    return state


def make(name: str, **sections: object) -> LoraStrategy:
    cfg = check_strategy(
        from_dict(
            {
                "strategy": {"name": name},
                "lora": {"rank": 4},
                "federation": {"num_clients": NODES},
                **sections,
            }
        )
    )
    strategy = registry.get(name)(cfg, global_state())
    strategy.sampler.set_partitions({pid: 100 + pid for pid in range(NODES)})
    return strategy


class Nodes:
    """A grid that lists node ids (partition i on node 100 + i)."""

    def get_node_ids(self) -> list[int]:
        return [100 + pid for pid in range(NODES)]


def client_reply(message: Message, start: State, pid: int) -> State:
    """What an honest client sends back, following only the message (arrays and plan)."""
    plan = ClientPlan.from_config(message.content[protocol.PLAN])  # type: ignore[arg-type]
    received = from_arrays(message.content[protocol.ARRAYS])
    g = torch.Generator().manual_seed(pid)
    state: State = {}
    for key, value in start.items():
        shape = list(value.shape)
        if ".lora_A." in key:
            shape[0] = plan.rank
        elif ".lora_B." in key:
            shape[1] = plan.rank
        state[key] = torch.randn(shape, generator=g) if plan.reinit_seed is not None else value
    state.update(received)
    trained = {
        k: v + (0.0 if kind_of(k) in plan.freeze else 0.01) * torch.randn(v.shape, generator=g)
        for k, v in state.items()
    }
    return {k: trained[k] for k in plan.reply_keys(received, trained)}


def replies_to(messages: list[Message], start: State) -> list[Message]:
    out = []
    for pid, message in enumerate(messages):
        metrics = MetricRecord(
            {protocol.NUM_EXAMPLES: 10 + pid, protocol.TRAIN_LOSS: 1.0, protocol.PARTITION_ID: pid}
        )
        arrays = to_arrays(client_reply(message, start, pid))
        out.append(
            Message(RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), reply_to=message)
        )
    return out


@pytest.mark.parametrize("name", NAMES)
def test_is_described_and_its_options_have_defaults(name: str) -> None:
    cls = registry.get(name)
    assert cls.name == name and cls.description and cls.__doc__
    assert dataclasses.is_dataclass(cls.Options)
    cls.Options()  # every option has a default
    assert registry.validate_options(name, {}) == dataclasses.asdict(cls.Options())
    with pytest.raises(ConfigError, match=f"unknown for strategy '{name}'"):
        registry.validate_options(name, {"no_such_option": 1})


@pytest.mark.parametrize("name", NAMES)
def test_a_round_through_flowers_contract_keeps_the_adapter_shape(name: str, task_identity: None) -> None:
    strategy = make(name)
    before = strategy.global_state
    messages = list(strategy.configure_train(1, to_arrays(before), ConfigRecord(), Nodes()))
    assert len(messages) == NODES
    for pid, message in enumerate(messages):  # the plan travels, and is the strategy's own
        plan = ClientPlan.from_config(message.content[protocol.PLAN])  # type: ignore[arg-type]
        assert plan == strategy.client_plan(pid, 1)
    arrays, metrics = strategy.aggregate_train(1, replies_to(messages, before))
    assert strategy.counts.as_row() == {
        "num_sampled": NODES, "num_replied": NODES, "num_failed": 0, "num_rejected": 0, "num_dropped": 0
    }  # fmt: skip
    assert metrics is not None and metrics["num_clients"] == NODES
    after = from_arrays(arrays)
    assert {k: (v.shape, v.dtype) for k, v in after.items()} == {
        k: (v.shape, v.dtype) for k, v in before.items()
    }
    assert all(torch.isfinite(v).all() for v in after.values())
    assert strategy.traffic.downlink > 0 and strategy.traffic.uplink > 0


@pytest.mark.parametrize("name", [n for n in NAMES if registry.get(n).linear_aggregate])
def test_a_strategy_declared_linear_can_aggregate_the_mean_alone(name: str) -> None:
    """What dp-updates relies on: it hands the strategy only the (noised) weighted mean of the
    clients' arrays, with weight 1; for a linear aggregate that gives what the clients would have.
    A false declaration fails here."""
    strategy = make(name)
    sent = strategy.outgoing(strategy.global_state)
    g = torch.Generator().manual_seed(3)
    updates = [{k: v + torch.randn(v.shape, generator=g) for k, v in sent.items()} for _ in range(3)]
    p = [0.2, 0.3, 0.5]
    mean = {k: sum(pk * u[k] for pk, u in zip(p, updates, strict=True)) for k in sent}
    from_clients = strategy.aggregate(strategy.global_state, updates, p)
    from_mean = strategy.aggregate(strategy.global_state, [mean], [1.0])
    assert set(from_clients) == set(sent) and not strategy.base_offsets
    for key in sent:
        torch.testing.assert_close(from_mean[key], from_clients[key])


@pytest.mark.parametrize("name", NAMES)
def test_privacy_modes_follow_the_declaration(name: str) -> None:
    modes = registry.privacy_modes(name)
    assert "none" in modes and "dp-sgd" in modes
    for mode, mechanism in mechanisms.available().items():
        needs_linear = mechanism.requires_linear_aggregate
        assert (mode in modes) == (registry.get(name).linear_aggregate or not needs_linear)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_state_is_json_and_restores(name: str, task_identity: None) -> None:
    strategy = make(name, privacy={"mode": "dp-sgd", "noise_multiplier": 1.0})
    messages = list(strategy.configure_train(1, to_arrays(strategy.global_state), ConfigRecord(), Nodes()))
    strategy.aggregate_train(1, replies_to(messages, strategy.global_state))
    saved = json.loads(json.dumps(strategy.checkpoint_state()))
    resumed = make(name, privacy={"mode": "dp-sgd", "noise_multiplier": 1.0})
    resumed.restore(strategy.global_state, strategy.base_offsets, saved)
    assert resumed.sampler.rng.random() == strategy.sampler.rng.random()
    assert resumed.checkpoint_state() == strategy.checkpoint_state()


# ----- the example of docs/write-a-strategy.md ------------------------------------------------
def _load_example() -> ModuleType:
    """Import the docs' example as a module of the ``strategies`` package, as a dropped-in file is."""
    name = "strategies.server_lr"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example() -> Iterator[ModuleType]:
    module = _load_example()
    yield module
    registry._REGISTRY.pop("fedavg-server-lr", None)
    sys.modules.pop("strategies.server_lr", None)


def test_a_file_in_the_strategies_folder_is_discovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "server_lr.py").write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "fedavg-server-lr" in registry.available()
    finally:
        registry._REGISTRY.pop("fedavg-server-lr", None)
        sys.modules.pop("strategies.server_lr", None)


def test_the_example_strategy_known_answer(example: ModuleType) -> None:
    strategy = make("fedavg-server-lr", strategy={"name": "fedavg-server-lr", "options": {"server_lr": 0.5}})
    x = strategy.global_state
    updates = [{k: v + 1.0 for k, v in x.items()}, {k: v + 3.0 for k, v in x.items()}]
    out = strategy.aggregate(x, updates, [0.25, 0.75])  # mean = x + 2.5, half-way: x + 1.25
    for key, value in x.items():
        torch.testing.assert_close(out[key], value + 1.25)
    with pytest.raises(ConfigError, match=r"server_lr = 2\.5 is invalid"):
        make("fedavg-server-lr", strategy={"name": "fedavg-server-lr", "options": {"server_lr": 2.5}})
    assert registry.privacy_modes("fedavg-server-lr") == list(mechanisms.available())


@pytest.mark.e2e
def test_the_example_strategy_runs_end_to_end(example: ModuleType, tmp_path: Path, federate) -> None:  # type: ignore[no-untyped-def]
    """A federation on the real model and data, through Flower's message serialisation, with the example
    strategy registered only on the server side of this process: clients need nothing but the plan the
    message carries. (Ray adds nothing here: the strategy never runs in a client.)"""
    from fedlora.core.records.rundir import read_rounds
    from fedlora.run.experiment import load_experiment, preflight

    cfg = load_experiment(
        ROOT / "sims" / "quickstart.toml",
        [
            'strategy.name="fedavg-server-lr"', "federation.num_clients=3", "federation.rounds=2",
            "train.local_steps=2", "data.max_examples=2000", "data.test_size=100", "data.max_length=32",
            "federation.client_cpus=2",
        ],
    )  # fmt: skip
    rows = read_rounds(federate(preflight(cfg), tmp_path / "run"))
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["strategy"] == "fedavg-server-lr" and r["num_clients"] == 3 for r in rows)
    assert all(math.isfinite(r["eval_accuracy"]) for r in rows)
