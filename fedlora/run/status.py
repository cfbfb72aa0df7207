"""``fedlora deploy status``: what the operator's SuperLink knows, through Flower's Control API.

The SuperLink answers three questions over the same TLS connection ``flwr`` uses (a ``[superlink.NAME]``
entry in ``$FLWR_HOME/config.toml``): which SuperNodes are registered and when each last sent a
heartbeat (``ListNodes``: a node is online until ``online_until``, which every heartbeat moves to
``now + 2 x heartbeat_interval``), which runs exist and in which state (``ListRuns``), and a run's log
(``StreamLogs``), in which the ServerApp writes one ``fedlora: round N/M ...`` line per phase: the
last one is the run's current round.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fedlora.run.credentials import DeployError

HEARTBEAT_PATIENCE = 2
"""Flower 1.42's ``HEARTBEAT_PATIENCE``: a node is online until ``last heartbeat + 2 x interval``."""

_ROUND = re.compile(r"fedlora: round\s+(\d+)/(\d+)\s+(.*)")


@dataclass(frozen=True)
class NodeStatus:
    """One registered SuperNode."""

    node_id: int
    status: str
    last_heartbeat: datetime | None
    """When the node last reported (its last heartbeat), None if it never did."""
    online_since: datetime | None


@dataclass(frozen=True)
class RunStatus:
    """One run and, for fedlora runs, its current round."""

    run_id: int
    status: str
    app: str
    started: datetime | None
    finished: datetime | None
    round: int | None = None
    rounds: int | None = None
    phase: str = ""


@dataclass(frozen=True)
class FederationStatus:
    """The SuperLink's answer: nodes, runs (newest first), and its clock."""

    superlink: str
    nodes: list[NodeStatus]
    runs: list[RunStatus]
    now: datetime


def _time(text: str) -> datetime | None:
    """An ISO 8601 time of the Control API (empty: none)."""
    return datetime.fromisoformat(text) if text else None


def node_status(info: Any) -> NodeStatus:
    """A ``NodeInfo`` (protobuf) of the Control API as a :class:`NodeStatus`."""
    heartbeat = None
    if info.online_until and info.heartbeat_interval:
        last = info.online_until - HEARTBEAT_PATIENCE * info.heartbeat_interval
        heartbeat = datetime.fromtimestamp(last, tz=UTC)
    return NodeStatus(
        node_id=int(info.node_id),
        status=str(info.status),
        last_heartbeat=heartbeat,
        online_since=_time(info.last_activated_at),
    )


def current_round(log: str) -> tuple[int | None, int | None, str]:
    """(round, rounds, phase text) from the last ``fedlora: round N/M ...`` line of a run's log."""
    found = _ROUND.findall(log)
    if not found:
        return None, None, ""
    done, total, rest = found[-1]
    phase = " ".join(rest.split())
    return int(done), int(total), f"done: {phase}" if phase.startswith("clients ") else phase


def federation_status(connection: str | None, *, log_runs: int = 1) -> FederationStatus:
    """Ask the SuperLink of ``connection`` (a name in ``$FLWR_HOME/config.toml``; None: the default)
    for its nodes and runs, and the log of the newest ``log_runs`` runs for their round.

    Raises DeployError (one line) when the connection is unknown or the SuperLink does not answer."""
    # start-up: Flower's CLI modules (typer, httpx, protobuf) load only for this command
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListNodesRequest, ListRunsRequest, StreamLogsRequest

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Flower prints "Using SuperLink: ..."
            conn = read_superlink_connection(connection)
            client = init_http_client_from_connection(conn)
    except (Exception, SystemExit) as exc:
        raise DeployError(
            f"no SuperLink connection {connection or '(default)'} in FLWR_HOME: {_why(exc)}"
        ) from None
    try:
        nodes = client.ListNodes(ListNodesRequest())
        listed = client.ListRuns(ListRunsRequest())
        runs = sorted((run_from_proto(p) for p in listed.run_dict.values()), key=lambda r: -r.run_id)
        statuses = []
        for i, run in enumerate(runs):
            log = _first_log(client.StreamLogs(StreamLogsRequest(run_id=run.run_id))) if i < log_runs else ""
            statuses.append(_run_status(run, log))
    except Exception as exc:
        raise DeployError(f"the SuperLink at {conn.address} did not answer: {_why(exc)}") from None
    finally:
        client.close()
    now = _time(nodes.now) or datetime.now(tz=UTC)
    return FederationStatus(
        f"{conn.name} ({conn.address})", [node_status(n) for n in nodes.nodes_info], statuses, now
    )


def _why(exc: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _first_log(stream: Iterable[Any]) -> str:
    """The log so far: the first answer of ``StreamLogs`` holds everything up to now."""
    for answer in stream:
        return str(answer.log_output)
    return ""


def _run_status(run: Any, log: str) -> RunStatus:
    """A ``Run`` of the Control API, with the round its ``log`` shows."""
    text = run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else "")
    done, total, phase = current_round(log)
    return RunStatus(
        run_id=int(run.run_id),
        status=text,
        app=f"{run.fab_id}=={run.fab_version}",
        started=_time(run.running_at),
        finished=_time(run.finished_at),
        round=done,
        rounds=total,
        phase=phase,
    )


def _ago(when: datetime | None, now: datetime) -> str:
    """How long before ``now`` (seconds, or minutes past two)."""
    if when is None:
        return "never"
    seconds = max(0.0, (now - when).total_seconds())
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def status_lines(status: FederationStatus, runs: int = 3) -> list[str]:
    """What ``fedlora deploy status`` prints: one line per node, then the newest ``runs`` runs."""
    online = sum(n.status == "online" for n in status.nodes)
    lines = [f"SuperLink {status.superlink}: {len(status.nodes)} SuperNodes registered, {online} online"]
    for node in sorted(status.nodes, key=lambda n: n.node_id):
        since = f", online since {node.online_since:%Y-%m-%d %H:%M:%S}Z" if node.status == "online" else ""
        seen = _ago(node.last_heartbeat, status.now)
        lines.append(f"  node {node.node_id}: {node.status}, last heartbeat {seen}{since}")
    if not status.runs:
        lines.append("no runs yet")
    for run in status.runs[:runs]:
        where = f", round {run.round}/{run.rounds}: {run.phase}" if run.round is not None else ""
        lines.append(f"run {run.run_id} ({run.app}): {run.status}{where}")
    if len(status.runs) > runs:
        lines.append(f"  ... and {len(status.runs) - runs} earlier runs (flwr ls)")
    return lines
