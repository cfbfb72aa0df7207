"""Distributed DP in the integer domain: the Skellam mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021).

Each client clips its update to L2 norm C, maps it to integers at scale L / C (Flower's stochastic
quantiser with range [-C, C] and 2L levels: unbiased, each coordinate off by less than 1), and adds
Skellam noise Sk(mu) = Poisson(mu) - Poisson(mu) to every coordinate (variance 2 mu). Sums of
independent Skellam noise are Skellam: the r shares that reach the masked sum add up to Sk(r mu)
exactly, so the noise in the decoded sum is known exactly whoever dropped out. (The discrete Gaussian
of Kairouz et al. is not closed under sums; its sampler is not shipped by NumPy, Poisson's is.)

Sensitivity of the sum to one client's update, in integer units: Delta_2 <= L + sqrt(d) (the clipped
update has norm <= L, randomised rounding moves each of the d coordinates by less than 1) and
Delta_1 <= sqrt(d) L + d. The Skellam mechanism with total parameter mu_t is (alpha, eps(alpha))-RDP
with eps(alpha) = alpha Delta_2^2 / (4 mu_t) + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (16 mu_t^2),
3 Delta_1 / (4 mu_t)) (Agarwal et al., Theorem 3.5): the first term is the Gaussian mechanism's with
noise multiplier sigma = sqrt(2 mu_t) / Delta_2, computed with Opacus's RDP analysis (q = 1); the second
is Skellam's excess. Rounds compose by adding RDP; Opacus converts to (epsilon, delta). Orders are the
integers 2..256.

Wrap-around: the sum lives modulo M = 2**bits and is decoded into (-M/2, M/2]. Each coordinate of m
clients' updates is at most m (L + 1) in size; the noise exceeds t = M/2 - 1 - m (L + 1) with probability
at most 2 exp(-(t asinh(t / 2 mu_t) - 2 mu_t (sqrt(1 + (t / 2 mu_t)^2) - 1))) (Chernoff, from Skellam's
moment generating function exp(2 mu (cosh s - 1))), and a union bound over the d coordinates bounds the
probability that any of them wraps. L is the largest scale whose bound stays below the target.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.common.secure_aggregation.quantization import quantize

from fedlora.core.protocol.codec import seeded_numpy

ORDERS = list(range(2, 257))
"""RDP orders (integers) at which rounds are composed."""
MAX_SCALE = 2**29
"""Flower's quantiser returns int32: 2L levels must fit."""
MAX_SHARE_MU = 1e11
"""Largest Poisson mean a client draws: NumPy's sampler drifts above about 1e13 (measured with 200,000
draws: variance 1.005x at 1e12, 1.035x at 1e15, 1.42x at 1e16), which would add noise nobody accounts."""

Entry = tuple[float, float, float]
"""One round in the accountant: (Delta_2, Delta_1, total Skellam parameter mu_t that arrived)."""


def tail_bound(mu: float, t: float) -> float:
    """P(|Sk(mu)| >= t) <= this (Chernoff); 1 when t <= 0."""
    if t <= 0:
        return 1.0
    x = t / (2 * mu)
    exponent = t * math.asinh(x) - 2 * mu * (math.sqrt(1 + x * x) - 1)
    return min(1.0, 2 * math.exp(-exponent))


def sensitivities(scale: int, length: int) -> tuple[float, float]:
    """(Delta_2, Delta_1) in integer units of one client's rounded, clipped update."""
    return scale + math.sqrt(length), math.sqrt(length) * scale + length


def share_mu(noise_multiplier: float, scale: int, length: int, clients: int) -> float:
    """Each client's Skellam parameter: m shares sum to variance (sigma Delta_2)^2."""
    l2, _ = sensitivities(scale, length)
    return (noise_multiplier * l2) ** 2 / (2 * clients)


