"""Sample-level DP: one round of DP-SGD on a client, with Opacus, over the trainable parameters only.

Each step draws a Poisson sample of the client's examples (every example independently with
probability q = batch_size / n, so the expected batch is ``train.batch_size``), clips each example's
gradient to ``clip_norm``, sums, adds N(0, (noise_multiplier * clip_norm)^2) per coordinate, and
divides by the expected batch (Opacus's DPOptimizer). Only parameters with ``requires_grad`` get
per-sample gradients: LoRA factors being trained and the head (for FFA-LoRA, B and the head).
An empty Poisson sample still takes a step made of noise alone, as the accounting assumes.
Dataset sizes are treated as public, as in Opacus.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedlora.core.config import PrivacyConfig, TrainConfig
from fedlora.core.training.alternation import Alternation
from fedlora.core.training.loops import Encoded, make_optimizer, num_steps

LossOf = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A split's loss of a batch from its logits and labels (:meth:`Encoded.loss_of`)."""

if TYPE_CHECKING:
    from fedlora.privacy.accounting import Entry

# Known and harmless here: the seeded generator is deliberate (docs/privacy.md, Limits), and the
# backward-hook note comes from the frozen embeddings.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class PrivateRound:
    """What one client's DP-SGD round did: mean loss, examples seen, and its accounting entry."""

    loss: float
    seen: int
    steps: int
    sample_rate: float
    noise_multiplier: float

    @property
    def entry(self) -> Entry:
        """(noise multiplier, sample rate, steps) for the accountant."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate q = batch_size / n (capped at 1), so the expected batch is batch_size."""
    return min(1.0, batch_size / max(num_examples, 1))


def poisson_sample(num_examples: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the examples drawn, each independently with probability ``rate`` (may be empty)."""
    return torch.nonzero(torch.rand(num_examples, generator=generator) < rate).flatten()


class PrivateTrainer:
    """A model made private with Opacus for one round; use as a context manager (hooks are removed)."""

    def __init__(
        self,
        model: nn.Module,
        train: TrainConfig,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_batch: int,
        mode: str = "hooks",
        max_physical_batch: int = 0,
        seed: int = 0,
    ) -> None:
        # start-up: Opacus takes about a second to import; only runs with DP need it
        from opacus import PrivacyEngine

        model.train()  # Opacus finds no activations in eval mode
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.expected_batch = expected_batch
        self.max_physical_batch = max_physical_batch
        self.generator = torch.Generator().manual_seed(seed)
        # The loader only tells Opacus the expected batch size; sampling is done by poisson_sample.
        shape_only: DataLoader[int] = DataLoader(range(expected_batch), batch_size=expected_batch)  # type: ignore[arg-type]
        made = PrivacyEngine().make_private(
            module=model,
            optimizer=make_optimizer(model, train),
            criterion=nn.CrossEntropyLoss(),
            data_loader=shape_only,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip_norm,
            poisson_sampling=False,
            grad_sample_mode=mode,
            noise_generator=self.generator,
        )
        self.mode = mode
        if mode == "ghost":
            self.module, self.optimizer, self.criterion, _ = made
        else:
            self.module, self.optimizer, _ = made
            self.criterion = nn.CrossEntropyLoss()

    def __enter__(self) -> PrivateTrainer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.module._close()  # removes Opacus's hooks and per-sample gradients from the model

    def step(self, batch: dict[str, torch.Tensor] | None, loss_of: LossOf | None = None) -> float:
        """A DP-SGD step on ``batch`` (None: an empty Poisson sample); returns its mean loss (0 if empty).

        ``loss_of(logits, labels)``: the batch's mean of per-example losses (the split's
        :meth:`~fedlora.core.training.loops.Encoded.loss_of`); default: cross-entropy of the class. Ghost
        clipping always uses the criterion Opacus wrapped (cross-entropy)."""
        if batch is None:
            self._noise_only_step()
            return 0.0
        n = len(batch["labels"])
        size = self.max_physical_batch or n
        chunks = [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]
        total = 0.0
        for i, chunk in enumerate(chunks):
            self.optimizer.zero_grad(set_to_none=True)
            labels = chunk.pop("labels")
            logits = self.module(**chunk).logits
            ghost = self.mode == "ghost"
            loss = self.criterion(logits, labels) if ghost or loss_of is None else loss_of(logits, labels)
            loss.backward()
            if i < len(chunks) - 1:  # virtual batch: clip and accumulate now, noise and step at the end
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            total += float(loss.item()) * len(labels)
        return total / n

    def _noise_only_step(self) -> None:
        """What DP-SGD does on an empty sample: the update is the noise over the expected batch."""
        std = self.noise_multiplier * self.clip_norm
        for p in self.optimizer.params:
            noise = torch.normal(0.0, std, size=p.shape, generator=self.generator) if std > 0 else None
            p.grad = (noise if noise is not None else torch.zeros_like(p)) / self.expected_batch
        self.optimizer.original_optimizer.step()
        self.optimizer.original_optimizer.zero_grad(set_to_none=True)


def train_private(
    model: nn.Module,
    data: Encoded,
    train: TrainConfig,
    privacy: PrivacyConfig,
    *,
    noise_multiplier: float,
    seed: int,
) -> PrivateRound:
    """This round's local DP-SGD steps (``num_steps(train, n)``) with Poisson-sampled batches."""
    n = len(data)
    expected = min(train.batch_size, n)
    rate = sample_rate(train.batch_size, n)
    steps = num_steps(train, n)
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # LoRA dropout
    sampler = torch.Generator().manual_seed(seed)
    total, seen = 0.0, 0
    trainer = PrivateTrainer(
        model,
        train,
        noise_multiplier=noise_multiplier,
        clip_norm=privacy.clip_norm,
        expected_batch=expected,
        mode=privacy.opacus_mode,
        max_physical_batch=privacy.max_physical_batch,
        seed=seed + 1,
    )
    with trainer, Alternation(model) as alternation:  # LA-LoRA: a frozen factor is not clipped nor noised
        for step in range(steps):
            alternation.before_step(step)
            index = poisson_sample(n, rate, sampler)
            batch = _to(data.batch(index), device) if len(index) else None
            loss = trainer.step(batch, data.loss_of)
            total += loss * len(index)
            seen += len(index)
    return PrivateRound(total / max(seen, 1), seen, steps, rate, noise_multiplier)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
