"""User-level DP on the arrays that travel: clip each client's update, add Gaussian noise to the sum.

With expected m clients per round (Poisson sampling of clients with rate q = m / N), the release is

    new = sent + (sum_k clip_C(u_k - sent) + N(0, (sigma * C)^2 I)) / m

The sum has sensitivity C to one client's presence, so each round is the subsampled Gaussian
mechanism with noise multiplier sigma and rate q. Dividing by the fixed expected m (not by the
number that replied) keeps the sensitivity bounded. Placements:

* ``server``: the server clips every update and draws all the noise;
* ``client``: each client clips its own update and adds N(0, sigma^2 C^2 / m), so m clients' shares
  sum to the full noise even under secure aggregation; when fewer than m replied, the server adds the
  missing share, N(0, (m - r) / m * sigma^2 C^2), so the noise stays calibrated.

Only the arrays in the messages are touched (for FFA-LoRA B and the head, never the frozen A).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedlora.core.model.arrays import State, global_norm


def difference(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> State:
    """``new - old`` for every key of ``new`` (both must hold it, with the same shape)."""
    return {k: v - old[k] for k, v in new.items()}


def clip(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[State, float]:
    """``update`` scaled by min(1, C / ||update||); returns (clipped update, norm before clipping)."""
    norm = global_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


def gaussian_like(arrays: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> State:
    """Independent N(0, std^2) noise with the shapes of ``arrays`` (keys in sorted order)."""
    return {
        k: torch.normal(0.0, std, size=arrays[k].shape, generator=generator, dtype=torch.float32).to(
            arrays[k].dtype
        )
        if std > 0
        else torch.zeros_like(arrays[k])
        for k in sorted(arrays)
    }


def client_share(
    received: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
) -> tuple[State, float]:
    """Client placement: ``received`` + clipped update + this client's noise share; and the raw norm."""
    clipped, norm = clip(difference({k: trained[k] for k in received}, received), clip_norm)
    noise = gaussian_like(clipped, noise_multiplier * clip_norm / math.sqrt(expected_clients), generator)
    return {k: received[k] + clipped[k] + noise[k] for k in received}, norm


def private_mean(
    sent: Mapping[str, torch.Tensor],
    replies: Sequence[Mapping[str, torch.Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    placement: str,
    generator: torch.Generator,
) -> tuple[State, dict[str, float]]:
    """The noised mean of the clients' updates applied to ``sent``; and diagnostics.

    ``replies`` are the clients' arrays (for ``client`` placement already clipped and noised by them).
    Diagnostics: ``dp_clipped`` (share of updates whose norm exceeded C, server placement) and
    ``dp_noise_std`` (std of the noise added to the sum here, per coordinate).
    """
    sigma_c = noise_multiplier * clip_norm
    deltas = [difference(r, sent) for r in replies]
    clipped_count = 0
    if placement == "server":
        pairs = [clip(d, clip_norm) for d in deltas]
        deltas = [d for d, _ in pairs]
        clipped_count = sum(1 for _, norm in pairs if norm > clip_norm)
        std = sigma_c
    else:
        std = sigma_c * math.sqrt(max(0.0, expected_clients - len(replies)) / expected_clients)
    keys = sorted(replies[0]) if replies else sorted(sent)
    total = {k: sum((d[k] for d in deltas), torch.zeros_like(sent[k])) for k in keys}
    noise = gaussian_like({k: sent[k] for k in keys}, std, generator)
    mean = {k: sent[k] + (total[k] + noise[k]) / expected_clients for k in keys}
    info = {"dp_clipped": clipped_count / max(len(replies), 1), "dp_noise_std": std}
    return mean, info
