"""FedIT: FedAvg on both LoRA factors and the head (Zhang et al., 2024).

A_bar = sum_k p_k A_k and B_bar = sum_k p_k B_k, with p_k the client's share of examples.
The product B_bar A_bar differs from the ideal sum_k p_k B_k A_k; later strategies correct that.
Everything here is :class:`~strategies.base.LoraStrategy`'s default.
"""

from __future__ import annotations

from strategies.base import LoraStrategy
from strategies.registry import register


@register("fedit")
class FedIT(LoraStrategy):
    """FedAvg of every adapter and head tensor."""

    description = "FedAvg of LoRA A, B and the head (biased: mean(B)·mean(A) != mean(B·A))"
