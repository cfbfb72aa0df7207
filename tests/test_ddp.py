"""Distributed DP under secure aggregation (``privacy.mode = "ddp"``, the Skellam mechanism): the noise
in a decoded sum, the wrap-around bound, the accounting against an independent recomputation, the
``[privacy.options]`` table, and a federation that reports epsilon.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import get_privacy_spent

from fedlora.core.config import ConfigError
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.privacy import skellam
from fedlora.run.experiment import load_experiment, preflight

DDP = ("secure_aggregation.enabled=true", 'privacy.mode="ddp"', "privacy.noise_multiplier=1.0")


def independent_epsilon(rows: list[dict], delta: float) -> float:  # type: ignore[type-arg]
    """Epsilon from the noise each round recorded, written out here from Agarwal et al.'s bound (not with
    the product's code): per round alpha l2^2 / (4 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (16 mu^2),
    3 l1 / (4 mu)), summed over rounds, converted by Opacus at the integer orders 2..256."""
    orders = list(range(2, 257))
    total = [0.0] * len(orders)
    for row in rows:
        if not row.get("ddp_arrived"):
            continue
        l2, l1, mu = row["ddp_l2_sensitivity"], row["ddp_l1_sensitivity"], row["ddp_mu"]
        for i, a in enumerate(orders):
            total[i] += a * l2 * l2 / (4 * mu) + min(
                ((2 * a - 1) * l2 * l2 + 6 * l1) / (16 * mu * mu), 3 * l1 / (4 * mu)
            )
    eps, _ = get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(eps)


def test_the_decoded_sum_carries_the_full_noise_and_nothing_wraps() -> None:
    """Four clients' shares add up to Skellam noise of std sigma * Delta_2 in integer units; decoded, the
    sum of the clipped updates plus noise of std sigma * Delta_2 * C / L, unbiased."""
    m, length, sigma, clip = 4, 20_000, 1.0, 0.5
    modulus = 2**32
    scale = skellam.choose_scale(m, sigma, modulus, length, 1e-9)
    codec = skellam.SkellamCodec(clip, scale, skellam.share_mu(sigma, scale, length, m), modulus)
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 1, length) for _ in range(m)]  # norms ~141: all clipped to 0.5
    encoded = [codec.encode(u, 1.0, seed=0) for u in updates]
    assert [c for _, c in encoded] == [1, 1, 1, 1]
    summed, weight = codec.decode(sum(v for v, _ in encoded) % modulus, m)
    assert weight == m
    exact = sum(u * clip / np.linalg.norm(u) for u in updates)
    residual = summed - exact
    expected = sigma * skellam.sensitivities(scale, length)[0] * clip / scale
    assert abs(residual.std() / expected - 1) < 0.03
    assert abs(residual.mean()) < 4 * expected / math.sqrt(length)
    assert skellam.wrap_bound(scale, m, sigma, modulus, length) <= 1e-9


def test_a_small_modulus_picks_a_small_scale_and_still_does_not_wrap() -> None:
    """With 2**20 the scale shrinks to keep the bound; a scale four times larger would wrap."""
    m, length, sigma, modulus = 8, 5_000, 2.0, 2**20
    scale = skellam.choose_scale(m, sigma, modulus, length, 1e-6)
    assert (
        skellam.wrap_bound(scale, m, sigma, modulus, length)
        <= 1e-6
        < skellam.wrap_bound(4 * scale, m, sigma, modulus, length)
    )
    codec = skellam.SkellamCodec(1.0, scale, skellam.share_mu(sigma, scale, length, m), modulus)
    rng = np.random.default_rng(1)
    updates = [np.zeros(length) for _ in range(m)]
    for u in updates:  # the worst case for wrap-around: all the norm on one coordinate, same sign
        u[0] = 5.0
    total = sum(codec.encode(u, 1.0, seed=0)[0] for u in updates) % modulus
    summed, _ = codec.decode(total, m)
    noise_std = sigma * skellam.sensitivities(scale, length)[0] / scale
    assert abs(summed[0] - m) < 8 * noise_std
    del rng
    with pytest.raises(ValueError, match="no integer scale keeps the wrap-around probability"):
        skellam.choose_scale(1000, 2.0, 2**12, length, 1e-9)


def test_the_tail_bound_holds_empirically() -> None:
    rng = np.random.default_rng(2)
    mu, t = 50.0, 40
    draws = rng.poisson(mu, 1_000_000) - rng.poisson(mu, 1_000_000)
    assert np.mean(np.abs(draws) >= t) <= skellam.tail_bound(mu, t)
    assert skellam.tail_bound(mu, t) < 1e-3


def test_accounting_matches_the_independent_formula_and_the_gaussian_limit() -> None:
    """The product's epsilon equals the formula written out in this file, and for large mu (tiny Skellam
    excess) Opacus's RDP accountant of the Gaussian mechanism with sigma = sqrt(2 mu) / l2, q = 1."""
    from opacus.accountants import RDPAccountant

    l2, l1 = 1e6 + 100.0, 1e8
    history = [(l2, l1, (1.2 * l2) ** 2 / 2)] * 5
    rows = [
        {"ddp_arrived": 1, "ddp_l2_sensitivity": a, "ddp_l1_sensitivity": b, "ddp_mu": c}
        for a, b, c in history
    ]
    assert skellam.epsilon(history, 1e-5) == pytest.approx(independent_epsilon(rows, 1e-5), rel=1e-9)
    gaussian = RDPAccountant()
    gaussian.history = [(1.2, 1.0, 5)]
    assert skellam.epsilon(history, 1e-5) == pytest.approx(gaussian.get_epsilon(1e-5), rel=0.02)
    fewer = [(l2, l1, (1.2 * l2) ** 2 / 2 * 0.5)] * 5  # half the shares arrived each round
    assert skellam.epsilon(fewer, 1e-5) > skellam.epsilon(history, 1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['privacy.mode="ddp"', "privacy.noise_multiplier=1.0"], "needs secure_aggregation.enabled = true"),
        ([*DDP, "privacy.options.wrap_bound=2.0"], "privacy.options.wrap_bound = 2.0 is invalid"),
        (
            [*DDP, "privacy.options.bits=3"],
            "privacy.options.bits is unknown for privacy.mode = 'ddp'; valid options: wrap_bound",
        ),
        ([*DDP, 'privacy.accountant="prv"'], "privacy.accountant = 'prv' is invalid: expected 'rdp'"),
        (
            ["privacy.options.wrap_bound=1e-6"],
            "privacy.options.wrap_bound is unknown for privacy.mode = 'none'",
        ),
        (['privacy.mode="ddp"', "secure_aggregation.enabled=true"], "needs privacy.target_epsilon"),
        (
            [*DDP, 'privacy.options.wrap_bound="x"'],
            "privacy.options.wrap_bound = 'x' is invalid: expected a number",
        ),
    ],
)
def test_ddp_settings_are_checked_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_existing_privacy_keys_still_load() -> None:
    cfg = load_experiment(None, [*DDP, "privacy.options.wrap_bound=1e-6", "privacy.clip_norm=0.5"])
    assert cfg.privacy.options == {"wrap_bound": 1e-6} and cfg.privacy.clip_norm == 0.5
    assert load_experiment(
        None, ['privacy.mode="dp-updates"', "privacy.noise_multiplier=1.0", 'privacy.placement="client"']
    )


