"""Compressed updates (``[compression]``): the codecs' error bounds and exact sizes, updates instead of
values, error feedback's bookkeeping, and the configuration's refusals. Whole federations with each
codec are in tests/test_compression_e2e.py."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from clients.local import encode_reply
from fedlora.core.config import CompressionConfig, ConfigError, ExperimentConfig, from_dict
from fedlora.core.model import codecs
from fedlora.core.model.arrays import from_arrays, payload_bytes, to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.core.records.store import ClientStore
from fedlora.core.transport import check_compression
from fedlora.run.experiment import load_experiment
from fedlora.server import replies
from tests.helpers import client_state

CODECS = ("fp16", "bf16", "int8")

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps the messages built here


def spread(seed: int, shape: tuple[int, ...] = (6, 40)) -> torch.Tensor:
    """Values over many magnitudes (1e-9 to 1e2), both signs, one zero row: a hard case for every codec."""
    g = torch.Generator().manual_seed(seed)
    magnitudes = 10.0 ** (torch.rand(shape, generator=g) * 11 - 9)
    values = magnitudes * torch.sign(torch.randn(shape, generator=g))
    if len(shape) >= 2:
        values[1] = 0.0
    return values.float()


def roundtrip(tensor: torch.Tensor, codec: str) -> torch.Tensor:
    """``tensor`` encoded, sent through Flower's protobuf form and bytes, and decoded."""
    message = Message(RecordDict({"a": to_arrays({"x": tensor}, codec)}), dst_node_id=1, message_type="train")
    back = message_from_proto(ProtoMessage.FromString(message_to_proto(message).SerializeToString()))
    return from_arrays(back.content["a"])["x"]


@pytest.mark.parametrize("shape", [(6, 40), (40,), (3, 4, 5)])
def test_fp16_error_is_within_half_precision(shape: tuple[int, ...]) -> None:
    """Relative error <= 2^-11 in fp16's normal range, absolute error <= 2^-25 below it."""
    x = spread(0, shape)
    x = x.clamp(-60000, 60000)
    got = roundtrip(x, "fp16")
    assert got.dtype == torch.float32 and got.shape == x.shape
    err = (got - x).abs()
    normal = x.abs() >= 2**-14
    assert normal.any() and (~normal).any()
    assert bool((err[normal] <= 2**-11 * x.abs()[normal]).all())
    assert bool((err[~normal] <= 2**-25).all())


def test_fp16_overflow_becomes_infinite_and_is_rejected() -> None:
    """fp16 tops out at 65504: a larger value decodes to infinity, which validation refuses."""
    got = roundtrip(torch.tensor([[1e5, 1.0]]), "fp16")
    assert math.isinf(float(got[0, 0])) and float(got[0, 1]) == 1.0


@pytest.mark.parametrize("shape", [(6, 40), (40,)])
def test_bf16_error_is_within_eight_bits_over_the_whole_range(shape: tuple[int, ...]) -> None:
    """Relative error <= 2^-8 for every value, however small or large (float32's exponent)."""
    x = spread(1, shape) * 1e10
    got = roundtrip(x, "bf16")
    assert got.dtype == torch.float32
    assert bool(((got - x).abs() <= 2**-8 * x.abs()).all())
    assert not torch.equal(got, x)  # it does lose precision


@pytest.mark.parametrize("shape", [(6, 40), (40,), (3, 4, 5), (5, 1)])
def test_int8_error_is_within_half_a_row_scale(shape: tuple[int, ...]) -> None:
    """Each value within scale/2 of the original, scale = max|row| / 127 per row (first dimension;
    a vector is one row); zero rows stay exactly zero; each row's largest value is exact."""
    x = spread(2, shape)
    got = roundtrip(x, "int8")
    rows = x.reshape(codecs.rows_of(shape), -1)
    scales = rows.abs().amax(dim=1) / 127
    err = (got.reshape(rows.shape) - rows).abs()
    assert bool((err <= scales[:, None] / 2 * (1 + 1e-6)).all())
    peak = rows.abs().argmax(dim=1)
    decoded = got.reshape(rows.shape)
    torch.testing.assert_close(decoded.gather(1, peak[:, None]), rows.gather(1, peak[:, None]))
    if len(shape) >= 2 and shape[1] > 1:
        assert bool((got[1] == 0).all())


def test_int8_row_with_nan_decodes_to_nan() -> None:
    """A non-finite value spoils its row (and only its row), so the server can reject the reply."""
    x = torch.ones(3, 4)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    got = roundtrip(x, "int8")
    assert bool(torch.isnan(got[1]).all()) and bool(torch.isnan(got[2]).all())
    assert torch.equal(got[0], x[0])


