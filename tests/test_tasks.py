"""Tasks are plug-ins: found by the registry, checked by name, one file each; nothing outside a task's
file branches on its name; the docs' example task (regression) drops in as one file and runs a
federated round end to end."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import fedlora.tasks
from fedlora.core.config import ConfigError, from_dict
from fedlora.run.experiment import check_strategy, load_experiment, preflight
from fedlora.tasks import registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "regression.py"


def test_the_registry_finds_both_tasks_and_names_the_valid_ones() -> None:
    assert {"classification", "causal-lm"} <= set(registry.available())
    with pytest.raises(
        ConfigError, match=r"^task = 'generation' is unknown; valid tasks: .*causal-lm"
    ) as info:
        check_strategy(from_dict({"task": "generation"}))
    assert "\n" not in str(info.value)


def test_a_key_of_another_task_is_refused_in_one_line() -> None:
    with pytest.raises(
        ConfigError, match=r"data.response = 'answer' does not apply to task = 'classification'"
    ):
        check_strategy(from_dict({"data": {"response": "answer"}}))


def test_nothing_outside_a_task_file_branches_on_a_task_name() -> None:
    """No comparison with a task's name, and no `.causal` flag, in the code outside fedlora/tasks/."""
    names = "|".join(re.escape(n) for n in registry.available())
    branch = re.compile(rf"(==|!=|\bin)\s*\(?\s*[\"'](?:{names})[\"']|\.causal\b|task\s*==")
    files = [p for pkg in ("fedlora", "clients", "strategies") for p in (ROOT / pkg).rglob("*.py")]
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        if "tasks" not in p.relative_to(ROOT).parts
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if branch.search(line)
    ]
    assert not hits, hits


# ----- the example of docs/write-a-task.md ------------------------------------------------------------
@pytest.fixture
def regression(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The docs' example dropped into the tasks folder (a folder on the package's path) and discovered."""
    (tmp_path / "regression.py").write_text(EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(fedlora.tasks, "__path__", [*fedlora.tasks.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "regression" in registry.available()
        yield sys.modules["fedlora.tasks.regression"]
    finally:
        registry._REGISTRY.pop("regression", None)
        sys.modules.pop("fedlora.tasks.regression", None)


@pytest.fixture
def ratings(tmp_path: Path, synthetic_tweets) -> Path:  # type: ignore[no-untyped-def]
    """The synthetic tweets with numeric labels 1, 3, 5 (negative, neutral, positive) as a CSV."""
    import pandas as pd

    from fedlora.core.data.sources import write_table

    stars = [(1, 3, 5)[label] for label in synthetic_tweets["label"]]
    frame = pd.DataFrame({"text": synthetic_tweets["text"], "stars": stars})
    return write_table(frame, tmp_path / "ratings.csv")


def _settings(model: str, source: Path, *more: str) -> list[str]:
    return [
        *("task=regression", f"model.path={model}", f"data.source={source}", "data.label=stars"),
        *("data.partitioner=iid", "data.test_size=30", "federation.num_clients=3", "federation.rounds=2"),
        *("train.local_steps=4", "train.batch_size=8", "train.lr=2e-2", "lora.rank=2", *more),
    ]


def test_the_example_task_drops_in_and_runs_a_federation(
    regression, ratings, tiny_bert, federate, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Copied into the tasks folder, regression trains with FedIT: the head has one output, the loss is
    the mean squared error, it falls, and the saved adapter reloads and predicts numbers."""
    cfg = preflight(load_experiment(None, _settings(tiny_bert.path, ratings)))
    assert cfg.data.labels == ["1", "3", "5"]  # numeric names, sorted as numbers
    out = federate(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["eval_loss"]) and 0 <= r["eval_accuracy"] <= 1 for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    model = registry.task_of(cfg).load_trained(out / "adapter")
    ids = torch.tensor([[2, 10, 11, 3]])
    assert model(input_ids=ids).logits.shape == (1, 1)


def test_the_example_task_refuses_labels_that_are_not_numbers(regression, tiny_bert, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    from fedlora.core.data.sources import write_table

    source = write_table(
        pd.DataFrame({"text": ["a b", "c d"] * 20, "stars": ["one", "two"] * 20}), tmp_path / "w.csv"
    )
    with pytest.raises(ConfigError, match=r"reads each label as a number, but data\.label has 'one'"):
        preflight(load_experiment(None, _settings(tiny_bert.path, source, "data.test_size=10")))


def test_dp_sgd_clips_the_example_tasks_own_loss(regression, ratings, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    """Under DP-SGD with no noise and a huge clip, one private step equals one plain step of the task's
    own loss (the squared error, not a cross-entropy); ghost clipping, which would apply cross-entropy, is
    refused in one line."""
    import copy

    from fedlora.core.model.adapters import set_trainable
    from fedlora.core.model.loading import load_tokenizer
    from fedlora.core.training.loops import make_optimizer
    from fedlora.privacy.dp_sgd import PrivateTrainer
    from fedlora.tasks.models import get_model

    cfg = preflight(
        load_experiment(None, _settings(tiny_bert.path, ratings, "lora.dropout=0", "train.optimizer=sgd"))
    )
    data = registry.task_of(cfg).encode(_first_rows(cfg, 8), load_tokenizer(tiny_bert.path))
    batch = data.batch(list(range(8)))
    plain, private = get_model(cfg), copy.deepcopy(get_model(cfg))
    set_trainable(plain)
    set_trainable(private)
    opt = make_optimizer(plain, cfg.train)
    torch.manual_seed(0)  # the same dropout masks in both forward passes
    data.loss(plain, batch).backward()
    opt.step()
    with PrivateTrainer(private, cfg.train, noise_multiplier=0.0, clip_norm=1e6, expected_batch=8) as trainer:
        torch.manual_seed(0)
        trainer.step(dict(batch), data.loss_of)
    for (_, a), (_, b) in zip(plain.named_parameters(), private.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    ghost = ["privacy.mode=dp-sgd", "privacy.noise_multiplier=1.0", "privacy.opacus_mode=ghost"]
    with pytest.raises(ConfigError, match=r"opacus_mode = 'ghost' is not supported with task = 'regression'"):
        load_experiment(None, _settings(tiny_bert.path, ratings, *ghost))


def _first_rows(cfg, n: int):  # type: ignore[no-untyped-def]
    from fedlora.core.data.splits import get_splits

    return get_splits(cfg.data, cfg.federation.num_clients, cfg.seed).client_train(0).select(range(n))
