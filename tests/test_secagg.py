"""SecAgg+ on the Message API, without a model: the server's stages (:mod:`fedlora.server.secagg`) against
the real ClientApp's stage handler (``clients/app.py`` -> :mod:`clients.secagg`), the clients' masking
played by the test with chosen integer vectors, so that every sum is known exactly. Also the codec, the
checks on a masked reply, and the refusals at load. Whole federations are in test_secagg_e2e.py.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from scipy.stats import chisquare

from clients import secagg as client
from clients.app import app
from fedlora.core.config import ConfigError, ExperimentConfig, from_dict
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol import secagg
from fedlora.core.protocol.codec import WeightedQuantiser
from fedlora.core.records.store import ClientStore
from fedlora.run.experiment import load_experiment
from fedlora.server.secagg import SecureRound, vector_problem

MODULUS = 2**32

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps messages with a run id


def uniformity(vector: np.ndarray, modulus: int = MODULUS, bins: int = 32) -> float:
    """Chi-square p-value of ``vector`` against the uniform distribution on [0, modulus), in ``bins``
    equal bins."""
    counts = np.bincount((vector.astype(np.uint64) * bins // modulus).astype(np.int64), minlength=bins)
    return float(chisquare(counts).pvalue)


class StageGrid:
    """Flower's Grid contract answered by the real ClientApp for the stage messages, one node per
    partition; ``fail[stage]`` names partitions that raise in that stage (an error reply, as Flower's)."""

    def __init__(self, partitions: int) -> None:
        self.contexts = {
            pid + 1: Context(run_id=1, node_id=pid + 1, node_config={}, state=RecordDict(), run_config={})
            for pid in range(partitions)
        }
        self.fail: dict[str, set[int]] = {}
        self.received: list[Message] = []
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"{len(self._replies)}-{i}-{random.random()}"
            stage = str(message.content.config_records[secagg.RECORD][secagg.STAGE])
            pid = message.metadata.dst_node_id - 1
            if pid in self.fail.get(stage, set()):
                reply = Message(Error(code=0, reason="gone"), reply_to=message)
            else:
                try:
                    reply = app(message, self.contexts[message.metadata.dst_node_id])
                except ValueError as exc:  # a client that refuses answers with an error, as in Flower
                    reply = Message(Error(code=0, reason=str(exc)), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        out = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        self.received.extend(out)
        return out


def experiment(clients: int, **secure: Any) -> ExperimentConfig:
    return from_dict(
        {
            "federation": {"num_clients": clients, "round_timeout": 5.0},
            "secure_aggregation": {"enabled": True, **secure},
        }
    )


def training_messages(cfg: ExperimentConfig, state_dir: Path, pids: list[int]) -> list[Message]:
    config = ConfigRecord(
        {
            protocol.EXPERIMENT: cfg.to_toml(),
            protocol.SERVER_ROUND: 1,
            protocol.STATE_DIR: str(state_dir),
        }
    )
    return [
        Message(
            RecordDict({protocol.CONFIG: ConfigRecord({**dict(config), protocol.ASSIGNED_PARTITION: pid})}),
            message_type=MessageType.TRAIN,
            dst_node_id=pid + 1,
        )
        for pid in pids
    ]


def play_round(
    cfg: ExperimentConfig,
    tmp_path: Path,
    vectors: dict[int, np.ndarray],
    *,
    fail: dict[str, set[int]] | None = None,
) -> tuple[np.ndarray | None, dict[int, np.ndarray], SecureRound, StageGrid]:
    """One round: setup and share-keys through the ClientApp, the collect stage played here (clients
    mask ``vectors``; those in ``fail['collect-masked-vectors']`` send nothing), unmask through the
    ClientApp. Returns (the unmasked sum or None, the masked vectors the server received, the round,
    the grid)."""
    grid = StageGrid(cfg.federation.num_clients)
    grid.fail = fail or {}
    pids = sorted(vectors)
    server = SecureRound(cfg)
    out = server.open(grid, 1, training_messages(cfg, tmp_path, pids), pids)  # type: ignore[arg-type]
    masked = {}
    for message in out:
        pid = message.metadata.dst_node_id - 1
        if pid in grid.fail.get(secagg.COLLECT, set()):
            continue
        store = ClientStore(grid.contexts[pid + 1], str(tmp_path), pid, 1)
        secrets = client.receive_shares(message, store, pid, 1)
        record = client.masked_record(secrets, store, vectors[pid], server.modulus)
        masked[pid] = record[secagg.VECTOR].numpy().astype(np.int64)
    total = server.close(grid, masked) if out else None  # type: ignore[arg-type]
    return total, masked, server, grid


def random_vectors(pids: list[int], length: int = 4000, seed: int = 0) -> dict[int, np.ndarray]:
    """Quantised-looking vectors: small integers around 2**21, as Flower's quantiser makes them."""
    rng = np.random.default_rng(seed)
    return {pid: (2**21 + rng.integers(-3000, 3000, size=length)).astype(np.int64) for pid in pids}


# ----- the curious server ----------------------------------------------------------------------------


def test_each_masked_vector_is_uniform_and_the_sum_is_exact(tmp_path: Path) -> None:
    """Every array the server receives from a client looks uniform on the field (chi-square), which the
    unmasked vectors are far from; the unmasked sum is exactly the sum of the clients' vectors.

    The masks come from fresh key pairs, so under uniformity each p-value is itself uniform: a 1e-6
    threshold fails a correct protocol once in 200,000 runs of this test (five vectors); an unmasked or
    badly masked vector scores below 1e-12."""
    cfg = experiment(5, num_shares=1.0)
    vectors = random_vectors(list(range(5)))
    total, masked, server, grid = play_round(cfg, tmp_path, vectors)
    assert total is not None
    np.testing.assert_array_equal(total, sum(vectors.values()) % MODULUS)
    for pid in vectors:
        assert uniformity(masked[pid]) > 1e-6
        assert uniformity(vectors[pid]) < 1e-12
    assert server.stats.shares == 5 and server.stats.threshold == 3 and not server.stats.abandoned
    arrays = [r for r in grid.received if r.content.array_records]
    assert arrays == []  # the stages carry keys, ciphertexts and shares only: no vector in the clear


def test_secrets_are_deleted_after_unmasking(tmp_path: Path) -> None:
    cfg = experiment(3, num_shares=1.0)
    play_round(cfg, tmp_path, random_vectors([0, 1, 2]))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# ----- dropouts ------------------------------------------------------------------------------------------


def test_dropouts_after_masking_up_to_the_threshold_still_unmask(tmp_path: Path) -> None:
    """5 clients, threshold 3: two whose vectors arrived vanish before unmask (their self-masks are rebuilt
    from the others' shares): the sum of all five; two whose vectors never arrive: the sum of three."""
    cfg = experiment(5, num_shares=1.0)
    vectors = random_vectors(list(range(5)), seed=1)
    total, _, server, _ = play_round(cfg, tmp_path / "a", vectors, fail={secagg.UNMASK: {1, 3}})
    assert total is not None
    np.testing.assert_array_equal(total, sum(vectors.values()) % MODULUS)
    total, _, server, _ = play_round(cfg, tmp_path / "b", vectors, fail={secagg.COLLECT: {0, 4}})
    assert total is not None and server.stats.dropped == 2
    np.testing.assert_array_equal(total, (vectors[1] + vectors[2] + vectors[3]) % MODULUS)


def test_beyond_the_threshold_the_round_is_abandoned(tmp_path: Path) -> None:
    cfg = experiment(5, num_shares=1.0)
    vectors = random_vectors(list(range(5)), seed=2)
    for i, fail in enumerate(
        [{secagg.UNMASK: {0, 1, 2}}, {secagg.COLLECT: {0, 1, 2}}, {secagg.SETUP: {0, 1, 2}}]
    ):
        total, _, server, _ = play_round(cfg, tmp_path / str(i), vectors, fail=fail)
        assert total is None and server.stats.abandoned


def test_a_sparse_neighbourhood_survives_dropouts(tmp_path: Path) -> None:
    """SecAgg+'s logarithmic degree: 20 clients share with 11 each (threshold 7); one client fails in
    share-keys and two send no vector: the sum of the other seventeen, exactly."""
    cfg = experiment(20)
    vectors = random_vectors(list(range(20)), length=500, seed=3)
    fail = {secagg.SHARE_KEYS: {5}, secagg.COLLECT: {7, 13}}
    total, _, server, _ = play_round(cfg, tmp_path, vectors, fail=fail)
    assert server.stats.shares == 11 and server.stats.threshold == 7
    assert total is not None
    np.testing.assert_array_equal(total, sum(v for p, v in vectors.items() if p not in (5, 7, 13)) % MODULUS)


# ----- the rules of the protocol ---------------------------------------------------------------------


def test_share_and_threshold_counts() -> None:
    assert [secagg.share_count(0, m) for m in (2, 3, 5, 10, 100, 1000)] == [2, 3, 5, 9, 15, 21]
    assert secagg.share_count(1.0, 10) == 10 and secagg.share_count(0.5, 10) == 5
    assert secagg.share_count(4, 10) == 5  # odd below m
    assert secagg.threshold_count(0.6, 5) == 3 and secagg.threshold_count(0.1, 5) == 2
    assert secagg.threshold_count(4, 3) == 3


def test_neighbourhoods_are_symmetric() -> None:
    hoods = secagg.neighbourhoods(list(range(30)), 7, random.Random(0))
    assert all(len(h) == 7 and p in h for p, h in hoods.items())
    assert all(p in hoods[q] for p, h in hoods.items() for q in h)


def test_secrets_round_trip() -> None:
    secrets = secagg.client_setup(3, 2, 5, 3)
    secrets.keys = {1: (b"a", b"b"), 3: (secrets.pk1, secrets.pk2)}
    secrets.seed_shares, secrets.sk1_shares = {1: b"x"}, {1: b"y"}
    assert secagg.ClientSecrets.from_record(secrets.to_record()) == secrets


def test_a_client_refuses_stages_out_of_order(tmp_path: Path) -> None:
    cfg = experiment(3, num_shares=1.0)
    grid = StageGrid(3)
    (message,) = training_messages(cfg, tmp_path, [0])
    keys = {secagg.STAGE: secagg.SHARE_KEYS, f"{secagg.KEYS_PREFIX}0": [b"a", b"b"]}
    message.content[secagg.RECORD] = ConfigRecord(keys)
    with pytest.raises(ValueError, match="expected this round's secrets after 'setup'"):
        app(message, grid.contexts[1])


def test_a_client_refuses_a_threshold_the_experiment_does_not_give(tmp_path: Path) -> None:
    cfg = experiment(5, num_shares=1.0)
    (message,) = training_messages(cfg, tmp_path, [0])
    setup = {secagg.STAGE: secagg.SETUP, secagg.SAMPLED: 5, secagg.SHARES: 5, secagg.THRESHOLD: 2}
    message.content[secagg.RECORD] = ConfigRecord(setup)
    with pytest.raises(
        ValueError, match="threshold 2 among 5 clients; the experiment's settings give 5 and 3"
    ):
        app(message, StageGrid(1).contexts[1])


# ----- the codec and the server's checks -----------------------------------------------------------------


def test_the_weighted_codec_decodes_the_weighted_mean_within_its_bound() -> None:
    codec = WeightedQuantiser(8.0, 2**22, 2**32, 1000.0)
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 1e-2, 3000) for _ in range(6)]
    weights = [120.0, 37.0, 980.0, 5.0, 400.0, 1500.0]  # one above max_weight: still no wrap-around
    encoded = [codec.encode(u, w, seed=i) for i, (u, w) in enumerate(zip(updates, weights, strict=True))]
    total = sum(v for v, _ in encoded) % codec.modulus
    summed, weight = codec.decode(total, len(updates))
    mean = summed / weight
    exact = sum(w * u for w, u in zip(weights, updates, strict=True)) / sum(weights)
    q = np.array([round(w / 1000 * 2**22) / 2**22 for w in weights])
    p, p_sent = np.array(weights) / sum(weights), q / q.sum()
    rounding = len(updates) * codec.step() / q.sum()  # each client's coordinate is off by < one step
    weighting = np.abs(p_sent - p).sum() * max(np.abs(u).max() for u in updates)
    bound = rounding + weighting
    assert np.abs(mean - exact).max() <= bound
    assert all(c == 0 for _, c in encoded)
    _, clipped = codec.encode(np.array([9.0, -0.5, -12.0]), 1000.0, seed=0)
    assert clipped == 2


