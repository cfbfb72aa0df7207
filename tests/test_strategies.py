"""Every strategy's aggregation on random named tensors, with known answers from its paper's equations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedlora.core.config import ConfigError, from_dict
from fedlora.core.model.adapters import set_base_offsets, set_trainable
from fedlora.core.model.arrays import base_weight_name, lora_scale, orthogonal_a
from fedlora.run.experiment import check_strategy
from strategies import registry
from strategies.aggregation import normalised_weights
from tests.helpers import HEAD, LAYERS, client_state


def make(name: str, **options: object):  # type: ignore[no-untyped-def]
    cfg = check_strategy(
        from_dict({"strategy": {"name": name, "options": options}, "lora": {"rank": 4, "alpha": 8.0}})
    )
    return registry.get(name)(cfg, client_state(99))


def ideal(updates, weights, layer, scales=None):  # type: ignore[no-untyped-def]
    p = normalised_weights(weights)
    scales = scales or [1.0] * len(updates)
    return sum(
        pk * sk * u[f"{layer}.lora_B.weight"] @ u[f"{layer}.lora_A.weight"]
        for pk, sk, u in zip(p, scales, updates, strict=True)
    )


REFACTORISED = {"fedsvd", "flexlora"}
"""Strategies whose server re-factorises B·A (same product, new factors)."""


def product(state, layer):  # type: ignore[no-untyped-def]
    return state[f"{layer}.lora_B.weight"] @ state[f"{layer}.lora_A.weight"]


UPDATES = [client_state(1), client_state(2), client_state(3)]
WEIGHTS = [10.0, 30.0, 60.0]
P = normalised_weights(WEIGHTS)


def test_every_strategy_is_listed_with_a_description() -> None:
    names = set(registry.available())
    assert names >= {"fedit", "ffa-lora", "lora-fair", "fedex-lora", "flora", "fedsa-lora"}  # the built-ins
    assert all(cls.description for cls in registry.available().values())


@pytest.mark.parametrize(
    "name", [n for n in sorted(registry.available()) if make(n).client_plan(0, 1).reinit_seed is None]
)  # a strategy whose clients restart from a fresh adapter (FLoRA) has no fixed point to test
def test_identical_clients_aggregate_to_themselves(name: str) -> None:
    strategy = make(name)
    same = client_state(5)
    sent = strategy.outgoing(same)
    out = strategy.aggregate(same, [dict(sent), dict(sent), dict(sent)], [0.2, 0.3, 0.5])
    if name in REFACTORISED:  # the factors are re-expressed; what must stay is every product, and the head
        for layer in LAYERS:
            torch.testing.assert_close(product(out, layer), product(same, layer))
        out = {k: v for k, v in out.items() if ".lora_" not in k}
    for key, value in out.items():
        torch.testing.assert_close(value, same[key])
    for offset in strategy.base_offsets.values():
        torch.testing.assert_close(offset, torch.zeros_like(offset))


def test_ffa_lora_sends_no_a_and_its_average_is_exact() -> None:
    strategy = make("ffa-lora")
    sent = strategy.outgoing(strategy.global_state)
    assert not any(".lora_A." in k for k in sent) and HEAD in sent
    shared_a = {k: v for k, v in client_state(7).items() if ".lora_A." in k}
    updates = [{k: v for k, v in {**u, **shared_a}.items() if ".lora_A." not in k} for u in UPDATES]
    out = strategy.aggregate(strategy.global_state, updates, P)
    for layer in LAYERS:
        exact = sum(
            pk * (u[f"{layer}.lora_B.weight"] @ shared_a[f"{layer}.lora_A.weight"])
            for pk, u in zip(P, updates, strict=True)
        )
        torch.testing.assert_close(out[f"{layer}.lora_B.weight"] @ shared_a[f"{layer}.lora_A.weight"], exact)
    plan = strategy.client_plan(0, 1)
    assert plan.freeze == frozenset({"lora_A"})


def test_ffa_lora_orthogonal_a_is_orthogonal_and_seeded() -> None:
    state = {"x.lora_A.weight": torch.zeros(8, 384), "x.lora_B.weight": torch.zeros(384, 8)}
    one, two = orthogonal_a(state, seed=3), orthogonal_a(state, seed=3)
    a = one["x.lora_A.weight"].double()
    gram = a @ a.T
    torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64) * gram[0, 0], atol=1e-5, rtol=1e-4)
    assert torch.equal(one["x.lora_A.weight"], two["x.lora_A.weight"])
    assert float(a.pow(2).mean()) == pytest.approx(1 / (3 * 384), rel=1e-3)  # Kaiming-uniform variance
    with pytest.raises(ConfigError, match="a_init"):
        make("ffa-lora", a_init="gaussian")


def test_fedex_lora_effective_weights_are_exact() -> None:
    strategy = make("fedex-lora")
    s = lora_scale(strategy.cfg.lora)
    out = strategy.aggregate(strategy.global_state, UPDATES, P)
    w0 = torch.randn(10, 12, dtype=torch.float64)
    for layer in LAYERS:
        offset = strategy.base_offsets[base_weight_name(layer)]
        effective = w0 + offset + s * out[f"{layer}.lora_B.weight"] @ out[f"{layer}.lora_A.weight"]
        torch.testing.assert_close(effective, w0 + s * ideal(UPDATES, P, layer))
    before = {k: v.clone() for k, v in strategy.base_offsets.items()}
    strategy.aggregate(out, UPDATES, P)  # offsets accumulate over rounds
    for key, value in strategy.base_offsets.items():
        torch.testing.assert_close(value, 2 * before[key])


def test_flora_merges_mixed_ranks_exactly_and_averages_the_head() -> None:
    strategy = make("flora", ranks=[2, 4, 8])
    ranks = [strategy.client_plan(pid, 1).rank for pid in range(4)]
    assert ranks == [2, 4, 8, 2]
    updates = [client_state(10 + i, rank=r) for i, r in enumerate([2, 4, 8])]
    scales = [strategy.cfg.lora.alpha / r for r in (2, 4, 8)]
    out = strategy.aggregate(strategy.global_state, updates, P)
    for layer in LAYERS:
        torch.testing.assert_close(
            strategy.base_offsets[base_weight_name(layer)], ideal(updates, P, layer, scales)
        )
    torch.testing.assert_close(out[HEAD], sum(pk * u[HEAD] for pk, u in zip(P, updates, strict=True)))
    assert set(out) == {HEAD}
    assert set(strategy.outgoing(strategy.global_state)) == {HEAD}
    plans = [strategy.client_plan(0, r) for r in (1, 2)]
    assert plans[0].reinit_seed != plans[1].reinit_seed and plans[0].reply == "adapter"


def test_fedsa_lora_never_sends_or_changes_b() -> None:
    strategy = make("fedsa-lora", local_head=False)
    sent = strategy.outgoing(strategy.global_state)
    assert not any(".lora_B." in k for k in sent) and HEAD in sent
    b_before = {k: v.clone() for k, v in strategy.global_state.items() if ".lora_B." in k}
    updates = [{k: v for k, v in u.items() if ".lora_B." not in k} for u in UPDATES]
    new = strategy.aggregate(strategy.global_state, updates, P)
    assert not any(".lora_B." in k for k in new)
    strategy.global_state = {**strategy.global_state, **new}
    assert all(torch.equal(strategy.global_state[k], v) for k, v in b_before.items())
    assert strategy.client_plan(0, 1).keep_local == frozenset({"lora_B"})
    default = make("fedsa-lora")  # the official code's default: the head stays local too
    assert HEAD not in default.outgoing(default.global_state)
    assert default.client_plan(0, 1).keep_local == frozenset({"lora_B", "head"})


def test_fedsa_lora_keeps_b_in_the_node_state() -> None:
    from flwr.app import Context, RecordDict

    from clients.runtime import load_local, save_local
    from fedlora.core.protocol.plan import ClientPlan
    from fedlora.core.records.store import ClientStore

    context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    plan = ClientPlan(rank=4, keep_local=frozenset({"lora_B"}))
    state = {k: v.float() for k, v in client_state(4).items()}
    save_local(ClientStore(context, None, 0, 1), plan, state)
    kept = load_local(ClientStore(context, None, 0, 2), plan)
    assert set(kept) == {k for k in state if ".lora_B." in k}
    assert all(torch.equal(kept[k], state[k]) for k in kept)


def test_base_offsets_and_freezing_on_a_bert_model(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    from fedlora.tasks.models import get_model

    cfg = from_dict({"model": {"path": tiny_bert.path}})
    model = get_model(cfg)
    module = dict(model.named_modules())["base_model.model.bert.encoder.layer.0.attention.self.query"]
    w0 = module.base_layer.weight.detach().clone()
    key = base_weight_name("base_model.model.bert.encoder.layer.0.attention.self.query")
    offset = torch.full_like(w0, 0.01)
    set_base_offsets(model, {key: offset})
    set_base_offsets(model, {key: offset})  # the same offset twice: no accumulation
    torch.testing.assert_close(module.base_layer.weight, w0 + offset)
    set_base_offsets(model, {})
    assert torch.equal(module.base_layer.weight, w0)
    with pytest.raises(KeyError, match="lacks"):
        set_base_offsets(model, {"base_model.model.nope.base_layer.weight": offset})
    set_trainable(model, frozenset({"lora_A"}))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_B." in n)
    set_trainable(model)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)


def test_strategy_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="ranks"):
        make("flora", ranks=[0])
    with pytest.raises(ConfigError, match="unknown for strategy 'fedex-lora'"):
        make("fedex-lora", steps=3)
    assert dataclasses.asdict(make("flora").options) == {"ranks": [], "downlink": "stacked"}


# ----- FedSVD ---------------------------------------------------------------------------------------
def _orthonormal_rows(a: torch.Tensor, atol: float = 1e-5) -> None:
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    torch.testing.assert_close(a.double() @ a.double().T, eye, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fedsvd_refactorisation_reproduces_the_product_with_orthonormal_a(dtype: torch.dtype) -> None:
    from strategies.fedsvd import refactorise

    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(10, 4, generator=g).to(dtype), torch.randn(4, 12, generator=g).to(dtype)
    b[:, 3] = 0  # a rank-3 product still gets 4 orthonormal rows
    a_new, b_new = refactorise(b, a)
    assert a_new.shape == a.shape and b_new.shape == b.shape and a_new.dtype == b_new.dtype == dtype
    _orthonormal_rows(a_new)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(b_new @ a_new, b @ a, **tol)  # type: ignore[arg-type]
    norms = b_new.double().norm(dim=0)  # B_new = U_r Σ_r: its column norms are the singular values
    assert torch.all(norms[:-1] >= norms[1:]) and norms[-1] < 1e-5
    # the singular values of the full product (its SVD computed directly, not through the factors)
    torch.testing.assert_close(norms, torch.linalg.svdvals((b @ a).double())[:4], rtol=0, atol=1e-5)
    zero_a, zero_b = refactorise(torch.zeros(10, 4, dtype=dtype), a)  # B = 0: product 0, A still orthonormal
    _orthonormal_rows(zero_a)
    assert torch.count_nonzero(zero_b) == 0
    with pytest.raises(ValueError, match="rank 4 exceeds"):
        refactorise(torch.randn(3, 4), torch.randn(4, 12))


def test_fedsvd_round_is_the_average_of_b_over_the_previous_a_refactorised() -> None:
    strategy = make("fedsvd")
    plan = strategy.client_plan(0, 1)
    assert plan.freeze == frozenset({"lora_A"}) and plan.reply == "trained"
    sent = strategy.outgoing(strategy.global_state)
    assert set(sent) == set(strategy.global_state)  # A travels down with B and the head
    for server_round in (1, 2):  # the second round starts from the first one's refactorised pair
        before = dict(strategy.global_state)
        updates = [{k: v for k, v in u.items() if ".lora_A." not in k} for u in UPDATES]  # what clients send
        strategy.server_round = server_round
        out = strategy.aggregate(before, updates, P)
        for layer in LAYERS:
            b_bar = sum(pk * u[f"{layer}.lora_B.weight"] for pk, u in zip(P, updates, strict=True))
            torch.testing.assert_close(product(out, layer), b_bar @ before[f"{layer}.lora_A.weight"])
            _orthonormal_rows(out[f"{layer}.lora_A.weight"])
        torch.testing.assert_close(out[HEAD], sum(pk * u[HEAD] for pk, u in zip(P, updates, strict=True)))
        strategy.global_state = {**before, **out}
    with_a = [{**u, **client_state(50 + i)} for i, u in enumerate(updates)]  # an A in a reply is ignored
    strategy.server_round = 3
    ignored = strategy.aggregate(strategy.global_state, with_a, P)
    honest = strategy.aggregate(strategy.global_state, [client_state(50 + i) for i in range(3)], P)
    for key in ignored:
        torch.testing.assert_close(ignored[key], honest[key])


def test_fedsvd_period_refactorises_only_on_its_rounds() -> None:
    strategy = make("fedsvd", period=2)
    updates = [{k: v for k, v in u.items() if ".lora_A." not in k} for u in UPDATES]
    a_key = f"{LAYERS[0]}.lora_A.weight"
    strategy.server_round = 1
    out = strategy.aggregate(strategy.global_state, updates, P)
    assert torch.equal(out[a_key], strategy.global_state[a_key])  # round 1: FFA-LoRA's exact average
    strategy.server_round = 2
    _orthonormal_rows(strategy.aggregate(strategy.global_state, updates, P)[a_key])
    with pytest.raises(ConfigError, match="period = 0"):
        make("fedsvd", period=0)


# ----- alternating freezing (RoLoRA) ----------------------------------------------------------------
@pytest.mark.parametrize(("schedule", "trained"), [("BA", "BABAB"), ("BBAA", "BBAAB"), ("BAA", "BAABA")])
def test_rolora_phases_follow_the_schedule(schedule: str, trained: str) -> None:
    strategy = make("rolora", schedule=schedule)
    frozen = {"B": frozenset({"lora_A"}), "A": frozenset({"lora_B"})}
    for server_round, phase in enumerate(trained, start=1):
        plan = strategy.client_plan(3, server_round)
        assert plan.freeze == frozen[phase] and plan.reply == "trained"
    for bad in ("", "AB", "BB", "BAX", "ba"):
        with pytest.raises(ConfigError, match="schedule"):
            make("rolora", schedule=bad)


@pytest.mark.parametrize("phase_round", [1, 2])  # 1: B trained over the shared A; 2: A over the shared B
def test_rolora_aggregates_the_moved_factor_exactly(phase_round: int) -> None:
    strategy = make("rolora")
    strategy.server_round = phase_round
    moved, fixed = ("lora_B", "lora_A") if phase_round == 1 else ("lora_A", "lora_B")
    g = strategy.global_state
    # each client trained only `moved`; the frozen factor is the global one for all of them
    updates = [{k: v for k, v in u.items() if f".{fixed}." not in k} for u in UPDATES]
    out = strategy.aggregate(g, updates, P)
    for layer in LAYERS:
        full = [{**u, f"{layer}.{fixed}.weight": g[f"{layer}.{fixed}.weight"]} for u in updates]
        average_of_products = sum(pk * product(u, layer) for pk, u in zip(P, full, strict=True))
        torch.testing.assert_close(product(out, layer), average_of_products)  # exact, no cross terms
        assert torch.equal(out[f"{layer}.{fixed}.weight"], g[f"{layer}.{fixed}.weight"])
        average = sum(pk * u[f"{layer}.{moved}.weight"] for pk, u in zip(P, updates, strict=True))
        torch.testing.assert_close(out[f"{layer}.{moved}.weight"], average)
    assert strategy.diagnostics() == {"trained_b": float(phase_round == 1)}


# ----- what travels, counted by hand, through Flower's Strategy contract --------------------------
NPY_HEADER = 128
"""Bytes of the .npy header Flower serialises with every array of these shapes (format 1.0)."""


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [100, 101, 102]


def _by_hand(shapes: list[tuple[int, ...]], itemsize: int = 8) -> int:
    return sum(NPY_HEADER + math.prod(s) * itemsize for s in shapes)


@pytest.mark.parametrize(("name", "server_round"), [("fedsvd", 1), ("rolora", 1), ("rolora", 2)])
def test_traffic_per_round_equals_the_bytes_counted_by_hand(
    name: str, server_round: int, task_identity: None
) -> None:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedlora.core.model.arrays import from_arrays, to_arrays
    from fedlora.core.protocol import keys as protocol
    from fedlora.core.protocol.plan import ClientPlan

    cfg = check_strategy(
        from_dict({"strategy": {"name": name}, "lora": {"rank": 4}, "federation": {"num_clients": 3}})
    )
    strategy = registry.get(name)(cfg, client_state(99))  # 2 layers: A 4x12, B 10x4; head 3x10; float64
    strategy.sampler.set_partitions({pid: 100 + pid for pid in range(3)})
    messages = list(
        strategy.configure_train(server_round, to_arrays(client_state(99)), ConfigRecord(), _Grid())
    )
    a, b, head = (4, 12), (10, 4), (3, 10)
    assert strategy.traffic.downlink == 3 * _by_hand([a, a, b, b, head])  # A (the broadcast), B, head
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
    strategy.aggregate_train(server_round, replies)
    moved = b if name == "fedsvd" or server_round == 1 else a
    assert strategy.traffic.uplink == 3 * _by_hand([moved, moved, head])  # one factor and the head
    assert strategy.counts.rejected == 0


def test_fedsvd_and_rolora_allow_every_privacy_mode() -> None:
    """Their aggregate is a function of the weighted mean of what travels (B, or the factor that moved,
    and the head): dp-updates can noise that mean; DP-SGD trains only the unfrozen kinds."""
    from fedlora.privacy.mechanisms import registry as mechanisms

    for name in ("fedsvd", "rolora"):
        assert registry.get(name).linear_aggregate
        assert registry.privacy_modes(name) == list(mechanisms.available())
        assert {"none", "dp-sgd", "dp-updates"} <= set(registry.privacy_modes(name))
