"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters, merge them into the base weights.

Each round every sampled client starts from a freshly initialised LoRA (A random, B zero) of its own
rank r_k, trains it, and sends A_k, B_k and the head. The server stacks them: A_stack holds the rows of
every A_k, B_stack the columns of p_k s_k B_k, so B_stack A_stack = sum_k p_k s_k B_k A_k exactly, with
s_k = alpha / r_k (alpha / sqrt(r_k) with rsLoRA): one alpha convention for every rank. The product is
added to an offset on the frozen base weights; the head is averaged like FedAvg.

Downlink (``downlink``): ``stacked`` (default, the paper's protocol) sends each client the stacked
factors of the merges it has not seen yet, which it merges into the offsets it keeps in its state store
(:mod:`fedlora.core.model.offsets`); when those stacks would be more bytes than the full offsets (a client
that missed many rounds, or was never sampled) it sends the full offsets instead. ``merged`` sends the
full offsets in every message. Both give every client and the server the same offsets, so the runs are
the same and only the downlink bytes differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.model import offsets as stacked
from fedlora.core.model.arrays import State, base_weight_name, is_head, lora_scale, to_arrays
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol.plan import ClientPlan
from fedlora.server import replies as reply_of
from strategies.aggregation import weighted_average
from strategies.base import LoraStrategy
from strategies.lowrank import flora_stack, layer_groups
from strategies.registry import register

DOWNLINKS = ("stacked", "merged")


@dataclass
class FloraOptions:
    """ranks: LoRA rank per client, cycled over partition ids (client k gets ranks[k % len]); empty =
    lora.rank for every client. downlink: 'stacked' (the paper's: the stacked factors of the merges a
    client has not seen, or the full offsets when fewer bytes) or 'merged' (the full offsets always)."""

    ranks: list[int] = field(default_factory=list)
    downlink: str = "stacked"

    def __post_init__(self) -> None:
        if any(r < 1 for r in self.ranks):
            raise ConfigError(f"strategy.options.ranks = {self.ranks!r} is invalid: expected integers >= 1")
        if self.downlink not in DOWNLINKS:
            raise ConfigError(
                f"strategy.options.downlink = {self.downlink!r} is invalid: "
                f"expected one of {', '.join(DOWNLINKS)}"
            )


def client_rank(cfg: ExperimentConfig, options: FloraOptions, partition_id: int) -> int:
    """The LoRA rank of client ``partition_id``."""
    return options.ranks[partition_id % len(options.ranks)] if options.ranks else cfg.lora.rank


def flora_stacks(
    updates: Sequence[State], weights: Sequence[float], scales: Sequence[float], version: int
) -> State:
    """Per adapted layer, the stacked factors (A_stack, B_stack) of one round, keyed for ``version``
    (:func:`fedlora.core.model.offsets.stack_key`); B_stack @ A_stack = sum_k p_k s_k B_k A_k."""
    result: State = {}
    for layer, (key_a, key_b) in layer_groups(updates[0]).items():
        a_stack, b_stack = flora_stack(
            [u[key_a] for u in updates], [u[key_b] for u in updates], weights, scales
        )
        result[stacked.stack_key(version, base_weight_name(layer), "A")] = a_stack
        result[stacked.stack_key(version, base_weight_name(layer), "B")] = b_stack
    return result


def _nbytes(state: State) -> int:
    """Raw tensor bytes (what :func:`fedlora.core.model.arrays.payload_bytes` counts, less array headers)."""
    return sum(v.numel() * v.element_size() for v in state.values())


@register("flora")
class Flora(LoraStrategy):
    """Stacking aggregation with per-client ranks; LoRA re-initialised on clients every round."""

    description = "stack clients' adapters (any ranks) so the product is exact; merge into frozen weights"
    Options = FloraOptions
    nonlinear_reason = "its stacking needs each client's own factors B_k and A_k"

    def __init__(self, cfg: ExperimentConfig, global_state: State) -> None:
        super().__init__(cfg, global_state)
        self.version = 0
        """Merges folded into ``base_offsets`` so far."""
        self.stacks: dict[int, State] = {}
        """Stacked factors of recent versions, kept while all of them together are fewer bytes than
        the full offsets (older ones could never be the cheaper message)."""
        self.synced: dict[int, int] = {}
        """Partition -> the offsets version that client confirmed holding (a reply without error)."""
        self._pending: dict[int, int] = {}

    def client_plan(self, partition_id: int, server_round: int) -> ClientPlan:
        seed = (self.cfg.seed * 7_919 + server_round * 104_729 + partition_id) % 2**31
        rank = client_rank(self.cfg, self.options, partition_id)
        return ClientPlan(rank=rank, reinit_seed=seed, reply="adapter")

    def outgoing(self, global_state: State) -> State:
        return {k: v for k, v in global_state.items() if is_head(k)}

    def aggregate(self, global_state: State, updates: Sequence[State], weights: Sequence[float]) -> State:
        ranks = [next(v.shape[0] for k, v in u.items() if ".lora_A." in k) for u in updates]
        scales = [lora_scale(dataclasses.replace(self.cfg.lora, rank=r)) for r in ranks]
        self.version += 1
        stack = flora_stacks(updates, weights, scales, self.version)
        self.base_offsets = stacked.apply_stacks(self.base_offsets, stack, after=self.version - 1)
        self.stacks[self.version] = stack
        budget = _nbytes(self.base_offsets)
        for version in sorted(self.stacks, reverse=True):
            budget -= _nbytes(self.stacks[version])
            if budget < 0:
                del self.stacks[version]
        heads = [{k: v for k, v in u.items() if is_head(k)} for u in updates]
        return weighted_average(heads, weights)

    # ----- downlink ------------------------------------------------------------------------------
    def offsets_message(
        self, partition_id: int, full: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, int]]:
        if self.options.downlink == "merged":
            return full, {}
        config = {protocol.OFFSETS_VERSION: self.version}
        self._pending[partition_id] = self.version
        have = self.synced.get(partition_id, 0)
        if have == self.version:
            return {}, config
        missing = range(have + 1, self.version + 1)
        if all(v in self.stacks for v in missing):
            stacks = {k: t for v in missing for k, t in self.stacks[v].items()}
            if _nbytes(stacks) <= _nbytes(self.base_offsets):
                return {protocol.BASE_STACKS: to_arrays(stacks)}, {**config, protocol.OFFSETS_SINCE: have}
        return full, config

    def confirm(self, partitions: Iterable[int]) -> None:
        """Clients that replied without error hold the offsets version their message carried."""
        for pid in partitions:
            if pid in self._pending:
                self.synced[pid] = self._pending[pid]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.confirm(reply_of.partition_of(r) for r in replies if not r.has_error())
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.confirm(reply_of.partition_of(r) for r in replies if not r.has_error())
        return super().aggregate_evaluate(server_round, replies)

    # ----- checkpoint ----------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "offsets_version": self.version}

    def restore(self, global_state: State, base_offsets: State, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint. The stacks are not checkpointed and no client is taken as in step
        (it may have seen a round the checkpoint lost): every client's next message has the full offsets."""
        super().restore(global_state, base_offsets, saved)
        self.version = int(saved.get("offsets_version", 0))
        self.stacks, self.synced, self._pending = {}, {}, {}
