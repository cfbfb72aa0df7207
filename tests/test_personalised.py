"""Personalised strategies are judged personalised by default: a strategy whose clients keep state of their
own (FedSA-LoRA) evaluates its clients every round unless told otherwise, and its progress line, summary
headline and comparison row are the personalised accuracy, the server's B = 0 number only the shared part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.core.config import ConfigError, load_config
from fedlora.core.data.sources import write_table
from fedlora.core.data.tweets import TOPICS, topics_frame
from fedlora.run.experiment import load_experiment, preflight
from fedlora.run.progress import Listener, round_line, summary_line
from strategies import registry


def test_strategies_that_keep_client_state_say_so(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    """``keeps_client_state`` agrees with what each strategy's clients keep between rounds."""
    from fedlora.tasks.models import initial_state

    cfg = load_experiment(None)
    for name, cls in registry.available().items():
        each = load_experiment(None, [f'strategy.name="{name}"', f"model.path={tiny_bert.path}"])
        strategy = cls(each, initial_state(each))
        keeps = bool(strategy.client_plan(0, 1).keep_local)
        assert cls.keeps_client_state == keeps, name
    assert registry.get("fedsa-lora").keeps_client_state and cfg.federation.fraction_evaluate == 0.0


def test_clients_evaluate_by_default_only_where_they_keep_state() -> None:
    fedsa = load_experiment(None, ['strategy.name="fedsa-lora"'])
    assert fedsa.federation.fraction_evaluate == 1.0
    told = load_experiment(None, ['strategy.name="fedsa-lora"', "federation.fraction_evaluate=0"])
    assert told.federation.fraction_evaluate == 0.0  # told otherwise
    assert load_experiment(None, ["federation.fraction_evaluate=0.3"]).federation.fraction_evaluate == 0.3
    no_validation = load_experiment(None, ['strategy.name="fedsa-lora"', "data.val_fraction=0"])
    assert no_validation.federation.fraction_evaluate == 0.0
    with pytest.raises(ConfigError, match=r"federation\.fraction_evaluate"):
        load_config(None, ["federation.fraction_evaluate=-0.5"])


def test_a_personalised_row_and_summary_lead_with_the_personalised_accuracy(tmp_path: Path) -> None:
    row = {
        "round": 3, "num_clients": 5, "train_loss": 0.9, "eval_loss": 1.1, "eval_accuracy": 0.424,
        "eval_macro_f1": 0.2, "uplink_bytes": 10, "downlink_bytes": 10, "wall_s": 1.0,
        "client_eval_accuracy": 0.713, "personalised_accuracy": 0.713,
    }  # fmt: skip
    line = round_line(row, 8)
    assert "personalised_acc 71.30%" in line and "shared part: eval_loss 1.1000 eval_acc 42.40%" in line
    assert line.index("personalised_acc") < line.index("shared part")
    summary = {
        "wall_s": 3.0, "accuracy_of": "personalised", "final_accuracy": 0.713, "best_accuracy": 0.72,
        "final_eval_accuracy": 0.424, "majority_accuracy": 0.424,
    }  # fmt: skip
    text = summary_line(summary, tmp_path)
    assert (
        "final personalised accuracy 71.30% (best 72.00%" in text
        and "shared part on the test set 42.40%" in text
    )


@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path_factory.mktemp("d") / "t.csv")


@pytest.mark.e2e
def test_a_fedsa_lora_run_with_default_settings_is_personalised(
    tmp_path: Path, tiny_bert, topics_csv: Path, federate
) -> None:  # type: ignore[no-untyped-def]
    """In-process federation on the tiny model, nothing said about evaluation: every round's row has the
    personalised accuracy, the progress line shows it first, summary.json leads with it."""
    overrides = [
        f'model.path="{tiny_bert.path}"', f'data.source="{topics_csv}"', 'data.label="topic"',
        f"data.labels={json.dumps(sorted(TOPICS))}", 'data.partitioner="iid"', "data.max_length=16",
        "data.test_size=12", 'strategy.name="fedsa-lora"', "federation.num_clients=3",
        "federation.rounds=2", "train.local_steps=2",
    ]  # fmt: skip
    cfg = preflight(load_experiment(None, overrides))
    lines: list[str] = []
    run = federate(
        cfg, tmp_path / "run", listener=Listener(on_round=lambda r: lines.append(round_line(r, 2)))
    )
    rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["personalised_accuracy"] == r["client_eval_accuracy"] for r in rows)
    assert len(lines) == 2 and all("personalised_acc" in line and "shared part" in line for line in lines)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accuracy_of"] == "personalised" and summary["eval_accuracy_of"] == "shared part"
    assert summary["final_accuracy"] == rows[-1]["personalised_accuracy"]
    assert summary["best_accuracy"] == max(r["personalised_accuracy"] for r in rows)