@pytest.mark.parametrize("codec", ("none", *CODECS))
def test_byte_counts_are_exactly_what_travels(codec: str) -> None:
    """``payload_bytes``: 2 bytes a value for fp16 and bf16; one a value plus a float32 scale per row for
    int8; none = NumPy's float32 format (4 bytes a value plus its header)."""
    state = {"a": torch.randn(8, 96), "b": torch.randn(96, 8), "v": torch.randn(3)}
    record = to_arrays(state, codec)
    sizes = {k: len(arr.data) for k, arr in record.items()}
    expected = {
        "none": {k: 4 * v.numel() + 128 for k, v in state.items()},
        "fp16": {"a": 2 * 768, "b": 2 * 768, "v": 6},
        "bf16": {"a": 2 * 768, "b": 2 * 768, "v": 6},
        "int8": {"a": 768 + 4 * 8, "b": 768 + 4 * 96, "v": 3 + 4},
    }[codec]
    assert sizes == expected
    assert payload_bytes(record) == sum(expected.values())
    if codec != "none":
        assert all(codecs.encoded_bytes(tuple(state[k].shape), codec) == expected[k] for k in state)


def test_encoded_arrays_refuse_to_be_read_as_numpy_and_bad_lengths_are_errors() -> None:
    """Nothing can take int8 levels for values by accident; a truncated array is an error, not garbage."""
    record = to_arrays({"x": torch.randn(4, 4)}, "int8")
    arr = record["x"]
    with pytest.raises(TypeError):
        arr.numpy()
    arr.data = arr.data[:-1]
    with pytest.raises(ValueError, match="int8 array of shape \\(4, 4\\) has 31 bytes, expected 32"):
        from_arrays(record)


def test_uncompressed_arrays_are_unchanged() -> None:
    """``none`` is Flower's own float32 format, byte for byte (runs without [compression] are unchanged)."""
    from flwr.app import ArrayRecord

    state = client_state(0)
    state = {k: v.float() for k, v in state.items()}
    ours, flowers = to_arrays(state), ArrayRecord(dict(state))
    assert [(a.stype, a.dtype, a.data) for a in ours.values()] == [
        (a.stype, a.dtype, a.data) for a in flowers.values()
    ]


def test_deltas_and_their_inverse() -> None:
    """Updates are reply minus received where key and shape match; other arrays travel as they are."""
    received = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    reply = {"a": torch.full((2, 3), 3.0), "b": torch.ones(5), "c": torch.full((2,), 7.0)}
    update = codecs.deltas(reply, received)
    assert torch.equal(update["a"], torch.full((2, 3), 2.0))
    assert torch.equal(update["b"], reply["b"]) and torch.equal(update["c"], reply["c"])
    back = codecs.add_deltas(update, received)
    assert all(torch.equal(back[k], reply[k]) for k in reply)


def store(tmp_path: Any = None, round_: int = 1) -> ClientStore:
    """A client's state store: files under ``tmp_path`` when given, else the node's Context."""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return ClientStore(context, str(tmp_path) if tmp_path else None, 0, round_)


@pytest.mark.parametrize("codec", CODECS)
def test_error_feedback_telescopes(tmp_path, codec: str) -> None:  # type: ignore[no-untyped-def]
    """Over rounds, the updates the server decodes plus the client's final residual add up to the true
    updates: nothing the codec drops is lost, it arrives later (the residual lives in the client's store)."""
    received = {k: v.float() for k, v in client_state(0).items()}
    true_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in received.items()}
    sent_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in received.items()}
    compression = CompressionConfig(uplink=codec, error_feedback=True)
    for t in range(1, 7):
        g = torch.Generator().manual_seed(t)
        update = {k: torch.randn(v.shape, generator=g) * 10.0 ** -(t % 4) for k, v in received.items()}
        reply = {k: received[k] + update[k] for k in received}
        record = encode_reply(compression, store(tmp_path, t), received, reply)
        decoded = from_arrays(record)
        for k in received:
            true_sum[k] += update[k].double()
            sent_sum[k] += decoded[k].double()
    residual = store(tmp_path, 7).load_arrays(protocol.RESIDUAL)
    assert residual is not None and set(residual) == set(received)
    for k in received:
        assert (sent_sum[k] - true_sum[k]).abs().max() > 1e-6  # the codec did lose something each round
        torch.testing.assert_close(sent_sum[k] + residual[k].double(), true_sum[k], atol=1e-5, rtol=1e-5)


def test_without_error_feedback_the_loss_is_not_kept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    received = {"a": torch.zeros(2, 8)}
    compression = CompressionConfig(uplink="int8")
    encode_reply(compression, store(tmp_path), received, {"a": torch.randn(2, 8)})
    assert store(tmp_path, 2).load_arrays(protocol.RESIDUAL) is None


