"""HetLoRA and FlexLoRA: known answers from their papers' equations, ranks by device class, one alpha
convention for every rank, and HetLoRA's rank self-pruning penalty."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedlora.core.config import from_dict
from fedlora.core.model.arrays import from_arrays, to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.plan import ClientPlan
from fedlora.core.training.pruning import tail_norm, tail_penalty
from fedlora.run.experiment import check_strategy
from strategies import registry
from strategies.flexlora import flexlora_aggregate
from strategies.hetlora import hetlora_aggregate
from strategies.lowrank import svd_factors, truncate_state

A, B, HEAD = "m.lora_A.weight", "m.lora_B.weight", "classifier.weight"


def make(name: str, devices: bool = True, **options: object):  # type: ignore[no-untyped-def]
    classes = [{"name": "small", "share": 0.5, "rank": 2}, {"name": "big", "share": 0.5, "rank": 4}]
    cfg = check_strategy(
        from_dict(
            {
                "strategy": {"name": name, "options": options},
                "lora": {"rank": 4, "alpha": 8.0},
                "federation": {"num_clients": 6},
                **({"devices": {"classes": classes}} if devices else {}),
            }
        )
    )
    g = torch.Generator().manual_seed(0)
    state = {A: torch.randn(4, 5, generator=g), B: torch.randn(3, 4, generator=g), HEAD: torch.randn(2, 5)}
    return registry.get(name)(cfg, state)


def test_hetlora_zero_pads_lower_ranks_and_averages() -> None:
    """Cho et al., eq. for the server: A_bar = sum_k p_k [A_k; 0], B_bar = sum_k p_k [B_k, 0]."""
    a0, b0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [3.0]])
    a1 = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    b1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 4.0]])
    updates = [{A: a0, B: b0, HEAD: torch.ones(2)}, {A: a1, B: b1, HEAD: torch.zeros(2)}]
    got = hetlora_aggregate(updates, [0.25, 0.75], [1.0, 1.0], rank=3, norm=False)
    want_a = 0.25 * torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]) + 0.75 * a1
    want_b = 0.25 * torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]]) + 0.75 * b1
    torch.testing.assert_close(got[A], want_a)
    torch.testing.assert_close(got[B], want_b)
    torch.testing.assert_close(got[HEAD], torch.full((2,), 0.25))


def test_hetlora_norm_weighting_is_proportional_to_the_update_norm() -> None:
    a0, b0 = torch.eye(2)[:1], torch.tensor([[3.0], [4.0]])  # ||B0 A0|| = 5
    a1, b1 = torch.eye(2), torch.eye(2)  # ||B1 A1|| = sqrt(2)
    updates = [{A: a0, B: b0}, {A: a1, B: b1}]
    got = hetlora_aggregate(updates, [0.5, 0.5], [1.0, 1.0], rank=2, norm=True)
    w0 = 5 / (5 + math.sqrt(2))
    torch.testing.assert_close(got[A], w0 * torch.tensor([[1.0, 0.0], [0.0, 0.0]]) + (1 - w0) * a1)


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_clients_get_their_class_rank_and_the_same_product(name: str) -> None:
    """A rank-2 client's truncation, at its own scale alpha/2, has the product the server's first two
    components have at alpha/4: one alpha convention for every rank."""
    strategy = make(name)
    ranks = {pid: strategy.client_plan(pid, 1).rank for pid in range(6)}
    assert sorted(ranks.values()) == [2, 2, 2, 4, 4, 4]
    state = strategy.global_state
    strategy.train_messages(1, ConfigRecord(), {})  # what the round sends, for expected_reply
    for pid, rank in ranks.items():
        sent = strategy.client_arrays(pid, state)
        assert sent[A].shape == (rank, 5) and sent[B].shape == (3, rank)
        torch.testing.assert_close(
            (8.0 / rank) * sent[B] @ sent[A], (8.0 / 4) * state[B][:, :rank] @ state[A][:rank]
        )
        assert strategy.expected_reply(pid, 1)[A][0] == (rank, 5)


def test_without_device_classes_ranks_cycle_over_the_options() -> None:
    strategy = make("hetlora", devices=False, ranks=[1, 3])
    assert [strategy.client_plan(pid, 1).rank for pid in range(4)] == [1, 3, 1, 3]


def test_hetlora_truncate_then_pad_gives_back_the_leading_components() -> None:
    strategy = make("hetlora")
    small = next(pid for pid in range(6) if strategy.client_plan(pid, 1).rank == 2)
    sent = strategy.client_arrays(small, strategy.global_state)
    got = strategy.aggregate(strategy.global_state, [sent], [1.0])
    want = truncate_state(strategy.global_state, 2, 1.0)
    torch.testing.assert_close(got[A][:2], want[A])
    torch.testing.assert_close(got[B][:, :2], want[B])
    assert not got[A][2:].any() and not got[B][:, 2:].any()


def test_flexlora_is_the_truncated_svd_of_the_average_full_size_product() -> None:
    """Bai et al.: W = sum_k p_k s_k B_k A_k, then each client's SVD truncation at its rank."""
    g = torch.Generator().manual_seed(1)
    ranks, p = [2, 4, 3], [0.2, 0.5, 0.3]
    updates = [{A: torch.randn(r, 7, generator=g), B: torch.randn(6, r, generator=g)} for r in ranks]
    scales = [8.0 / r for r in ranks]
    dw = sum(pk * sk * u[B].double() @ u[A].double() for pk, sk, u in zip(p, scales, updates, strict=True))
    u, s, vh = torch.linalg.svd(dw)
    got = flexlora_aggregate(updates, p, scales, rank=4, scale=2.0)
    best4 = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(2.0 * got[B].double() @ got[A].double(), best4, rtol=0, atol=1e-5)
    small = truncate_state(got, 2, math.sqrt(2.0 / 4.0))  # a rank-2 client at scale 8/2
    best2 = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    torch.testing.assert_close(4.0 * small[B].double() @ small[A].double(), best2, rtol=0, atol=1e-5)


