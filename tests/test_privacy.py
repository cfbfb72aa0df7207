"""Privacy math: accounting against independent references, calibration, clipping and noise."""

from __future__ import annotations

import itertools
import math
import re

import dp_accounting
import pytest
import torch
from opacus.accountants import RDPAccountant

from fedlora.core.config import ConfigError, ExperimentConfig, from_dict
from fedlora.privacy import accounting
from fedlora.privacy.dp_updates import client_share, clip, global_norm, private_mean
from fedlora.privacy.mechanisms import dp_sgd, dp_updates, mechanism_for
from fedlora.privacy.mechanisms import registry as mechanisms
from fedlora.run.experiment import check_strategy

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Google's dp-accounting RDP accountant for `steps` Poisson-subsampled Gaussian mechanisms."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = dp_accounting.rdp.RdpAccountant(ORDERS)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.1, 0.01, 100), (0.8, 0.05, 64), (2.0, 1.0, 10), (1.0, 2 / 3, 5)]
)
def test_epsilon_matches_an_independent_rdp_accountant(sigma: float, q: float, steps: int) -> None:
    ours = accounting.epsilon([(sigma, q, steps)], 1e-5, "rdp")
    reference = _dp_accounting_epsilon(sigma, q, steps, 1e-5)
    # Same mechanism, orders and conversion; dp-accounting drops a few fractional orders where its
    # series does not converge, which moves the result by < 0.05% (measured).
    assert ours == pytest.approx(reference, rel=1e-3)


def test_epsilon_accumulates_over_rounds_and_grows_monotonically() -> None:
    per_round = (1.0, 0.02, 8)
    values = [accounting.epsilon([per_round] * k, 1e-5) for k in range(1, 9)]
    assert all(b > a for a, b in itertools.pairwise(values))
    # k rounds of 8 steps is the same mechanism as one history entry of 8k steps.
    whole = RDPAccountant()
    whole.history = [(1.0, 0.02, 64)]
    assert values[-1] == pytest.approx(whole.get_epsilon(1e-5), rel=1e-9)
    assert accounting.epsilon([], 1e-5) == 0.0
    assert accounting.epsilon([(0.0, 0.02, 8)], 1e-5) == math.inf


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
@pytest.mark.parametrize("kind", ["rdp", "prv", "gdp"])
@pytest.mark.parametrize("target", [1.0, 3.0, 6.0])
def test_calibration_lands_at_or_just_below_the_target(kind: str, target: float) -> None:
    sigma = accounting.calibrate(target, 1e-5, 16 / 1500, 64, kind)
    spent = accounting.epsilon([(sigma, 16 / 1500, 64)], 1e-5, kind)
    assert target - 0.05 <= spent <= target


def test_budget_check_and_history_round_trip() -> None:
    history = [(1.0, 0.02, 8)] * 3
    assert accounting.history_from_lists(accounting.history_to_lists(history)) == history
    spent_next = accounting.epsilon([*history, (1.0, 0.02, 8)], 1e-5)
    assert accounting.would_exceed(history, (1.0, 0.02, 8), spent_next - 1e-6, 1e-5, "rdp")
    assert not accounting.would_exceed(history, (1.0, 0.02, 8), spent_next + 1e-6, 1e-5, "rdp")
    assert not accounting.would_exceed(history, (1.0, 0.02, 8), 0.0, 1e-5, "rdp")  # no budget


def _cfg(**privacy_keys: object) -> ExperimentConfig:
    """A config with these ``[privacy]`` keys, checked as the experiment loader checks them."""
    cfg = from_dict({"privacy": dict(privacy_keys), "federation": {"num_clients": 10, "rounds": 8}})
    return mechanisms.validate(cfg)


def test_dp_sgd_plan_spends_the_target_over_the_planned_run() -> None:
    cfg = _cfg(mode="dp-sgd", target_epsilon=3.0)
    noise, rate, steps = dp_sgd.plan(cfg, 1000)
    assert rate == 16 / 1000 and steps == 8
    assert 2.95 <= accounting.epsilon([(noise, rate, steps)] * 8, 1e-5) <= 3.0


def test_dp_updates_epsilon_after_k_rounds_is_the_subsampled_gaussian() -> None:
    cfg = from_dict(
        {
            "privacy": {"mode": "dp-updates", "noise_multiplier": 1.2},
            "federation": {"num_clients": 100, "rounds": 20, "fraction": 0.1},
        }
    )
    assert dp_updates.client_rate(cfg) == 0.1 and dp_updates.expected_clients(cfg) == pytest.approx(10.0)
    eps = accounting.epsilon(dp_updates.update_history(cfg, 20), 1e-5)
    assert eps == pytest.approx(_dp_accounting_epsilon(1.2, 0.1, 20, 1e-5), rel=1e-3)


