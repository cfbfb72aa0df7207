"""Attaching a simulation to a running Ray cluster (``--ray-address`` / ``federation.ray_address``).

The end-to-end test starts a Ray head and a second Ray node on this machine as separate processes
(``ray start --block``, one CPU each, their own ports and temp dirs), runs a two-round simulation
across both, checks that a client actor ran on each node, stops both nodes by PID and checks that
none of their processes remain. It never uses ``ray stop`` (which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedlora.core.config import ConfigError, load_config
from fedlora.run.simulation import backend_config, check_ray_address, worker_env

RAY = str(Path(sys.executable).with_name("ray"))
TINY = [
    "--clients",
    "2",
    "--rounds",
    "2",
    "--set",
    "train.local_steps=1",
    "--set",
    "data.max_examples=1000",
    "--set",
    "data.test_size=100",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----- configuration and pre-flight checks (no Ray started) ------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "head.example:6379", "[::1]:6379", ""])
def test_valid_addresses(address: str) -> None:
    assert load_config(None, [f'federation.ray_address="{address}"']).federation.ray_address == address


@pytest.mark.parametrize("address", ["6379", "head:", ":6379", "head:0", "head:70000", "head:port", "a b:1"])
def test_invalid_addresses_name_the_key(address: str) -> None:
    with pytest.raises(ConfigError, match=r"federation\.ray_address .* HOST:PORT"):
        load_config(None, [f'federation.ray_address="{address}"'])


def test_local_ray_by_default() -> None:
    args = backend_config(load_config(None))["init_args"]
    assert "address" not in args
    assert args["_node_ip_address"] == "127.0.0.1"


def test_attach_passes_the_address_and_resources() -> None:
    cfg = load_config(
        None,
        [
            'federation.ray_address="127.0.0.1:6379"',
            "federation.client_cpus=2",
            "federation.client_gpus=0.25",
        ],
    )
    config = backend_config(cfg)
    assert config["init_args"]["address"] == "127.0.0.1:6379"
    assert config["init_args"]["_node_ip_address"] == "127.0.0.1"  # loopback nodes
    assert "include_dashboard" not in config["init_args"]  # not for an existing cluster
    assert config["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}


def test_remote_head_lets_ray_find_this_nodes_address() -> None:
    cfg = load_config(None, ['federation.ray_address="10.0.0.5:6379"'])
    assert "_node_ip_address" not in backend_config(cfg)["init_args"]


def test_actors_get_the_module_path_and_the_openmp_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the job's runtime environment, so also on a head started elsewhere."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = worker_env()
    root = str(Path(__file__).resolve().parents[1])
    assert set(env) == {"PYTHONPATH"} and root in env["PYTHONPATH"].split(os.pathsep)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert worker_env()["OMP_WAIT_POLICY"] == "PASSIVE"


def test_unreachable_head_is_a_one_line_error() -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"no Ray head answers there.*ray start --head --port {port}"):
        check_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 5
    check_ray_address("")  # local Ray: nothing to check


@pytest.mark.cli
def test_cli_refuses_an_unreachable_head_and_writes_nothing(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    proc = run_cli("run", "--ray-address", f"127.0.0.1:{free_port()}", "--out", str(out), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "federation.ray_address" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# ----- a real two-node cluster ----------------------------------------------------------------


def _node_ports() -> list[str]:
    """Distinct ports for one node's daemons, so that nodes (and other clusters) never collide."""
    flags = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    return [str(x) for flag in flags for x in (flag, free_port())]


