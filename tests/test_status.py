"""``fedlora deploy status`` without a SuperLink: what it reads from the Control API's answers (node
heartbeats, runs, a run's log) and what it prints. The live check is in test_deploy.py, against the
deployment that file starts."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from fedlora.run.status import (
    FederationStatus,
    NodeStatus,
    RunStatus,
    current_round,
    node_status,
    status_lines,
)

NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)


def test_the_last_heartbeat_is_online_until_less_two_intervals() -> None:
    info = SimpleNamespace(
        node_id=42,
        status="online",
        online_until=NOW.timestamp() + 50.0,
        heartbeat_interval=30.0,
        last_activated_at="2026-12-07T11:00:00+00:00",
    )
    node = node_status(info)
    assert node.last_heartbeat == datetime.fromtimestamp(NOW.timestamp() - 10.0, tz=UTC)
    assert node.online_since == datetime(2026, 12, 7, 11, 0, tzinfo=UTC)
    never = node_status(SimpleNamespace(**{**vars(info), "online_until": 0.0, "last_activated_at": ""}))
    assert never.last_heartbeat is None and never.online_since is None


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        ("", (None, None, "")),
        ("INFO starting\nfedlora: writing run directory /data/runs/x\n", (None, None, "")),
        (
            "fedlora: round   1/5  training: 1/2 clients replied, elapsed 3 s\n"
            "fedlora: round   1/5  clients   2  train_loss 1.0867  eval_acc 42.00%  29.4 s\n"
            "fedlora: round   2/5  training: 0/2 clients replied, elapsed 1 s\n",
            (2, 5, "training: 0/2 clients replied, elapsed 1 s"),
        ),
        (
            "fedlora: round   5/5  clients   2  train_loss 0.9  eval_acc 61.00%  9.1 s\n",
            (5, 5, "done: clients 2 train_loss 0.9 eval_acc 61.00% 9.1 s"),
        ),
    ],
)
def test_the_current_round_is_the_last_round_line_of_the_log(log: str, expected: tuple[object, ...]) -> None:
    assert current_round(log) == expected


def test_status_lines_name_every_node_and_the_newest_runs() -> None:
    nodes = [
        NodeStatus(
            7,
            "online",
            datetime(2026, 12, 7, 11, 59, 55, tzinfo=UTC),
            datetime(2026, 12, 7, 11, 0, tzinfo=UTC),
        ),
        NodeStatus(3, "offline", datetime(2026, 12, 7, 11, 50, 0, tzinfo=UTC), None),
    ]
    runs = [
        RunStatus(9, "running", "fedlora/fedlora==0.1.0", NOW, None, 2, 5, "training: 1/2 clients replied"),
        *[RunStatus(i, "finished:completed", "fedlora/fedlora==0.1.0", NOW, NOW) for i in (8, 7, 6)],
    ]
    lines = status_lines(FederationStatus("fed (127.0.0.1:8000)", nodes, runs, NOW), runs=2)
    assert lines == [
        "SuperLink fed (127.0.0.1:8000): 2 SuperNodes registered, 1 online",
        "  node 3: offline, last heartbeat 10 min ago",
        "  node 7: online, last heartbeat 5 s ago, online since 2026-12-07 11:00:00Z",
        "run 9 (fedlora/fedlora==0.1.0): running, round 2/5: training: 1/2 clients replied",
        "run 8 (fedlora/fedlora==0.1.0): finished:completed",
        "  ... and 2 earlier runs (flwr ls)",
    ]
    empty = status_lines(FederationStatus("fed (x:1)", [], [], NOW))
    assert empty == ["SuperLink fed (x:1): 0 SuperNodes registered, 0 online", "no runs yet"]


@pytest.mark.cli
def test_status_without_a_connection_is_a_one_line_error(run_cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("deploy", "status", "nowhere", env={"FLWR_HOME": str(tmp_path)}, timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: no SuperLink connection nowhere in FLWR_HOME: "), line
    bad = run_cli("deploy", "status", "--runs", "0", timeout=120)
    assert (
        bad.returncode == 2 and bad.stderr.strip() == "error: --runs 0 is invalid: expected an integer >= 1"
    )
