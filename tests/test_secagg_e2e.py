"""SecAgg+ in whole federations on the tiny model (``run_in_memory``: the product's round loop, strategy,
ClientApp and run directory, Flower's serialisation both ways, no Ray): a curious server's view, and
dropouts, wrong-length vectors and abandoned rounds compared with the same seed without secure
aggregation. The protocol alone, with exact sums, is in test_secagg.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message
from safetensors.torch import load_file
from scipy.stats import chisquare

from fedlora.core.config import ConfigError
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.core.model.arrays import fold_cores, is_head, is_lora_b, layer_of
from fedlora.core.protocol import secagg
from fedlora.core.protocol.codec import WeightedQuantiser
from fedlora.core.protocol.stopping import exchange
from fedlora.run import checkpoint
from fedlora.run.experiment import load_experiment, preflight
from fedlora.tasks.models import initial_state
from strategies import registry

ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path_factory.mktemp("d") / "t.csv")


def experiment(model: str, data: Path, *extra: str) -> Any:
    """Six clients, all sampled, one round of two local steps on the tiny model."""
    return preflight(
        load_experiment(
            None,
            [
                f'model.path="{model}"',
                f'data.source="{data}"',
                'data.label="topic"',
                f"data.labels={json.dumps(sorted(TOPICS))}",
                'data.partitioner="iid"',
                "data.max_length=16",
                "data.test_size=12",
                "federation.num_clients=6",
                "federation.rounds=1",
                "train.local_steps=2",
                *extra,
            ],
        )
    )


SECURE = (
    "secure_aggregation.enabled=true",
    "secure_aggregation.num_shares=1.0",
    "secure_aggregation.max_weight=20",
)


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Every reply the server receives (round loop and SecAgg+ stages), and ``drop``: partitions whose
    ``unmask`` replies are lost (clients gone after their masked vector arrived)."""
    seen: dict[str, Any] = {"replies": [], "drop": set()}

    def recording(
        grid: Any, messages: Any, timeout: Any, on_reply: Callable[..., None] | None = None
    ) -> list[Message]:
        replies = exchange(grid, messages, timeout, on_reply)
        seen["replies"].extend(replies)
        return [r for r in replies if not _unmask_of(r, seen["drop"])]

    monkeypatch.setattr("fedlora.run.rounds.exchange", recording)
    monkeypatch.setattr("fedlora.server.secagg.exchange", recording)
    yield seen


def _unmask_of(reply: Message, partitions: set[int]) -> bool:
    record = reply.content.config_records.get(secagg.RECORD) if not reply.has_error() else None
    return record is not None and secagg.OWNERS in record and int(record[secagg.PARTITION]) in partitions  # type: ignore[call-overload]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / ADAPTER))


