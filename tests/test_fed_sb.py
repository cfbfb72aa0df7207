"""Fed-SB: the warm-up's frame is the truncated SVD of round 1's update, R is averaged exactly in that
frame, only R (and the head) is trained and sent, and the saved adapter is plain peft LoRA."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from clients.runtime import start_state
from fedlora.core.config import ConfigError, TrainConfig, from_dict
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.core.model.adapters import adapter_state, inject_lora, load_adapter_state, set_trainable
from fedlora.core.model.arrays import core_key, fold_cores, from_arrays, lora_scale, to_arrays
from fedlora.core.model.cores import has_cores, set_cores
from fedlora.core.model.loading import load_classifier, load_tokenizer
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.plan import ClientPlan
from fedlora.core.training.loops import encode, train_local
from fedlora.privacy.dp_sgd import PrivateTrainer
from fedlora.privacy.mechanisms import registry as mechanisms
from fedlora.run.experiment import check_strategy, load_experiment, preflight
from strategies import registry
from strategies.aggregation import normalised_weights
from strategies.fed_sb import FedSb, frame_from_update
from tests.helpers import HEAD, LAYERS, client_state

RANK, D_IN, D_OUT = 4, 12, 10  # client_state's shapes
NPY_HEADER = 128
"""Bytes of the .npy header Flower serialises with every array of these shapes (format 1.0)."""


def make(state: dict[str, torch.Tensor] | None = None, **options: object) -> FedSb:
    cfg = check_strategy(
        from_dict(
            {
                "strategy": {"name": "fed-sb", "options": options},
                "lora": {"rank": RANK, "alpha": 8.0},
                "federation": {"num_clients": 3},
            }
        )
    )
    return FedSb(cfg, client_state(99) if state is None else state)


def unframed() -> dict[str, torch.Tensor]:
    """An adapter as peft starts it: B = 0 (no frame yet)."""
    return {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in client_state(99).items()}


def product(state: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    return state[f"{layer}.lora_B.weight"] @ state[core_key(layer)] @ state[f"{layer}.lora_A.weight"]


def truncated(m: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m.double())
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_frame_is_the_truncated_svd_of_the_update_with_orthonormal_factors() -> None:
    g = torch.Generator().manual_seed(0)
    b_bar, a_w = torch.randn(30, 16, generator=g), torch.randn(16, 20, generator=g)
    a, b, r = frame_from_update(b_bar, a_w, scale_w=0.5, rank=4, scale=2.0)
    assert a.shape == (4, 20) and b.shape == (30, 4) and r.shape == (4, 4) and a.dtype == torch.float32
    torch.testing.assert_close((a @ a.T).double(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close((b.T @ b).double(), torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    diagonal = torch.diagonal(r)
    assert torch.equal(r, torch.diag(diagonal)) and bool((diagonal[:-1] >= diagonal[1:]).all())
    want = truncated(0.5 * b_bar.double() @ a_w.double(), 4)
    torch.testing.assert_close((2.0 * b @ r @ a).double(), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="exceeds"):
        frame_from_update(b_bar[:, :3], a_w[:3], scale_w=1.0, rank=4, scale=1.0)


def test_warmup_round_plans_a_full_width_ffa_round_and_sends_b_zero() -> None:
    strategy = make(unframed())
    assert not strategy.framed(strategy.global_state) and strategy.warmup_rank == D_IN
    plan = strategy.client_plan(0, 1)
    assert plan == ClientPlan(
        rank=D_IN, freeze=frozenset({"lora_A"}), reply="trained", a_init="orthogonal"
    )  # A_w from the seed, never sent; B_w trained and sent back with the head
    sent = strategy.outgoing(strategy.global_state)
    assert sorted(sent) == sorted([f"{layer}.lora_B.weight" for layer in LAYERS] + [HEAD])
    assert all(sent[f"{layer}.lora_B.weight"].shape == (D_OUT, D_IN) for layer in LAYERS)
    assert not any(bool(sent[f"{layer}.lora_B.weight"].any()) for layer in LAYERS)
    assert make(unframed(), warmup_rank=6).warmup_rank == 6
    assert make(unframed(), warmup_rank=99).warmup_rank == D_IN  # capped to the input width


def test_warmup_aggregate_fixes_b_a_r_from_the_mean_full_width_update() -> None:
    """s·B R A after round 1 = the rank-r truncation of s_w·(Σ p_k B_k)·A_w, A_w being the clients' A."""
    strategy = make(unframed())
    g = torch.Generator().manual_seed(1)
    weights = [10.0, 30.0, 60.0]
    sent = strategy.outgoing(strategy.global_state)
    updates = [
        {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in sent.items()} for _ in weights
    ]
    out = strategy.aggregate(strategy.global_state, updates, weights)
    p = normalised_weights(weights)
    a_w = strategy.warmup_a(strategy.global_state)
    scale, scale_w = 8.0 / RANK, 8.0 / D_IN
    for layer in LAYERS:
        b_bar = sum(pk * u[f"{layer}.lora_B.weight"] for pk, u in zip(p, updates, strict=True))
        want = truncated(scale_w * b_bar @ a_w[f"{layer}.lora_A.weight"], RANK)
        torch.testing.assert_close(scale * product(out, layer), want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out[HEAD], sum(pk * u[HEAD] for pk, u in zip(p, updates, strict=True)))
    assert strategy.framed(out) and strategy.diagnostics()["sb_warmup"] == 1.0
    assert 0 < strategy.diagnostics()["sb_kept_energy"] <= 1


