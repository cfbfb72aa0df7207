"""What a running federation reports while it runs, and the progress lines made from it.

A :class:`Listener` is told the zero-shot scores (round 0 of a causal-LM run, before any training),
each round's row once it is in ``rounds.jsonl``, and within a round a :class:`RoundProgress` event when
a phase's messages go out, after every reply, and when the server starts on the test set. ``fedlora
run`` prints these (a live line in a terminal: round, clients replied out of sent, time since the round
began); the ServerApp of ``flwr run .`` logs them (:func:`log_listener`). Both make their lines with
:func:`round_line` and :func:`progress_line`; ``mark`` lets the CLI style parts of a line (rich markup)
that a log keeps plain.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.core.config import DataConfig, ExperimentConfig

Row = dict[str, Any]
Mark = Callable[[str, str], str]
"""``mark(text, style)``: ``text`` as the printer shows it in ``style`` (dim, bold, yellow, magenta)."""

PHASES = {"train": "training", "evaluate": "client evaluation", "test": "evaluating on the test set"}


def plain(text: str, style: str) -> str:
    """No styling: for logs."""
    return text


@dataclass(frozen=True)
class RoundProgress:
    """Where a round stands: a phase began, or one of its replies arrived."""

    round: int
    phase: str
    """``train``, ``evaluate`` (the clients on their validation splits) or ``test`` (the server on the
    test set: no messages)."""
    replied: int
    """Replies received so far in this phase, errors included (0 when its messages have just gone out)."""
    sent: int
    elapsed_s: float
    """Seconds since the round (this attempt of it) began."""


@dataclass(frozen=True)
class Listener:
    """Callbacks a run calls as it goes; any may be None. They run on the server loop's thread, so they
    must return quickly."""

    on_round: Callable[[Row], None] | None = None
    on_progress: Callable[[RoundProgress], None] | None = None
    on_zero_shot: Callable[[Row], None] | None = None

    def round_done(self, row: Row) -> None:
        """A round finished; ``row`` is its line of ``rounds.jsonl``."""
        if self.on_round is not None:
            self.on_round(row)

    def progress(self, event: RoundProgress) -> None:
        """A phase of a round began, or a reply arrived."""
        if self.on_progress is not None:
            self.on_progress(event)

    def zero_shot(self, row: Row) -> None:
        """The untrained model's scores (round 0), before the first round."""
        if self.on_zero_shot is not None:
            self.on_zero_shot(row)


def pct(value: float | None) -> str:
    """A fraction as a percentage with two decimals; 'n/a' for a missing (null or nan) one."""
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:.2f}%"


def round_line(row: Row, rounds: int, mark: Mark = plain) -> str:
    """One round's progress line: clients, losses, test scores, traffic, time, privacy, faults. The
    zero-shot row (round 0: no training, no traffic) has the test scores in the same columns."""
    head = f"round {row['round']:>3}/{rounds}  "
    if row["round"] == 0:
        return head + f"{'zero-shot (no training)':<30}  " + _scores(row, mark).rstrip()
    return (
        head
        + f"clients {row['num_clients']:>3}  train_loss {row['train_loss']:.4f}  "
        + _scores(row, mark)
        + f"up {row['uplink_bytes'] / 1e6:.2f} MB  down {row['downlink_bytes'] / 1e6:.2f} MB  "
        + f"{row['wall_s']:.1f} s"
        + _privacy(row, mark)
        + _faults(row, mark)
    )


def progress_line(event: RoundProgress, rounds: int, *, elapsed: bool = True) -> str:
    """``round   3/8  training: 4/10 clients replied, elapsed 12 s``, or ``round   3/8  evaluating on the
    test set, ...`` (without the time if not ``elapsed``: a live display that counts it itself)."""
    text = f"round {event.round:>3}/{rounds}  {PHASES.get(event.phase, event.phase)}"
    if event.phase != "test":
        text += f": {event.replied}/{event.sent} clients replied"
    return text + (f", elapsed {event.elapsed_s:.0f} s" if elapsed else "")


def _scores(row: Row, mark: Mark) -> str:
    """The test-set part of a progress line ("not evaluated" between evaluation rounds; "n/a" for an
    accuracy a causal-LM task with free-text responses does not have)."""
    if row.get("eval_loss") is None:
        return mark("not evaluated (federation.evaluate_every)", "dim") + "  "
    if row.get("personalised_accuracy") is not None:  # the clients' own models: the headline
        return (
            f"personalised_acc {mark(pct(row['personalised_accuracy']), 'bold')}  "
            f"shared part: eval_loss {row['eval_loss']:.4f} eval_acc {pct(row['eval_accuracy'])}  "
        )
    return (
        f"eval_loss {row['eval_loss']:.4f}  eval_acc {mark(pct(row['eval_accuracy']), 'bold')}  "
        f"macro_f1 {pct(row['eval_macro_f1'])}  "
        + (f"ppl {row['eval_perplexity']:.3f}  " if row.get("eval_perplexity") is not None else "")
    )