def wrap_bound(scale: int, clients: int, noise_multiplier: float, modulus: int, length: int) -> float:
    """Probability bound that any coordinate of a round's decoded sum wraps around (all m arrive: the
    most signal and noise)."""
    mu = clients * share_mu(noise_multiplier, scale, length, clients)
    headroom = modulus / 2 - 1 - clients * (scale + 1)
    return min(1.0, length * tail_bound(mu, headroom))


def choose_scale(clients: int, noise_multiplier: float, modulus: int, length: int, target: float) -> int:
    """The largest integer scale L (at most :data:`MAX_SCALE`, and with shares of at most
    :data:`MAX_SHARE_MU`) whose wrap-around bound is <= ``target``; ValueError when even L = 1 wraps too
    often."""
    if wrap_bound(1, clients, noise_multiplier, modulus, length) > target:
        raise ValueError(
            f"privacy.mode = 'ddp': no integer scale keeps the wrap-around probability below {target:g} "
            f"with {clients} clients, noise multiplier {noise_multiplier:g} and modulus "
            f"2**{modulus.bit_length() - 1}; raise secure_aggregation.modulus_bits"
        )
    low, high = 1, MAX_SCALE

    def fits(scale: int) -> bool:
        mu = share_mu(noise_multiplier, scale, length, clients)
        return mu <= MAX_SHARE_MU and wrap_bound(scale, clients, noise_multiplier, modulus, length) <= target

    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def rdp(history: Sequence[Entry]) -> list[float]:
    """RDP at :data:`ORDERS` of the rounds in ``history`` (composed by addition)."""
    # start-up: Opacus takes about a second to import; only runs with DP need it
    from opacus.accountants.analysis.rdp import compute_rdp

    total = np.zeros(len(ORDERS))
    for l2, l1, mu in history:
        sigma = math.sqrt(2 * mu) / l2
        gaussian = np.asarray(compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=ORDERS))
        excess = [min(((2 * a - 1) * l2**2 + 6 * l1) / (16 * mu**2), 3 * l1 / (4 * mu)) for a in ORDERS]
        total += gaussian + np.asarray(excess)
    return [float(v) for v in total]


def epsilon(history: Sequence[Entry], delta: float) -> float:
    """Epsilon at ``delta`` spent by the rounds in ``history`` (0 for none)."""
    if not history:
        return 0.0
    # start-up: as in rdp()
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp(history), delta=delta)
    return float(eps)


@dataclass(frozen=True)
class SkellamCodec:
    """A client's clipped update at integer scale L plus its Skellam share, as ``[1, z_1 + n_1, ...]``
    modulo M; the decoded sum is back in float units, with the number of shares that arrived."""

    clip_norm: float
    scale: int
    mu: float
    modulus: int

    def encode(self, update: np.ndarray, weight: float, seed: int) -> tuple[np.ndarray, int]:
        """``weight`` is ignored (every client weighs the same) and ``seed`` too: the rounding and the
        noise come from the OS's entropy, which the server cannot replay."""
        norm = float(np.linalg.norm(update))
        clipped = norm > self.clip_norm
        values = np.asarray(update, dtype=np.float64) * (min(1.0, self.clip_norm / norm) if clipped else 1.0)
        with seeded_numpy(secrets.randbits(32)):
            (ints,) = quantize([values], self.clip_norm, 2 * self.scale)
        rng = np.random.default_rng()
        noise = rng.poisson(self.mu, values.size) - rng.poisson(self.mu, values.size)
        body = ints.astype(np.int64) + noise
        return np.concatenate([np.array([1], dtype=np.int64), body]) % self.modulus, int(clipped)

    def decode(self, total: np.ndarray, arrived: int) -> tuple[np.ndarray, float]:
        """(the noisy sum of the clipped updates, the number of shares in it)."""
        centred = (np.asarray(total[1:], dtype=np.int64) - arrived * self.scale) % self.modulus
        centred = np.where(centred >= self.modulus // 2, centred - self.modulus, centred)
        return centred.astype(np.float64) * (self.clip_norm / self.scale), float(total[0])
