"""Progress a person can follow: replies reported one by one while a round waits, the zero-shot line made
by the same formatter as the round lines, and the log of `flwr run` throttled."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedlora.core.protocol.stopping import STOP, exchange
from fedlora.run.progress import Listener, RoundProgress, log_listener, progress_line, round_line

ROW = {
    "round": 3,
    "num_clients": 4,
    "train_loss": 0.51234,
    "eval_loss": 0.75,
    "eval_accuracy": 0.6,
    "eval_macro_f1": 0.5,
    "uplink_bytes": 2_500_000,
    "downlink_bytes": 1_000_000,
    "wall_s": 12.34,
}


class TrickleGrid:
    """Flower's Grid contract with replies that arrive one per pull, as from clients finishing in turn."""

    def __init__(self) -> None:
        self.waiting: list[str] = []

    def push_messages(self, messages: Any) -> list[str]:
        self.waiting = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.waiting)

    def pull_messages(self, ids: Any) -> list[Any]:
        if not self.waiting:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=self.waiting.pop(0)))]


def test_exchange_reports_the_send_and_then_every_reply() -> None:
    STOP.clear()
    seen: list[tuple[int, int]] = []
    replies = exchange(TrickleGrid(), ["a", "b", "c"], timeout=10, on_reply=lambda k, m: seen.append((k, m)))  # type: ignore[arg-type]
    assert len(replies) == 3
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_a_round_line_shows_clients_scores_traffic_privacy_and_faults() -> None:
    row = {**ROW, "epsilon": 1.234, "delta": 1e-5, "num_failed": 1, "attempts": 2}
    assert round_line(row, 8) == (
        "round   3/8  clients   4  train_loss 0.5123  eval_loss 0.7500  eval_acc 60.00%  macro_f1 50.00%  "
        "up 2.50 MB  down 1.00 MB  12.3 s  eps 1.23 (delta 1e-05)  1 failed, attempt 2"
    )
    styled = round_line(row, 8, lambda text, style: f"<{style}>{text}</>")
    assert "eval_acc <bold>60.00%</>" in styled and "<magenta>eps 1.23</>" in styled
    assert "<yellow>1 failed, attempt 2</>" in styled
    unevaluated = round_line({**ROW, "eval_loss": None}, 8)
    assert "not evaluated (federation.evaluate_every)  up 2.50 MB" in unevaluated


def test_the_zero_shot_line_has_the_test_scores_in_the_round_lines_columns() -> None:
    zero = {
        "round": 0,
        "eval_loss": 2.5,
        "eval_accuracy": 0.25,
        "eval_macro_f1": 0.2,
        "eval_perplexity": 12.0,
    }
    line = round_line(zero, 8)
    assert line == (
        "round   0/8  zero-shot (no training)         eval_loss 2.5000  eval_acc 25.00%  macro_f1 20.00%  "
        "ppl 12.000"
    )
    assert line.index("eval_loss") == round_line(ROW, 8).index("eval_loss")
    assert "{" not in line  # not a raw dict


def test_a_progress_line_names_the_phase_and_the_clients() -> None:
    event = RoundProgress(round=2, phase="evaluate", replied=1, sent=5, elapsed_s=12.4)
    assert progress_line(event, 8) == "round   2/8  client evaluation: 1/5 clients replied, elapsed 12 s"
    assert progress_line(event, 8, elapsed=False).endswith("1/5 clients replied")
    test_set = RoundProgress(round=2, phase="test", replied=0, sent=0, elapsed_s=30.2)
    assert progress_line(test_set, 8) == "round   2/8  evaluating on the test set, elapsed 30 s"


def test_the_log_of_flwr_run_shows_a_phases_last_reply_and_throttles_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test-progress")
    listener = log_listener(8, log, every_s=3600)
    with caplog.at_level(logging.WARNING, logger="test-progress"):
        for replied in range(4):
            listener.progress(RoundProgress(1, "train", replied, 3, 0.5))
        listener.progress(RoundProgress(1, "test", 0, 0, 0.6))
        listener.round_done(ROW)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "fedlora: round   1/8  training: 3/3 clients replied, elapsed 0 s",
        f"fedlora: {round_line(ROW, 8)}",
    ]


