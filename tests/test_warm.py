"""The warm trainer: the ClientApp hands its message over a Unix socket to one long-lived process per
SuperNode (``clients/warm.py``, ``fedlora/run/trainer.py``).

Without processes: the hand-over carries the message and the Context's state both ways (Flower's
protobuf form), a failure there is a one-line error, an unreachable trainer is an error and a trainer
on other code a fallback, the socket's folder is private, and a whole federation through a trainer
gives the very rounds and adapter of one without. With processes (``cli``): ``fedlora deploy
supernode`` starts the trainer, names its socket to the SuperNode, and the trainer ends with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients import runtime, warm
from fedlora.run.credentials import DeployError
from fedlora.run.deploy import LocalDeployment
from fedlora.run.trainer import private_directory

Handler = Callable[[Message, Context], Message]
pytestmark = pytest.mark.usefixtures("task_identity")  # Flower stamps messages with a task identity


@pytest.fixture
def trainer(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Handler], Path]]:
    """``trainer(handler)``: a trainer in a thread of this process answering with ``handler``, its
    socket named in FEDLORA_TRAINER_SOCKET; returns the socket's path."""
    threads: list[tuple[threading.Thread, socket.socket]] = []

    def start(handler: Handler) -> Path:
        path = private_directory(short_tmp) / "trainer.sock"
        sock = warm.listen(str(path))
        thread = threading.Thread(target=_serve_until_closed, args=(sock, handler), daemon=True)
        thread.start()
        threads.append((thread, sock))
        monkeypatch.setenv(warm.SOCKET_ENV, str(path))
        return path

    yield start
    for thread, sock in threads:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(timeout=5)


def _serve_until_closed(sock: socket.socket, handler: Handler) -> None:
    with contextlib.suppress(OSError):  # the fixture closed the socket
        warm.serve(sock, handler, warm.code_version())


def _message(kind: str = "train") -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(6, dtype="float32").reshape(2, 3))}),
            "config": ConfigRecord({"server-round": 3, "experiment": "[seed]\n"}),
        }
    )
    message = Message(content, dst_node_id=7, message_type=kind)
    message.metadata.__dict__["_message_id"] = "m-1"
    return message


def _context() -> Context:
    state = RecordDict({"kept": ConfigRecord({"rounds": 2})})
    return Context(run_id=5, node_id=7, node_config={"partition-id": 1}, state=state, run_config={})


def _echo(message: Message, context: Context) -> Message:
    """Doubles the arrays, counts rounds in the Context's state, reports the node config it saw."""
    w = message.content["arrays"]["w"].numpy()  # type: ignore[union-attr]
    kept = context.state["kept"]
    kept["rounds"] = int(kept["rounds"]) + 1  # type: ignore[index,arg-type]
    metrics = MetricRecord({"partition": int(context.node_config["partition-id"]), "pid": os.getpid()})  # type: ignore[arg-type]
    reply = RecordDict({"arrays": ArrayRecord({"w": Array(w * 2)}), "metrics": metrics})
    return Message(reply, reply_to=message)


def test_hand_over_carries_the_message_and_the_context_state_both_ways(trainer) -> None:  # type: ignore[no-untyped-def]
    from clients.app import app

    trainer(_echo)
    message, context = _message(), _context()
    reply = app(message, context)  # the ClientApp itself: train hands over
    assert reply.metadata.reply_to_message_id == "m-1"
    assert reply.content["arrays"]["w"].numpy().tolist() == [[0, 2, 4], [6, 8, 10]]  # type: ignore[union-attr]
    assert reply.content["metrics"]["partition"] == 1
    assert context.state["kept"]["rounds"] == 3  # type: ignore[index]  # the trainer's change came back
    again = app(_message("evaluate"), context)
    assert context.state["kept"]["rounds"] == 4  # type: ignore[index]
    assert again.content["metrics"]["pid"] == os.getpid()  # answered by the (thread) trainer


def test_a_failure_in_the_trainer_is_a_one_line_error_and_it_serves_on(trainer) -> None:  # type: ignore[no-untyped-def]
    calls = []

    def flaky(message: Message, context: Context) -> Message:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("partition-id 9 is outside 0..2\nsecond line")
        return _echo(message, context)

    path = trainer(flaky)
    with pytest.raises(warm.TrainerError) as info:
        warm.hand_over(_message(), _context(), str(path))
    assert str(info.value) == "the warm trainer failed: ValueError: partition-id 9 is outside 0..2"
    reply = warm.hand_over(_message(), _context(), str(path))
    assert reply is not None and not reply.has_error()


def test_an_unreachable_trainer_is_an_error_naming_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    with pytest.raises(warm.TrainerError) as info:
        warm.hand_over(_message(), _context(), str(path))
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"the warm trainer at {path} (FEDLORA_TRAINER_SOCKET) is not reachable: ")
    assert "unset FEDLORA_TRAINER_SOCKET to train in each ClientApp process" in line


def test_a_trainer_on_other_code_declines_and_the_client_trains_itself(
    trainer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    import clients.app
    from clients import local

    path = trainer(_echo)
    monkeypatch.setattr(warm, "code_version", lambda: "an-older-release")  # the ClientApp's side differs
    assert warm.hand_over(_message(), _context(), str(path)) is None
    assert "runs other code than this run's ClientApp" in capsys.readouterr().err
    monkeypatch.setattr(local, "train", lambda message, context: Message(RecordDict(), reply_to=message))
    reply = clients.app.app(_message(), _context())
    assert not reply.content.array_records  # local.train answered, not the trainer's echo


def test_the_socket_folder_is_private_and_another_user_cannot_connect(short_tmp: Path) -> None:
    folder = private_directory(short_tmp)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    sock = warm.listen(str(folder / "trainer.sock"))
    try:
        assert stat.S_IMODE((folder / "trainer.sock").stat().st_mode) == 0o600
        if os.getuid() != 0:
            pytest.skip("needs root to try as another user")
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code, str(folder / "trainer.sock")], timeout=60)
        assert proc.returncode == 3  # nobody (another user) is refused by the folder's mode
    finally:
        sock.close()


