"""The token cache of deployed clients: a fresh ClientApp process finds its tokenised splits on the
node's disk (equal to tokenising again), a changed file or tokenizer makes a new entry, and nothing is
cached where FEDLORA_CACHE_DIR is unset (simulations)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients import runtime
from fedlora.core.config import ExperimentConfig
from fedlora.core.data import token_cache
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame

ROOT = Path(__file__).resolve().parents[1]


def _experiment(model: str) -> str:
    return ExperimentConfig.from_toml(
        f'[model]\npath = "{model}"\n[data]\nsource = "nowhere.csv"\nlabel = "topic"\n'
        f'labels = {json.dumps(sorted(TOPICS))}\npartitioner = "iid"\nmax_length = 16\n'
        "[federation]\nnum_clients = 2\n"
    ).to_toml()


@pytest.fixture()
def node_file(tmp_path: Path) -> Path:
    return write_table(topics_frame(per_topic=6, users=2, seed=0), tmp_path / "mine.csv")


def _fresh(text: str, path: Path) -> runtime.ClientData:
    runtime._client_data.cache_clear()  # as a new ClientApp process would start
    return runtime.data_for(text, 0, str(path))


def test_cached_splits_equal_tokenising_again(
    tmp_path: Path,
    node_file: Path,
    tiny_bert,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    text = _experiment(tiny_bert.path)
    monkeypatch.delenv(token_cache.CACHE_ENV, raising=False)
    plain = _fresh(text, node_file)
    cache = tmp_path / "cache"
    monkeypatch.setenv(token_cache.CACHE_ENV, str(cache))
    first = _fresh(text, node_file)  # tokenises and writes the entry
    (entry,) = cache.glob("*.json")
    second = _fresh(text, node_file)  # reads it
    for data in (first, second):
        for split, expected in ((data.train, plain.train), (data.val, plain.val)):
            assert split.ids == expected.ids and split.pad_id == expected.pad_id
            assert split.labels.tolist() == expected.labels.tolist()
    # A changed file is a new entry, never the old one read back.
    node_file.write_text(node_file.read_text() + node_file.read_text().splitlines()[1] + "\n")
    third = _fresh(text, node_file)
    assert len(list(cache.glob("*.json"))) == 2
    assert len(third.train) + len(third.val) == len(plain.train) + len(plain.val) + 1
    assert entry.exists()


def test_key_covers_file_tokenizer_and_data_settings(tmp_path: Path, node_file: Path, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    cfg = ExperimentConfig.from_toml(_experiment(tiny_bert.path))
    model = Path(tiny_bert.path)
    key = token_cache.key_for(cfg, 0, str(node_file), model)
    assert key == token_cache.key_for(cfg, 1, str(node_file), model)  # own file: the partition is moot
    other = cfg.__class__.from_toml(_experiment(tiny_bert.path).replace("max_length = 16", "max_length = 17"))
    assert token_cache.key_for(other, 0, str(node_file), model) != key
    vocab = tmp_path / "tok"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("a\nb\n")
    assert token_cache.key_for(cfg, 0, str(node_file), vocab) != key


def test_unset_means_no_cache_and_a_missing_or_corrupt_entry_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(token_cache.CACHE_ENV, raising=False)
    assert token_cache.cache_dir() is None  # simulations: splits stay in the actor's memory only
    monkeypatch.setenv(token_cache.CACHE_ENV, "")
    assert token_cache.cache_dir() is None
    assert token_cache.load(tmp_path, "missing") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert token_cache.load(tmp_path, "bad") is None


@pytest.mark.cli  # a new Python process
def test_a_cached_client_process_does_not_import_datasets(
    tmp_path: Path,
    node_file: Path,
    tiny_bert,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    text = _experiment(tiny_bert.path)
    (tmp_path / "exp.toml").write_text(text)
    monkeypatch.setenv(token_cache.CACHE_ENV, str(tmp_path / "cache"))
    expected = _fresh(text, node_file)  # this process fills the cache, as a node's first message would
    script = (
        "import sys, pathlib; from clients import runtime; "
        "text = pathlib.Path(sys.argv[1]).read_text(); d = runtime.data_for(text, 0, sys.argv[2]); "
        "print(len(d.train), len(d.val), sorted({'datasets', 'pandas', 'pyarrow'} & set(sys.modules)))"
    )
    env = {"PYTHONPATH": str(ROOT), token_cache.CACHE_ENV: str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "exp.toml"), str(node_file)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # The next process (the next message) found its splits on disk and imported no data module.
    assert proc.stdout.split() == [str(len(expected.train)), str(len(expected.val)), "[]"]
