"""One long-lived thread that runs a store's fsyncs off the event loop.

Group commit makes one fsync round at a time (FileStore._sync), hundreds a
second under load. ``trio.to_thread.run_sync`` per round cost about as much
CPU as the fdatasync itself: a thread-cache hand-off, two ``prctl`` calls
naming the worker thread, a capacity limiter and a cancel scope. Here the
round's work is queued to a thread that lives as long as the store and
waits on a lock; the result comes back the way trio's own threads deliver
theirs (``TrioToken.run_sync_soon``, one write to trio's wake-up socket),
to an event the round awaits.

Like ``to_thread.run_sync`` without ``abandon_on_cancel``, a round that was
handed over is waited for even if the waiting task is cancelled: its
segments' state is only settled once the fsync is known to have succeeded
or failed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("fn", "args", "token", "done", "result", "error")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...], token: trio.lowlevel.TrioToken) -> None:
        self.fn = fn
        self.args = args
        self.token = token
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SyncThread:
    """Runs functions in one thread, in the order given (``run``)."""

    def __init__(self, name: str = "pybroker fsync") -> None:
        self.name = name
        self._jobs: deque[_Job[Any] | None] = deque()
        # Held while the thread has nothing to do; released to wake it. A
        # plain lock, not a threading.Semaphore (a Condition in Python: a
        # lock, a waiter list and a second lock per wake-up). Only the trio
        # thread releases it and only the worker acquires it, so "release
        # if held" cannot race.
        self._idle = threading.Lock()
        self._idle.acquire()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread; its result, or its exception raised
        here. A cancellation that arrives once it was handed over waits for
        it (and is raised at the next checkpoint)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, args, trio.lowlevel.current_trio_token())
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.append(job)
        self._wake()
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def stop(self) -> None:
        """End the thread after the jobs queued (the store closes)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._jobs.append(None)
        self._wake()
        thread.join()

    def _wake(self) -> None:
        if self._idle.locked():
            self._idle.release()

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            if not jobs:
                self._idle.acquire()
                continue
            job = jobs.popleft()
            if job is None:
                return
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # handed to the caller, who raises it
                job.error = exc
            try:
                job.token.run_sync_soon(job.done.set)
            except trio.RunFinishedError:
                pass  # the caller's run is gone: nobody waits for it