def test_flexlora_keeps_a_product_of_low_enough_rank_exactly() -> None:
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(6, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 5, generator=g, dtype=torch.float64
    )
    a, b = svd_factors(delta, 4, scale=0.5)
    torch.testing.assert_close(0.5 * b @ a, delta)


class Lora(nn.Module):
    """One peft-shaped LoRA layer: ``lora_A`` and ``lora_B`` ModuleDicts holding the 'default' adapter."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(5, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, 4, bias=False)})
        with torch.no_grad():
            self.lora_A["default"].weight.copy_(torch.randn(rank, 5, generator=g))
            self.lora_B["default"].weight.copy_(torch.randn(4, rank, generator=g))


def test_the_pruning_penalty_adds_the_gradient_of_the_tail_norm_product() -> None:
    model = Lora(rank=4)
    a, b = model.lora_A["default"].weight, model.lora_B["default"].weight
    with tail_penalty(model, start=2, weight=0.3):
        (b.sum() * 0.0 + a.sum() * 0.0).backward()
    hooked = (a.grad.clone(), b.grad.clone())  # type: ignore[union-attr]
    a.grad, b.grad = None, None
    (0.3 * b[:, 2:].norm() * a[2:].norm()).backward()
    torch.testing.assert_close(hooked[0], a.grad)
    torch.testing.assert_close(hooked[1], b.grad)
    assert tail_norm(model, 2) == pytest.approx(float(b[:, 2:].norm() * a[2:].norm()))
    a.grad = None
    (a.sum() * 0.0).backward()  # the hooks are gone once the block ends
    assert not a.grad.any()  # type: ignore[union-attr]


def test_a_client_whose_tail_shrank_prunes_its_rank(task_identity: None) -> None:
    strategy = make("hetlora", prune_weight=0.1, prune_gamma=0.5)
    big = [pid for pid in range(6) if strategy.client_plan(pid, 1).rank == 4]
    plan = strategy.client_plan(big[0], 1)
    assert (plan.prune_from, plan.prune_weight) == (2, 0.1)
    assert ClientPlan.from_config(plan.to_config()) == plan
    strategy.sampler.set_partitions({pid: 100 + pid for pid in range(6)})
    strategy.sampler.assigns = False
    messages = strategy.train_messages(1, ConfigRecord(), {pid: 100 + pid for pid in big[:2]})
    replies = []
    for pid, message, shrank in zip(big[:2], messages, (True, False), strict=True):
        norms = {protocol.TAIL_NORM_BEFORE: 1.0, protocol.TAIL_NORM_AFTER: 0.5 if shrank else 2.0}
        metrics = {protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 1.0, protocol.PARTITION_ID: pid, **norms}
        arrays = to_arrays(from_arrays(message.content[protocol.ARRAYS]))
        content = RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: MetricRecord(metrics)})
        replies.append(Message(content, reply_to=message))
    strategy.aggregate_train(1, replies)
    assert strategy.client_plan(big[0], 2).rank == 2 and strategy.client_plan(big[1], 2).rank == 4
    saved = strategy.checkpoint_state()
    again = make("hetlora", prune_weight=0.1, prune_gamma=0.5)
    again.restore(strategy.global_state, {}, saved)
    assert again.client_plan(big[0], 2).rank == 2
