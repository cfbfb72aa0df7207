"""A client's update as integers modulo 2**bits for secure aggregation, and the server's decoding of their
sum: Flower's stochastic quantisation (:mod:`flwr.common.secure_aggregation.quantization`), and its way
of sending a weighted mean (each client sends its quantised weight and its update multiplied by it; the
server divides the summed update by the summed weight).

A vector is ``[w_q, z_1, ..., z_d]``: the quantised weight, then the update's coordinates. Privacy
mechanisms may bring their own codec (``fedlora.privacy``: noise added in the integer domain).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedlora.core.config import SecureAggregationConfig


class Codec(Protocol):
    """Integers for the masked sum, and back."""

    @property
    def modulus(self) -> int:
        """The field's size, 2**bits: every encoded value is below it."""
        ...

    def encode(self, update: np.ndarray, weight: float, seed: int) -> tuple[np.ndarray, int]:
        """``update`` (float, flat) with its unnormalised ``weight`` as d + 1 integers in [0, modulus), and
        how many coordinates had to be clipped."""
        ...

    def decode(self, total: np.ndarray, arrived: int) -> tuple[np.ndarray, float]:
        """From the sum of ``arrived`` clients' vectors: (the sum of their weighted updates, the sum of
        their weights); the weighted mean is the first over the second."""
        ...


@contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """NumPy's global generator seeded with ``seed`` inside the block (Flower's quantiser draws from it),
    restored afterwards."""
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


@dataclass(frozen=True)
class WeightedQuantiser:
    """Flower's SecAgg+ encoding: weight w -> ratio w / max_weight, quantised to q = round(ratio * R);
    update -> update * q / R, clipped to [-c, c] and stochastically rounded to R = 2**bits levels."""

    clipping_range: float
    levels: int
    modulus: int
    max_weight: float

    @classmethod
    def of(cls, cfg: SecureAggregationConfig) -> WeightedQuantiser:
        """The codec of the ``[secure_aggregation]`` settings."""
        return cls(cfg.clipping_range, 2**cfg.quantization_bits, 2**cfg.modulus_bits, cfg.max_weight)

    def step(self) -> float:
        """The quantisation step 2c / R: each client's coordinate is off by less than this."""
        return 2 * self.clipping_range / self.levels

    def encode(self, update: np.ndarray, weight: float, seed: int) -> tuple[np.ndarray, int]:
        q = round(weight / self.max_weight * self.levels)
        scaled = np.asarray(update, dtype=np.float64) * (q / self.levels)
        clipped = int((np.abs(scaled) > self.clipping_range).sum())
        with seeded_numpy(seed):
            (ints,) = quantize([scaled], self.clipping_range, self.levels)
        vector = np.concatenate([np.array([q], dtype=np.int64), ints.astype(np.int64)])
        return vector % self.modulus, clipped

    def decode(self, total: np.ndarray, arrived: int) -> tuple[np.ndarray, float]:
        weight = float(total[0]) / self.levels
        (summed,) = dequantize([np.asarray(total[1:], dtype=np.int64)], self.clipping_range, self.levels)
        return summed - (arrived - 1) * self.clipping_range, weight
