"""A client's side of SecAgg+ (:mod:`fedlora.core.protocol.secagg`): the stages that do not train
(``setup``, ``share-keys``, ``unmask``, handled here without torch) and the masking of the trained update
(``collect-masked-vectors``, called from :func:`clients.local.train`).

Between stages the client keeps its secrets in its store (:class:`fedlora.core.records.store.ClientStore`:
the run's or node's state directory, else the node's Context), by partition, because in a simulation the
next stage of a partition may reach another virtual node or process. They are deleted once it unmasks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients import node
from fedlora.core.config import ExperimentConfig
from fedlora.core.protocol import keys as protocol
from fedlora.core.protocol import secagg
from fedlora.core.records.store import ClientStore


def stage_of(message: Message) -> str | None:
    """The SecAgg+ stage a TRAIN message belongs to, or None (an ordinary training message)."""
    record = message.content.config_records.get(secagg.RECORD)
    return None if record is None else str(record[secagg.STAGE])


def handles(message: Message) -> bool:
    """Whether the message is a stage handled here (every stage but the one that trains)."""
    return stage_of(message) not in (None, secagg.COLLECT)


def _name(partition: int) -> str:
    return f"{secagg.STATE}-{partition}"


def _load(store: ClientStore, partition: int, server_round: int, after: str) -> secagg.ClientSecrets:
    """This round's secrets, which must have reached stage ``after``."""
    saved = store.load_config(_name(partition), include_current=True)
    secrets = secagg.ClientSecrets.from_record(saved) if saved is not None else None
    if secrets is None or secrets.round != server_round or secrets.stage != after:
        found = "none" if secrets is None else f"round {secrets.round}, stage {secrets.stage!r}"
        raise ValueError(f"secure aggregation: expected this round's secrets after {after!r}, found {found}")
    return secrets


def handle(message: Message, context: Context) -> Message:
    """``setup``, ``share-keys`` or ``unmask``: one stage of the protocol for the partition the message is
    for; replies with a ``secagg`` record naming the partition."""
    config: ConfigRecord = message.content[protocol.CONFIG]  # type: ignore[assignment]
    cfg = ExperimentConfig.from_toml(str(config[protocol.EXPERIMENT]))
    if not cfg.secure_aggregation.enabled:
        raise ValueError("secure aggregation stage received, but secure_aggregation.enabled is false")
    pid = node.partition_id(context, config, cfg.federation.num_clients)
    server_round = int(config[protocol.SERVER_ROUND])  # type: ignore[arg-type]
    store = node.client_store(context, config, pid, server_round)
    record = dict(message.content.config_records[secagg.RECORD])
    stage = str(record[secagg.STAGE])
    out: dict[str, Any]
    if stage == secagg.SETUP:
        secrets = _setup(cfg, pid, server_round, record)
        out = {secagg.PK1: secrets.pk1, secagg.PK2: secrets.pk2}
    elif stage == secagg.SHARE_KEYS:
        secrets = _load(store, pid, server_round, secagg.SETUP)
        keys = {
            int(k.removeprefix(secagg.KEYS_PREFIX)): (bytes(v[0]), bytes(v[1]))  # type: ignore[index, arg-type]
            for k, v in record.items()
            if k.startswith(secagg.KEYS_PREFIX)
        }
        destinations, ciphertexts = secagg.client_share_keys(secrets, keys)
        out = {secagg.DESTINATIONS: destinations, secagg.CIPHERTEXTS: ciphertexts}
    elif stage == secagg.UNMASK:
        secrets = _load(store, pid, server_round, secagg.COLLECT)
        active = [int(p) for p in record[secagg.ACTIVE]]  # type: ignore[union-attr]
        dead = [int(p) for p in record[secagg.DEAD]]  # type: ignore[union-attr]
        owners, shares = secagg.client_unmask(secrets, active, dead)
        out = {secagg.OWNERS: owners, secagg.SECRET_SHARES: shares}
    else:
        raise ValueError(f"secure aggregation: unknown stage {stage!r}")
    if secrets.stage == secagg.UNMASK:
        store.delete(_name(pid))
    else:
        store.save_config(_name(pid), secrets.to_record())
    return Message(
        RecordDict({secagg.RECORD: ConfigRecord({secagg.PARTITION: pid, **out})}), reply_to=message
    )


def _setup(
    cfg: ExperimentConfig, pid: int, server_round: int, record: dict[str, Any]
) -> secagg.ClientSecrets:
    """New key pairs, after checking the server's sizes against the experiment's settings."""
    sa = cfg.secure_aggregation
    sampled, shares, threshold = (int(record[k]) for k in (secagg.SAMPLED, secagg.SHARES, secagg.THRESHOLD))
    expected = secagg.share_count(sa.num_shares, sampled)
    want = secagg.threshold_count(sa.reconstruction_threshold, shares)
    if shares != expected or threshold != want:
        raise ValueError(
            f"secure aggregation: the server asked for {shares} shares and threshold {threshold} among "
            f"{sampled} clients; the experiment's settings give {expected} and {want}"
        )
    return secagg.client_setup(pid, server_round, shares, threshold)


def receive_shares(message: Message, store: ClientStore, pid: int, server_round: int) -> secagg.ClientSecrets:
    """``collect-masked-vectors``, before training: the key shares the live neighbours sent, decrypted."""
    record = message.content.config_records[secagg.RECORD]
    secrets = _load(store, pid, server_round, secagg.SHARE_KEYS)
    sources = [int(s) for s in record[secagg.SOURCES]]  # type: ignore[union-attr]
    secagg.client_receive_shares(secrets, sources, [bytes(c) for c in record[secagg.CIPHERTEXTS]])  # type: ignore[union-attr, arg-type]
    return secrets


def masked_record(
    secrets: secagg.ClientSecrets, store: ClientStore, vector: np.ndarray, modulus: int
) -> ArrayRecord:
    """``vector`` (integers in [0, modulus)) masked, as the reply's ArrayRecord (uint32 when the modulus
    allows, so that a vector weighs what the float32 update would); the secrets move to the next stage."""
    masked = secagg.client_mask(secrets, vector, modulus)
    store.save_config(_name(secrets.partition), secrets.to_record())
    wire = masked.astype(np.uint32 if modulus <= 2**32 else np.int64)
    return ArrayRecord({secagg.VECTOR: Array(wire)})