def test_federated_update_is_the_average_of_r_in_the_fixed_frame() -> None:
    """Σ p_k s·B R_k A = s·B (Σ p_k R_k) A: the aggregate is exact, and B and A never move."""
    strategy = make()
    g = torch.Generator().manual_seed(2)
    frame = strategy.global_state
    assert strategy.framed(frame)
    assert strategy.client_plan(0, 2) == ClientPlan(
        rank=RANK, freeze=frozenset({"lora_A", "lora_B"}), reply="trained", core=True
    )
    weights = [1.0, 2.0, 5.0]
    updates = []
    for _ in weights:  # a client's R and head; a stray A or B in a reply is ignored
        update = {k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in frame.items()}
        updates.append(update)
    out = strategy.aggregate(frame, updates, weights)
    p = normalised_weights(weights)
    s = lora_scale(strategy.cfg.lora)
    for layer in LAYERS:
        for factor in ("lora_A", "lora_B"):
            assert torch.equal(out[f"{layer}.{factor}.weight"], frame[f"{layer}.{factor}.weight"])
        want = sum(
            pk * s * frame[f"{layer}.lora_B.weight"] @ u[core_key(layer)] @ frame[f"{layer}.lora_A.weight"]
            for pk, u in zip(p, updates, strict=True)
        )
        torch.testing.assert_close(s * product(out, layer), want, atol=1e-10, rtol=1e-10)
    assert strategy.diagnostics()["sb_warmup"] == 0.0 and math.isnan(strategy.diagnostics()["sb_kept_energy"])


def test_options_and_check_refuse_a_warmup_rank_below_the_lora_rank() -> None:
    with pytest.raises(ConfigError, match=r"warmup_rank = 2 is below lora\.rank = 4"):
        make(warmup_rank=2)
    with pytest.raises(ConfigError, match="warmup_rank = -1 is invalid"):
        make(warmup_rank=-1)
    assert registry.privacy_modes("fed-sb") == sorted(mechanisms.available())


# ----- the client side, on a tiny BERT ------------------------------------------------------------
def _model(path: str, rank: int = 4) -> torch.nn.Module:
    from fedlora.core.config import LoraConfig

    return inject_lora(
        load_classifier(path, num_labels=3, seed=0), LoraConfig(rank=rank, dropout=0.0), seed=0
    )


def test_warmup_a_on_the_server_is_the_a_every_client_derives(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    cfg = load_experiment(None, [f'model.path="{tiny_bert.path}"', 'strategy.name="fed-sb"'])
    from fedlora.tasks.models import initial_state

    strategy = FedSb(cfg, initial_state(cfg))
    plan = strategy.client_plan(0, 1)
    local = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=plan.rank))
    client = start_state(local, plan)
    server = strategy.warmup_a(strategy.global_state)
    assert server and all(torch.equal(server[k], client[k]) for k in server)
    assert plan.rank == tiny_bert.config.hidden_size  # full width: q and v take the hidden states


def test_a_cored_model_trains_only_r_and_the_head_also_under_dp_sgd(tiny_bert, synthetic_tweets) -> None:  # type: ignore[no-untyped-def]
    data = encode(synthetic_tweets, load_tokenizer(tiny_bert.path), 32)
    model = _model(tiny_bert.path)
    set_cores(model, True)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    set_trainable(model, frozenset({"lora_A", "lora_B"}))
    train_local(model, data, TrainConfig(local_steps=2, batch_size=8), seed=0)
    moved = {k.rsplit(".", 2)[-2] for k, v in adapter_state(model).items() if not torch.equal(v, state[k])}
    assert moved == {"lora_R", "classifier"}
    load_adapter_state(model, state)
    with PrivateTrainer(model, TrainConfig(), noise_multiplier=1.0, clip_norm=1.0, expected_batch=8) as t:
        names = {id(p): n for n, p in model.named_parameters()}
        noised = {names[id(p)].split(".")[-3] for p in t.optimizer.params}  # what Opacus clips and noises
        assert noised == {"lora_R", "modules_to_save"}
        t.step(dict(data.batch(list(range(8)))))
    after = adapter_state(model)
    assert all(
        torch.equal(after[k], state[k]) == (".lora_R." not in k and "classifier" not in k) for k in state
    )


