"""The base model as a grid axis: model folders (with their LoRA targets) as levels, paired like any other
axis, seed by seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedlora.compare import session
from fedlora.compare.grid import parse_grid
from fedlora.core.config import ConfigError
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.report.writer import collect, write_report

SIMS = Path(__file__).resolve().parents[1] / "sims"


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path_factory.mktemp("d") / "t.csv")


def model_grid(data: Path, axis: dict[str, Any], **extra: Any):  # type: ignore[no-untyped-def]
    table: dict[str, Any] = {
        "experiment": "quickstart.toml",
        "seeds": [0, 1],
        "set": [
            f'data.source="{data}"', 'data.label="topic"', f"data.labels={json.dumps(sorted(TOPICS))}",
            'data.partitioner="iid"', "data.max_length=16", "data.test_size=12", "federation.num_clients=3",
            "federation.rounds=2", "train.local_steps=2",
        ],
        "axes": [axis, {"key": "strategy.name", "values": ["fedit", "ffa-lora"]}],
        **extra,
    }  # fmt: skip
    return parse_grid(table, base_dir=SIMS)


def test_model_folders_are_levels_named_after_the_folder(tiny_bert, tiny_llama, topics_csv) -> None:  # type: ignore[no-untyped-def]
    grid = model_grid(topics_csv, {"key": "model.path", "values": [tiny_bert.path, tiny_llama.path]})
    assert grid.axes[0].name == "model" and list(grid.axes[0].levels) == ["tiny-bert", "tiny-llama"]
    tasks = session.checked(grid.tasks())  # every run checked against its own model's modules
    paths = {(t.cell.label, t.seed): t.config.model.path for t in tasks}
    assert paths[("tiny-bert · fedit", 1)] == tiny_bert.path
    assert paths[("tiny-llama · ffa-lora", 0)] == tiny_llama.path
    assert {t.key for t in tasks} >= {"tiny-bert__fedit/seed-0", "tiny-llama__ffa-lora/seed-1"}


def test_a_model_level_sets_its_own_targets(tiny_bert, tiny_llama, topics_csv) -> None:  # type: ignore[no-untyped-def]
    axis = {
        "name": "model",
        "levels": {
            "bert": [f'model.path="{tiny_bert.path}"', 'lora.targets=["query", "value"]'],
            "llama": [f'model.path="{tiny_llama.path}"', 'lora.targets=["q_proj", "v_proj"]'],
        },
    }
    tasks = session.checked(model_grid(topics_csv, axis).tasks())
    targets = {t.cell.levels["model"]: t.config.lora.targets for t in tasks}
    assert targets == {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
    wrong = {
        "name": "model",
        "levels": {"llama": [f'model.path="{tiny_llama.path}"', 'lora.targets=["query"]']},
    }
    with pytest.raises(ConfigError, match=r"lora\.targets"):
        session.checked(model_grid(topics_csv, wrong).tasks())


@pytest.mark.e2e
def test_each_model_is_paired_seed_by_seed(
    tmp_path: Path, tiny_bert, tiny_llama, topics_csv, federate
) -> None:  # type: ignore[no-untyped-def]
    """Both models federated in this process at seeds 0 and 1; with baseline { model = "tiny-bert" } the
    report pairs each strategy on tiny-llama with the same strategy on tiny-bert, on both seeds."""
    grid = model_grid(
        topics_csv,
        {"key": "model.path", "values": [tiny_bert.path, tiny_llama.path]},
        baseline={"model": "tiny-bert"},
    )
    root = tmp_path / "cmp"
    root.mkdir()
    (root / "comparison.json").write_text(json.dumps(grid.manifest()))
    for task in session.checked(grid.tasks()):
        federate(task.config, root / "runs" / task.key)
    found = collect([root])
    text = write_report(found, root)["markdown"].read_text()
    assert "## Paired differences against tiny-bert at the same strategy" in text
    pairs = {(c.label, b.label) for p in found.pairings() for c, b in p.pairs()}
    assert pairs == {
        ("tiny-llama · fedit", "tiny-bert · fedit"),
        ("tiny-llama · ffa-lora", "tiny-bert · ffa-lora"),
    }
    for line in text.splitlines():
        if line.startswith("| tiny-llama"):
            assert line.split("|")[2].strip() == "2"  # both seeds paired