def masked_reply(vector: np.ndarray) -> Message:
    from flwr.app import Array, ArrayRecord

    content = RecordDict(
        {
            secagg.MASKED: ArrayRecord({secagg.VECTOR: Array(vector)}),
            protocol.METRICS: MetricRecord({protocol.PARTITION_ID: 0, protocol.NUM_EXAMPLES: 4}),
        }
    )
    reply = Message(content, reply_to=Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN))
    return reply


def test_a_masked_vector_of_the_wrong_length_type_or_range_is_rejected() -> None:
    good = np.arange(10, dtype=np.uint32)
    assert vector_problem(masked_reply(good), 10, MODULUS) is None
    assert (
        vector_problem(masked_reply(good[:9]), 10, MODULUS) == "masked vector of shape (9,), expected (10,)"
    )
    assert "dtype float32" in str(vector_problem(masked_reply(good.astype(np.float32)), 10, MODULUS))
    assert "outside" in str(vector_problem(masked_reply(np.full(10, 2**33, dtype=np.int64)), 10, MODULUS))


# ----- refusals, one line each, at load (before any process starts) ----------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy.name=flora"], "strategy 'flora' cannot run under secure aggregation: its stacking"),
        (
            ["strategy.name=lora-fair"],
            "strategy 'lora-fair' cannot run under secure aggregation: its correction",
        ),
        (
            ["strategy.name=fedex-lora"],
            "strategy 'fedex-lora' cannot run under secure aggregation: its residual",
        ),
        (
            ['privacy.mode="dp-updates"', "privacy.noise_multiplier=1.0"],
            "privacy.mode = 'dp-updates' cannot run under secure aggregation",
        ),
        (["robustness.max_update_norm=5.0"], "robustness.max_update_norm cannot be checked"),
        (["secure_aggregation.modulus_bits=24"], "secure_aggregation.modulus_bits = 24 is too small"),
        (["secure_aggregation.num_shares=2"], "secure_aggregation.num_shares = 2.0 is invalid"),
        (["secure_aggregation.reconstruction_threshold=2.5"], "reconstruction_threshold = 2.5 is invalid"),
        (["federation.min_clients=1"], "needs federation.min_clients >= 2"),
    ],
)
def test_refused_at_load_with_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(None, ["secure_aggregation.enabled=true", *overrides])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["fedit", "ffa-lora", "fedsa-lora", "rolora", "fedsvd"])
def test_strategies_on_a_sum_load(name: str) -> None:
    assert load_experiment(None, ["secure_aggregation.enabled=true", f"strategy.name={name}"])


def test_field_capacity_rule_matches_the_sum() -> None:
    """The load-time bound (m * 2**quantization_bits < 2**modulus_bits) is what m full-range values need."""
    cfg = load_experiment(None, ["secure_aggregation.enabled=true", "secure_aggregation.modulus_bits=26"])
    sa = cfg.secure_aggregation
    assert cfg.federation.clients_per_round() * 2**sa.quantization_bits < 2**sa.modulus_bits
    assert math.log2(10) + 22 < 26
