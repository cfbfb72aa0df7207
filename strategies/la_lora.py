"""LA-LoRA, local alternating LoRA (Liu, Miao, Xi and Liu, "Rethinking LoRA for Privacy-Preserving Federated
Learning in Large Models", ICLR 2026, arXiv:2602.19926v1): each client alternates the two factors within
its own local steps, not across rounds as RoLoRA does, so that under DP-SGD the gradients of A and B are
never taken (nor clipped and noised) together.

Client, every round: start from the global A, B and head; local step i (from 0) trains B with A frozen
when ``(i // alternate_every) % 2 == 0`` and A with B frozen otherwise; the head trains at every step.
Under DP-SGD each step's per-example clipping and noise cover only that step's factor and the head (the
frozen factor is left out of Opacus's optimizer for the step, :mod:`fedlora.core.training.alternation`);
the privacy accounting is unchanged (same steps, sampling rate and noise multiplier). Server: FedAvg of
A, B and the head, as FedIT (the aggregate is the weighted mean of what travels, so dp-updates and secure
aggregation apply); traffic is FedIT's.

Which version is followed: the alternation of the authors' public code (``update_FedAvg_AL`` in
``DP_lora.py``), whose README describes "local step 1: update lora_B, freeze lora_A; step 2: update
lora_A, freeze lora_B; ...": every step by default, B first. One stored revision of that code starts
with A instead (``batch_idx % 2 == 0`` trains A); with peft's B = 0 such a first step moves nothing but
the head, so B first is kept here. Not implemented, and said so: the optional Gaussian low-pass filter on
the noised gradients (kernel [1, 4, 6, 4, 1] / 16 along A's input and B's output dimension; what runs
here is the code's ``--la_filter 0`` ablation, "LA-LoRA(-filter)"), the code's learning rate for B at
twice A's, and the code's clipping (per parameter tensor with an adaptive bound, not per example): DP-SGD
here is the platform's, Opacus's per-example clipping with the accountant. The paper's method section
itself could not be read here (only its abstract and summaries): the schedule comes from the code and
its README. Opacus's ghost mode cannot follow an alternation and is refused at load; hooks mode works.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.protocol.plan import ClientPlan
from fedlora.privacy.mechanisms import mechanism_for
from strategies.base import LoraStrategy
from strategies.registry import register


@dataclass
class LaLoraOptions:
    """alternate_every: local steps per block (>= 1); blocks alternate between training B (A frozen)
    and training A (B frozen), B first. Default 1: every step, as the authors' code."""

    alternate_every: int = 1

    def __post_init__(self) -> None:
        if self.alternate_every < 1:
            raise ConfigError(
                f"strategy.options.alternate_every = {self.alternate_every} is invalid: "
                "expected an integer >= 1"
            )


@register("la-lora")
class LaLora(LoraStrategy):
    """FedAvg of A, B and the head; clients alternate B and A within their local steps."""

    description = "local steps alternate training B (A frozen) and A (B frozen); FedAvg of A, B, head"
    Options = LaLoraOptions

    @classmethod
    def check(cls, cfg: ExperimentConfig) -> None:
        """Ghost clipping (the mechanism's ``opacus_mode``) is refused in one line."""
        if getattr(mechanism_for(cfg).options, "opacus_mode", "") == "ghost":
            raise ConfigError(
                "strategy 'la-lora' cannot run with privacy.opacus_mode = 'ghost' (ghost clipping keeps a "
                "fixed set of trained parameters; the local alternation changes it every step): use 'hooks'"
            )

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        return ClientPlan(rank=self.cfg.lora.rank, alternate_every=self.options.alternate_every)
