"""The warm trainer: one long-lived process per SuperNode that trains, and the hand-over to it.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, which would import torch and
load the model each time. With a warm trainer the ClientApp only hands the message over: it sends the
Flower Message and Context (Flower's own protobuf serialisation) over a Unix socket to this node's
trainer, which keeps torch, the base model, the adapter code and the tokenised data loaded across
messages and runs, runs the same ClientApp handlers on them and sends back the reply and the
Context's updated state.

- **Where**: the socket named by ``FEDLORA_TRAINER_SOCKET``. The SuperNode's launcher
  (``fedlora deploy supernode``, :mod:`fedlora.run.trainer`) creates it in a fresh directory of mode
  0700 owned by the node's user, so only processes of that user reach it (a filesystem socket rather
  than an abstract one: an abstract socket has no permissions, anyone in the network namespace could
  connect, and it would need a shared secret); the trainer also refuses a peer of another user id.
- **Without it** (the variable unset or empty: simulations, ``flwr run`` locally, a node started
  without the launcher) each ClientApp process trains itself, as before.
- **Configured but unreachable** is an error, not a fallback: the node's owner set it up to keep one
  copy of the model in memory, so training beside it could exhaust the node's memory (with a large
  model), and a silent fallback would hide that the node lost its trainer. The message fails with one
  line naming the socket; the server counts the failed reply.
- **Other code**: the trainer runs the fedlora installed on the node, the ClientApp the code of the
  run's app bundle. Each request carries a hash of the ClientApp's source (``fedlora`` and ``clients``);
  a trainer whose code differs does not train, and this message is trained in the ClientApp process
  as before (with a warning in the node's log), so an upgraded app never runs on stale code.

Framing: a request is three frames (a JSON header, the Message's protobuf, the Context's protobuf), a
reply three frames (a JSON header, the reply's protobuf, the Context's protobuf), each frame an 8-byte
big-endian length and the bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

import fedlora

SOCKET_ENV = "FEDLORA_TRAINER_SOCKET"
"""Environment variable: the Unix socket of this node's warm trainer; unset or empty: none."""

PROTOCOL = 1
"""Version of the framing and header fields; a trainer refuses another."""

_HEADER = struct.Struct(">Q")
_MAX_FRAME = 1 << 34  # 16 GiB: a guard against reading garbage as a length, not a real limit
Handler = Callable[[Message, Context], Message]


class TrainerError(RuntimeError):
    """The warm trainer could not be reached, or failed on the message (its message is one line)."""


def socket_path() -> str:
    """The configured trainer socket ("" when none)."""
    return os.environ.get(SOCKET_ENV, "").strip()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the client-side source this process runs (every ``.py`` of ``fedlora`` and ``clients``,
    by path relative to the package and content): equal hashes mean the trainer runs this code."""
    digest = hashlib.sha256()
    for package in (Path(fedlora.__file__).parent, Path(__file__).parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(f"{package.name}/{path.relative_to(package)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


# -- framing ------------------------------------------------------------------------------------------
def send_frames(sock: socket.socket, frames: list[bytes]) -> None:
    """Send ``frames``, each as its length and its bytes."""
    for frame in frames:
        sock.sendall(_HEADER.pack(len(frame)))
        sock.sendall(frame)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise EOFError(f"connection closed after {got} of {size} bytes")
        got += n
    return bytes(buffer)


def recv_frames(sock: socket.socket, count: int) -> list[bytes]:
    """Receive ``count`` frames (raises EOFError when the peer closes first)."""
    frames = []
    for _ in range(count):
        (size,) = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
        if size > _MAX_FRAME:
            raise EOFError(f"a frame of {size} bytes: not a fedlora trainer stream")
        frames.append(_read_exactly(sock, size))
    return frames


# -- the ClientApp side ---------------------------------------------------------------------------------
def hand_over(message: Message, context: Context, path: str) -> Message | None:
    """Have the trainer at ``path`` handle ``message``; returns its reply, with ``context.state``
    replaced by the trainer's, or None when the trainer runs other code (train here instead).

    Raises :class:`TrainerError` (one line) when the trainer is unreachable or the message fails there.
    """
    header = {"protocol": PROTOCOL, "code": code_version(), "cpu_s": time.process_time()}
    request = [
        json.dumps(header).encode(),
        message_to_proto(message).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    ]
    head, reply, state = _exchange(path, request)
    answer = json.loads(head)
    if answer["status"] == "other-code":
        print(
            f"fedlora: the warm trainer at {path} runs other code than this run's ClientApp "
            f"({answer['code']} != {header['code']}): training in this ClientApp process instead; "
            "restart the SuperNode with this version to use the trainer again",
            file=sys.stderr,
        )
        return None
    if answer["status"] != "ok":
        raise TrainerError(f"the warm trainer failed: {answer['error']}")
    context.state = context_from_proto(ProtoContext.FromString(state)).state
    return message_from_proto(ProtoMessage.FromString(reply))


def _exchange(path: str, request: list[bytes]) -> list[bytes]:
    """Send ``request`` to the trainer at ``path`` and read its three-frame answer (TrainerError if the
    trainer is not there or closes the connection first)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            send_frames(sock, request)
            return recv_frames(sock, 3)
    except EOFError as exc:
        raise TrainerError(
            f"the warm trainer at {path} closed the connection before replying ({exc}); "
            "see the SuperNode's log (did the trainer die?)"
        ) from None
    except OSError as exc:
        raise TrainerError(
            f"the warm trainer at {path} ({SOCKET_ENV}) is not reachable: {exc.strerror or exc}; restart "
            f"this SuperNode (fedlora deploy supernode starts its trainer), or unset {SOCKET_ENV} to train "
            "in each ClientApp process"
        ) from None


