"""SecAgg+ (Bell et al., CCS 2020) as Flower implements it, re-expressed as pure functions for this
project's round loop: the server learns the sum of the clients' integer vectors modulo 2**bits, and
nothing about any one of them.

Four exchanges within one training round, each a TRAIN message with a ``secagg`` ConfigRecord:

1. ``setup``: the server names the round's sizes; each client makes two key pairs (ECDH) and replies with
   the public keys.
2. ``share-keys``: the server forwards the public keys of a client's neighbours; the client draws the seed
   of its self-mask, Shamir-shares that seed and its first private key among its neighbours (itself
   included), and replies with each neighbour's shares encrypted under their agreed key.
3. ``collect-masked-vectors``: the ordinary training message plus the ciphertexts addressed to the
   client; the client trains, encodes its update as integers (:mod:`fedlora.core.protocol.codec`), adds
   its self-mask and one pairwise mask per live neighbour (+ if its id is larger, - if smaller, so that
   each pair cancels in the sum), and replies with the masked vector.
4. ``unmask``: the server names, per client, which neighbours' vectors arrived and which did not; the
   client replies with its share of each arrived neighbour's self-mask seed and of each missing
   neighbour's private key. With ``threshold`` shares of each, the server removes every self-mask and
   the pairwise masks a missing client left in the others' vectors.

Clients are identified by their partition id (virtual nodes of a simulation play several partitions).
Every cryptographic primitive is Flower's (:mod:`flwr.common.secure_aggregation`, key pairs from
:mod:`flwr.supercore.primitives.asymmetric`); masks are expanded with Flower's ``pseudo_rand_gen``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

RECORD = "secagg"
"""RecordDict key of the ConfigRecord that carries a stage's fields (both ways)."""
MASKED = "masked"
"""RecordDict key of the ArrayRecord of a client's masked vector (one array, :data:`VECTOR`)."""
VECTOR = "vector"
STATE = "fedlora-secagg"
"""Client store name of a client's secrets for the current round (deleted after it unmasks)."""

PARTITION = "partition"
"""Key of the client's partition id in every stage reply's record."""
STAGE = "stage"
SETUP, SHARE_KEYS, COLLECT, UNMASK = "setup", "share-keys", "collect-masked-vectors", "unmask"
STAGES = (SETUP, SHARE_KEYS, COLLECT, UNMASK)

SAMPLED, SHARES, THRESHOLD = "sampled", "shares", "threshold"
PK1, PK2 = "pk1", "pk2"
DESTINATIONS, CIPHERTEXTS, SOURCES = "destinations", "ciphertexts", "sources"
ACTIVE, DEAD, OWNERS, SECRET_SHARES = "active", "dead", "owners", "secret-shares"
KEYS_PREFIX = "keys-"
"""share-keys: one entry per neighbour, ``keys-<partition>`` -> [pk1, pk2]."""


def share_count(setting: float, sampled: int) -> int:
    """How many clients share each secret (a client and its neighbours), as Flower's workflow: 0 = SecAgg+'s
    logarithmic degree min(m, 2*ceil(log2 m) + 1); a fraction (<= 1) of the m sampled clients; or a count.
    Odd below m (a ring of neighbours on both sides), at least 3, at most m."""
    if setting == 0:
        count = 2 * math.ceil(math.log2(max(sampled, 2))) + 1
    elif setting <= 1:
        count = round(setting * sampled)
    else:
        count = int(setting)
    count = min(max(count, 3), sampled)
    return count + 1 if count < sampled and count % 2 == 0 else min(count, sampled)


def threshold_count(setting: float, shares: int) -> int:
    """Shares needed to rebuild a secret: a fraction (<= 1) of ``shares`` (rounded, at least 2) or a count,
    at most ``shares``."""
    count = round(setting * shares) if setting <= 1 else int(setting)
    return min(max(count, 2), shares)


def neighbourhoods(clients: Sequence[int], shares: int, rng: random.Random) -> dict[int, list[int]]:
    """Each client's neighbours, itself included: a ring over a shuffled order of ``clients``, ``shares``
    wide (``shares // 2`` on each side), as in Flower's workflow."""
    order = list(clients)
    rng.shuffle(order)
    half = shares // 2
    n = len(order)
    return {pid: sorted({order[(i + k) % n] for k in range(-half, half + 1)}) for i, pid in enumerate(order)}


# ----- a client's secrets between stages ---------------------------------------------------------------


