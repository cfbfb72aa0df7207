"""Every registered strategy, federated in this process on a tiny model: the product's server and client
code end to end without Ray (``run_in_memory``), fast enough to run for every strategy, with and without
DP-SGD. What only a real simulation can show (Ray actors, the real model) is in test_strategies_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.core.config import ExperimentConfig
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.run.experiment import load_experiment, preflight
from strategies import registry

TIMING = ("wall_s", "aggregate_s", "fair_solve_s")


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path_factory.mktemp("d") / "t.csv")


def experiment(model: str, data: Path, strategy: str, *extra: str) -> ExperimentConfig:
    """Three clients, two sampled a round, two rounds of two local steps on the tiny model."""
    overrides = [
        f'model.path="{model}"',
        f'data.source="{data}"',
        'data.label="topic"',
        f"data.labels={json.dumps(sorted(TOPICS))}",
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=12",
        f'strategy.name="{strategy}"',
        "federation.num_clients=3",
        "federation.fraction=0.67",
        "federation.rounds=2",
        "train.local_steps=2",
        *extra,
    ]
    return preflight(load_experiment(None, overrides))


def rows(run: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


def untimed(run: Path) -> list[dict]:  # type: ignore[type-arg]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run)]


pytestmark = pytest.mark.e2e  # whole federations (in-process, tiny model): not in `make test-fast`


@pytest.mark.parametrize("name", registry.available())
def test_every_strategy_is_reproducible_bit_for_bit(run_in_memory, tiny_bert, topics_csv, name: str) -> None:  # type: ignore[no-untyped-def]
    """Same seed, same rounds (every metric, sampled clients, traffic) and the same adapter, bit for bit."""
    cfg = experiment(tiny_bert.path, topics_csv, name)
    first, second = run_in_memory(cfg, "first"), run_in_memory(cfg, "second")
    assert [r["round"] for r in rows(first)] == [1, 2]
    assert all(r["num_clients"] == 2 and r["num_failed"] == 0 for r in rows(first))
    assert untimed(first) == untimed(second)
    adapter = "adapter/adapter_model.safetensors"
    a, b = load_file(str(first / adapter)), load_file(str(second / adapter))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    clients = [json.loads(line) for line in (first / "clients.jsonl").read_text().splitlines()]
    trained = [(c["round"], c["status"]) for c in clients if c["phase"] == "train"]
    assert trained == [(1, "ok"), (1, "ok"), (2, "ok"), (2, "ok")]


@pytest.mark.parametrize("name", registry.available())
def test_every_strategy_completes_under_dp_sgd(run_in_memory, tiny_bert, topics_csv, name: str) -> None:  # type: ignore[no-untyped-def]
    """Opacus in the client, the accountant on the server: epsilon grows over the two rounds."""
    dp_sgd = ('privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0")
    cfg = experiment(tiny_bert.path, topics_csv, name, *dp_sgd)
    run = run_in_memory(cfg, "dp")
    got = rows(run)
    assert [r["round"] for r in got] == [1, 2] and all(r["num_clients"] == 2 for r in got)
    assert 0 < got[0]["epsilon"] < got[1]["epsilon"] < float("inf")
    if name == "fedsvd":  # the DP noise lands on B only: the saved A still has orthonormal rows
        saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        a_keys = [k for k in saved if ".lora_A." in k]
        assert a_keys
        for key in a_keys:
            a = saved[key].double()
            torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
