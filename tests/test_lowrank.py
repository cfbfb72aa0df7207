"""Low-rank aggregation math (FFA-LoRA, FedEx-LoRA, FLoRA) on hand and seeded random matrices."""

from __future__ import annotations

import pytest
import torch

from strategies.aggregation import weighted_average
from strategies.lowrank import (
    base_weight_key,
    fedex_residual,
    flora_stack,
    layer_groups,
    product_average,
)

Factors = tuple[list[torch.Tensor], list[torch.Tensor]]


def _factors(ranks: list[int], d_in: int, d_out: int, dtype: torch.dtype, seed: int = 0) -> Factors:
    """Random client factors A_k (r_k x d_in), B_k (d_out x r_k), B non-zero (as after training)."""
    g = torch.Generator().manual_seed(seed)
    a_list = [torch.randn(r, d_in, generator=g, dtype=torch.float64).to(dtype) for r in ranks]
    b_list = [torch.randn(d_out, r, generator=g, dtype=torch.float64).to(dtype) for r in ranks]
    return a_list, b_list


def _reference(a_list: list[torch.Tensor], b_list: list[torch.Tensor], p: list[float], s: list[float]):
    """sum_k p_k s_k B_k A_k in float64, written out independently of the module."""
    return sum(pk * sk * (b.double() @ a.double()) for pk, sk, a, b in zip(p, s, a_list, b_list, strict=True))


# ---- product_average -------------------------------------------------------------------------------


def test_product_average_known_answer() -> None:
    a_list = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])]
    b_list = [torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [0.0]])]
    # B1 A1 = [[1, 2], [3, 6]], B2 A2 = [[0, 2], [0, 0]]; weights 1:3 -> p = 0.25, 0.75
    out = product_average(a_list, b_list, [1, 3])
    torch.testing.assert_close(out, torch.tensor([[0.25, 2.0], [0.75, 1.5]]))
    assert out.dtype == torch.float32
    scaled = product_average(a_list, b_list, [0.25, 0.75], scales=[2.0, 1.0])
    torch.testing.assert_close(scaled, torch.tensor([[0.5, 2.5], [1.5, 3.0]]))


def test_product_average_keeps_dtype_and_rejects_bad_shapes() -> None:
    a_list, b_list = _factors([2, 3], 6, 5, torch.bfloat16)
    assert product_average(a_list, b_list, [1, 1]).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="client 1"):
        product_average([torch.zeros(2, 6), torch.zeros(2, 7)], [torch.zeros(5, 2)] * 2, [1, 1])
    with pytest.raises(ValueError, match="ranks"):
        product_average([torch.zeros(2, 6)], [torch.zeros(5, 3)], [1])
    with pytest.raises(ValueError):
        product_average([torch.zeros(2, 6)], [torch.zeros(5, 2)], [1, 1])


# ---- FedEx-LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fedex_residual_restores_exact_average(dtype: torch.dtype) -> None:
    d_in, d_out, r, s = 24, 16, 4, 16 / 4
    a_list, b_list = _factors([r, r, r], d_in, d_out, dtype, seed=1)
    w0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    weights = [10.0, 30.0, 60.0]
    p = [0.1, 0.3, 0.6]
    residual = fedex_residual(a_list, b_list, weights, scale=s)
    assert residual.shape == (d_out, d_in) and residual.dtype == dtype
    a_bar = sum(pk * a for pk, a in zip(p, a_list, strict=True))
    b_bar = sum(pk * b for pk, b in zip(p, b_list, strict=True))
    assert isinstance(a_bar, torch.Tensor) and isinstance(b_bar, torch.Tensor)
    served = w0 + residual + s * (b_bar @ a_bar)
    exact = w0 + s * product_average(a_list, b_list, weights)
    torch.testing.assert_close(served, exact)
    torch.testing.assert_close(exact, (w0.double() + _reference(a_list, b_list, p, [s] * 3)).to(dtype))
    assert residual.abs().max() > 0.1  # FedIT alone would be biased here


def test_fedex_residual_zero_for_identical_clients() -> None:
    a_list, b_list = _factors([8], 32, 48, torch.float32, seed=3)
    residual = fedex_residual(a_list * 3, b_list * 3, [5, 1, 9], scale=2.0)
    torch.testing.assert_close(residual, torch.zeros(48, 32))


def test_fedex_residual_diagonal_example() -> None:
    a_list = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    b_list = [torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])]
    # sum p_k B_k A_k = I / 2, B_bar A_bar = ones / 4
    residual = fedex_residual(a_list, b_list, [1, 1], scale=2.0)
    torch.testing.assert_close(residual, 2.0 * torch.tensor([[0.25, -0.25], [-0.25, 0.25]]))


def test_fedex_residual_rejects_mixed_ranks() -> None:
    a_list, b_list = _factors([2, 4], 6, 5, torch.float32)
    with pytest.raises(ValueError, match="rank"):
        fedex_residual(a_list, b_list, [1, 1], scale=1.0)


