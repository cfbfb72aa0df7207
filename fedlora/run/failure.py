"""The one line a failed run ends with: the cause, and what to do next (``--resume`` only when a round
finished; a run directory whose first round never finished has nothing to resume from)."""

from __future__ import annotations

from fedlora.core.records.rundir import RunDirectory


def finished_rounds(run_dir: RunDirectory) -> int:
    """Rounds recorded in the run directory's ``rounds.jsonl`` (0 when it has none)."""
    path = run_dir.rounds_path
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def failure_message(exc: BaseException, run_dir: RunDirectory) -> str:
    """``the run failed: <Type>: <cause on one line> (<what next>)``: the exception's cause (the
    exception itself when it has none), then ``--resume`` advice when a round finished, else the advice
    to rerun with ``--overwrite`` (the run directory exists but holds no round)."""
    cause = exc.__cause__ or exc
    text = " ".join(str(cause).split()) or "no detail"
    done = finished_rounds(run_dir)
    if done:
        advice = f"{done} finished round(s) are kept; continue with --resume {run_dir.path} once fixed"
    else:
        advice = "no round finished, so there is nothing to resume; fix it and rerun with --overwrite"
    return (
        f"the run failed: {type(cause).__name__}: {text} ({advice}; --verbose shows Flower's and Ray's logs)"
    )
