"""Writing what outboxes queued without waking a writer task per connection.

One publish reaches every subscriber's outbox; with one message per PUBLISH
frame, waking each connection's writer task for it cost a task switch and a
trip through ``send_all`` per subscriber per frame, most of the broker's
time at a modest rate. Instead an outbox with data and no write in progress
marks itself dirty here, and whoever finished a piece of work writes every
dirty outbox at once, directly on the socket (``Outbox.write_now``).
What a socket does not take at once goes to the connection's writer task,
which waits until it can send (the bound on what is queued is unchanged).

Marking an outbox wakes this trio run's flusher task (one for all
connections, started on first use), which writes whatever is dirty when it
runs: in the scheduler's next batch, where the writer tasks used to run,
together with the tasks woken by the same work (a reader paused on its
PUBLISH window, for one), so nothing reaches a peer earlier relative to
them than before. The one exception is the session's reader, which writes
what its own read produced at the end of that read (``flush``): its frames
were handled synchronously, nothing else waited for them. One task switch
per pass of the broker's work (a commit round, an acker's answers) instead
of one per connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from ..logs import get_logger

if TYPE_CHECKING:
    from .outbox import Outbox


class Flusher:
    def __init__(self) -> None:
        self.dirty: dict[Outbox, None] = {}
        self._wake = trio.Event()
        self._started = False
        self.logger: Any = get_logger(component="flusher")

    def mark(self, outbox: Outbox) -> None:
        """``outbox`` has data queued and no write in progress."""
        if not self.dirty:
            if not self._started:
                self._started = True
                trio.lowlevel.spawn_system_task(self._run, name="pybroker outbox flusher")
            self._wake.set()
        self.dirty[outbox] = None

    def flush(self) -> None:
        """Write every dirty outbox now (what the sockets take)."""
        while self.dirty:
            dirty, self.dirty = self.dirty, {}
            for outbox in dirty:
                try:
                    outbox.write_now()
                except Exception:
                    # Never leave the other outboxes of this pass unwritten.
                    self.logger.exception("internal error while writing queued data")
                    outbox.wake_writer()

    async def _run(self) -> None:
        # A system task: an exception here would end the whole run, so none
        # may escape (flush catches them per outbox).
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            self.flush()


_FLUSHER: trio.lowlevel.RunVar[Flusher] = trio.lowlevel.RunVar("pybroker_flusher")


def current() -> Flusher:
    """This trio run's flusher (all brokers of a run share it: it only writes)."""
    try:
        return _FLUSHER.get()
    except LookupError:
        flusher = Flusher()
        _FLUSHER.set(flusher)
        return flusher


def flush() -> None:
    """Write what is dirty now, if this run has a flusher."""
    try:
        flusher = _FLUSHER.get()
    except LookupError:
        return
    if flusher.dirty:
        flusher.flush()
