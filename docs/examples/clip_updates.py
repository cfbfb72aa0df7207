"""Clipped client updates without noise: the server scales each client's update of the arrays that
travel down to L2 norm ``privacy.clip_norm`` before the strategy aggregates,

    x_k <- sent + (x_k - sent) * min(1, C / ||x_k - sent||),

which bounds how far any one client can move a round's aggregate (norm bounding, as in Sun et al.,
2019, "Can You Really Backdoor Federated Learning?"), and is the clipping half of dp-updates alone: run
next to dp-updates, it separates what clipping costs from what the noise costs. It adds no noise, so it
gives no differential privacy and reports no epsilon.

Copied into ``fedlora/privacy/mechanisms/`` this file is all it takes: the registry finds it, and
``privacy.mode = "clip-updates"`` runs it (on the server, and on every client, which build the same
mechanism from the experiment).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.core.model.arrays import State
from fedlora.privacy.dp_updates import clip, difference
from fedlora.privacy.mechanisms.base import Mechanism
from fedlora.privacy.mechanisms.registry import register


@dataclass(frozen=True)
class ClipOptions:
    """clip_norm: the bound C on each client's update (``[privacy]``'s range check: C > 0)."""

    clip_norm: float


@register("clip-updates")
class ClipUpdates(Mechanism):
    """Each client's update clipped to ``privacy.clip_norm`` by the server; no noise, no epsilon."""

    Options = ClipOptions
    options: ClipOptions
    # A bound on each update bounds its effect on the aggregate only when the aggregate is linear in
    # what travels (not for LoRA-FAIR's correction, FedEx-LoRA's residual or FLoRA's stacking).
    requires_linear_aggregate = True
    _clipped = 0.0

    def observe(self, metrics: Sequence[Mapping[str, Any]]) -> None:
        """A new round: nothing clipped yet."""
        self._clipped = 0.0

    def release(
        self, sent: State, updates: Sequence[State], weights: Sequence[float], server_round: int
    ) -> tuple[list[State], list[float]]:
        """Every update clipped around ``sent``; the weights as they came."""
        bound = self.options.clip_norm
        pairs = [clip(difference(update, sent), bound) for update in updates]
        self._clipped = sum(norm > bound for _, norm in pairs) / max(len(pairs), 1)
        return [{k: sent[k] + d[k] for k in d} for d, _ in pairs], list(weights)

    def round_metrics(self) -> dict[str, float]:
        """The share of this round's updates that were clipped (``rounds.jsonl``)."""
        return {"clipped_share": self._clipped}