def _privacy(row: Row, mark: Mark) -> str:
    """The privacy part of a progress line (empty when DP is off)."""
    if "epsilon" not in row:
        return ""
    declined = f"  declined {int(row['num_declined'])}" if row.get("num_declined") else ""
    epsilon = mark(f"eps {row['epsilon']:.2f}", "magenta")
    return f"  {epsilon} (delta {row['delta']:g}){declined}"


def _faults(row: Row, mark: Mark) -> str:
    """Failed and rejected clients, and retries, in a progress line (empty when all went well)."""
    parts = [f"{row[k]} {k[4:]}" for k in ("num_failed", "num_rejected") if row.get(k)]
    if row.get("attempts", 1) > 1:
        parts.append(f"attempt {row['attempts']}")
    return f"  {mark(', '.join(parts), 'yellow')}" if parts else ""


def data_line(data: DataConfig) -> str:
    """The data a run trains on: source, number of labels, partitioner."""
    source = "the tweets" if data.tweets else Path(data.source).name
    split = f"natural by {data.partition_by}" if data.partitioner == "natural" else data.partitioner
    return f"{source} ({len(data.labels)} labels), partitioner {split}"


def start_line(cfg: ExperimentConfig, run_dir: Path, mark: Mark = plain) -> str:
    """What a run is about to do: strategy, clients, rounds, data, and where it writes."""
    fed = cfg.federation
    return (
        f"{mark('fedlora', 'bold')} {cfg.name}: strategy {mark(cfg.strategy.name, 'cyan')}, "
        f"{fed.num_clients} clients ({fed.clients_per_round()} per round), {fed.rounds} rounds, "
        f"{data_line(cfg.data)} -> {run_dir}"
    )


def summary_line(summary: Row, run_dir: Path, mark: Mark = plain) -> str:
    """A finished run from its ``summary.json``: time, final and best accuracy against the majority
    class (and the zero-shot model), macro-F1, perplexity; a run whose examples have no classes (free-text
    responses) has no accuracy: its loss and perplexity against the zero-shot model's."""
    s, zero = summary, summary.get("zero_shot")
    if s.get("accuracy_of") == "personalised":
        return (
            f"{mark('done', 'green')} in {s['wall_s']:.1f} s: final personalised accuracy "
            f"{pct(s['final_accuracy'])} (best {pct(s['best_accuracy'])}; the clients' own models on their "
            f"validation splits); shared part on the test set {pct(s['final_eval_accuracy'])} "
            f"(majority class {pct(s['majority_accuracy'])}) -> {run_dir}"
        )
    if not _finite(s.get("final_eval_accuracy")) and _finite(s.get("final_eval_perplexity")):
        before = (
            f" (zero-shot {zero['eval_perplexity']:.3f})"
            if zero and _finite(zero.get("eval_perplexity"))
            else ""
        )
        return (
            f"{mark('done', 'green')} in {s['wall_s']:.1f} s: final eval_loss {s['final_eval_loss']:.4f}, "
            f"perplexity {s['final_eval_perplexity']:.3f}{before} (free-text responses: no accuracy) "
            f"-> {run_dir}"
        )
    return (
        f"{mark('done', 'green')} in {s['wall_s']:.1f} s: "
        f"final eval_accuracy {pct(s['final_eval_accuracy'])} "
        f"(best {pct(s['best_eval_accuracy'])} in round {s['best_round']}; "
        f"majority class {pct(s['majority_accuracy'])}"
        + (f"; zero-shot {pct(zero['eval_accuracy'])}" if zero else "")
        + f"), final macro-F1 {pct(s['final_eval_macro_f1'])} "
        f"(majority class {pct(s['majority_macro_f1'])})"
        + (f", perplexity {s['final_eval_perplexity']:.3f}" if s.get("final_eval_perplexity") else "")
        + f" -> {run_dir}"
    )


def _finite(value: object) -> bool:
    """Whether ``value`` is a finite number (summary.json writes undefined metrics as null or NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def log_listener(rounds: int, log: logging.Logger, *, every_s: float = 10.0) -> Listener:
    """A listener that logs the zero-shot and round lines, and where a round's replies stand at most
    every ``every_s`` seconds per phase, plus the phase's last reply (what ``flwr run --stream`` shows).
    The test-set phase is not logged: the round's line follows it."""
    last = {"logged": 0.0}

    def replies(event: RoundProgress) -> None:
        now = time.monotonic()
        if event.phase == "test":
            return
        if event.replied == 0:
            last["logged"] = now  # the phase began: its first line comes after every_s, or when done
        elif event.replied == event.sent or now - last["logged"] >= every_s:
            last["logged"] = now
            log.warning("fedlora: %s", progress_line(event, rounds))

    def line(row: Row) -> None:
        log.warning("fedlora: %s", round_line(row, rounds))

    return Listener(on_round=line, on_progress=replies, on_zero_shot=line)