@dataclass
class ClientSecrets:
    """What one client keeps between the stages of one round (never sent: it would unmask its vector)."""

    partition: int
    round: int
    stage: str
    shares: int
    threshold: int
    sk1: bytes = b""
    pk1: bytes = b""
    sk2: bytes = b""
    pk2: bytes = b""
    seed: bytes = b""
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    """Neighbour -> (pk1, pk2), itself included."""
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    """Owner -> this client's share of the owner's self-mask seed."""
    sk1_shares: dict[int, bytes] = field(default_factory=dict)
    """Owner -> this client's share of the owner's first private key."""

    def to_record(self) -> dict[str, Any]:
        """As JSON-able values (bytes as hex), for :class:`fedlora.core.records.store.ClientStore`."""
        flat: dict[str, Any] = {
            "partition": self.partition,
            "round": self.round,
            "stage": self.stage,
            "shares": self.shares,
            "threshold": self.threshold,
            **{name: getattr(self, name).hex() for name in ("sk1", "pk1", "sk2", "pk2", "seed")},
        }
        flat["key-owners"] = list(self.keys)
        flat["key-values"] = [b.hex() for pair in self.keys.values() for b in pair]
        for name in ("seed_shares", "sk1_shares"):
            table: dict[int, bytes] = getattr(self, name)
            flat[f"{name}-owners"] = list(table)
            flat[f"{name}-values"] = [b.hex() for b in table.values()]
        return flat

    @classmethod
    def from_record(cls, flat: Mapping[str, Any]) -> ClientSecrets:
        """The inverse of :meth:`to_record`."""
        keys = [bytes.fromhex(v) for v in flat["key-values"]]
        secrets = cls(
            partition=int(flat["partition"]),
            round=int(flat["round"]),
            stage=str(flat["stage"]),
            shares=int(flat["shares"]),
            threshold=int(flat["threshold"]),
        )
        for name in ("sk1", "pk1", "sk2", "pk2", "seed"):
            setattr(secrets, name, bytes.fromhex(str(flat[name])))
        secrets.keys = {int(o): (keys[2 * i], keys[2 * i + 1]) for i, o in enumerate(flat["key-owners"])}
        for name in ("seed_shares", "sk1_shares"):
            owners, values = flat[f"{name}-owners"], flat[f"{name}-values"]
            setattr(secrets, name, {int(o): bytes.fromhex(v) for o, v in zip(owners, values, strict=True)})
        return secrets


def client_setup(partition: int, server_round: int, shares: int, threshold: int) -> ClientSecrets:
    """Stage 1: two fresh key pairs (one agrees the pairwise masks, one encrypts the shares)."""
    if not 2 <= threshold <= shares:
        raise ValueError(f"secure aggregation: threshold {threshold} must be in [2, {shares}] shares")
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    return ClientSecrets(
        partition,
        server_round,
        SETUP,
        shares,
        threshold,
        sk1=private_key_to_bytes(sk1),
        pk1=public_key_to_bytes(pk1),
        sk2=private_key_to_bytes(sk2),
        pk2=public_key_to_bytes(pk2),
    )


def client_share_keys(
    secrets: ClientSecrets, keys: Mapping[int, tuple[bytes, bytes]]
) -> tuple[list[int], list[bytes]]:
    """Stage 2: draw the self-mask seed, Shamir-share it and sk1 among the neighbours in ``keys`` (this
    client included); returns (destinations, ciphertexts), one per other neighbour."""
    me = secrets.partition
    if me not in keys or keys[me] != (secrets.pk1, secrets.pk2):
        raise ValueError("secure aggregation: the server did not forward this client's own public keys")
    if len(keys) < secrets.threshold:
        raise ValueError(f"secure aggregation: {len(keys)} neighbours left, fewer than the threshold")
    flat = [k for pair in keys.values() for k in pair]
    if len(set(flat)) != len(flat):
        raise ValueError("secure aggregation: two neighbours sent the same public key")
    secrets.keys = dict(keys)
    secrets.seed = os.urandom(32)
    seed_shares = create_shares(secrets.seed, secrets.threshold, len(keys))
    sk1_shares = create_shares(secrets.sk1, secrets.threshold, len(keys))
    destinations, ciphertexts = [], []
    for i, (pid, (_, pk2)) in enumerate(sorted(keys.items())):
        if pid == me:
            secrets.seed_shares[me], secrets.sk1_shares[me] = seed_shares[i], sk1_shares[i]
            continue
        key = generate_shared_key(bytes_to_private_key(secrets.sk2), bytes_to_public_key(pk2))
        plain = share_keys_plaintext_concat(me, pid, seed_shares[i], sk1_shares[i])
        destinations.append(pid)
        ciphertexts.append(encrypt(key, plain))
    secrets.stage = SHARE_KEYS
    return destinations, ciphertexts


def client_receive_shares(
    secrets: ClientSecrets, sources: Sequence[int], ciphertexts: Sequence[bytes]
) -> None:
    """Stage 3, before masking: decrypt and keep the shares the live neighbours sent this client."""
    if len(sources) + 1 < secrets.threshold:
        raise ValueError(f"secure aggregation: {len(sources)} live neighbours, fewer than the threshold")
    for src, ciphertext in zip(sources, ciphertexts, strict=True):
        if src not in secrets.keys or src == secrets.partition:
            raise ValueError(f"secure aggregation: shares from {src}, which is not a neighbour")
        key = generate_shared_key(
            bytes_to_private_key(secrets.sk2), bytes_to_public_key(secrets.keys[src][1])
        )
        actual, dst, seed_share, sk1_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
        if actual != src or dst != secrets.partition:
            raise ValueError(f"secure aggregation: a ciphertext from {src} was addressed {actual} -> {dst}")
        secrets.seed_shares[src], secrets.sk1_shares[src] = seed_share, sk1_share


