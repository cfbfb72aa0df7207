"""Aggregation math with hand-computed answers (no Flower, no model)."""

from __future__ import annotations

import pytest
import torch

from strategies.aggregation import normalised_weights, weighted_average


def test_weights_are_example_shares() -> None:
    assert normalised_weights([10, 30]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        normalised_weights([0, 0])
    with pytest.raises(ValueError):
        normalised_weights([])


def test_weighted_average_known_answer() -> None:
    a = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([[3.0, 6.0]]), "b": torch.tensor([4.0])}
    out = weighted_average([a, b], [1, 3])  # p = 0.25, 0.75
    torch.testing.assert_close(out["w"], torch.tensor([[2.5, 5.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([3.0]))
    assert out["w"].dtype == torch.float32


def test_identical_clients_aggregate_to_themselves() -> None:
    g = torch.Generator().manual_seed(0)
    state = {"x": torch.randn(4, 3, generator=g), "y": torch.randn(5, generator=g)}
    out = weighted_average([state, state, state], [5, 1, 9])
    for key in state:
        torch.testing.assert_close(out[key], state[key])


def test_mismatched_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="keys"):
        weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])


def test_fedit_product_is_biased() -> None:
    """mean(B)·mean(A) != mean(B·A): the reason LoRA-FAIR, FedEx-LoRA and FLoRA exist."""
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    avg = weighted_average([{"A": a1, "B": b1}, {"A": a2, "B": b2}], [1, 1])
    ideal = 0.5 * (b1 @ a1) + 0.5 * (b2 @ a2)  # diag(0.5, 0.5)
    fedit = avg["B"] @ avg["A"]  # all entries 0.25
    torch.testing.assert_close(ideal, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(fedit, torch.full((2, 2), 0.25))