# ---- FLoRA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("d_in", "d_out"), [(384, 384), (24, 16)])
def test_flora_stack_is_exact_with_mixed_ranks(d_in: int, d_out: int) -> None:
    ranks = [2, 4, 8]
    alpha = 16.0
    scales = [alpha / r for r in ranks]
    weights = [100, 300, 600]
    p = [0.1, 0.3, 0.6]
    a64, b64 = _factors(ranks, d_in, d_out, torch.float64, seed=4)
    a_stack, b_stack = flora_stack(a64, b64, weights, scales)
    assert a_stack.shape == (sum(ranks), d_in)
    assert b_stack.shape == (d_out, sum(ranks))
    expected = _reference(a64, b64, p, scales)
    torch.testing.assert_close(b_stack @ a_stack, expected)
    # weights and scales sit on B only; A rows are the clients' A_k unchanged, in client order
    torch.testing.assert_close(a_stack[: ranks[0]], a64[0])
    torch.testing.assert_close(b_stack[:, : ranks[0]], p[0] * scales[0] * b64[0])

    a32 = [a.float() for a in a64]
    b32 = [b.float() for b in b64]
    a_stack32, b_stack32 = flora_stack(a32, b32, weights, scales)
    assert a_stack32.dtype == b_stack32.dtype == torch.float32
    torch.testing.assert_close(b_stack32 @ a_stack32, expected.float(), rtol=1e-5, atol=1e-5)


def test_flora_identical_clients_merge_to_single_adapter() -> None:
    a_list, b_list = _factors([8], 24, 16, torch.float32, seed=5)
    s = 16 / 8**0.5  # rsLoRA scale, passed in by the caller
    single = s * (b_list[0] @ a_list[0])
    a_stack, b_stack = flora_stack(a_list * 4, b_list * 4, [1, 1, 1, 1], [s] * 4)
    assert a_stack.shape == (32, 24) and b_stack.shape == (16, 32)
    torch.testing.assert_close(b_stack @ a_stack, single)


# ---- FFA-LoRA --------------------------------------------------------------------------------------


def test_ffa_lora_b_only_average_is_exact() -> None:
    d_in, d_out, r = 24, 16, 4
    g = torch.Generator().manual_seed(6)
    shared_a = torch.randn(r, d_in, generator=g, dtype=torch.float64)  # frozen, same on every client
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    head = "base_model.model.classifier.weight"
    states = [
        {
            key: torch.randn(d_out, r, generator=g, dtype=torch.float64),
            head: torch.randn(2, d_in, generator=g),
        }
        for _ in range(3)
    ]
    weights = [2, 3, 5]
    avg = weighted_average(states, weights)
    # sum_k p_k (B_k A) == (sum_k p_k B_k) A: averaging B alone is exact, unlike FedIT
    exact = product_average([shared_a] * 3, [st[key] for st in states], weights)
    torch.testing.assert_close(avg[key] @ shared_a, exact)
    assert avg[key].shape == (d_out, r)
    # uplink per adapted matrix: only B, r * d_out values instead of r * (d_in + d_out)
    lora_values = sum(v.numel() for k, v in states[0].items() if ".lora_" in k)
    assert lora_values == r * d_out
    assert lora_values < r * (d_in + d_out)


def test_identical_clients_aggregate_to_themselves() -> None:
    a_list, b_list = _factors([4], 24, 16, torch.float32, seed=7)
    a, b = a_list[0], b_list[0]
    s = 2.0
    n = 3
    weights = [5, 1, 9]
    torch.testing.assert_close(product_average([a] * n, [b] * n, weights, [s] * n), s * (b @ a))
    torch.testing.assert_close(fedex_residual([a] * n, [b] * n, weights, s), torch.zeros(16, 24))
    a_stack, b_stack = flora_stack([a] * n, [b] * n, weights, [s] * n)
    torch.testing.assert_close(b_stack @ a_stack, s * (b @ a))
    avg_b = weighted_average([{"b": b}] * n, weights)["b"]
    torch.testing.assert_close(avg_b, b)


# ---- peft key grouping -----------------------------------------------------------------------------


PEFT_KEYS = [
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
    "base_model.model.bert.encoder.layer.0.attention.self.value.lora_A.weight",
    "base_model.model.bert.encoder.layer.0.attention.self.value.lora_B.weight",
    "base_model.model.bert.encoder.layer.1.attention.self.query.lora_B.weight",
    "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight",
    "base_model.model.classifier.weight",
    "base_model.model.classifier.bias",
]


def test_layer_groups_on_peft_keys() -> None:
    groups = layer_groups(PEFT_KEYS)
    prefix = "base_model.model.bert.encoder.layer."
    assert list(groups) == [
        prefix + "0.attention.self.query",
        prefix + "0.attention.self.value",
        prefix + "1.attention.self.query",
    ]
    layer = prefix + "1.attention.self.query"
    assert groups[layer] == (layer + ".lora_A.weight", layer + ".lora_B.weight")
    assert not any("classifier" in name for name in groups)
    assert base_weight_key(layer) == layer + ".base_layer.weight"
    assert layer_groups(["base_model.model.classifier.weight"]) == {}


def test_layer_groups_rejects_unmatched_keys() -> None:
    lone_a = "base_model.model.bert.encoder.layer.2.attention.self.query.lora_A.weight"
    with pytest.raises(ValueError, match=lone_a.replace(".", r"\.")):
        layer_groups([*PEFT_KEYS, lone_a])
    lone_b = "base_model.model.bert.encoder.layer.3.output.dense.lora_B.weight"
    with pytest.raises(ValueError, match=lone_b.replace(".", r"\.")):
        layer_groups([*PEFT_KEYS, lone_b])
