"""Reliability without a federation: reply validation, fault assignment, checkpoints, client state."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedlora.core.config import from_dict
from fedlora.core.model.arrays import to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.validation import check_reply, spec_of, update_norm
from fedlora.core.training import faults
from fedlora.run import checkpoint
from strategies import registry
from tests.helpers import LAYERS, client_state

A0, B0 = f"{LAYERS[0]}.lora_A.weight", f"{LAYERS[0]}.lora_B.weight"


# ----- check_reply: known answers ---------------------------------------------------------------
SENT = {"a": torch.zeros(2, 2), "b": torch.ones(3)}


def _reply(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**{k: v.clone() for k, v in SENT.items()}, **changes}


def test_a_good_reply_passes_and_its_norm_is_the_update_norm() -> None:
    reply = _reply(a=torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    assert update_norm(reply, SENT) == pytest.approx(5.0)
    assert check_reply(reply, spec_of(SENT), SENT) is None
    assert check_reply(reply, spec_of(SENT), SENT, max_norm=5.01) is None


@pytest.mark.parametrize(
    ("reply", "max_norm", "reason"),
    [
        ({"a": torch.zeros(2, 2)}, 0.0, "missing array 'b'"),
        ({**SENT, "c": torch.zeros(1)}, 0.0, "unexpected array 'c'"),
        (_reply(a=torch.zeros(4)), 0.0, "array 'a' has shape (4,), expected (2, 2)"),
        (_reply(b=torch.ones(3, dtype=torch.float64)), 0.0, "array 'b' has dtype torch.float64"),
        (_reply(b=torch.tensor([1.0, math.nan, math.nan])), 0.0, "array 'b' has 2 NaN or infinite values"),
        (_reply(a=torch.tensor([[math.inf, 0.0], [0.0, 0.0]])), 0.0, "array 'a' has 1 NaN or infinite"),
        (
            _reply(a=torch.tensor([[3.0, 0.0], [0.0, 4.0]])),
            4.99,
            "update norm 5 exceeds robustness.max_update_norm = 4.99",
        ),
    ],
)
def test_bad_replies_are_rejected_with_their_reason(reply: dict, max_norm: float, reason: str) -> None:
    got = check_reply(reply, spec_of(SENT), SENT, max_norm)
    assert got is not None and got.startswith(reason), got


# ----- every strategy drops bad replies and aggregates the rest ---------------------------------
class Nodes:
    """A grid that only lists node ids (what ``configure_train`` needs with fraction = 1)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(100, 100 + self.n))


def _strategy(name: str, max_norm: float = 0.0, **extra: object):  # type: ignore[no-untyped-def]
    cfg = from_dict(
        {
            "strategy": {"name": name},
            "lora": {"rank": 4, "alpha": 8.0},
            "federation": {"num_clients": 8, "min_clients": 2},
            "robustness": {"max_update_norm": max_norm},
            **extra,
        }
    )
    state = {k: v.float() for k, v in client_state(99).items()}
    strategy = registry.get(name)(cfg, state)
    strategy.sampler.set_partitions({pid: 100 + pid for pid in range(8)})  # what Nodes(8) would answer
    return strategy


