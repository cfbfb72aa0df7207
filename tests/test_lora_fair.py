"""LoRA-FAIR math: the ΔB correction and its guarantees (seeded, no Flower, no model)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from strategies.lora_fair import (
    FairResult,
    FairSettings,
    best_cosine,
    fair_correct,
    fair_correct_layers,
)
from strategies.lowrank import product_average

Layer = tuple[Tensor, Tensor, Tensor]  # (Ā, B̄, ΔW)

# Client drift per round, as (relative noise on A, row mixing of A, share of the drift common to all clients,
# scale of the shared starting B). "tiny" and "slight" are short homogeneous rounds (FedIT's cosine is within
# 1e-5 and 3e-4 of the best: the low-drift rounds where a solve started at ΔB = 0 stalled and changed
# nothing), "hetero" a skewed one from B0 = 0.
DRIFTS = {
    "tiny": (0.01, 0.01, 0.5, 1e-3),
    "slight": (0.1, 0.05, 0.5, 1e-3),
    "mild": (0.3, 0.3, 0.5, 1e-3),
    "strong": (0.5, 0.5, 0.2, 1e-3),
    "hetero": (0.3, 0.3, 0.0, 0.0),
}


Clients = tuple[list[Tensor], list[Tensor], list[float]]  # (A_k, B_k, p_k)


def _clients(seed: int, k: int, drift: str, d_out: int = 384, d_in: int = 384, r: int = 8) -> Clients:
    """k clients that all started from one adapter (A0 kaiming-uniform, B0 small) and drifted locally."""
    rel_a, mix, common, b0_scale = DRIFTS[drift]
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    a0 = (torch.rand(r, d_in, generator=g, dtype=torch.float64) * 2 - 1) / d_in**0.5
    b0 = b0_scale * randn(d_out, r)
    shared_a, shared_b = randn(r, d_in), randn(d_out, r)
    a_list: list[Tensor] = []
    b_list: list[Tensor] = []
    for _ in range(k):
        rows = torch.eye(r, dtype=torch.float64) + mix * randn(r, r)  # local steps mix A's rows
        a_list.append(rows @ a0 + rel_a * a0.std() * (common * shared_a + (1 - common) * randn(r, d_in)))
        b_list.append(b0 + 1e-3 * (common * shared_b + (1 - common) * randn(d_out, r)))
    p = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return a_list, b_list, (p / p.sum()).tolist()


def _layer(seed: int, k: int, drift: str = "strong", **shape: int) -> Layer:
    """(Ā, B̄, ΔW) in float32, as the server would hold them."""
    a_list, b_list, p = _clients(seed, k, drift, **shape)
    weights = torch.tensor(p, dtype=torch.float64)
    a_bar, b_bar = (torch.einsum("k,kij->ij", weights, torch.stack(x)) for x in (a_list, b_list))  # FedIT
    return a_bar.float(), b_bar.float(), product_average(a_list, b_list, p).float()


def _product_ratio(layer: Layer, res: FairResult) -> float:
    """‖(B̄ + ΔB)Ā‖_F / ‖ΔW‖_F."""
    a, b, w = (t.double() for t in layer)
    return float(((b + res.delta_b.double()) @ a).norm() / w.norm())


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="lam"):
        FairSettings(lam=-1)
    with pytest.raises(ValueError, match="lr"):
        FairSettings(lr=0)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="'q'"):
        fair_correct_layers({"q": (torch.zeros(4, 6), torch.zeros(5, 3), torch.zeros(5, 6))})


@pytest.mark.parametrize("match_norm", [True, False])
def test_identical_clients_aggregate_to_themselves(match_norm: bool) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 64, generator=g) / 8, 1e-3 * torch.randn(48, 8, generator=g)
    delta_w = product_average([a, a, a], [b, b, b], [0.2, 0.3, 0.5])
    torch.testing.assert_close(delta_w, b @ a)
    res = fair_correct(a, b, delta_w, FairSettings(match_norm=match_norm))
    assert res.cos_before == pytest.approx(1.0, abs=1e-6)
    assert res.cos_after >= res.cos_before
    assert res.delta_norm <= 1e-5 * float(b.norm())
    assert res.delta_b.shape == b.shape and res.delta_b.dtype == b.dtype


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("match_norm", [True, False])
def test_cosine_is_never_lowered(seed: int, match_norm: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 32, generator=g), torch.randn(24, 4, generator=g)
    cases = {
        "optimal": (a, b, b @ a),  # B̄Ā already has the best direction
        "optimal_scaled": (a, b, 3 * (b @ a)),
        "random_full_rank": (a, b, torch.randn(24, 32, generator=g)),
        "opposite": (a, b, -(b @ a)),
        "zero_b": (a, torch.zeros(24, 4), torch.randn(24, 32, generator=g)),
        "huge_lambda": (a, b, torch.randn(24, 4, generator=g) @ a),  # ΔB = 0 is the optimum for λ = 1e3
    }
    for name, (a_bar, b_bar, w) in cases.items():
        lam = 1e3 if name == "huge_lambda" else 0.01
        res = fair_correct(a_bar, b_bar, w, FairSettings(lam=lam, match_norm=match_norm))
        assert res.cos_after >= res.cos_before - 1e-9, name
        assert res.cos_after <= best_cosine(a_bar, w) + 1e-6, name
    if not match_norm:  # nothing to gain: ΔB stays exactly 0
        assert fair_correct(a, b, b @ a, FairSettings(match_norm=False)).delta_norm < 1e-6 * float(b.norm())
        assert fair_correct(*cases["huge_lambda"], FairSettings(lam=1e3, match_norm=False)).delta_norm == 0


def test_zero_b_bar_still_reaches_the_best_cosine() -> None:
    a, _, w = _layer(0, 5)
    res = fair_correct(a, torch.zeros(384, 8), w)
    assert res.cos_before == 0
    assert res.cos_after >= best_cosine(a, w) - 0.005


@pytest.mark.parametrize("drift", sorted(DRIFTS))
@pytest.mark.parametrize("k", [2, 5, 10])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_shaped_inputs_reach_the_least_squares_cosine_within_1e_4(
    seed: int, k: int, drift: str
) -> None:
    """Low drift (tiny, slight) and high drift (strong, hetero), the paper's objective (no rescaling):
    the cosine reaches that of the least-squares B* = ΔW·Ā⁺, the best any B reaches with this Ā."""
    layer = _layer(seed, k, drift)
    res = fair_correct(*layer)
    best = best_cosine(layer[0], layer[2])
    assert res.cos_after >= best - 1e-4
    assert res.cos_after > res.cos_before  # the correction does something, even on the tiny rounds
    rescaled = fair_correct(*layer, FairSettings(match_norm=True))  # the named extension
    assert rescaled.cos_after == pytest.approx(res.cos_after, abs=1e-9)
    assert _product_ratio(layer, rescaled) == pytest.approx(1.0, abs=1e-6)


def test_the_default_is_the_papers_objective_without_rescaling() -> None:
    assert FairSettings().match_norm is False
    layer = _layer(3, 10, "hetero")
    res = fair_correct(*layer)
    assert res.cos_after >= best_cosine(layer[0], layer[2]) - 1e-4


def test_lambda_zero_works_and_larger_lambda_shrinks_delta_b() -> None:
    layer = _layer(0, 5)
    best = best_cosine(layer[0], layer[2])
    for match_norm in (False, True):
        norms = []
        for lam in (0.0, 0.1, 1.0, 3.0):
            res = fair_correct(*layer, FairSettings(lam=lam, match_norm=match_norm))
            assert torch.isfinite(res.delta_b).all()
            norms.append(res.delta_norm)
            if lam == 0:
                assert res.cos_after >= best - 0.005
        assert all(x > y for x, y in itertools.pairwise(norms)), (match_norm, norms)


def test_scale_of_the_entries_does_not_change_the_direction() -> None:
    a, b, w = _layer(1, 5)
    plain = fair_correct(a, b, w, FairSettings(lam=0))
    scaled = fair_correct(100 * a, 1e-3 * b, 0.1 * w, FairSettings(lam=0))
    assert scaled.cos_after == pytest.approx(plain.cos_after, abs=1e-5)
    torch.testing.assert_close(
        scaled.delta_b, 1e-3 * plain.delta_b, rtol=1e-3, atol=1e-3 * float(b.abs().max())
    )


def test_vectorised_layers_equal_per_layer_results() -> None:
    ffn = {"d_out": 96, "d_in": 64, "r": 4}
    layers = {  # two shapes, interleaved: grouped by shape inside, returned in this order
        "attn.0": _layer(0, 3),
        "ffn.0": _layer(10, 4, "hetero", **ffn),
        "attn.1": _layer(1, 4, "mild"),
        "ffn.1": _layer(11, 2, "strong", **ffn),
        "attn.2": _layer(2, 5, "hetero"),
    }
    batched = fair_correct_layers(layers)
    assert list(batched) == list(layers)
    for name, layer in layers.items():
        single = fair_correct(*layer)
        assert batched[name].cos_before == pytest.approx(single.cos_before, abs=1e-9)
        assert batched[name].cos_after == pytest.approx(single.cos_after, abs=1e-7)
        assert batched[name].delta_norm == pytest.approx(single.delta_norm, rel=1e-4)
        torch.testing.assert_close(batched[name].delta_b, single.delta_b, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_inputs_device() -> None:
    a_bar, b_bar, delta_w = _layer(0, 5)
    res = fair_correct(a_bar.cuda(), b_bar.cuda(), delta_w.cuda())
    assert res.delta_b.device.type == "cuda"
    assert res.cos_after == pytest.approx(fair_correct(a_bar, b_bar, delta_w).cos_after, abs=1e-5)