def test_privacy_checks_name_the_key_and_the_fix() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("privacy.delta = 0.01 is invalid: it must be below 1 / 1000")
    ):
        mechanism_for(_cfg(mode="dp-sgd", noise_multiplier=1.0, delta=0.01)).preflight([400, 1000])
    too_little = _cfg(mode="dp-updates", noise_multiplier=0.3, target_epsilon=1.0)
    with pytest.raises(ConfigError, match=re.escape("target_epsilon = 1 is exceeded")):
        mechanism_for(too_little).preflight([100] * 10)
    with pytest.raises(ConfigError, match=re.escape("needs privacy.target_epsilon")):
        _cfg(mode="dp-sgd")
    with pytest.raises(ConfigError, match=re.escape("cannot protect strategy 'lora-fair'")):
        check_strategy(
            from_dict(
                {
                    "privacy": {"mode": "dp-updates", "noise_multiplier": 1.0},
                    "strategy": {"name": "lora-fair"},
                }
            )
        )
    with pytest.raises(ConfigError, match=re.escape("privacy.mode = 'dp' is invalid")):
        _cfg(mode="dp")


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b": torch.randn(64, 8, generator=g) * scale, "head": torch.randn(3, 64, generator=g) * scale}


def test_clipping_never_exceeds_the_bound_and_keeps_small_updates() -> None:
    for seed in range(50):
        big = _state(seed, scale=10.0)
        clipped, norm = clip(big, 0.7)
        assert norm > 0.7 and global_norm(clipped) <= 0.7 * (1 + 1e-6)
    small = _state(0, scale=1e-4)
    kept, _ = clip(small, 0.7)
    assert all(torch.equal(kept[k], small[k]) for k in small)


def test_server_noise_has_std_sigma_c_on_the_sum() -> None:
    sent = {k: torch.zeros_like(v) for k, v in _state(0).items()}
    replies = [{k: torch.zeros_like(v) for k, v in sent.items()} for _ in range(4)]  # zero updates
    draws = []
    for r in range(200):
        mean, info = private_mean(
            sent,
            replies,
            clip_norm=0.5,
            noise_multiplier=1.5,
            expected_clients=4.0,
            placement="server",
            generator=torch.Generator().manual_seed(r),
        )
        draws.append(torch.cat([v.flatten() for v in mean.values()]) * 4.0)  # back to the sum
    noise = torch.stack(draws)
    # 200 x 704 draws: the sample std is within ~0.2% of the truth; 2% is far beyond chance.
    assert float(noise.std()) == pytest.approx(1.5 * 0.5, rel=0.02)
    assert abs(float(noise.mean())) < 0.01
    assert info["dp_noise_std"] == pytest.approx(0.75)


def test_client_shares_sum_to_the_full_noise_and_missing_shares_are_topped_up() -> None:
    received = {k: torch.zeros_like(v) for k, v in _state(0).items()}
    trained = dict(received)
    sums = []
    for r in range(100):
        shares = [
            client_share(
                received,
                trained,
                clip_norm=0.5,
                noise_multiplier=1.5,
                expected_clients=4.0,
                generator=torch.Generator().manual_seed(1000 * r + k),
            )[0]
            for k in range(4)
        ]
        sums.append(torch.cat([sum(s[k] for s in shares).flatten() for k in sorted(received)]))
    assert float(torch.stack(sums).std()) == pytest.approx(0.75, rel=0.03)
    # Only 1 of 4 expected replied: the server adds the missing 3/4 of the variance.
    _, info = private_mean(
        received,
        [trained],
        clip_norm=0.5,
        noise_multiplier=1.5,
        expected_clients=4.0,
        placement="client",
        generator=torch.Generator().manual_seed(0),
    )
    assert info["dp_noise_std"] == pytest.approx(0.75 * math.sqrt(3 / 4))


def test_noised_mean_without_noise_is_the_clipped_mean_over_the_expected_count() -> None:
    sent = _state(0)
    replies = [{k: sent[k] + _state(s, 0.001)[k] for k in sent} for s in (1, 2, 3)]
    mean, _ = private_mean(
        sent,
        replies,
        clip_norm=1e6,
        noise_multiplier=0.0,
        expected_clients=4.0,
        placement="server",
        generator=torch.Generator().manual_seed(0),
    )
    for k in sent:
        want = sent[k] + sum(r[k] - sent[k] for r in replies) / 4.0
        assert torch.allclose(mean[k], want, atol=1e-7)


def test_server_samples_clients_by_poisson_with_rate_m_over_n_and_weighs_them_equally() -> None:
    import random

    cfg = from_dict(
        {
            "privacy": {"mode": "dp-updates", "noise_multiplier": 1.0},
            "federation": {"num_clients": 100, "fraction": 0.2},
        }
    )
    server = mechanism_for(cfg)
    rng = random.Random(0)
    sizes = [len(server.sample(range(100), 20, rng)) for _ in range(2000)]
    assert sum(sizes) / len(sizes) == pytest.approx(20.0, abs=0.3)  # std of the mean ~0.09
    assert min(sizes) < 20 < max(sizes)  # the count varies, as Poisson sampling does
    assert server.weights([10.0, 500.0, 20.0]) == [1 / 3] * 3
    assert mechanism_for(_cfg(mode="dp-sgd", noise_multiplier=1.0)).weights([10.0, 490.0]) == [0.02, 0.98]
