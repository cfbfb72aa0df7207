"""A SuperNode with its warm trainer (``fedlora deploy supernode -- flower-supernode ARGS``).

:func:`launch_supernode` makes a fresh directory of mode 0700 (the node's user only), starts the trainer
(:func:`serve_trainer`, ``python -m fedlora.run.trainer SOCKET``) with the parent-death signal, waits
until its socket exists, then replaces itself with the SuperNode command (``exec``), naming the socket
in FEDLORA_TRAINER_SOCKET: every ClientApp process the SuperNode starts inherits that environment and
hands its message over (:mod:`clients.warm`). The SuperNode keeps the launcher's PID, so the trainer is
its child and gets SIGTERM when the SuperNode ends, however it ends; on SIGTERM the trainer removes its
socket and directory. ``fedlora deploy local`` (:class:`fedlora.run.deploy.LocalDeployment`) also stops
it by PID.
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
from typing import NoReturn

from clients import warm
from fedlora.run.credentials import DeployError
from fedlora.run.processes import DIE_WITH_PARENT

READY_TIMEOUT = 60.0
"""Seconds the launcher waits for the trainer's socket before giving up."""


SOCKET_NAME = "trainer.sock"
"""The socket's file name inside its private directory."""

MAX_SOCKET_PATH = 107
"""Bytes a Unix socket's path may have on Linux (``sun_path`` is 108 bytes with the final NUL)."""

_PREFIX = "fedlora-trainer-"


def private_directory(parent: Path | None = None) -> Path:
    """A fresh directory for the trainer's socket, mode 0700, under ``parent`` (default: TMPDIR).

    Refused before anything is made when the socket's path would be too long for a Unix socket."""
    if parent is not None and not parent.is_dir():
        raise DeployError(f"--socket-dir {parent}: no such directory")
    base = Path(tempfile.gettempdir() if parent is None else parent).resolve()
    length = len(os.fsencode(base)) + len(f"/{_PREFIX}XXXXXXXX/{SOCKET_NAME}")  # mkdtemp: 8 random characters
    if length > MAX_SOCKET_PATH:
        raise DeployError(
            f"--socket-dir {base}: the trainer's socket path would be {length} bytes, over the "
            f"{MAX_SOCKET_PATH} a Unix socket allows; choose a shorter folder (for example /tmp)"
        )
    return Path(tempfile.mkdtemp(prefix=_PREFIX, dir=base))  # mkdtemp: mode 0700


def trainer_command(path: Path) -> list[str]:
    """The trainer process's command line."""
    return [sys.executable, "-m", "fedlora.run.trainer", str(path)]


def start_trainer(path: Path, timeout: float = READY_TIMEOUT) -> subprocess.Popen[bytes]:
    """Start the trainer listening at ``path`` (it dies with this process, or with the program this
    process becomes); returns once the socket exists. Raises DeployError if the trainer exits first."""
    proc = subprocess.Popen(trainer_command(path), preexec_fn=DIE_WITH_PARENT)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise DeployError(f"the warm trainer exited with code {proc.returncode} before listening")
        if time.monotonic() > deadline:
            proc.kill()
            raise DeployError(f"the warm trainer did not listen at {path} within {timeout:.0f} s")
        time.sleep(0.05)
    return proc


def launch_supernode(command: list[str], *, trainer: bool = True, socket_dir: Path | None = None) -> NoReturn:
    """Start this node's trainer (unless ``trainer`` is false), then become ``command`` (the SuperNode).

    Every check comes first: ``command`` must name an executable (DeployError otherwise).
    """
    if not command:
        raise DeployError("no SuperNode command given: fedlora deploy supernode -- flower-supernode ARGS")
    if shutil.which(command[0]) is None:
        raise DeployError(f"{command[0]}: command not found (the SuperNode command after --)")
    env = dict(os.environ)
    env.pop(warm.SOCKET_ENV, None)
    if trainer:
        path = private_directory(socket_dir) / SOCKET_NAME
        start_trainer(path)
        env[warm.SOCKET_ENV] = str(path)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)


def serve_trainer(path: Path) -> int:
    """The trainer process: listen at ``path`` first (a message that arrives while the training code
    imports waits in the backlog), import it, answer messages until SIGTERM; then remove the socket and
    its directory (if empty)."""
    os.environ.pop(warm.SOCKET_ENV, None)  # the handlers below train here and never hand over again
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    sock = warm.listen(str(path))
    try:
        # start-up: what the trainer is for: torch, transformers, peft and the training code are
        # imported once, after the socket listens
        from clients import local
        from clients.app import app

        del local
        print(f"fedlora: warm trainer ready at {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
        warm.serve(sock, app, warm.code_version())
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: not only ours
            path.parent.rmdir()
    return 0


if __name__ == "__main__":  # pragma: no cover - the trainer process (see trainer_command)
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fedlora.run.trainer SOCKET")
    sys.exit(serve_trainer(Path(sys.argv[1])))
