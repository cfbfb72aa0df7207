"""Your own data end to end: a CSV written here (five string labels, a ``user`` column) is shown by
``fedlora data``, trains with ``partition_by = "user"``, reports macro-F1 in every row, and the saved
adapter, reloaded, predicts class names."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedlora.cli import app
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame

ROOT = Path(__file__).resolve().parents[1]
TOPIC_NAMES = sorted(TOPICS)


def experiment(tmp_path: Path, per_topic: int = 40) -> Path:
    source = write_table(topics_frame(per_topic=per_topic, users=5, seed=0), tmp_path / "topics.csv")
    path = tmp_path / "topics.toml"
    path.write_text(
        'name = "own-data"\n'
        f'[data]\nsource = "{source}"\nlabel = "topic"\npartition_by = "user"\ntest_size = 50\n'
        "max_length = 32\n"
        "[federation]\nnum_clients = 3\nrounds = 2\nmin_clients = 2\n"
        "[train]\nlocal_steps = 2\nbatch_size = 8\nlr = 0.01\n"
    )
    return path


def test_fedlora_data_shows_each_client_and_writes_a_png(tmp_path: Path) -> None:
    png = tmp_path / "shares.png"
    result = CliRunner().invoke(app, ["data", str(experiment(tmp_path)), "--png", str(png)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("own-data: topics.csv (5 labels), partitioner natural by user, 3 clients")
    assert lines[1].split()[:3] == ["client", "train", "val"] and lines[1].split()[3:8] == TOPIC_NAMES
    clients = [line.split() for line in lines[2:5]]
    assert [c[0] for c in clients] == ["0", "1", "2"]
    held = sorted(user.strip(",") for c in clients for user in c[8:])
    assert held == [f"user-{u}" for u in range(5)]  # 5 users grouped onto 3 clients, none split
    assert sum(int(c[1]) + int(c[2]) for c in clients) == 5 * 40 - 50
    assert lines[5].split()[:2] == ["test", "50"] and "majority class 20.0%" in lines[5]
    assert lines[6] == f"wrote {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_a_csv_with_five_labels_trains_by_user_and_the_adapter_predicts_names(
    tmp_path: Path, federate: Callable[..., Path]
) -> None:
    """The federation runs in this process (the product's round loop and ClientApp, messages through
    Flower's protobuf form): what is checked here is the data path, not Ray's transport."""
    from fedlora.run.experiment import load_experiment, preflight

    out = tmp_path / "run"
    federate(preflight(load_experiment(experiment(tmp_path)), simulation=True), out)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(0.0 <= row["eval_macro_f1"] <= 1.0 for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == TOPIC_NAMES
    assert summary["final_eval_macro_f1"] == rows[-1]["eval_macro_f1"]
    assert summary["majority_accuracy"] == pytest.approx(0.2)  # 10 of each topic in the test set
    assert summary["majority_macro_f1"] == pytest.approx(2 * 0.2 / 1.2 / 5)

    from fedlora.core.config import ExperimentConfig
    from fedlora.core.data.splits import get_splits
    from fedlora.core.model.adapters import load_trained  # here: loads peft and transformers
    from fedlora.core.model.loading import load_tokenizer
    from fedlora.core.training.loops import encode, score

    model = load_trained(out / "adapter")
    assert [model.config.id2label[i] for i in range(5)] == TOPIC_NAMES
    cfg = ExperimentConfig.from_toml((out / "config.toml").read_text())
    test = get_splits(cfg.data, cfg.federation.num_clients, cfg.seed).test
    scores = score(model, encode(test, load_tokenizer(""), cfg.data.max_length))
    assert scores.accuracy == pytest.approx(summary["final_eval_accuracy"])
    assert scores.macro_f1 == pytest.approx(summary["final_eval_macro_f1"])
    texts = ["@united lost my bag again", "#Coachella2015 lineup!"]
    batch = load_tokenizer("")(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    assert all(model.config.id2label[p] in TOPIC_NAMES for p in predicted)
