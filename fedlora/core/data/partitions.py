"""Partitioners: which rows of the training pool each client gets (``data.partitioner``).

``iid``, ``dirichlet`` and ``shards`` are flwr-datasets' ``IidPartitioner``, ``DirichletPartitioner`` and
``ShardPartitioner``; ``natural`` gives one client per value of ``data.partition_by`` (values grouped when
there are fewer clients, split when there are more), which flwr-datasets has no balanced form of. Every
function returns row indices into the pool, one array per client, and is deterministic in the seed.
See ``docs/data.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import datasets
import numpy as np

from fedlora.core.config import ConfigError, DataConfig
from fedlora.core.data.sources import LABEL, partition_column
from fedlora.core.data.tweets import SOURCES

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

# Independent random streams derived from the seed: np.random.default_rng([seed, stream]).
IID_STREAM, NATURAL_STREAM, VAL_STREAM = 1, 2, 3


def partition(pool: datasets.Dataset, cfg: DataConfig, num_clients: int, seed: int) -> list[np.ndarray]:
    """Row indices into ``pool`` for each of ``num_clients`` clients, by ``cfg.partitioner``."""
    if cfg.partitioner == "iid":
        return iid(len(pool), num_clients, seed)
    if cfg.partitioner == "dirichlet":
        return dirichlet(int_column(pool, LABEL), num_clients, cfg.alpha, seed)
    if cfg.partitioner == "shards":
        return shards(int_column(pool, LABEL), num_clients, cfg.shards_per_client, seed)
    if cfg.partitioner == "natural":
        column = partition_column(cfg)
        values = np.asarray(pool.with_format("arrow")[:][column].to_pylist())
        order = SOURCES if cfg.tweets and column == "source" else None
        rng = np.random.default_rng([seed, NATURAL_STREAM])
        return natural(values, num_clients, rng, order=order, key=cfg.partition_by)
    raise ValueError(f"data.partitioner = {cfg.partitioner!r} is invalid")  # the config refuses it first


def int_column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """An integer column as an int64 array, via Arrow (``ds[name]`` iterates row by row in datasets 4)."""
    return np.asarray(ds.with_format("arrow")[:][name].to_numpy(), dtype=np.int64)


def _rows_of(partitioner: Partitioner, num_clients: int) -> list[np.ndarray]:
    """Each partition's values of the ``row`` column. flwr's label-based partitioners work out every
    partition's indices on the first ``load_partition`` and keep them (``_partition_id_to_indices``):
    read them from there when present, which avoids one ``Dataset.select`` per client (minutes at
    10,000 clients); ``tests/test_data.py`` checks that both ways agree."""
    first = int_column(partitioner.load_partition(0), "row")
    indices = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(indices, dict) or len(indices) != num_clients:
        return [first] + [int_column(partitioner.load_partition(c), "row") for c in range(1, num_clients)]
    rows = int_column(partitioner.dataset, "row")
    return [rows[np.asarray(indices[cid], dtype=np.int64)] for cid in range(num_clients)]


def iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle the rows and cut them into ``num_clients`` contiguous shards whose sizes differ by at most
    one, the first ``n mod num_clients`` one larger: the partitions of flwr's IidPartitioner (which
    ``Dataset.shard``s contiguously), computed in one pass; ``tests/test_data.py`` checks they agree."""
    rows = np.random.default_rng([seed, IID_STREAM]).permutation(n)
    return [np.asarray(part) for part in np.array_split(rows, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """flwr's DirichletPartitioner by label (no self-balancing), redrawn until no client is empty."""
    # start-up: flwr_datasets imports seaborn and scipy.stats (about 2.5 s); natural splits and
    # every data check before partitioning need neither
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=alpha,
        min_partition_size=1,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # one warning per redraw
            return _rows_of(partitioner, num_clients)
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
        raise ValueError(
            f"dirichlet alpha = {alpha} left a client without examples in 11 draws (seed {seed}); "
            "raise data.alpha or lower federation.num_clients"
        ) from None


def shards(labels: np.ndarray, num_clients: int, per_client: int, seed: int) -> list[np.ndarray]:
    """McMahan et al.'s pathological split with flwr's ShardPartitioner: the rows sorted by label are cut
    into ``num_clients * per_client`` equal shards, dealt at random, ``per_client`` to each client. The
    last ``n mod (num_clients * per_client)`` rows in label order fit no shard and are left out."""
    if num_clients * per_client > len(labels):
        raise ConfigError(
            f"data.partitioner = 'shards' needs federation.num_clients x data.shards_per_client = "
            f"{num_clients * per_client} training examples or more, but {len(labels)} are left after the "
            "test set; lower data.shards_per_client or federation.num_clients"
        )
    # start-up: flwr_datasets imports seaborn and scipy.stats (about 2.5 s); natural splits and
    # every data check before partitioning need neither
    from flwr_datasets.partitioner import ShardPartitioner

    partitioner = ShardPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_shards_per_partition=per_client,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pyarrow's, from flwr sorting by label
        return _rows_of(partitioner, num_clients)


def natural(
    values: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    order: Sequence[str] | None = None,
    key: str = "data.partition_by",
) -> list[np.ndarray]:
    """Clients by value of a column: one client per value, values grouped when there are fewer clients.

    ``order``: the values in client-id order (the tweets' :data:`SOURCES`); None = sorted values. Only with
    an ``order`` may there be more clients than values (each value's rows are then shuffled and cut into
    near-equal parts, as the tweets' sources are); otherwise that is an error naming ``key``.
    """
    names = [name for name in order if (values == name).any()] if order is not None else np.unique(values)
    groups = [np.flatnonzero(values == name) for name in names]
    if num_clients < len(groups):
        return _group(groups, num_clients)
    if order is None and num_clients > len(groups):
        raise ConfigError(
            f"federation.num_clients = {num_clients} exceeds the {len(groups)} values of data.partition_by "
            f"'{key}' in the training pool (one client per value); lower federation.num_clients to at "
            f"most {len(groups)} or use another data.partitioner"
        )
    counts = _allot([len(rows) for rows in groups], num_clients)
    return [
        part
        for rows, k in zip(groups, counts, strict=True)
        for part in np.array_split(rng.permutation(rows), k)
    ]


def _allot(sizes: Sequence[int], num_clients: int) -> np.ndarray:
    """Clients per value: one each, the rest by largest remainder in proportion to size, capped at size."""
    size = np.asarray(sizes, dtype=np.int64)
    quota = (num_clients - len(size)) * size / size.sum()
    counts = 1 + np.floor(quota).astype(np.int64)
    by_remainder = np.argsort(-(quota - np.floor(quota)), kind="stable")
    counts[by_remainder[: num_clients - int(counts.sum())]] += 1
    counts = np.minimum(counts, size)  # a value cannot feed more clients than it has rows
    for _ in range(num_clients - int(counts.sum())):
        counts[int(np.argmax(np.where(counts < size, size / counts, -1.0)))] += 1
    return counts


def _group(groups: list[np.ndarray], num_clients: int) -> list[np.ndarray]:
    """Fewer clients than values: largest value first, each to the client with the fewest rows so far."""
    members: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    load = np.zeros(num_clients, dtype=np.int64)
    for rows in sorted(groups, key=len, reverse=True):
        cid = int(np.argmin(load))
        members[cid].append(rows)
        load[cid] += len(rows)
    return [np.concatenate(parts) for parts in members]