def test_error_feedback_keeps_residuals_of_arrays_not_sent_and_drops_non_finite_ones() -> None:
    """RoLoRA sends A and B in turns: A's residual waits for the next A round. A NaN update (a faulty
    client) resets that array's residual instead of poisoning every later round."""
    previous = {"a": torch.full((2,), 0.5), "b": torch.full((2,), 0.25)}
    sent = {"b": torch.tensor([1.0, float("nan")])}
    decoded = {"b": torch.tensor([1.0, float("nan")])}
    residual = codecs.residual_of(sent, decoded, previous)
    assert set(residual) == {"a"} and torch.equal(residual["a"], previous["a"])


def test_server_adds_updates_to_what_it_sent() -> None:
    """A reply carrying an encoded update reads as what was sent plus the decoded update (float32)."""
    sent = {"a": torch.randn(4, 16)}
    update = {"a": torch.randn(4, 16) * 1e-3}
    metrics = MetricRecord({protocol.PARTITION_ID: 0, protocol.NUM_EXAMPLES: 5})
    reply = Message(
        RecordDict({protocol.ARRAYS: to_arrays(update, "int8"), protocol.METRICS: metrics}),
        dst_node_id=1,
        message_type="train",
    )
    got = replies.arrays_of(reply, sent, updates=True)
    scale = update["a"].abs().amax(dim=1, keepdim=True) / 127
    assert bool(((got["a"] - sent["a"] - update["a"]).abs() <= scale / 2 + 1e-7).all())
    spec = {"a": ((4, 16), torch.float32)}
    assert replies.problem(reply, spec, sent, 0.0, updates=True) is None
    assert "update norm" in str(replies.problem(reply, spec, sent, 1e-6, updates=True))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"uplink": "fp8"}, "compression.uplink = 'fp8' is invalid: expected one of none, fp16, bf16, int8"),
        ({"downlink": 16}, "compression.downlink = 16 is invalid: expected a string"),
        ({"error_feedback": True}, "compression.error_feedback = true needs compression.uplink = fp16"),
        ({"level": 3}, "unknown key 'compression.level'"),
    ],
)
def test_bad_compression_settings_are_one_line_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(")", "\\)")) as info:
        from_dict({"compression": table})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("strategy", ["flora", "fedex-lora", "lora-fair"])
def test_error_feedback_is_refused_for_strategies_that_combine_factors(strategy: str) -> None:
    overrides = [f'strategy.name="{strategy}"', 'compression.uplink="int8"']
    overrides.append("compression.error_feedback=true")
    with pytest.raises(ConfigError, match=f"cannot be used with strategy '{strategy}'") as info:
        load_experiment(None, overrides)
    assert "\n" not in str(info.value)
    assert load_experiment(None, overrides[:2]).compression.uplink == "int8"  # compression alone is fine


@pytest.mark.parametrize("strategy", ["fedit", "ffa-lora", "rolora", "fedsvd", "fedsa-lora"])
@pytest.mark.parametrize("privacy", ["none", "dp-sgd", "dp-updates"])
def test_error_feedback_is_allowed_for_linear_strategies_under_dp(strategy: str, privacy: str) -> None:
    """Allowed under DP too (docs/privacy.md, Compression): what it feeds back is a function of what the
    client may release (dp-sgd, client-placed noise) or goes to the trusted server (server placement)."""
    overrides = [
        f'strategy.name="{strategy}"',
        f'privacy.mode="{privacy}"',
        'compression.uplink="int8"',
        "compression.error_feedback=true",
    ]
    if privacy != "none":
        overrides.append("privacy.noise_multiplier=1.0")
    assert load_experiment(None, overrides).compression.error_feedback


def test_compression_is_refused_with_secure_aggregation_on() -> None:
    """Once a [secure_aggregation] table with an ``enabled`` switch exists, the two exclude each other."""
    cfg = ExperimentConfig(compression=CompressionConfig(uplink="fp16"))
    check_compression(cfg)  # no such table yet: fine
    shadow = SimpleNamespace(compression=cfg.compression, secure_aggregation=SimpleNamespace(enabled=True))
    with pytest.raises(ConfigError, match="cannot be combined with secure aggregation"):
        check_compression(shadow)  # type: ignore[arg-type]
    shadow.secure_aggregation.enabled = False
    check_compression(shadow)  # type: ignore[arg-type]
    plain = SimpleNamespace(compression=CompressionConfig(), secure_aggregation=SimpleNamespace(enabled=True))
    check_compression(plain)  # type: ignore[arg-type]
