"""One local Ray head for the runs of a comparison, instead of a Ray started and stopped by every run.

Each ``fedlora run`` of the grid attaches to the head (``--ray-address``), so Ray's daemons start once
per comparison; each run still starts its own client actors. The head is ``ray start --head --block``
in a session of its own, on loopback, with its own ports and a short temporary directory (Ray's
socket paths must stay under 108 bytes), and the same quiet environment a run gives its own Ray.

It never outlives the comparison: :meth:`RayHead.stop` sends SIGTERM (``ray start --block`` then stops
its daemons) and kills by PID whatever remains; if `fedlora compare` dies without stopping it, the
kernel sends the head SIGTERM (Linux's parent-death signal), and Ray's daemons share the fate of
``ray start`` the same way; the head's temporary directory is then removed when the next head starts
with the same log (the comparison is run again).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fedlora.run.environment import QUIET_ENV
from fedlora.run.processes import DIE_WITH_PARENT, free_ports

STARTED = "Ray runtime started"
PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--ray-client-server-port",
)


def worker_ports(index: int) -> tuple[int, int]:
    """Head ``index``'s worker port range: 1,000 ports from 20000 + 1000 * index, below Linux's
    ephemeral range (where the other ports are picked) and above Ray's default range (a run's own Ray)."""
    low = 20000 + 1000 * index
    return low, low + 999


class RayHeadError(RuntimeError):
    """The head did not start (its log's last lines are in the message)."""


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.is_file() else (shutil.which("ray") or "ray")


class RayHead:
    """A local Ray head process; ``address`` is HOST:PORT for ``federation.ray_address``."""

    def __init__(
        self, log: Path, *, num_cpus: int | None = None, worker_ports: tuple[int, int] | None = None
    ) -> None:
        self.log = log
        self.num_cpus = num_cpus
        self.worker_ports = worker_ports
        """Inclusive port range of this head's workers and drivers (None: Ray's default 10002-19999).
        Heads that run side by side need disjoint ranges, or a driver can bind a port another head's
        worker holds and abort with "Address already in use"."""
        self.port, *self._ports = free_ports(1 + len(PORT_FLAGS))
        """The head's port and its components' (distinct: two components on one port stop the head)."""
        self.address = f"127.0.0.1:{self.port}"
        self._temp: Path | None = None
        """Ray's temporary directory, made when the head starts (short: socket paths < 108 bytes)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        """Size of the log before this head started: an earlier head's lines are not this one's."""

    def command(self) -> list[str]:
        command = [_ray_executable(), "start", "--head", "--block", "--port", str(self.port)]
        command += ["--node-ip-address", "127.0.0.1", "--include-dashboard", "false"]
        if self._temp is None:
            self._temp = Path(tempfile.mkdtemp(prefix="fl-ray-"))
        command += ["--disable-usage-stats", "--temp-dir", str(self._temp)]
        if self.num_cpus is not None:
            command += ["--num-cpus", str(self.num_cpus)]
        if self.worker_ports is not None:
            command += ["--min-worker-port", str(self.worker_ports[0])]
            command += ["--max-worker-port", str(self.worker_ports[1])]
        return command + [
            str(x) for flag, port in zip(PORT_FLAGS, self._ports, strict=True) for x in (flag, port)
        ]

    def start(self, timeout: float = 120.0) -> str:
        """Start the head and wait until Ray reports it running; returns its address."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        command = self.command()
        self._marker.write_text(str(self._temp), encoding="utf-8")
        self._log_start = self.log.stat().st_size if self.log.is_file() else 0  # an earlier head's lines
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches `fedlora compare` only
                preexec_fn=DIE_WITH_PARENT,
                env={**os.environ, **QUIET_ENV},
            )
        deadline = time.monotonic() + timeout
        while STARTED not in self._log_text():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self._log_text().strip().splitlines()[-5:])
                self.stop()
                raise RayHeadError(f"the comparison's Ray head did not start (log {self.log}): {tail}")
            time.sleep(0.2)
        return self.address

    @property
    def _marker(self) -> Path:
        """Names the head's temporary directory while it runs (beside its log)."""
        return self.log.with_name(self.log.name + ".tmpdir")

    def _remove_stale(self) -> None:
        """Remove the temporary directory of a head killed before it could (its comparison got SIGKILL)."""
        if not self._marker.is_file():
            return
        stale = Path(self._marker.read_text(encoding="utf-8").strip())
        if stale.name.startswith("fl-ray-") and stale != self._temp:
            shutil.rmtree(stale, ignore_errors=True)
        self._marker.unlink(missing_ok=True)

    def _log_text(self) -> str:
        """What this head wrote to its log (a resumed comparison appends to the earlier head's log)."""
        if not self.log.is_file():
            return ""
        with self.log.open("rb") as f:
            f.seek(self._log_start)
            return f.read().decode("utf-8", errors="replace")

    def pids(self) -> list[int]:
        """The head process and its descendants now (Ray's daemons and workers)."""
        if self._proc is None:
            return []
        try:
            root = psutil.Process(self._proc.pid)
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.Error:
            return []

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to ``ray start`` (it stops its daemons); then SIGKILL by PID whatever is left."""
        if self._proc is not None:
            tree = []
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self._proc.pid)
                tree = [root, *root.children(recursive=True)]
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(tree, timeout=grace)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._marker.unlink(missing_ok=True)

    def __enter__(self) -> RayHead:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
