"""The line a failed run ends with: its cause on one line, ``--resume`` advised only once a round has
finished (a run that failed in round 1 has nothing to resume from)."""

from __future__ import annotations

from pathlib import Path

from fedlora.core.records.rundir import RunDirectory
from fedlora.run.failure import failure_message


def _failed() -> RuntimeError:
    try:
        try:
            raise ValueError("client 3: size mismatch for classifier.weight:\n  copying [2, 32] into [3, 32]")
        except ValueError as inner:
            raise RuntimeError("ServerApp thread raised") from inner
    except RuntimeError as outer:
        return outer


def test_no_finished_round_no_resume_advice(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    (tmp_path / "run").mkdir()
    run_dir.rounds_path.write_text("")
    message = failure_message(_failed(), run_dir)
    assert message == (
        "the run failed: ValueError: client 3: size mismatch for classifier.weight: copying [2, 32] into "
        "[3, 32] (no round finished, so there is nothing to resume; fix it and rerun with --overwrite; "
        "--verbose shows Flower's and Ray's logs)"
    )
    assert "--resume" not in message


def test_finished_rounds_are_counted_and_resume_advised(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path / "run")
    (tmp_path / "run").mkdir()
    run_dir.rounds_path.write_text('{"round": 1}\n{"round": 2}\n')
    message = failure_message(RuntimeError("round 3: every client failed"), run_dir)
    assert message.startswith("the run failed: RuntimeError: round 3: every client failed (2 finished ")
    assert f"continue with --resume {tmp_path / 'run'} once fixed" in message
