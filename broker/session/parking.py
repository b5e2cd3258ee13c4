"""Idle connections without a task: the parking lot.

A task waiting on a socket costs about 6 KiB (the task, its coroutine
frames down to the epoll wait, the session's nursery and cancel scopes):
with 10,000 idle subscribers that was most of the broker's memory. A plain
TCP connection whose reader has waited ``PARK_AFTER`` seconds with nothing
buffered, and whose session runs no other task (no writer, acker or TOPICS
request), is parked instead: its reader ends, its task and nursery are
freed, and its socket is watched by one epoll set shared by every parked
connection (``select.epoll``, itself waited on by one task). What a
parked connection keeps is its session's objects: its subscriptions,
outbox and codec state.

Nothing else changes for it: deliveries, PINGs of the idle timeout and
answers are written directly (broker/session/flushing.py); when the socket
has input (or is closed, or fails), when the outbox needs its writer task,
or when the session must stop (server shutdown, idle timeout), the lot
starts a new task for the session in the server's connection nursery, and
the session reads on as before.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING, Any

import trio

from ..logs import get_logger

if TYPE_CHECKING:
    from .session import Session

#: Seconds a reader waits on a silent socket before its connection is
#: parked. Short: parking and resuming cost tens of microseconds, while the
#: task costs its memory for as long as it waits.
PARK_AFTER = 1.0
#: Seconds between looks at which readers to park.
PARK_SWEEP = 0.25
#: Parked sockets handed back to their sessions per epoll call.
_MAX_EVENTS = 1024
_WATCH = select.EPOLLIN | select.EPOLLRDHUP


class ParkingLot:
    """The parked connections of one server, and the readers that might be."""

    def __init__(self, sessions: set[Session]) -> None:
        #: The server's sessions (a session leaves it when it ends).
        self.sessions = sessions
        #: PARK_AFTER and PARK_SWEEP, for this server (tests shorten them).
        self.park_after = PARK_AFTER
        self.sweep = PARK_SWEEP
        #: Sessions with a task (the candidates for parking).
        self.active: set[Session] = set()
        #: Parked sessions by socket number.
        self.parked: dict[int, Session] = {}
        self._epoll: select.epoll | None = None
        # Where resumed sessions run: the server's connection nursery.
        self._nursery: trio.Nursery | None = None
        #: False once the server shuts down: nothing is parked after that.
        self.open = False
        self.logger: Any = get_logger(component="parking")

    def attach(self, nursery: trio.Nursery) -> None:
        """Sessions resume in ``nursery`` (the one their first task ran in)."""
        self._epoll = select.epoll()
        self._nursery = nursery
        self.open = True

    def close(self) -> None:
        """Shutdown: park nothing more, and give every parked session its
        task back (each then stops, as its ``shutdown`` said)."""
        self.open = False
        for fd in list(self.parked):
            self._resume_fd(fd)

    def abandon(self) -> None:
        """The connection nursery has ended without a shutdown (the server
        was cancelled): close the parked connections as cancelling their
        tasks would have."""
        self.open = False
        self._nursery = None
        for fd in list(self.parked):
            session = self.parked.pop(fd)
            self.active.discard(session)
            self.sessions.discard(session)
            session.abandon()

    def release(self) -> None:
        """The server has stopped: drop the epoll set."""
        self.open = False
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    # -- sessions -------------------------------------------------------------

    def park(self, session: Session, fd: int) -> bool:
        """Park ``session`` (its task is ending); False if it may not be
        (the lot is closed, the socket is gone): it reads on."""
        if not self.open or self._epoll is None or fd < 0:
            return False
        try:
            self._epoll.register(fd, _WATCH)
        except OSError:
            return False
        self.active.discard(session)
        self.parked[fd] = session
        return True

    def resume(self, session: Session, fd: int) -> bool:
        """Give a parked ``session`` a task again; False if it was not parked."""
        if self.parked.get(fd) is not session:
            return False
        self._resume_fd(fd)
        return True

    def _resume_fd(self, fd: int) -> None:
        session = self.parked.pop(fd)
        if self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # closed behind our back: the read says so
        self.active.add(session)
        assert self._nursery is not None, "parked only while the connection nursery is open"
        self._nursery.start_soon(session.resumed)

    # -- the lot's task -------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Resume parked sessions whose sockets have something, and park
        readers that have waited long enough. Until cancelled."""
        assert self._epoll is not None
        epoll = self._epoll
        task_status.started()
        next_sweep = trio.current_time() + self.sweep
        while True:
            with trio.move_on_at(next_sweep):
                await trio.lowlevel.wait_readable(epoll.fileno())
            if self.parked:
                self._wake(epoll.poll(0, _MAX_EVENTS))
            now = trio.current_time()
            if now >= next_sweep:
                next_sweep = now + self.sweep
                self._sweep(now)

    def _wake(self, ready: list[tuple[int, int]]) -> None:
        for fd, _ in ready:
            if fd in self.parked:
                self._resume_fd(fd)

    def _sweep(self, now: float) -> None:
        # A function of its own: a loop variable in run()'s frame would keep
        # the last session alive after its connection ends.
        if self.open:
            for session in list(self.active):
                session.park_if_idle(now, self.park_after)
