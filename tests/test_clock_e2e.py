"""The virtual clock in whole federations (in this process, tiny model): deterministic virtual times,
a slow class dropped under a deadline and waited for without one, FedBuff's steps and staleness, and
HetLoRA and FlexLoRA end to end with ranks by device class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedlora.core.config import ExperimentConfig
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.run.experiment import load_experiment, preflight

pytestmark = pytest.mark.e2e  # whole federations (in-process, tiny model): not in `make test-fast`

FAST_SLOW = (
    'devices.classes=[{name="fast", share=0.5, speed=1.0, uplink_mbps=8.0, downlink_mbps=16.0, '
    'latency_s=0.25}, {name="slow", share=0.5, speed=0.01, uplink_mbps=1.0, downlink_mbps=2.0, '
    "latency_s=0.5}]"
)


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path_factory.mktemp("d") / "t.csv")


def experiment(model: str, data: Path, *extra: str) -> ExperimentConfig:
    """Four clients, all sampled, two rounds of two local steps on the tiny model."""
    overrides = [
        f'model.path="{model}"',
        f'data.source="{data}"',
        'data.label="topic"',
        f"data.labels={json.dumps(sorted(TOPICS))}",
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=12",
        "federation.num_clients=4",
        "federation.min_clients=2",
        "federation.rounds=2",
        "train.local_steps=2",
        "devices.step_cost_s=0.5",
        *extra,
    ]
    return preflight(load_experiment(None, overrides))


def rows(run: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


def test_same_seed_same_virtual_times_to_the_last_digit(run_in_memory, tiny_bert, topics_csv) -> None:  # type: ignore[no-untyped-def]
    cfg = experiment(tiny_bert.path, topics_csv, FAST_SLOW)
    first, second = rows(run_in_memory(cfg, "a")), rows(run_in_memory(cfg, "b"))
    times = [(r["virtual_round_s"], r["virtual_time_s"]) for r in first]
    assert times == [(r["virtual_round_s"], r["virtual_time_s"]) for r in second]
    assert times[1][1] == times[0][1] + times[1][0]
    # without a deadline the round waits for the slow class: 2 steps x 0.5 s / 0.01 = 100 s of compute
    assert all(100.5 < r["virtual_round_s"] < 101 and r["num_clients"] == 4 for r in first)
    assert all(r["num_dropped"] == 0 and r["num_late"] == 0 for r in first)


def test_a_slow_class_misses_the_deadline_and_is_counted(run_in_memory, tiny_bert, topics_csv) -> None:  # type: ignore[no-untyped-def]
    cfg = experiment(tiny_bert.path, topics_csv, FAST_SLOW, "schedule.deadline_s=10.0")
    run = run_in_memory(cfg, "deadline")
    got = rows(run)
    assert all(r["num_clients"] == 2 and r["num_late"] == 2 and r["num_dropped"] == 2 for r in got)
    assert all(r["num_failed"] == 0 and r["virtual_round_s"] == 10.0 for r in got)
    assert got[-1]["virtual_time_s"] == 20.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_dropped"] == 4 and summary["virtual_time_s"] == 20.0
    clients = [json.loads(line) for line in (run / "clients.jsonl").read_text().splitlines()]
    assert len([c for c in clients if c["phase"] == "train"]) == 4  # the late ones were never asked


def test_without_device_classes_rows_have_no_clock(run_in_memory, tiny_bert, topics_csv) -> None:  # type: ignore[no-untyped-def]
    got = rows(run_in_memory(experiment(tiny_bert.path, topics_csv), "plain"))
    assert all("virtual_time_s" not in r and r["num_dropped"] == 0 for r in got)


@pytest.mark.parametrize("strategy", ["fedit", "ffa-lora"])
def test_fedbuff_runs_end_to_end_and_records_staleness(
    run_in_memory, tiny_bert, topics_csv, strategy
) -> None:  # type: ignore[no-untyped-def]
    fedbuff = (
        'schedule.mode="fedbuff"',
        "schedule.concurrency=3",
        "schedule.buffer=2",
        "federation.rounds=3",
    )
    cfg = experiment(tiny_bert.path, topics_csv, FAST_SLOW, f'strategy.name="{strategy}"', *fedbuff)
    run = run_in_memory(cfg, strategy)
    got = rows(run)
    assert [r["round"] for r in got] == [1, 2, 3] and all(r["num_clients"] == 2 for r in got)
    assert [r["virtual_time_s"] for r in got] == sorted(r["virtual_time_s"] for r in got)
    summary = json.loads((run / "summary.json").read_text())
    stale = [s for r in got for s in r["staleness"]]
    assert sum(summary["staleness_histogram"].values()) == len(stale) == 6
    assert summary["staleness_histogram"] == {str(s): stale.count(s) for s in sorted(set(stale))}
    clients = [json.loads(line) for line in (run / "clients.jsonl").read_text().splitlines()]
    assert sorted(c["staleness"] for c in clients if c["phase"] == "train") == sorted(stale)
    if strategy == "fedit":  # the same seed, the same steps: arrivals come from the virtual clock
        again = rows(run_in_memory(cfg, "again"))
        assert [untimed(r) for r in again] == [untimed(r) for r in got]


def untimed(row: dict) -> dict:  # type: ignore[type-arg]
    return {k: v for k, v in row.items() if k not in ("wall_s", "aggregate_s")}


RANKED = 'devices.classes=[{name="phone", share=0.5, speed=0.25, rank=2}, {name="laptop", share=0.5, rank=8}]'


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora"])
def test_heterogeneous_ranks_by_device_class_end_to_end(
    run_in_memory, tiny_bert, topics_csv, strategy
) -> None:  # type: ignore[no-untyped-def]
    extra = ["strategy.options={prune_weight=0.01}"] if strategy == "hetlora" else []
    cfg = experiment(tiny_bert.path, topics_csv, RANKED, f'strategy.name="{strategy}"', *extra)
    run = run_in_memory(cfg, strategy)
    got = rows(run)
    assert [r["num_clients"] for r in got] == [4, 4] and all(r["num_rejected"] == 0 for r in got)
    assert all(r["eval_accuracy"] is not None for r in got)
    clients = [json.loads(line) for line in (run / "clients.jsonl").read_text().splitlines()]
    if strategy == "hetlora":  # the pruning penalty's tail norms travel back
        assert all("tail_norm_before" in c and "tail_norm_after" in c for c in clients)
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert {v.shape[0] for k, v in saved.items() if ".lora_A." in k} == {8}  # the global adapter: r_max
