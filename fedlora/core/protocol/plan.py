"""What a client does with a round's message: decided by the strategy on the server, carried in the
message (a ConfigRecord under :data:`fedlora.core.protocol.keys.PLAN`), carried out by the ClientApp.

The client never looks up the strategy: everything strategy-specific it must do is in the plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord

from fedlora.core.model.arrays import kind_of

KINDS = ("lora_A", "lora_B", "lora_R", "head")
REPLIES = ("received", "trained", "adapter")
A_INITS = ("kaiming", "orthogonal")


@dataclass(frozen=True)
class ClientPlan:
    """A strategy's instructions to one client for one round.

    rank: the LoRA rank of this client's adapter.
    freeze: kinds ('lora_A', 'lora_B', 'lora_R', 'head') that are not trained this round.
    keep_local: kinds kept in the node's persistent state between rounds and never sent.
    reinit_seed: if set, LoRA is re-initialised (A random from this seed, B zero) before training.
    reply: 'received' (reply with the keys received), 'trained' (the keys received whose kind is not
        frozen: a factor sent only to be used, as FedSVD's A, does not travel back) or 'adapter' (every
        adapter and head key); always minus keep_local.
    a_init: 'kaiming' (peft's initialisation from the experiment seed) or 'orthogonal' (orthonormal rows
        from the experiment seed, scaled like Kaiming-uniform); used by FFA-LoRA's frozen A.
    core: the adapter has a trainable r x r core R between A and B in every adapted layer,
        W = W0 + s * B @ R @ A (Fed-SB; the R tensors travel under ``<layer>.lora_R.weight``).
    alternate_every: 0 (train every unfrozen kind at every local step) or k >= 1: the local steps
        alternate between training B (A frozen) and training A (B frozen) every k steps, B first; the head
        trains at every step (LA-LoRA). Honoured by plain and DP-SGD training.
    prune_from, prune_weight: rank self-pruning (HetLoRA): with ``prune_weight`` > 0 the local loss gets
        prune_weight * ||B[:, prune_from:]||_F * ||A[prune_from:, :]||_F per adapted layer, and the reply
        reports that tail's norm before and after training.
    """

    rank: int
    freeze: frozenset[str] = frozenset()
    keep_local: frozenset[str] = frozenset()
    reinit_seed: int | None = None
    reply: str = "received"
    a_init: str = "kaiming"
    core: bool = False
    alternate_every: int = 0
    prune_from: int = 0
    prune_weight: float = 0.0

    def __post_init__(self) -> None:
        bad = sorted((self.freeze | self.keep_local) - set(KINDS))
        valid = self.rank >= 1 and self.reply in REPLIES and self.a_init in A_INITS
        pruning = self.prune_weight >= 0 and 0 <= self.prune_from <= self.rank
        if bad or not valid or self.alternate_every < 0 or not pruning:
            raise ValueError(
                f"invalid client plan: rank {self.rank}, kinds {bad} (valid: {', '.join(KINDS)}), "
                f"reply {self.reply!r} (valid: {', '.join(REPLIES)}), a_init {self.a_init!r}, "
                f"alternate_every {self.alternate_every}, prune_from {self.prune_from}, "
                f"prune_weight {self.prune_weight}"
            )

    def reply_keys(self, received: Iterable[str], adapter: Iterable[str]) -> list[str]:
        """The keys a client replies with, from the keys it ``received`` and those of its whole
        ``adapter`` (see ``reply``); the server expects the same (``LoraStrategy.expected_reply``)."""
        keys = list(adapter) if self.reply == "adapter" else list(received)
        dropped = self.keep_local | (self.freeze if self.reply == "trained" else frozenset())
        return [k for k in keys if kind_of(k) not in dropped]

    def to_config(self) -> ConfigRecord:
        """The plan as a ConfigRecord (lists of kinds, -1 for no re-initialisation)."""
        return ConfigRecord(
            {
                "rank": self.rank,
                "freeze": sorted(self.freeze),
                "keep-local": sorted(self.keep_local),
                "reinit-seed": -1 if self.reinit_seed is None else self.reinit_seed,
                "reply": self.reply,
                "a-init": self.a_init,
                "core": self.core,
                "alternate-every": self.alternate_every,
                "prune-from": self.prune_from,
                "prune-weight": self.prune_weight,
            }
        )

    @classmethod
    def from_config(cls, record: Mapping[str, object]) -> ClientPlan:
        """The inverse of :meth:`to_config`; raises ValueError on a malformed plan."""
        try:
            seed = int(record["reinit-seed"])  # type: ignore[call-overload]
            return cls(
                rank=int(record["rank"]),  # type: ignore[call-overload]
                freeze=frozenset(str(k) for k in record["freeze"]),  # type: ignore[attr-defined]
                keep_local=frozenset(str(k) for k in record["keep-local"]),  # type: ignore[attr-defined]
                reinit_seed=None if seed < 0 else seed,
                reply=str(record["reply"]),
                a_init=str(record["a-init"]),
                core=bool(record["core"]),
                alternate_every=int(record["alternate-every"]),  # type: ignore[call-overload]
                prune_from=int(record.get("prune-from", 0)),  # type: ignore[call-overload]
                prune_weight=float(record.get("prune-weight", 0.0)),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"the message's client plan is malformed ({exc!r})") from None
