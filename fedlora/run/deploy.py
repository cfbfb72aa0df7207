"""A deployed federation on loopback: one SuperLink (TLS, SuperNode authentication) and N SuperNodes.

This is the topology of ``docker-compose.yml`` as plain local processes (no Docker engine needed):

- :func:`fedlora.run.credentials.make_credentials` writes a CA, the SuperLink's TLS certificate and one
  OpenSSH ECDSA (P-384) key pair per SuperNode into a directory;
- :func:`write_flwr_home` writes a project-local ``FLWR_HOME/config.toml`` with a ``[superlink.NAME]``
  connection (address and root certificate), so ``flwr run . NAME`` reaches the SuperLink;
- :class:`LocalDeployment` starts the SuperLink on a free port, registers every SuperNode's public key
  with ``flwr supernode register``, starts the SuperNodes with their partitions (``--node-config``),
  waits until all are online, and on exit stops every process it started, and their descendants, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import grpc
import tomli_w
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlora.run.credentials import Credentials, DeployError, make_credentials
from fedlora.run.processes import ProcessTracker, free_ports

FEDERATION = "fedlora-local"
"""Default name of the ``[superlink.NAME]`` connection written into FLWR_HOME."""

DEPLOY_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def write_flwr_home(home: Path, name: str, address: str, root_certificates: Path | None) -> Path:
    """Write ``home/config.toml`` with one ``[superlink.NAME]`` connection (TLS unless no CA); returns it."""

    connection: dict[str, object] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates.resolve())
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {"default": name, name: connection}}))
    return path


def flower_bin(name: str) -> str:
    """A Flower executable next to this Python interpreter (a virtual environment), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