def rows(run: Path, name: str = "rounds.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def bound(run: Path, cfg: Any) -> float:
    """Largest difference between the secure and the plain mean per coordinate: each client's value is
    off by less than one quantisation step of its weighted update, and the weights n_k / max_weight
    are quantised to 2**-bits (negligible here, added anyway)."""
    sa = cfg.secure_aggregation
    codec = WeightedQuantiser.of(sa)
    counts = [c["num_examples"] for c in rows(run, "clients.jsonl") if c["status"] == "ok"]
    ratios = [n / sa.max_weight for n in counts]
    return len(counts) * codec.step() / sum(ratios) + len(counts) * 2.0**-sa.quantization_bits


def uniform_p(vector: np.ndarray, modulus: int, bins: int = 16) -> float:
    counts = np.bincount((vector.astype(np.uint64) * bins // modulus).astype(np.int64), minlength=bins)
    return float(chisquare(counts).pvalue)


def test_a_curious_server_sees_uniform_vectors_and_the_plain_mean(
    run_in_memory, tiny_bert, topics_csv, wire
) -> None:  # type: ignore[no-untyped-def]
    """What the server receives under SecAgg+: per client, one vector that a chi-square test cannot tell
    from uniform on [0, 2**32) (the same test rejects the client's unmasked encoded update), and no
    array besides; the aggregate equals the plain run's within the quantisation bound."""
    plain_cfg = experiment(tiny_bert.path, topics_csv)
    plain = run_in_memory(plain_cfg, "plain")
    plain_replies = [r for r in wire["replies"] if "arrays" in r.content.array_records]
    wire["replies"].clear()
    cfg = experiment(tiny_bert.path, topics_csv, *SECURE)
    secure = run_in_memory(cfg, "secure")
    modulus = 2**cfg.secure_aggregation.modulus_bits
    with_arrays = [r for r in wire["replies"] if r.content.array_records]
    assert len(with_arrays) == 6 and all(set(r.content.array_records) == {secagg.MASKED} for r in with_arrays)
    for reply in with_arrays:
        assert (
            uniform_p(reply.content[secagg.MASKED][secagg.VECTOR].numpy(), modulus) > 1e-6
        )  # fresh masks: a correct run fails this once in a million
    assert all("label-counts" not in r.content.metric_records.get("metrics", {}) for r in wire["replies"])
    codec = WeightedQuantiser.of(cfg.secure_aggregation)
    for reply in plain_replies:  # the same update, encoded but not masked: far from uniform
        arrays = reply.content["arrays"]
        update = np.concatenate([arrays[k].numpy().reshape(-1) for k in sorted(arrays)])
        vector, _ = codec.encode(update * 0.01, 10.0, seed=0)
        assert uniform_p(vector, modulus) < 1e-12
    a, b = (checkpoint.load(run / "checkpoint.safetensors").global_state for run in (plain, secure))
    start = initial_state(cfg)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    print(f"secure vs plain: {gap:.3g}, bound {bound(secure, cfg):.3g}, update {moved:.3g}")
    assert gap <= bound(secure, cfg) < moved / 100
    assert rows(secure)[0]["secagg_abandoned"] == 0 and rows(secure)[0]["num_clients"] == 6


@pytest.mark.e2e
def test_dropouts_and_a_wrong_length_vector(run_in_memory, tiny_bert, topics_csv, wire) -> None:  # type: ignore[no-untyped-def]
    """Threshold 3 of 6: one client fails in training, one sends a vector of the wrong length (rejected,
    its masks removed as a dropout's), two vanish after their vectors arrived: the aggregate is the
    plain run's over the same clients, within the quantisation bound."""
    faults = ("faults.raise_fraction=0.17", "faults.corrupt_fraction=0.17")
    plain = run_in_memory(experiment(tiny_bert.path, topics_csv, *faults), "plain")
    cfg = experiment(
        tiny_bert.path, topics_csv, *SECURE, *faults, "secure_aggregation.reconstruction_threshold=3"
    )
    wire["drop"].update({0, 5})
    secure = run_in_memory(cfg, "secure")
    row = rows(secure)[0]
    assert (row["num_clients"], row["num_failed"], row["num_rejected"]) == (4, 1, 1)
    assert row["secagg_dropped"] == 2 and row["secagg_abandoned"] == 0
    rejected = [c for c in rows(secure, "clients.jsonl") if c["status"] == "rejected"]
    assert len(rejected) == 1 and "masked vector of shape" in rejected[0]["reason"]
    a, b = adapter(plain), adapter(secure)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= bound(secure, cfg)


@pytest.mark.e2e
def test_beyond_the_threshold_rounds_are_abandoned_and_the_run_goes_on(
    run_in_memory, tiny_bert, topics_csv
) -> None:  # type: ignore[no-untyped-def]
    """Four of six clients fail every round, threshold 3: nothing is aggregated, each round says so in
    rounds.jsonl, and the run finishes with the initial adapter."""
    extra = (
        "faults.raise_fraction=0.67",
        "federation.rounds=2",
        "secure_aggregation.reconstruction_threshold=3",
    )
    cfg = experiment(tiny_bert.path, topics_csv, *SECURE, *extra)
    secure = run_in_memory(cfg, "secure")
    assert [(r["round"], r["secagg_abandoned"], r["num_clients"]) for r in rows(secure)] == [
        (1, 1, 0),
        (2, 1, 0),
    ]
    assert json.loads((secure / "summary.json").read_text())["rounds"] == 2
    final = checkpoint.load(secure / "checkpoint.safetensors").global_state
    start = initial_state(cfg)
    assert final.keys() == start.keys() and all(torch.equal(final[k], start[k]) for k in start)


def test_a_max_weight_that_would_wrap_the_summed_weights_is_refused_in_preflight(
    tiny_bert, topics_csv
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        ConfigError,
        match=r"secure_aggregation.max_weight = 0.001 is too small: .* set secure_aggregation.max_weight > ",
    ):
        experiment(tiny_bert.path, topics_csv, *SECURE[:2], "secure_aggregation.max_weight=0.001")


def effective(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the adapter does to the model: per adapted layer the product B R A (B A without a core), and
    the head as it is. Factors alone are not comparable: an SVD (FedSVD's, Fed-SB's) may flip a
    singular vector's sign or swap two of nearly equal value for a tiny change of its input."""
    folded = fold_cores(state)
    out = {k: v for k, v in folded.items() if is_head(k)}
    for key, b in folded.items():
        if is_lora_b(key):
            out[layer_of(key)] = b.double() @ folded[f"{layer_of(key)}.lora_A.weight"].double()
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("name", registry.linear_strategies())
def test_every_strategy_with_a_linear_aggregate_runs_two_rounds_under_secagg(
    run_in_memory, tiny_bert, topics_csv, name: str
) -> None:  # type: ignore[no-untyped-def]
    """Each strategy that declares a weighted-sum aggregate (Fed-SB's cores from round 2 on, LA-LoRA's
    alternating factors, FedSA-LoRA's shared A, ...) trains two rounds under SecAgg+ with every client
    counted, and its adapter ends where the same seed without it ends, up to quantisation (whose error
    the second round's training carries on): within a tenth of how far the adapter moved."""
    extra = ("federation.rounds=2", f'strategy.name="{name}"')
    plain = run_in_memory(experiment(tiny_bert.path, topics_csv, *extra), "plain")
    cfg = experiment(tiny_bert.path, topics_csv, *SECURE, *extra)
    secure = run_in_memory(cfg, "secure")
    counted = [(r["num_clients"], r["secagg_abandoned"], r["secagg_shares"]) for r in rows(secure)]
    assert counted == [(6, 0, 6)] * 2
    raw = [
        checkpoint.load(plain / "checkpoint.safetensors").global_state,
        checkpoint.load(secure / "checkpoint.safetensors").global_state,
        initial_state(cfg),
    ]
    a, b, start = (effective(state) for state in raw)
    if all(torch.equal(a[k], start[k]) for k in a):  # nothing of the product is global (FedSA-LoRA: B stays)
        a, b, start = raw
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a if start[k].shape == a[k].shape)
    assert a.keys() == b.keys() and gap < moved / 10, (gap, moved)