@pytest.mark.e2e
def test_a_ddp_federation_reports_epsilon_that_a_recomputation_agrees_with(
    run_in_memory, tiny_bert, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Six clients, one fails in training every round: the rounds record five shares of noise, epsilon
    grows, and the recomputation from rounds.jsonl alone agrees; the summary has the final epsilon."""
    data = write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path / "t.csv")
    overrides = [
        f'model.path="{tiny_bert.path}"',
        f'data.source="{data}"',
        'data.label="topic"',
        f"data.labels={json.dumps(sorted(TOPICS))}",
        'data.partitioner="iid"',
        "data.max_length=16",
        "data.test_size=12",
        "federation.num_clients=6",
        "federation.rounds=2",
        "train.local_steps=2",
        "faults.raise_fraction=0.17",
        *DDP,
    ]
    run = run_in_memory(preflight(load_experiment(None, overrides)), "ddp")
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["ddp_arrived"] for r in rows] == [5.0, 5.0]
    assert [r["noise_multiplier"] for r in rows] == pytest.approx([math.sqrt(5 / 6)] * 2)
    assert 0 < rows[0]["epsilon"] < rows[1]["epsilon"] < math.inf
    for i in range(len(rows)):
        assert rows[i]["epsilon"] == pytest.approx(
            independent_epsilon(rows[: i + 1], rows[i]["delta"]), rel=1e-9
        )
    assert all(r["ddp_wrap_bound"] <= 1e-9 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_epsilon"] == rows[-1]["epsilon"] and summary["privacy_mode"] == "ddp"