def test_the_start_up_log_counts_the_clientapp_cpu_before_the_hand_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "startup.jsonl"
    monkeypatch.setenv(runtime.STARTUP_LOG, str(log))
    monkeypatch.setattr(runtime, "cpu_offset", 0.0)
    warm.charge_cpu(0.75)  # the ClientApp process had used 0.75 CPU-s when it handed over
    runtime.log_startup(_message())
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert 0.75 <= row["cpu_s"] < 0.75 + 0.5  # that, plus what this "trainer" used since


@pytest.mark.e2e
def test_a_federation_through_a_trainer_gives_the_same_rounds_and_adapter(  # type: ignore[no-untyped-def]
    trainer, run_in_memory, tiny_bert, tmp_path: Path
) -> None:
    """Two FedIT rounds with client evaluation on the tiny model, once trained in the ClientApp, once
    handed to a trainer: every metric and the adapter agree bit for bit."""
    from safetensors.torch import load_file

    from clients import local
    from fedlora.core.data.sources import write_table
    from fedlora.core.data.tweets import TOPICS, topics_frame
    from fedlora.run.experiment import load_experiment, preflight

    data = write_table(topics_frame(per_topic=12, users=3, seed=0), tmp_path / "t.csv")
    cfg = preflight(
        load_experiment(
            None,
            [
                f'model.path="{tiny_bert.path}"',
                f'data.source="{data}"',
                'data.label="topic"',
                f"data.labels={json.dumps(sorted(TOPICS))}",
                'data.partitioner="iid"',
                "data.max_length=16",
                "data.test_size=12",
                "federation.num_clients=3",
                "federation.rounds=2",
                "federation.fraction_evaluate=1.0",
                "train.local_steps=2",
            ],
        )
    )
    plain = run_in_memory(cfg, "plain")
    handled: list[str] = []

    def trainer_side(message: Message, context: Context) -> Message:
        handled.append(message.metadata.message_type)
        work = local.train if message.metadata.message_type == "train" else local.evaluate
        return work(message, context)

    trainer(trainer_side)
    through = run_in_memory(cfg, "through")
    assert sorted(set(handled)) == ["evaluate", "train"] and len(handled) == 12
    timing = ("wall_s", "aggregate_s")

    def rows(run: Path) -> list[dict[str, object]]:
        lines = (run / "rounds.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    assert rows(plain) == rows(through)
    a = load_file(str(plain / "adapter/adapter_model.safetensors"))
    b = load_file(str(through / "adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# -- processes ------------------------------------------------------------------------------------------
@pytest.mark.cli
def test_deploy_supernode_starts_the_trainer_and_it_ends_with_the_node(short_tmp: Path) -> None:
    """The launcher becomes the "SuperNode" (here a shell that reports the socket and waits); the
    trainer is its child, listening in a private folder; killing the node ends the trainer, which
    removes its socket and folder."""
    script = 'echo "socket=$FEDLORA_TRAINER_SOCKET"; exec sleep 600'
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop(warm.SOCKET_ENV, None)
    args = ["deploy", "supernode", "--socket-dir", str(short_tmp), "--", "sh", "-c", script]
    node = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", *args], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert node.stdout is not None
        line = node.stdout.readline().strip()
        path = Path(line.removeprefix("socket="))
        assert line.startswith("socket=") and path.parent.parent == short_tmp, line
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and path.is_socket()
        (child,) = psutil.Process(node.pid).children()  # the trainer, a child of the node itself
        assert "fedlora.run.trainer" in " ".join(child.cmdline())
        trainer_pid = child.pid
    finally:
        node.kill()
        node.wait()
    deadline = time.monotonic() + 30
    while psutil.pid_exists(trainer_pid) and time.monotonic() < deadline:
        with_status = psutil.Process(trainer_pid)
        if with_status.status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    assert not psutil.pid_exists(trainer_pid) or psutil.Process(trainer_pid).status() == psutil.STATUS_ZOMBIE
    assert not path.parent.exists()  # socket and folder removed on the way out


def test_a_socket_folder_too_deep_for_a_socket_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    with pytest.raises(DeployError) as info:
        private_directory(deep)
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"--socket-dir {deep}: the trainer's socket path would be ")
    assert "over the 107 a Unix socket allows; choose a shorter folder" in line
    assert list(deep.iterdir()) == []


@pytest.mark.cli
def test_deploy_supernode_rejects_a_missing_command_before_any_work(run_cli) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli("deploy", "supernode", "--", "no-such-flower-supernode", "--insecure")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: no-such-flower-supernode: command not found (the SuperNode command after --)"
    ]


def test_local_deployment_starts_supernodes_through_the_launcher(tmp_path: Path) -> None:
    warm_args = LocalDeployment(tmp_path / "a", 2).supernode_args(0, 9000)
    assert warm_args[1:6] == ["-m", "fedlora.cli", "deploy", "supernode", "--"]
    assert "flower-supernode" in warm_args[6]
    cold = LocalDeployment(tmp_path / "a", 2, trainer=False).supernode_args(0, 9000)
    assert "flower-supernode" in cold[0] and "supernode" not in cold[1:]
    assert LocalDeployment(tmp_path / "a", 2).supernode_args(0, 9000, trainer=False) == cold