# -- the trainer side -------------------------------------------------------------------------------
def handle(frames: list[bytes], handler: Handler, code: str) -> list[bytes]:
    """Answer one request (three frames) with ``handler``: the reply's three frames. An exception in
    the handler becomes an error header (its traceback goes to stderr, the SuperNode's log)."""
    header = json.loads(frames[0])
    if header.get("protocol") != PROTOCOL:
        error = (
            f"hand-over protocol {header.get('protocol')} from the ClientApp, the trainer speaks {PROTOCOL}"
        )
        return [json.dumps({"status": "error", "error": error}).encode(), b"", b""]
    if header.get("code") != code:
        return [json.dumps({"status": "other-code", "code": code}).encode(), b"", b""]
    message = message_from_proto(ProtoMessage.FromString(frames[1]))
    context = context_from_proto(ProtoContext.FromString(frames[2]))
    charge_cpu(float(header.get("cpu_s", 0.0)))
    start, what = time.monotonic(), f"{message.metadata.message_type} message of run {context.run_id}"
    try:
        reply = handler(message, context)
    except Exception as exc:
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        error = f"{type(exc).__name__}: {first}"
        print(f"fedlora: warm trainer: {what} failed: {error}", file=sys.stderr, flush=True)
        return [json.dumps({"status": "error", "error": error}).encode(), b"", b""]
    print(
        f"fedlora: warm trainer: {what} answered in {time.monotonic() - start:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    return [
        json.dumps({"status": "ok"}).encode(),
        message_to_proto(reply).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    ]


def charge_cpu(before: float) -> None:
    """Count this message's CPU seconds from ``before`` (what its ClientApp process had used when it
    handed the message over) in the start-up log (:func:`clients.runtime.log_startup`)."""
    # start-up: the trainer has imported the training code already; the ClientApp side never calls this
    from clients import runtime

    runtime.cpu_offset = before - time.process_time()


def listen(path: str) -> socket.socket:
    """A Unix socket listening at ``path`` (a stale socket file there is replaced)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def _same_user(conn: socket.socket) -> bool:
    """Whether the peer runs as this process's user (Linux SO_PEERCRED; elsewhere the directory's mode
    is the only guard)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return bool(uid == os.getuid())


def serve(sock: socket.socket, handler: Handler, code: str, *, max_requests: int | None = None) -> None:
    """Answer requests on ``sock`` one at a time (a node trains one message at a time), for ever or for
    ``max_requests``. A peer of another user is closed without an answer."""
    served = 0
    while max_requests is None or served < max_requests:
        conn, _ = sock.accept()
        with conn:
            if not _same_user(conn):
                print("fedlora trainer: refused a connection from another user", file=sys.stderr)
                continue
            try:
                frames = recv_frames(conn, 3)
                send_frames(conn, handle(frames, handler, code))
            except (EOFError, OSError) as exc:
                print(f"fedlora trainer: a ClientApp went away mid-message: {exc}", file=sys.stderr)
        served += 1
