"""Graceful stop of a running federation: a stop request the server loop checks while it waits.

A signal handler must not tear Ray down under Flower's worker threads (Ray ends the whole process
if a thread calls it after ``ray.shutdown``). So the handler only sets :data:`STOP`; the server
loop notices it within ``POLL_S`` seconds while waiting for replies (or between phases), raises
:class:`RunInterrupted`, and Flower then ends the client workers once their current message is
done and shuts Ray down itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

STOP_REQUEST = "stop requested"
POLL_S = 0.1
"""Seconds between two polls for replies (Flower's own grid polls every 0.1 s too)."""


class RunInterrupted(Exception):
    """The run was asked to stop (Ctrl-C or SIGTERM); finished rounds are kept."""


class StopFlag:
    """A process-wide stop request, set from a signal handler and checked by the server loop."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        """Ask the running federation to stop at its next check."""
        self._set = True

    def clear(self) -> None:
        """Forget an earlier request (a new run starts)."""
        self._set = False

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self._set

    def check(self) -> None:
        """Raise :class:`RunInterrupted` if a stop was requested."""
        if self._set:
            raise RunInterrupted(STOP_REQUEST)


STOP = StopFlag()


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    on_reply: Callable[[int, int], None] | None = None,
) -> list[Message]:
    """Send ``messages`` and collect the replies that arrive within ``timeout`` seconds (None: wait).

    Like ``Grid.send_and_receive`` but raises :class:`RunInterrupted` as soon as a stop is requested.
    ``on_reply(replied, sent)`` is called once the messages are sent (``replied`` 0) and after each reply.
    """
    STOP.check()
    pending = set(grid.push_messages(messages))
    sent = len(pending)
    if on_reply is not None:
        on_reply(0, sent)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending and (deadline is None or time.monotonic() < deadline):
        for reply in grid.pull_messages(pending):
            replies.append(reply)
            pending.discard(reply.metadata.reply_to_message_id)
            if on_reply is not None:
                on_reply(len(replies), sent)
        if pending:
            STOP.check()
            time.sleep(POLL_S)
    return replies
