"""Leave no process behind: track every descendant a run starts, and stop the stragglers by PID."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import TracebackType

import psutil


class ProcessTracker:
    """Context manager that records the descendants this process starts while it is open.

    Ray starts daemons and workers, and workers may be re-parented when their parent exits, so the
    tree is sampled every ``interval`` seconds. On exit every recorded process that is still alive
    (same PID and start time) gets ``grace`` seconds to end on its own, then SIGTERM, then SIGKILL.
    """

    def __init__(self, *, interval: float = 1.0, grace: float = 10.0) -> None:
        self.interval = interval
        self.grace = grace
        self._seen: dict[tuple[int, float], psutil.Process] = {}
        self._before: set[tuple[int, float]] = set()
        self.stopped: list[int] = []
        """PIDs that had to be terminated or killed on exit."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedlora-process-tracker", daemon=True)

    def __enter__(self) -> ProcessTracker:
        self._before = {(p.pid, _start(p)) for p in psutil.Process().children(recursive=True)}
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.stopped = self.stop_all()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Record the current descendants of this process."""
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            key = (child.pid, _start(child))
            if key not in self._before:
                self._seen.setdefault(key, child)

    def seen(self) -> list[int]:
        """PIDs of every process recorded so far, running or not."""
        return [p.pid for p in self._seen.values()]

    def alive(self) -> list[psutil.Process]:
        """Recorded processes that are still running (PID reuse is excluded by start time)."""
        return [p for p in self._seen.values() if _same_and_running(p)]

    def stop_all(self) -> list[int]:
        """Wait, then terminate, then kill the recorded processes still alive; returns the PIDs stopped."""
        _, alive = psutil.wait_procs(self.alive(), timeout=self.grace)
        return self._terminate(alive)

    def kill_now(self) -> list[int]:
        """SIGKILL every recorded process still alive, without waiting; returns their PIDs.

        For a forced stop: the caller exits right after, before Ray notices its daemons are gone.
        """
        alive = self.alive()
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                continue
        return [p.pid for p in alive]

    @staticmethod
    def _terminate(alive: list[psutil.Process]) -> list[int]:
        stopped = [p.pid for p in alive]
        for sig_fn in (psutil.Process.terminate, psutil.Process.kill):
            for proc in alive:
                try:
                    sig_fn(proc)
                except psutil.Error:
                    continue
            _, alive = psutil.wait_procs(alive, timeout=5)
            if not alive:
                break
        return stopped


def _start(proc: psutil.Process) -> float:
    try:
        return proc.create_time()
    except psutil.Error:
        return 0.0


def _same_and_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM (a graceful stop) when the process that started it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


DIE_WITH_PARENT: Callable[[], None] | None = _die_with_parent if sys.platform.startswith("linux") else None
"""``preexec_fn`` of a child that must not outlive the process that starts it (None off Linux)."""


def running(pids: list[int]) -> list[int]:
    """The PIDs of ``pids`` still running (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            continue
    return alive
