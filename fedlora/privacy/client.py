"""The client's side of differential privacy: DP-SGD with a node-persistent accountant, and the
client placement of dp-updates (clip the update, add this client's share of the noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.core import protocol
from fedlora.core.config import ExperimentConfig
from fedlora.core.store import ClientStore
from fedlora.core.training import Encoded
from fedlora.privacy import accounting


@dataclass(frozen=True)
class DpSgdOutcome:
    """A DP-SGD round: trained (loss, epsilon so far, noise) or declined (reason)."""

    loss: float = 0.0
    epsilon: float = 0.0
    noise_multiplier: float = 0.0
    declined: str = ""


def load_history(store: ClientStore) -> list[accounting.Entry]:
    """This node's DP-SGD accountant history (every earlier round it trained in), from its store."""
    record = store.load_config(protocol.DP_HISTORY)
    return accounting.history_from_lists(record) if record is not None else []  # type: ignore[arg-type]


def save_history(store: ClientStore, history: list[accounting.Entry]) -> None:
    """Keep the history in the client's store, which outlives the ClientApp process."""
    store.save_config(protocol.DP_HISTORY, accounting.history_to_lists(history))  # type: ignore[arg-type]


def dp_sgd_round(
    store: ClientStore, cfg: ExperimentConfig, model: torch.nn.Module, data: Encoded, *, seed: int
) -> DpSgdOutcome:
    """Train with DP-SGD unless this round would exceed the budget; the accountant lives in ``store``."""
    from fedlora.privacy.dp_sgd import train_private
    from fedlora.privacy.settings import dp_sgd_plan

    p = cfg.privacy
    noise, rate, steps = dp_sgd_plan(cfg, len(data))
    history = load_history(store)
    entry = (noise, rate, steps)
    if accounting.would_exceed(history, entry, p.target_epsilon, p.delta, p.accountant):
        spent = accounting.epsilon(history, p.delta, p.accountant)
        after = accounting.epsilon([*history, entry], p.delta, p.accountant)
        return DpSgdOutcome(
            epsilon=spent,
            noise_multiplier=noise,
            declined=f"privacy budget: epsilon {spent:.3f} spent, this round would reach {after:.3f} "
            f"> privacy.target_epsilon {p.target_epsilon:g}",
        )
    done = train_private(model, data, cfg.train, p, noise_multiplier=noise, seed=seed)
    history.append(done.entry)
    save_history(store, history)
    return DpSgdOutcome(
        loss=done.loss, epsilon=accounting.epsilon(history, p.delta, p.accountant), noise_multiplier=noise
    )


def privatise_reply(
    cfg: ExperimentConfig,
    received: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    *,
    seed: int,
) -> dict[str, torch.Tensor]:
    """dp-updates with client placement: the arrays to send (received + clipped update + noise share)."""
    from fedlora.privacy.dp_updates import client_share
    from fedlora.privacy.settings import expected_clients, update_noise

    shared, _ = client_share(
        {k: received[k] for k in trained},
        trained,
        clip_norm=cfg.privacy.clip_norm,
        noise_multiplier=update_noise(cfg),
        expected_clients=expected_clients(cfg),
        generator=torch.Generator().manual_seed(seed),
    )
    return shared