def _start_node(args: list[str], temp_dir: Path, log: Path) -> psutil.Popen:
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0"]
    common += [
        "--object-store-memory",
        str(100 * 2**20),
        "--disable-usage-stats",
        "--temp-dir",
        str(temp_dir),
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("w") as handle:
        return psutil.Popen(
            [RAY, "start", *args, *common, *_node_ports()], stdout=handle, stderr=subprocess.STDOUT, env=env
        )


def _wait_started(node: psutil.Popen, log: Path, timeout: float = 120) -> None:
    """Until ``ray start`` logs that its daemons are up."""
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text():
        assert node.poll() is None, f"a Ray node exited during start-up: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"a Ray node did not start in {timeout} s"
        time.sleep(0.5)


def _wait_listening(node: psutil.Popen, port: int, timeout: float = 120) -> None:
    """Until something accepts connections on ``port`` of 127.0.0.1."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert node.poll() is None, "the Ray head exited during start-up"
        assert time.monotonic() < deadline, f"the Ray head did not listen on {port} in {timeout} s"
        time.sleep(0.2)


def _count_nodes(address: str) -> int:
    """Alive nodes with a CPU in the cluster, asked from a separate driver process."""
    code = (
        "import ray, sys; "
        "ray.init(address=sys.argv[1], _node_ip_address='127.0.0.1', logging_level='error'); "
        "print(sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')))"
    )
    proc = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


def _tree(proc: psutil.Popen) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _stop(nodes: list[psutil.Popen], seen: dict[int, psutil.Process]) -> None:
    """SIGTERM each `ray start --block` (it stops its daemons), then kill by PID whatever is left."""
    for node in nodes:
        for proc in _tree(node):
            seen.setdefault(proc.pid, proc)
    for node in nodes:
        with contextlib.suppress(psutil.Error):
            node.terminate()
    _, alive = psutil.wait_procs(list(seen.values()), timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _watch_actors(nodes: list[psutil.Popen], found: list[set[int]], stop: threading.Event) -> None:
    """Record, per node, the PIDs of processes that ran a Flower client actor under it."""
    while not stop.wait(0.2):
        for node, pids in zip(nodes, found, strict=True):
            for proc in _tree(node)[1:]:
                with contextlib.suppress(psutil.Error):
                    if "ClientAppActor" in " ".join(proc.cmdline()):
                        pids.add(proc.pid)


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[str, list[psutil.Popen]]]:
    """A Ray head and a second node (1 CPU each) as separate processes; stopped by PID afterwards."""
    # Ray's socket paths must stay under 108 bytes: a short temp dir, not pytest's.
    short = Path(tempfile.mkdtemp(prefix="fl-ray-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[psutil.Popen] = []
    seen: dict[int, psutil.Process] = {}
    try:
        head_args = ["--head", "--port", str(port), "--include-dashboard", "false"]
        head_args += ["--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port())]
        nodes.append(_start_node(head_args, short / "head", tmp_path / "head.log"))
        _wait_listening(nodes[0], port)  # the head's GCS: enough for a second node to join
        nodes.append(_start_node(["--address", address], short / "node2", tmp_path / "node2.log"))
        _wait_started(nodes[0], tmp_path / "head.log")
        _wait_started(nodes[1], tmp_path / "node2.log")
        assert _count_nodes(address) == 2
        for node in nodes:
            seen.update({p.pid: p for p in _tree(node)})
        yield address, nodes
    finally:
        _stop(nodes, seen)
        shutil.rmtree(short, ignore_errors=True)
        left = [p.pid for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes of the Ray nodes still running: {left}"


@pytest.mark.e2e
def test_simulation_runs_across_two_ray_nodes(
    two_nodes: tuple[str, list[psutil.Popen]], tmp_path: Path, run_cli
) -> None:  # type: ignore[no-untyped-def]
    address, nodes = two_nodes
    out = tmp_path / "run"
    found: list[set[int]] = [set(), set()]
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_actors, args=(nodes, found, stop), daemon=True)
    watcher.start()
    try:
        proc = run_cli("run", *TINY, "--ray-address", address, "--out", str(out), timeout=300)
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from fedlora.core.records.rundir import read_rounds, read_summary

    assert [r["round"] for r in read_rounds(out)] == [1, 2]
    assert read_summary(out)["rounds"] == 2
    head_actors, node_actors = found
    assert head_actors and node_actors, f"client actors per node: head {head_actors}, second {node_actors}"
    assert all(n.poll() is None for n in nodes), "attaching must not stop the cluster"
    assert 'ray_address = "127.0.0.1' in (out / "config.toml").read_text()
