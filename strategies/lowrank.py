"""Pure low-rank aggregation math for FFA-LoRA, FedEx-LoRA and FLoRA (no Flower objects, no model).

Notation, per adapted layer (DESIGN.md section 5): client k sends A_k (r_k x d_in) and B_k (d_out x r_k),
has weight p_k (its share of examples) and LoRA scale s_k (alpha / r_k, or alpha / sqrt(r_k) with rsLoRA;
the caller computes the scale values). The effective weight is W = W0 + s * B @ A.

Conventions shared by every function here:

- ``weights`` are normalised to sum 1 with :func:`strategies.aggregation.normalised_weights`, so example
  counts and already normalised shares give the same answer (a non-positive total raises ValueError).
- Sums and products are done in float64 and the result is cast back to the inputs' dtype (the promoted
  dtype of all A and B tensors), on the device of the first A.
- Shapes are checked: every A_k is 2-D (r_k, d_in), every B_k is 2-D (d_out, r_k), and d_in / d_out are
  the same for every client. Any mismatch raises ValueError.

FFA-LoRA needs no function here: A is shared and frozen, so averaging B alone with
:func:`strategies.aggregation.weighted_average` is exact, since sum_k p_k (B_k A) == (sum_k p_k B_k) A.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fedlora.core.model.arrays import base_weight_name as base_weight_key
from strategies.aggregation import normalised_weights

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


def _check_factors(
    a_list: Sequence[Tensor],
    b_list: Sequence[Tensor],
    weights: Sequence[float],
    scales: Sequence[float] | None = None,
) -> tuple[list[float], list[float], torch.dtype]:
    """Validate one layer's client factors; return (normalised p_k, s_k, output dtype).

    ``scales`` defaults to 1.0 for every client.
    """
    n = len(a_list)
    if n == 0:
        raise ValueError("no client adapters to aggregate")
    if len(b_list) != n or len(weights) != n:
        raise ValueError(f"got {n} A factors, {len(b_list)} B factors and {len(weights)} weights")
    if scales is not None and len(scales) != n:
        raise ValueError(f"got {len(scales)} scales for {n} clients")
    for k, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"client {k}: A {tuple(a.shape)} and B {tuple(b.shape)} must both be 2-D")
    d_out, d_in = b_list[0].shape[0], a_list[0].shape[1]
    dtype = a_list[0].dtype
    for k, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"client {k}: B {tuple(b.shape)} and A {tuple(a.shape)} have different ranks")
        if a.shape[1] != d_in or b.shape[0] != d_out:
            raise ValueError(
                f"client {k}: B @ A is {b.shape[0]} x {a.shape[1]}, client 0's is {d_out} x {d_in}"
            )
        dtype = torch.promote_types(dtype, torch.promote_types(a.dtype, b.dtype))
    p = normalised_weights(weights)
    s = [1.0] * n if scales is None else [float(x) for x in scales]
    return p, s, dtype


def _f64(x: Tensor, like: Tensor) -> Tensor:
    """x as float64 on the device of ``like``."""
    return x.to(device=like.device, dtype=torch.float64)


def product_average(
    a_list: Sequence[Tensor],
    b_list: Sequence[Tensor],
    weights: Sequence[float],
    scales: Sequence[float] | None = None,
) -> Tensor:
    """The exact average of the clients' updates, sum_k p_k s_k B_k @ A_k, shape (d_out, d_in).

    ``weights`` are normalised to sum 1; ``scales`` (the s_k, dimensionless) default to 1.0 each.
    Ranks may differ between clients. Computed in float64, returned in the inputs' dtype.
    """
    p, s, dtype = _check_factors(a_list, b_list, weights, scales)
    return _product_sum64(a_list, b_list, [pk * sk for pk, sk in zip(p, s, strict=True)]).to(dtype)


def _product_sum64(a_list: Sequence[Tensor], b_list: Sequence[Tensor], coeffs: Sequence[float]) -> Tensor:
    """sum_k c_k B_k @ A_k in float64, on the device of the first A: the weighted sum of the clients'
    products, for every strategy that needs it (FedEx-LoRA's residual, LoRA-FAIR's ΔW)."""
    ref = a_list[0]
    acc = torch.zeros(b_list[0].shape[0], ref.shape[1], dtype=torch.float64, device=ref.device)
    for ck, a, b in zip(coeffs, a_list, b_list, strict=True):
        acc += ck * (_f64(b, ref) @ _f64(a, ref))
    return acc


def fedex_residual(
    a_list: Sequence[Tensor],
    b_list: Sequence[Tensor],
    weights: Sequence[float],
    scale: float,
) -> Tensor:
    """FedEx-LoRA residual s * (sum_k p_k B_k A_k - B_bar @ A_bar), shape (d_out, d_in).

    A_bar = sum_k p_k A_k and B_bar = sum_k p_k B_k are the FedIT averages, with the same normalised
    p_k as the product term and one LoRA scale ``scale`` (s, dimensionless) for every client, so every
    client must use the same rank. Folding the residual into the frozen base weights makes
    W0 + residual + s * B_bar @ A_bar == W0 + s * sum_k p_k B_k A_k exactly (up to float error).
    The residual is zero when all clients send the same factors. Computed in float64, returned in the
    inputs' dtype.
    """
    p, _, dtype = _check_factors(a_list, b_list, weights)
    ranks = {a.shape[0] for a in a_list}
    if len(ranks) != 1:
        raise ValueError(f"FedEx-LoRA needs one rank for every client, got ranks {sorted(ranks)}")
    ref = a_list[0]
    a_bar = torch.stack([pk * _f64(a, ref) for pk, a in zip(p, a_list, strict=True)]).sum(dim=0)
    b_bar = torch.stack([pk * _f64(b, ref) for pk, b in zip(p, b_list, strict=True)]).sum(dim=0)
    exact = _product_sum64(a_list, b_list, p)
    return (float(scale) * (exact - b_bar @ a_bar)).to(dtype)


def flora_stack(
    a_list: Sequence[Tensor],
    b_list: Sequence[Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """FLoRA stacking (Wang et al., NeurIPS 2024) of client adapters of possibly different ranks.

    Returns (A_stack, B_stack):

    - A_stack = [A_1; A_2; ...; A_K], the A_k concatenated by rows, unchanged: shape (sum r_k, d_in).
    - B_stack = [p_1 s_1 B_1, ..., p_K s_K B_K], the B_k concatenated by columns, each multiplied by its
      normalised weight p_k and LoRA scale s_k: shape (d_out, sum r_k).

    The weights and scales go on B only (once), so the stacked pair carries no extra scale: a client
    that loads it must use scale 1 for it (:func:`fedlora.core.model.offsets.merge_stack`). The product is
    exact, not an approximation, because block-matrix multiplication pairs column block k of B_stack only with
    row block k of A_stack: B_stack @ A_stack = sum_k (p_k s_k B_k) @ A_k, with no cross terms B_j A_k
    (unlike FedIT's B_bar @ A_bar). Rows of A_k and columns of B_k with the same client index line up
    because both are concatenated in client order. Returned in the inputs' dtype.
    """
    p, s, dtype = _check_factors(a_list, b_list, weights, scales)
    ref = a_list[0]
    a_stack = torch.cat([_f64(a, ref) for a in a_list], dim=0)
    b_stack = torch.cat([(pk * sk) * _f64(b, ref) for pk, sk, b in zip(p, s, b_list, strict=True)], dim=1)
    return a_stack.to(dtype), b_stack.to(dtype)


def layer_groups(state_keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Adapted-layer name -> (lora_A key, lora_B key), from peft state-dict key names.

    Only keys ending in ``.lora_A.weight`` / ``.lora_B.weight`` are grouped (e.g.
    ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` belongs to the layer
    ``base_model.model.bert.encoder.layer.0.attention.self.query``); every other key (the head, biases,
    base weights) is ignored. Layers are listed in the order their first LoRA key appears. Raises
    ValueError naming the key when an A has no B or a B has no A.
    """
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    order: dict[str, None] = {}
    for key in state_keys:
        if key.endswith(LORA_A_SUFFIX):
            layer = key[: -len(LORA_A_SUFFIX)]
            a_keys[layer] = key
        elif key.endswith(LORA_B_SUFFIX):
            layer = key[: -len(LORA_B_SUFFIX)]
            b_keys[layer] = key
        else:
            continue
        order.setdefault(layer, None)
    for layer in order:
        if layer not in b_keys:
            raise ValueError(f"LoRA key {a_keys[layer]!r} has no matching {layer + LORA_B_SUFFIX!r}")
        if layer not in a_keys:
            raise ValueError(f"LoRA key {b_keys[layer]!r} has no matching {layer + LORA_A_SUFFIX!r}")
    return {layer: (a_keys[layer], b_keys[layer]) for layer in order}


LayerUpdate = Callable[[list[Tensor], list[Tensor]], Tensor]


def add_to_offsets(
    offsets: Mapping[str, Tensor], updates: Sequence[Mapping[str, Tensor]], per_layer: LayerUpdate
) -> dict[str, Tensor]:
    """``offsets`` (keyed ``<layer>.base_layer.weight``) plus ``per_layer(A_list, B_list)`` per adapted layer.

    Used by the strategies that fold a full-rank update into the frozen base weights (FedEx-LoRA, FLoRA).
    """
    result = dict(offsets)
    for layer, (key_a, key_b) in layer_groups(updates[0]).items():
        delta = per_layer([u[key_a] for u in updates], [u[key_b] for u in updates])
        key = base_weight_key(layer)
        result[key] = result[key] + delta if key in result else delta
    return result


def rank_factor(scale_max: float, scale_k: float) -> float:
    """c_k = sqrt(s_max / s_k): a rank-r_max adapter's first r_k rows of A and columns of B, both
    multiplied by c_k, give at the client's scale s_k the same product as at s_max:
    s_k (c_k B_r)(c_k A_r) = s_max B_r A_r. One alpha convention for every rank."""
    return math.sqrt(scale_max / scale_k)


def truncate_state(state: Mapping[str, Tensor], rank: int, factor: float) -> dict[str, Tensor]:
    """``state`` with every LoRA A cut to its first ``rank`` rows and every B to its first ``rank``
    columns, both multiplied by ``factor`` (:func:`rank_factor`); other keys unchanged."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(LORA_A_SUFFIX):
            out[key] = (value[:rank] * factor).contiguous()
        elif key.endswith(LORA_B_SUFFIX):
            out[key] = (value[:, :rank] * factor).contiguous()
        else:
            out[key] = value
    return out


def pad_factors(a: Tensor, b: Tensor, rank: int, factor: float) -> tuple[Tensor, Tensor]:
    """HetLoRA's zero-padding: A_k (r_k x d_in) and B_k (d_out x r_k), divided by ``factor`` (the
    inverse of :func:`truncate_state`), padded with zero rows of A and zero columns of B to ``rank``."""
    r_k = a.shape[0]
    if r_k > rank or b.shape[1] != r_k:
        raise ValueError(f"cannot pad A {tuple(a.shape)} and B {tuple(b.shape)} to rank {rank}")
    a_pad = torch.zeros(rank, a.shape[1], dtype=a.dtype, device=a.device)
    b_pad = torch.zeros(b.shape[0], rank, dtype=b.dtype, device=b.device)
    a_pad[:r_k] = a / factor
    b_pad[:, :r_k] = b / factor
    return a_pad, b_pad


def svd_factors(delta: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
    """The best rank-``rank`` approximation of ``delta`` (Eckart-Young: its truncated SVD) as LoRA
    factors at scale s: A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A = U_r S_r V_r^T.
    Components are ordered by singular value, so the first r_k of them are the best rank-r_k one.
    Computed in float64, returned in ``delta``'s dtype; a rank above min(d_out, d_in) is padded with zeros."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    keep = min(rank, s.shape[0])
    root = torch.sqrt(s[:keep] / scale)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64, device=delta.device)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64, device=delta.device)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    return a.to(delta.dtype), b.to(delta.dtype)