def _good(strategy, pid: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """What client ``pid`` would honestly reply: the expected arrays, near what was sent."""
    g = torch.Generator().manual_seed(pid)
    sent = strategy.outgoing(strategy.global_state)
    return {
        k: sent.get(k, torch.zeros(shape)) + 0.01 * torch.randn(shape, generator=g)
        for k, (shape, _) in strategy.expected_reply(pid, 1).items()
    }


def _start(strategy):  # type: ignore[no-untyped-def]
    """Round 1's train messages to 8 nodes (partition i on node 100 + i)."""
    return list(strategy.configure_train(1, to_arrays(strategy.global_state), ConfigRecord(), Nodes(8)))


def _messages(sent, replies):  # type: ignore[no-untyped-def]
    out = []
    for pid, arrays in enumerate(replies):
        if arrays is None:
            out.append(Message(Error(code=0, reason="client raised"), reply_to=sent[pid]))
            continue
        metrics = MetricRecord(
            {protocol.NUM_EXAMPLES: 10 + pid, protocol.TRAIN_LOSS: 1.0, protocol.PARTITION_ID: pid}
        )
        content = RecordDict({protocol.ARRAYS: to_arrays(arrays), protocol.METRICS: metrics})
        out.append(Message(content, reply_to=sent[pid]))
    return out  # clients 7 (and any not listed) never answer


def _spoilt(good: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    key = sorted(good)[0]
    nan = {**good, key: torch.full_like(good[key], math.nan)}
    shape = {**good, key: good[key].flatten()[:-1]}
    missing = {k: v for k, v in good.items() if k != key}
    dtype = {**good, key: good[key].double()}
    huge = {k: v * 1e6 for k, v in good.items()}
    return [nan, shape, missing, dtype, huge]


def test_each_reply_becomes_a_client_row_with_its_fate(task_identity: None) -> None:
    strategy = _strategy("fedit", max_norm=1e3)
    sent = _start(strategy)
    good = [_good(strategy, pid) for pid in (0, 1)]
    messages = _messages(sent, [*good, _spoilt(_good(strategy, 2))[0], None])  # 2 NaN, 3 raised
    strategy.aggregate_train(1, messages)
    rows = {r["partition_id"]: r for r in strategy.client_rows}
    assert rows[0] == {
        "round": 1, "phase": "train", "partition_id": 0, "node_id": 100, "status": "ok",
        "num_examples": 10, "train_loss": 1.0,
    }  # fmt: skip
    assert rows[1]["status"] == "ok" and rows[1]["num_examples"] == 11
    assert rows[2]["status"] == "rejected" and "NaN" in rows[2]["reason"]
    assert rows[-1]["status"] == "failed" and rows[-1]["reason"] == "client raised"
    assert len(strategy.client_rows) == 4  # partitions 4-7 never answered: counted in num_failed only


def test_label_counts_travel_only_without_privacy() -> None:
    from clients.runtime import label_counts
    from fedlora.core.training.loops import Encoded

    split = Encoded(ids=((1,),) * 5, labels=torch.tensor([0, 2, 2, 0, 2]), pad_id=0)
    plain = from_dict({"data": {"labels": ["a", "b", "c"]}})
    assert label_counts(plain, split) == {protocol.LABEL_COUNTS: [2, 0, 3]}
    private = from_dict(
        {"data": {"labels": ["a", "b", "c"]}, "privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0}}
    )
    assert label_counts(private, split) == {}


def test_resume_keeps_the_client_rows_of_the_checkpointed_rounds(tmp_path: Path) -> None:
    from fedlora.core.records.rundir import RunDirectory

    run_dir = RunDirectory(tmp_path / "run")
    run_dir.create(from_dict({}))
    for r in (1, 2, 3):
        run_dir.append_round({"round": r})
        run_dir.append_clients([{"round": r, "partition_id": 0}, {"round": r, "partition_id": 1}])
    run_dir.keep_rounds(2, {"round": 2})
    lines = run_dir.clients_path.read_text().splitlines()
    assert [line.count('"round": 2') for line in lines] == [0, 0, 1, 1] and len(lines) == 4


@pytest.mark.parametrize("name", sorted(registry.available()))
def test_every_strategy_rejects_bad_replies_and_aggregates_the_rest(name: str, task_identity: None) -> None:
    dirty, clean = _strategy(name, max_norm=1e3), _strategy(name, max_norm=1e3)
    sent = _start(dirty)
    good = [_good(dirty, pid) for pid in (0, 1)]
    bad = _spoilt(_good(dirty, 2))  # partitions 2..6, each spoilt in one way
    dirty.aggregate_train(1, _messages(sent, [*good, *bad]))
    expected = {"num_sampled": 8, "num_replied": 7, "num_failed": 1, "num_rejected": 5, "num_dropped": 0}
    assert dirty.counts.as_row() == expected
    assert dirty.last_metrics["num_clients"] == 2
    clean.aggregate_train(1, _messages(_start(clean), good))
    for key, value in clean.global_state.items():
        torch.testing.assert_close(dirty.global_state[key], value)
    for key, value in clean.base_offsets.items():
        torch.testing.assert_close(dirty.base_offsets[key], value)


def test_flora_expects_each_clients_own_rank(task_identity: None) -> None:
    strategy = _strategy("flora")
    strategy.cfg.strategy.options = {"ranks": [2, 4]}
    strategy.options = registry.get("flora").Options(ranks=[2, 4])
    spec = strategy.expected_reply(0, 1)
    assert spec[A0][0] == (2, 12) and spec[B0][0] == (10, 2)
    assert strategy.expected_reply(1, 1)[A0][0] == (4, 12)


def test_too_few_valid_replies_fail_the_round_with_the_counts(task_identity: None) -> None:
    from strategies.base import RoundFailedError

    strategy = _strategy("fedit")
    sent = _start(strategy)
    good = _good(strategy, 0)
    nan = _spoilt(good)[0]
    with pytest.raises(
        RoundFailedError, match=r"1 valid replies from 8 sampled clients \(6 failed, 1 rejected\)"
    ):
        strategy.aggregate_train(1, _messages(sent, [good, nan]))


def test_dp_updates_noise_is_calibrated_to_the_replies_aggregated(task_identity: None) -> None:
    """Client placement: each client adds 1/m of the noise variance; the server tops up what the
    replies it aggregates lack, so a rejected reply's share is added back."""
    privacy = {"mode": "dp-updates", "noise_multiplier": 2.0, "clip_norm": 0.5, "placement": "client"}
    strategy = _strategy(
        "fedit", privacy=privacy, federation={"num_clients": 8, "min_clients": 2, "fraction": 0.5}
    )
    strategy.sampler.sample = lambda grid, fraction=None, training=False: {0: 100, 1: 101, 2: 102}  # type: ignore[method-assign]
    sent = _start(strategy)
    good = [_good(strategy, pid) for pid in (0, 1)]
    strategy.aggregate_train(1, _messages(sent, [*good, _spoilt(good[0])[0]]))
    assert strategy.counts.rejected == 1
    m = 4.0  # expected clients: fraction 0.5 of 8
    assert strategy.last_metrics["dp_noise_std"] == pytest.approx(2.0 * 0.5 * math.sqrt((m - 2) / m))


# ----- fault injection --------------------------------------------------------------------------
def test_faults_hit_exact_shares_of_the_clients_and_are_reproducible() -> None:
    cfg = from_dict(
        {"federation": {"num_clients": 20}, "faults": {"raise_fraction": 0.2, "nan_fraction": 0.1}}
    )
    first = faults.assignment(cfg, 3)
    assert sorted(first.values()) == ["nan"] * 2 + ["raise"] * 4
    assert faults.assignment(cfg, 3) == first
    assert faults.assignment(cfg, 4) != first  # a new draw every round
    assert faults.fault_for(cfg, 3, next(iter(first))) == first[next(iter(first))]
    assert faults.assignment(from_dict({}), 3) == {}


def test_spoilt_replies_and_the_raising_client() -> None:
    cfg = from_dict({"faults": {"raise_fraction": 0.5}})
    reply = {"x": torch.ones(2, 3), "y": torch.ones(4)}
    assert all(torch.isnan(v).all() for v in faults.spoil(reply, "nan").values())
    assert faults.spoil(reply, "corrupt")["x"].shape == (5,)
    assert faults.spoil(reply, None) == reply
    with pytest.raises(faults.InjectedFault, match="client 3 raises in round 2"):
        faults.before_training(cfg, "raise", 3, 2)


# ----- checkpoint and client state --------------------------------------------------------------
def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.safetensors"
    rng = random.Random(5)
    rng.random()
    dp_sgd = {"privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0}}
    strategy = _strategy("fedex-lora", **dp_sgd)
    strategy.sampler.rng = rng
    strategy.privacy.client_epsilon = {3: 1.5}  # type: ignore[attr-defined]
    strategy.base_offsets = {"w": torch.randn(3, 3)}
    row = {"round": 2, "eval_accuracy": 0.5, "train_loss": math.nan}
    checkpoint.save(
        path,
        checkpoint.Checkpoint(
            2, strategy.global_state, strategy.base_offsets, strategy.checkpoint_state(), row, 7.5
        ),
    )
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]  # no temporary file left
    saved = checkpoint.load(path)
    assert saved.round == 2 and saved.wall_s == 7.5 and saved.row["eval_accuracy"] == 0.5
    resumed = _strategy("fedex-lora", **dp_sgd)
    resumed.restore(saved.global_state, saved.base_offsets, saved.strategy)
    assert resumed.sampler.rng.random() == rng.random()
    assert resumed.privacy.client_epsilon == {3: 1.5}  # type: ignore[attr-defined]
    for key, value in strategy.global_state.items():
        assert torch.equal(resumed.global_state[key], value)
    assert torch.equal(resumed.base_offsets["w"], strategy.base_offsets["w"])


def test_client_store_replays_a_round_from_the_state_before_it(tmp_path: Path) -> None:
    from fedlora.core.records.store import ClientStore

    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})

    def store(server_round: int) -> ClientStore:
        return ClientStore(context, str(tmp_path), 4, server_round)

    for r in (1, 2, 4):
        store(r).save_arrays("b", {"x": torch.full((2,), float(r))})
        store(r).save_config("h", {"rounds": [r]})
    assert store(1).load_arrays("b") is None
    assert float(store(4).load_arrays("b")["x"][0]) == 2.0  # replaying round 4 starts from round 2
    assert float(store(4).load_arrays("b", include_current=True)["x"][0]) == 4.0
    assert store(5).load_config("h") == {"rounds": [4]}
    # only what a replay can still need is kept: the newest version and the one before it
    assert sorted(p.name for p in (tmp_path / "client-4").glob("b.*")) == [
        "b.r2.safetensors",
        "b.r4.safetensors",
    ]


def test_client_store_without_a_directory_uses_the_node_context() -> None:
    from fedlora.core.records.store import ClientStore

    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    ClientStore(context, None, 0, 1).save_config("h", {"noise": [1.0]})
    assert ClientStore(context, None, 0, 2).load_config("h") == {"noise": [1.0]}
    assert "h" in context.state.config_records


def test_resume_restores_a_row_lost_between_checkpoint_and_rounds_file(tmp_path: Path) -> None:
    from fedlora.core.records.rundir import RunDirectory, read_rounds

    run = RunDirectory(tmp_path)
    run.create(from_dict({}))
    run.append_round({"round": 1, "eval_accuracy": 0.4})
    run.append_round({"round": 2, "eval_accuracy": 0.5})
    with run.rounds_path.open("a") as f:
        f.write('{"round": 3, "eval_acc')  # a crash cut this line short
    rows = run.keep_rounds(3, {"round": 3, "eval_accuracy": 0.6, "train_loss": math.nan})
    assert (
        [r["eval_accuracy"] for r in read_rounds(tmp_path)]
        == [0.4, 0.5, 0.6]
        == [r["eval_accuracy"] for r in rows]
    )
    assert read_rounds(tmp_path)[-1]["train_loss"] is None


def test_a_failed_round_is_retried_then_stops_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlora.run.rounds import RoundLoop
    from strategies.base import RoundFailedError

    calls: list[int] = []

    def one_round(self: RoundLoop, server_round: int) -> dict[str, object]:
        calls.append(1)
        if len(calls) < 3:
            raise RoundFailedError("round 1: 1 valid replies from 5 sampled clients")
        return {"round": server_round}

    monkeypatch.setattr(RoundLoop, "one_round", one_round)
    strategy = _strategy("fedit", robustness={"round_retries": 2})
    loop = RoundLoop(None, strategy.cfg, strategy, None, ConfigRecord())  # type: ignore[arg-type]
    assert loop.run_round(1) == {"round": 1, "attempts": 3}
    calls.clear()
    loop.cfg = from_dict({"robustness": {"round_retries": 1}})
    with pytest.raises(
        RoundFailedError, match=r"gave up after 2 attempt\(s\) \(robustness.round_retries = 1\)"
    ):
        loop.run_round(1)


@pytest.mark.parametrize("in_directory", [True, False])
def test_dp_sgd_history_survives_in_the_client_store(tmp_path: Path, in_directory: bool) -> None:
    from fedlora.core.records.store import ClientStore
    from fedlora.privacy.mechanisms.dp_sgd import load_history, save_history

    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    root = str(tmp_path) if in_directory else None
    history = [(1.1, 0.05, 7), (0.9, 0.05, 7)]
    save_history(ClientStore(context, root, 1, 3), history)
    assert load_history(ClientStore(context, root, 1, 4)) == history
    if in_directory:  # a replay of round 3 starts from the history before it
        assert load_history(ClientStore(context, root, 1, 3)) == []