def test_saved_adapter_folds_r_and_loads_with_peft(tiny_bert, synthetic_tweets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedlora.core.model.adapters import load_trained, save_adapter
    from fedlora.run.evaluation import global_model

    cfg = load_experiment(
        None, [f'model.path="{tiny_bert.path}"', 'strategy.name="fed-sb"', "lora.dropout=0.0"]
    )
    model = _model(tiny_bert.path, cfg.lora.rank)
    set_cores(model, True)
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    model.eval()
    batch = encode(synthetic_tweets, load_tokenizer(tiny_bert.path), 32).batch(list(range(6)))
    batch.pop("labels")
    with torch.no_grad():
        want = model(**batch).logits
    folded = fold_cores(state)
    assert not any(".lora_R." in k for k in folded)
    served = global_model(cfg, state, {})  # what the server evaluates and saves: no cores, R folded into A
    assert not has_cores(served)
    save_adapter(served, tmp_path / "adapter")
    loaded = load_trained(tmp_path / "adapter", tiny_bert.path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, atol=1e-5, rtol=1e-5)


# ----- through Flower's Strategy contract, and a real federation in this process ----------------------
class _Grid:
    def get_node_ids(self) -> list[int]:
        return [100, 101, 102]


def _by_hand(shapes: list[tuple[int, ...]], itemsize: int = 8) -> int:
    return sum(NPY_HEADER + math.prod(s) * itemsize for s in shapes)


def test_uplink_per_client_is_r_squared_per_adapted_matrix_plus_the_head(task_identity: None) -> None:
    strategy = make()  # framed: 2 adapted layers, r = 4, head 3 x 10, float64
    strategy.sampler.set_partitions({pid: 100 + pid for pid in range(3)})
    messages = list(strategy.configure_train(2, to_arrays(strategy.global_state), ConfigRecord(), _Grid()))
    a, b, r, head = (RANK, D_IN), (D_OUT, RANK), (RANK, RANK), (3, D_OUT)
    assert strategy.traffic.downlink == 3 * _by_hand([a, b, a, b, head, r, r])  # the frame, R and the head
    replies = []
    for pid, message in enumerate(messages):
        plan = ClientPlan.from_config(message.content[protocol.PLAN])  # type: ignore[arg-type]
        trained = {k: v + 0.01 for k, v in from_arrays(message.content[protocol.ARRAYS]).items()}
        arrays = to_arrays({k: trained[k] for k in plan.reply_keys(trained, trained)})
        metrics = MetricRecord(
            {protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 1.0, protocol.PARTITION_ID: pid}
        )
        replies.append(
            Message(RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), reply_to=message)
        )
    strategy.aggregate_train(2, replies)
    assert strategy.counts.rejected == 0
    assert strategy.traffic.uplink == 3 * _by_hand([r, r, head])  # r² values per adapted matrix, and the head


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path_factory.mktemp("d") / "t.csv")


def _experiment(model: str, data: Path, *extra: str):  # type: ignore[no-untyped-def]
    overrides = [
        f'model.path="{model}"',
        f'data.source="{data}"',
        'data.label="topic"',
        f"data.labels={json.dumps(sorted(TOPICS))}",
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=12",
        'strategy.name="fed-sb"',
        "federation.num_clients=3",
        "federation.fraction=0.67",
        "federation.rounds=2",
        "train.local_steps=2",
        *extra,
    ]
    return preflight(load_experiment(None, overrides))


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["none", "dp-updates"])
def test_two_rounds_count_the_warmup_and_then_r_squared_bytes(  # type: ignore[no-untyped-def]
    run_in_memory, tiny_bert, topics_csv, mode: str
) -> None:
    """Round 1 sends B_w (d_out x hidden) both ways; round 2 sends R (r x r) and the head up, exactly."""
    extra = [f'privacy.mode="{mode}"', "privacy.noise_multiplier=0.5"] if mode != "none" else []
    cfg = _experiment(tiny_bert.path, topics_csv, *extra)
    run = run_in_memory(cfg, mode)
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    hidden, r, layers = tiny_bert.config.hidden_size, cfg.lora.rank, 2 * tiny_bert.config.num_hidden_layers
    head = _by_hand([(len(TOPICS), hidden), (len(TOPICS),)], 4)  # classifier weight and bias, float32
    clients = [row["num_clients"] for row in rows]
    assert rows[0]["uplink_bytes"] == clients[0] * (layers * _by_hand([(hidden, hidden)], 4) + head)
    assert rows[1]["uplink_bytes"] == clients[1] * (layers * _by_hand([(r, r)], 4) + head)
    assert [row["sb_warmup"] for row in rows] == [1.0, 0.0]
    saved = run / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    assert not any(".lora_R." in k for k in load_file(str(saved)))  # plain peft LoRA, R folded into A