def mask(vector: np.ndarray, seed: bytes, modulus: int) -> np.ndarray:
    """The mask ``seed`` expands to (Flower's ``pseudo_rand_gen``), as long as ``vector``."""
    return pseudo_rand_gen(seed, modulus, [vector.shape])[0]


def pairwise_seed(private_key: bytes, public_key: bytes) -> bytes:
    """The seed two clients agree on from one's sk1 and the other's pk1 (ECDH + HKDF, Flower's)."""
    return generate_shared_key(bytes_to_private_key(private_key), bytes_to_public_key(public_key))


def client_mask(secrets: ClientSecrets, vector: np.ndarray, modulus: int) -> np.ndarray:
    """Stage 3: ``vector`` (integers in [0, modulus)) plus the self-mask and one pairwise mask per
    neighbour whose shares arrived, modulo ``modulus``."""
    out = np.asarray(vector, dtype=np.int64) % modulus
    out = (out + mask(out, secrets.seed, modulus)) % modulus
    for pid in sorted(secrets.seed_shares):
        if pid == secrets.partition:
            continue
        pairwise = mask(out, pairwise_seed(secrets.sk1, secrets.keys[pid][0]), modulus)
        out = (out + pairwise if secrets.partition > pid else out - pairwise) % modulus
    secrets.stage = COLLECT
    return out


def client_unmask(
    secrets: ClientSecrets, active: Sequence[int], dead: Sequence[int]
) -> tuple[list[int], list[bytes]]:
    """Stage 4: this client's shares of each active neighbour's seed and each dead neighbour's sk1 (never
    both for one neighbour: that would unmask its vector)."""
    if set(active) & set(dead):
        raise ValueError("secure aggregation: a neighbour is named both active and dead")
    if len(active) < secrets.threshold:
        raise ValueError(f"secure aggregation: {len(active)} active neighbours, fewer than the threshold")
    unknown = sorted(set(active) - set(secrets.seed_shares)) + sorted(set(dead) - set(secrets.sk1_shares))
    if unknown:
        raise ValueError(f"secure aggregation: no share held for client {unknown[0]}")
    owners = list(active) + list(dead)
    shares = [secrets.seed_shares[p] for p in active] + [secrets.sk1_shares[p] for p in dead]
    secrets.stage = UNMASK
    return owners, shares


# ----- the server's side ------------------------------------------------------------------------------


def add_vectors(vectors: Iterable[np.ndarray], length: int, modulus: int) -> np.ndarray:
    """The sum of ``vectors`` modulo ``modulus`` (int64, no overflow for moduli up to 2**62)."""
    total = np.zeros(length, dtype=np.int64)
    for vector in vectors:
        total = (total + np.asarray(vector, dtype=np.int64)) % modulus
    return total


def unmask_sum(
    total: np.ndarray,
    *,
    modulus: int,
    threshold: int,
    neighbours: Mapping[int, Sequence[int]],
    public_keys: Mapping[int, tuple[bytes, bytes]],
    arrived: Sequence[int],
    dead: Sequence[int],
    shares: Mapping[int, Sequence[bytes]],
) -> np.ndarray | None:
    """The sum of the arrived clients' vectors from the sum of their masked ones: minus each arrived
    client's self-mask (seed rebuilt from ``threshold`` shares), and without the pairwise masks each dead
    client (shares sent, no vector) left in its arrived neighbours' vectors (its sk1 rebuilt). None when a
    secret has fewer than ``threshold`` shares: the round cannot be unmasked."""
    if any(len(shares.get(pid, ())) < threshold for pid in [*arrived, *dead]):
        return None
    out = np.asarray(total, dtype=np.int64) % modulus
    for pid in arrived:
        seed = combine_shares(list(shares[pid])[:threshold])
        out = (out - mask(out, seed, modulus)) % modulus
    in_sum = set(arrived)
    for pid in dead:
        sk1 = combine_shares(list(shares[pid])[:threshold])
        for other in neighbours[pid]:
            if other == pid or other not in in_sum:
                continue
            pairwise = mask(out, pairwise_seed(sk1, public_keys[other][0]), modulus)
            # ``other`` added the mask if its id is larger than the dead client's, else subtracted it
            out = (out - pairwise if other > pid else out + pairwise) % modulus
    return out


def record_bytes(values: Iterable[Any]) -> int:
    """Payload bytes of a stage record's values: bytes as their length, integers and floats as 8, strings
    as their UTF-8 length, lists item by item (for the protocol's traffic in ``rounds.jsonl``)."""
    total = 0
    for value in values:
        if isinstance(value, list):
            total += record_bytes(value)
        elif isinstance(value, bytes):
            total += len(value)
        elif isinstance(value, str):
            total += len(value.encode())
        else:
            total += 8
    return total
