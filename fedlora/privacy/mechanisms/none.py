"""``privacy.mode = "none"``: no differential privacy (the hooks of :class:`Mechanism` as they are)."""

from __future__ import annotations

from fedlora.privacy.mechanisms.base import Mechanism
from fedlora.privacy.mechanisms.registry import register


@register("none")
class NoPrivacy(Mechanism):
    """No differential privacy: uniform sampling, example-weighted means, plain training and replies.

    It ignores the budget keys and ``opacus_mode``, so that one override, ``privacy.mode = 'none'``,
    turns DP off in an experiment that sets them (as fedlora always allowed); ``placement`` and
    ``max_physical_batch`` are refused, as they always were.
    """

    ignores = frozenset(
        {"target_epsilon", "noise_multiplier", "clip_norm", "delta", "accountant", "opacus_mode"}
    )