@pytest.mark.e2e  # a whole federation, in process, on the tiny Llama
def test_an_in_process_round_reports_each_reply_then_its_row(
    tmp_path: Path, tiny_llama: Any, synthetic_tweets: Any, federate: Any
) -> None:
    """Zero-shot first, then per round: the training messages sent, one event per reply, the test set,
    the row."""
    import pandas as pd

    from fedlora.core.data.sources import write_table
    from fedlora.run.experiment import load_experiment, preflight

    frame = pd.DataFrame({"text": synthetic_tweets["text"], "sentiment": synthetic_tweets["label"]})
    frame["sentiment"] = frame["sentiment"].map(dict(enumerate(["negative", "neutral", "positive"])))
    source = write_table(frame, tmp_path / "tweets.csv")
    overrides = [
        *("task=causal-lm", f"model.path={tiny_llama.path}", f"data.source={source}", "data.label=sentiment"),
        *('data.template="tweet: {text} sentiment:"', "data.test_size=12", "data.partitioner=iid"),
        *("federation.num_clients=3", "federation.fraction=0.67", "federation.rounds=2"),
        *("train.local_steps=1", "train.batch_size=4", "lora.rank=2"),
    ]
    events: list[tuple[str, Any]] = []
    listener = Listener(
        on_round=lambda row: events.append(("round", row["round"])),
        on_progress=lambda e: events.append(("progress", (e.round, e.phase, e.replied, e.sent))),
        on_zero_shot=lambda row: events.append(("zero-shot", round_line(row, 2))),
    )
    federate(preflight(load_experiment(None, overrides)), tmp_path / "run", listener=listener)
    assert events[0][0] == "zero-shot" and events[0][1].startswith("round   0/2  zero-shot")
    for server_round in (1, 2):
        train = [e[1][2:] for e in events if e[0] == "progress" and e[1][:2] == (server_round, "train")]
        assert train == [(0, 2), (1, 2), (2, 2)]
    assert [e[1] for e in events if e[0] == "round"] == [1, 2]
    first = [e for e in events[: events.index(("round", 1))] if e[0] == "progress"]
    assert first[-1][1][:2] == (1, "test")  # the server's test set last, then the round's row
    assert all(e[1][0] == 1 for e in first)


def test_in_a_terminal_the_cli_shows_the_round_live_and_nothing_in_a_pipe() -> None:
    import io

    from rich.console import Console

    from fedlora.cli.run import RoundStatus

    screen = io.StringIO()
    with RoundStatus(Console(file=screen, force_terminal=True, width=120), 8) as status:
        status.show(RoundProgress(1, "train", 0, 2, 0.0))
        status.show(RoundProgress(1, "train", 1, 2, 3.0))
        assert status.live is not None
        status.live.refresh()
    assert "round   1/8  training: 1/2 clients replied" in screen.getvalue()
    assert "elapsed 0 s" in screen.getvalue()
    pipe = io.StringIO()
    with RoundStatus(Console(file=pipe, force_terminal=False), 8) as status:
        status.show(RoundProgress(1, "train", 1, 2, 3.0))
    assert pipe.getvalue() == ""


def test_a_free_text_run_is_summarised_by_its_perplexity_not_an_accuracy_it_has_not() -> None:
    from fedlora.run.progress import summary_line

    summary = {
        "wall_s": 12.0,
        "final_eval_accuracy": float("nan"),
        "final_eval_loss": 3.2068,
        "final_eval_perplexity": 24.699,
        "zero_shot": {"eval_perplexity": 133.435},
    }
    line = summary_line(summary, Path("runs/pairs"))
    assert "perplexity 24.699 (zero-shot 133.435)" in line and "accuracy n/a" not in line
    assert "final eval_loss 3.2068" in line and "no accuracy" in line
