"""What a client does with a round's message: decided by the strategy, carried out by the ClientApp."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("lora_A", "lora_B", "head")


@dataclass(frozen=True)
class ClientPlan:
    """A strategy's instructions to one client for one round.

    rank: the LoRA rank of this client's adapter.
    freeze: kinds ('lora_A', 'lora_B', 'head') that are not trained this round.
    keep_local: kinds kept in the node's persistent state between rounds and never sent.
    reinit_seed: if set, LoRA is re-initialised (A random from this seed, B zero) before training.
    reply: 'received' (reply with the keys received, minus keep_local) or 'adapter' (every adapter and
        head key, minus keep_local).
    a_init: 'kaiming' (peft's initialisation from the experiment seed) or 'orthogonal' (orthonormal rows
        from the experiment seed, scaled like Kaiming-uniform); used by FFA-LoRA's frozen A.
    """

    rank: int
    freeze: frozenset[str] = frozenset()
    keep_local: frozenset[str] = frozenset()
    reinit_seed: int | None = None
    reply: str = "received"
    a_init: str = "kaiming"

    def __post_init__(self) -> None:
        bad = sorted((self.freeze | self.keep_local) - set(KINDS))
        if bad or self.reply not in ("received", "adapter") or self.a_init not in ("kaiming", "orthogonal"):
            raise ValueError(f"invalid client plan: kinds {bad}, reply {self.reply!r}")
