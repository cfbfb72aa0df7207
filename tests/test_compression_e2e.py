"""Whole federations with compressed updates, in this process on the tiny model (``federate``): every
message and reply goes through Flower's protobuf form, so what rounds.jsonl counts is what travelled.
The codecs themselves are tested in tests/test_compression.py."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedlora.core.config import ExperimentConfig
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.core.model.arrays import layer_of, payload_bytes, to_arrays
from fedlora.core.model.codecs import encoded_bytes
from fedlora.core.protocol import keys as protocol
from fedlora.core.training import faults
from fedlora.run.experiment import load_experiment, preflight
from fedlora.tasks.models import initial_state

pytestmark = pytest.mark.e2e  # whole federations (in-process, tiny model): not in `make test-fast`

CODECS = ("fp16", "bf16", "int8")
CLIENTS_PER_ROUND = 2


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path_factory.mktemp("d") / "t.csv")


def experiment(model: str, data: Path, *extra: str) -> ExperimentConfig:
    """Three clients, two sampled a round, two rounds of two local steps on the tiny model."""
    overrides = [
        f'model.path="{model}"',
        f'data.source="{data}"',
        'data.label="topic"',
        f"data.labels={json.dumps(sorted(TOPICS))}",
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=12",
        "federation.num_clients=3",
        "federation.fraction=0.67",
        "federation.rounds=2",
        "train.local_steps=2",
        *extra,
    ]
    return preflight(load_experiment(None, overrides))


def rows(run: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(federate, tiny_bert, topics_csv, tmp_path_factory) -> Callable[..., tuple[ExperimentConfig, Path]]:  # type: ignore[no-untyped-def]
    """``runs(*overrides)``: the config and run directory of that experiment, made on first use."""
    base = tmp_path_factory.mktemp("compression")
    done: dict[tuple[str, ...], tuple[ExperimentConfig, Path]] = {}

    def get(*overrides: str) -> tuple[ExperimentConfig, Path]:
        if overrides not in done:
            cfg = experiment(tiny_bert.path, topics_csv, *overrides)
            done[overrides] = cfg, federate(cfg, base / f"run-{len(done)}")
        return done[overrides]

    return get


def both_ways(codec: str) -> tuple[str, str]:
    return f'compression.uplink="{codec}"', f'compression.downlink="{codec}"'


@pytest.mark.parametrize("codec", CODECS)
def test_bytes_per_round_are_the_codecs_exact_share(runs, codec: str) -> None:  # type: ignore[no-untyped-def]
    """FedIT sends the whole adapter down and gets it back: with a codec each round's uplink_bytes and
    downlink_bytes are the clients times the encoded sizes of the adapter's arrays (2 bytes a value, or
    1 plus a float32 scale per row), against NumPy's float32 arrays without; the run still learns the
    same way (its test loss stays close to the uncompressed run's)."""
    cfg, plain = runs()
    _, packed = runs(*both_ways(codec))
    state = initial_state(cfg)
    full = payload_bytes(to_arrays(state))
    small = sum(encoded_bytes(tuple(v.shape), codec) for v in state.values())
    for before, after in zip(rows(plain), rows(packed), strict=True):
        assert before["num_clients"] == after["num_clients"] == CLIENTS_PER_ROUND
        assert before["uplink_bytes"] == before["downlink_bytes"] == CLIENTS_PER_ROUND * full
        assert after["uplink_bytes"] == after["downlink_bytes"] == CLIENTS_PER_ROUND * small
    ratio = small / full
    assert {"fp16": 0.4 < ratio < 0.5, "bf16": 0.4 < ratio < 0.5, "int8": 0.25 < ratio < 0.4}[codec], ratio
    last_plain, last_packed = rows(plain)[-1], rows(packed)[-1]
    assert math.isfinite(last_packed["eval_loss"])
    assert abs(last_packed["eval_loss"] - last_plain["eval_loss"]) < 0.05


def test_error_feedback_keeps_each_clients_residual(runs) -> None:  # type: ignore[no-untyped-def]
    """With error feedback every client that trained keeps what int8 lost, keyed like its reply."""
    cfg, run = runs(*both_ways("int8"), "compression.error_feedback=true", "federation.rounds=3")
    assert [r["round"] for r in rows(run)] == [1, 2, 3] and all(r["num_rejected"] == 0 for r in rows(run))
    saved = sorted((run / "client_state").glob(f"client-*/{protocol.RESIDUAL}.r*.safetensors"))
    assert {p.parent.name for p in saved} == {"client-0", "client-1", "client-2"}
    from safetensors.torch import load_file

    residual = load_file(str(saved[-1]))
    assert set(residual) == set(initial_state(cfg))
    assert any(float(v.abs().max()) > 0 for v in residual.values())


def test_fedex_offsets_travel_compressed(runs) -> None:  # type: ignore[no-untyped-def]
    """FedEx-LoRA's full-rank base offsets go down with the downlink codec, counted as encoded."""
    cfg, run = runs('strategy.name="fedex-lora"', 'compression.downlink="int8"')
    state = initial_state(cfg)
    adapter = sum(encoded_bytes(tuple(v.shape), "int8") for v in state.values())
    layers = {layer_of(k) for k in state if ".lora_A." in k}
    shapes = [(state[f"{n}.lora_B.weight"].shape[0], state[f"{n}.lora_A.weight"].shape[1]) for n in layers]
    offsets = sum(encoded_bytes(shape, "int8") for shape in shapes)
    first, second = rows(run)
    assert first["downlink_bytes"] == CLIENTS_PER_ROUND * adapter  # no offsets before the first merge
    assert second["downlink_bytes"] == CLIENTS_PER_ROUND * (adapter + offsets)
    assert first["uplink_bytes"] == CLIENTS_PER_ROUND * payload_bytes(to_arrays(state))  # uplink plain


def test_dp_updates_with_client_noise_and_error_feedback(runs) -> None:  # type: ignore[no-untyped-def]
    """Client-placed noise, then the int8 codec with error feedback on the noised update: the run
    completes and accounts epsilon as without compression."""
    dp = ('privacy.mode="dp-updates"', 'privacy.placement="client"', "privacy.noise_multiplier=1.0")
    _, run = runs(*dp, 'compression.uplink="int8"', "compression.error_feedback=true")
    _, plain = runs(*dp)
    assert [r["epsilon"] for r in rows(run)] == [r["epsilon"] for r in rows(plain)]
    assert all(math.isfinite(r["eval_loss"]) for r in rows(run))


def test_a_nan_reply_is_still_rejected_after_int8(runs) -> None:  # type: ignore[no-untyped-def]
    """A client replying NaN is caught after decoding (a row with NaN decodes to NaN throughout); the
    others are aggregated."""
    cfg, run = runs('compression.uplink="int8"', "faults.nan_fraction=0.34", "federation.min_clients=1")
    lines = [json.loads(line) for line in (run / "clients.jsonl").read_text().splitlines()]
    seen = {(c["round"], c["partition_id"]): c["status"] for c in lines if c["phase"] == "train"}
    nan = {(r, pid) for r in (1, 2) for pid, fault in faults.assignment(cfg, r).items() if fault == "nan"}
    assert seen and nan & set(seen)
    assert all((status == "rejected") == (key in nan) for key, status in seen.items())


def test_flora_stacks_travel_in_float32(runs) -> None:  # type: ignore[no-untyped-def]
    """FLoRA's head goes down with the codec, its stacked factors in float32 (each client merges them
    into offsets it keeps, where a rounding error would stay); the fresh adapters go up encoded."""
    cfg, run = runs('strategy.name="flora"', *both_ways("int8"))
    state = initial_state(cfg)
    head = {k: v for k, v in state.items() if ".lora_" not in k}
    head_bytes = sum(encoded_bytes(tuple(v.shape), "int8") for v in head.values())
    stacked = CLIENTS_PER_ROUND * cfg.lora.rank
    stacks: dict[str, torch.Tensor] = {}
    for layer in {layer_of(k) for k in state if ".lora_A." in k}:
        d_in, d_out = state[f"{layer}.lora_A.weight"].shape[1], state[f"{layer}.lora_B.weight"].shape[0]
        stacks[f"{layer}.A"], stacks[f"{layer}.B"] = torch.zeros(stacked, d_in), torch.zeros(d_out, stacked)
    first, second = rows(run)
    assert first["downlink_bytes"] == CLIENTS_PER_ROUND * head_bytes
    # round 2: every client holds round 0's offsets (all it confirmed), so gets round 1's stacks
    assert second["downlink_bytes"] == CLIENTS_PER_ROUND * (head_bytes + payload_bytes(to_arrays(stacks)))
    adapter = sum(encoded_bytes(tuple(v.shape), "int8") for v in state.values())
    assert first["uplink_bytes"] == CLIENTS_PER_ROUND * adapter


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_heterogeneous_ranks_travel_compressed_at_each_clients_rank(runs, name: str) -> None:  # type: ignore[no-untyped-def]
    """HetLoRA and FlexLoRA send each client an adapter cut to its rank and get one of that rank back:
    under int8 each round carries about a third of the float32 bytes both ways (a byte per value and a
    float32 scale per row), and the run keeps its clients and a finite loss."""
    strategy = (f'strategy.name="{name}"', "strategy.options.ranks=[2, 4]")
    _, plain = runs(*strategy)
    _, packed = runs(*strategy, *both_ways("int8"))
    for before, after in zip(rows(plain), rows(packed), strict=True):
        assert before["num_clients"] == after["num_clients"] == CLIENTS_PER_ROUND
        assert after["num_rejected"] == 0
        assert 0.25 < after["uplink_bytes"] / before["uplink_bytes"] < 0.4
        assert 0.25 < after["downlink_bytes"] / before["downlink_bytes"] < 0.4
    assert math.isfinite(rows(packed)[-1]["eval_loss"])