@dataclass
class LocalDeployment:
    """The loopback topology as processes; a context manager that stops everything it started.

    ``directory`` receives ``certs/``, ``flwr-home/``, ``logs/``, the SuperNodes' state and their token
    cache (``token-cache/``, unless FEDLORA_CACHE_DIR is set already).
    ``app_dir`` is the Flower App (the repository root), the working directory of every process.
    ``data_paths``: one labelled file per SuperNode (its node config's ``data-path``: the node trains on
    that file and reads no other data); empty = every node takes its partition of ``data.source``.
    ``trainer``: each SuperNode starts with its warm trainer (``fedlora deploy supernode``,
    :mod:`fedlora.run.trainer`); false: every message's ClientApp process trains itself.
    """

    directory: Path
    num_nodes: int = 3
    federation: str = FEDERATION
    app_dir: Path = field(default_factory=Path.cwd)
    host: str = "127.0.0.1"
    start_timeout: float = 90.0
    data_paths: tuple[Path, ...] = ()
    trainer: bool = True
    env: dict[str, str] = field(init=False)
    port: int = field(init=False, default=0)
    health_port: int = field(init=False, default=0)
    processes: dict[str, subprocess.Popen[bytes]] = field(init=False, default_factory=dict)
    tracker: ProcessTracker = field(init=False)

    def __post_init__(self) -> None:
        self.directory = self.directory.resolve()
        self.app_dir = self.app_dir.resolve()
        self.data_paths = check_data_paths(self.data_paths, self.num_nodes)
        self.credentials = Credentials(self.directory / "certs", self.num_nodes)
        self.home = self.directory / "flwr-home"
        self.logs = self.directory / "logs"
        self.env = {**os.environ, **DEPLOY_ENV, "FLWR_HOME": str(self.home)}
        # Tokenised splits on disk (fedlora.core.data.token_cache.CACHE_ENV), reused by each
        # message's process.
        self.env.setdefault("FEDLORA_CACHE_DIR", str(self.directory / "token-cache"))
        pythonpath = [str(self.app_dir), os.environ.get("PYTHONPATH", "")]
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in pythonpath if p)
        # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH.
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.tracker = ProcessTracker(interval=0.5, grace=5.0)

    @property
    def address(self) -> str:
        """The SuperLink's address as SuperNodes and ``flwr`` reach it (Fleet and Control API share it)."""
        return f"{self.host}:{self.port}"

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        self.tracker.__enter__()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Credentials, FLWR_HOME, SuperLink, registration, SuperNodes; returns once all nodes are online."""
        self.logs.mkdir(parents=True, exist_ok=True)
        make_credentials(self.credentials.directory, self.num_nodes, hosts=("localhost", self.host))
        self.port, self.health_port = free_ports(2, self.host)
        write_flwr_home(self.home, self.federation, self.address, self.credentials.ca_cert)
        self.start_superlink()
        for i in range(self.num_nodes):
            self.register(self.credentials.node_public_key(i))
        node_ports = free_ports(self.num_nodes, self.host)
        for i, port in enumerate(node_ports):
            self.start_supernode(i, port)
        self.wait_online(self.num_nodes)

    def stop(self) -> list[int]:
        """Stop the SuperNodes, then the SuperLink, then any descendant still alive; returns PIDs stopped."""
        stopped = []
        order = sorted(self.processes, key=lambda name: name == "superlink")
        for name in order:
            proc = self.processes[name]
            if proc.poll() is None:
                stopped.append(proc.pid)
                proc.terminate()
        for name in order:
            try:
                self.processes[name].wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.processes[name].kill()
                self.processes[name].wait()
        self.tracker.sample()
        self.tracker.grace = 0.5
        self.tracker.__exit__(None, None, None)
        return stopped + self.tracker.stopped

    def pids(self) -> list[int]:
        """Every PID this deployment started (its processes and the descendants seen so far)."""
        self.tracker.sample()
        return sorted({p.pid for p in self.processes.values()} | set(self.tracker.seen()))

    # -- pieces ----------------------------------------------------------------------------------
    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start one long-running process in its own session, output to ``logs/NAME.log``."""
        log: IO[bytes] = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args, cwd=self.app_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes[name] = proc
        return proc

    def start_superlink(self) -> None:
        """The SuperLink with TLS on its one port and SuperNode authentication; waits until it accepts."""
        c = self.credentials
        proc = self.spawn(
            "superlink",
            [
                flower_bin("flower-superlink"),
                "--ssl-ca-certfile", str(c.ca_cert),
                "--ssl-certfile", str(c.server_cert),
                "--ssl-keyfile", str(c.server_key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", self.host,
                "--port", str(self.port),
                "--database", ":flwr-in-memory:",
                "--health-server-address", f"{self.host}:{self.health_port}",
            ],
        )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        while not _accepts(self.host, self.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DeployError(f"the SuperLink did not start; see {self.logs / 'superlink.log'}")
            time.sleep(0.2)

    def supernode_args(
        self,
        i: int,
        port: int,
        *,
        key: Path | None = None,
        tls: bool = True,
        auth: bool = True,
        trainer: bool | None = None,
    ) -> list[str]:
        """Command line of SuperNode ``i`` (partition ``i`` of ``num_nodes``), runtime API on ``port``.

        ``key`` defaults to node ``i``'s own key; ``tls=False`` or ``auth=False`` build the clients the
        SuperLink must refuse (plaintext, or without an authentication key). ``trainer`` (default: the
        deployment's) starts it through ``fedlora deploy supernode`` with its warm trainer.
        """
        launcher = [sys.executable, "-m", "fedlora.cli", "deploy", "supernode", "--"]
        warm = self.trainer if trainer is None else trainer
        args = [*(launcher if warm else []), flower_bin("flower-supernode"), "--superlink", self.address]
        args += ["--root-certificates", str(self.credentials.ca_cert)] if tls else ["--insecure"]
        if auth:
            args += ["--auth-supernode-private-key", str(key or self.credentials.node_key(i))]
        args += ["--node-config", self.node_config(i)]
        return [*args, "--host", self.host, "--port", str(port)]

    def node_config(self, i: int) -> str:
        """SuperNode ``i``'s ``--node-config``: its partition, and its own file when it has one."""
        config = f"partition-id={i} num-partitions={self.num_nodes}"
        return config + (f' data-path="{self.data_paths[i]}"' if self.data_paths else "")

    def start_supernode(self, i: int, port: int) -> subprocess.Popen[bytes]:
        """Start SuperNode ``i`` with its own key and partition."""
        return self.spawn(f"supernode-{i}", self.supernode_args(i, port))

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's FLWR_HOME."""
        return subprocess.run(
            [flower_bin("flwr"), *args],
            cwd=self.app_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``)."""
        proc = self.flwr("supernode", "register", str(public_key), self.federation)
        if proc.returncode != 0:
            raise DeployError(f"registering {public_key.name} failed: {_last_line(proc)}")

    def nodes(self) -> list[dict[str, object]]:
        """The SuperNodes the SuperLink knows (``flwr supernode list --format json``)."""
        proc = self.flwr("supernode", "list", self.federation, "--format", "json")
        if proc.returncode != 0:
            raise DeployError(f"flwr supernode list failed: {_last_line(proc)}")
        text = proc.stdout[proc.stdout.find("{") :]
        return list(json.loads(text).get("nodes", []))

    def wait_online(self, count: int) -> None:
        """Block until ``count`` SuperNodes are online, or raise naming the logs."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            online = [n for n in self.nodes() if n.get("status") == "online"]
            if len(online) >= count:
                return
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise DeployError(
                        f"{name} exited with code {proc.returncode}; see {self.logs / name}.log"
                    )
            if time.monotonic() > deadline:
                raise DeployError(
                    f"{len(online)} of {count} SuperNodes online after {self.start_timeout:.0f} s; "
                    f"see {self.logs}"
                )
            time.sleep(0.5)

    def submit_command(self, experiment: Path | None = None, overrides: tuple[str, ...] = ()) -> str:
        """The command that submits a run of the app to this federation (from the app's directory):
        ``experiment`` (default: the app's, sims/quickstart.toml) with ``overrides`` (``--set`` style)."""
        given = ";".join([f"federation.num_clients={self.num_nodes}", *overrides])
        chosen = f"experiment='{experiment}' " if experiment is not None else ""
        return (
            f"FLWR_HOME={self.home} {flower_bin('flwr')} run . {self.federation} --stream "
            f"--run-config \"{chosen}overrides='{given}'\""
        )


def check_data_paths(paths: tuple[Path, ...] | list[Path], num_nodes: int) -> tuple[Path, ...]:
    """The nodes' own files as absolute paths: none, or exactly one per node, each an existing file or
    ``save_to_disk`` directory (raises DeployError naming the fix)."""
    if not paths:
        return ()
    if len(paths) != num_nodes:
        raise DeployError(f"{len(paths)} --data files for {num_nodes} SuperNodes; give one file per node")
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise DeployError(f"--data {missing[0]}: no such file or directory; give each node's labelled file")
    if len({Path(p).resolve() for p in paths}) != len(paths):
        raise DeployError("--data names the same file twice; give each node its own file")
    return tuple(Path(p).resolve() for p in paths)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit code {proc.returncode}"


def serve(
    directory: Path,
    num_nodes: int,
    federation: str,
    *,
    echo: Callable[[str], None] = print,
    data_paths: tuple[Path, ...] = (),
    experiment: Path | None = None,
    overrides: tuple[str, ...] = (),
    trainer: bool = True,
) -> None:
    """``fedlora deploy local``: bring the topology up, say how to submit a run, wait for Ctrl-C.

    The first SIGINT or SIGTERM, during start-up or after, stops every process started, by PID (later
    signals are ignored while that happens, so nothing is left half-stopped). A SuperLink or
    SuperNode that exits on its own ends the wait with a :class:`DeployError`.
    """
    interrupted = threading.Event()

    def interrupt(signum: int, frame: object) -> None:
        if not interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with LocalDeployment(
            directory, num_nodes, federation, data_paths=data_paths, trainer=trainer
        ) as deployment:
            warm = ", each with its warm trainer" if trainer else ""
            echo(
                f"SuperLink {deployment.address} (TLS, SuperNode authentication) with {num_nodes} "
                f"registered SuperNodes online{warm}; logs in {deployment.logs}"
            )
            echo("Submit a run from this directory in another terminal:")
            echo(f"  {deployment.submit_command(experiment, overrides)}")
            echo("Ctrl-C stops the SuperLink and the SuperNodes.")
            while True:
                time.sleep(1.0)
                exited = [n for n, p in deployment.processes.items() if p.poll() is not None]
                if exited:
                    raise DeployError(f"{exited[0]} exited; see {deployment.logs / exited[0]}.log")
    except KeyboardInterrupt:
        echo("stopped: no process of this deployment is running")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def healthy(address: str, timeout: float = 3.0) -> bool:
    """Whether the gRPC health server of a SuperLink or SuperNode at ``address`` reports SERVING.

    Flower starts that server with ``--health-server-address`` (plaintext, meant for 127.0.0.1 only);
    the container image's HEALTHCHECK calls this through ``fedlora deploy health``.
    """

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
