"""Group commit: one task makes appended batches durable for everyone.

Publishing sessions append to topic logs synchronously; for topics whose
fsync policy is ``always`` the router holds the batch back from subscribers
and the session holds back its PUBACK. This task runs one ``store.sync()``
per round, covering every batch appended before the round started (one
fsync for all of them, whatever connection they came from), then releases
the held deliveries in append order and wakes the sessions waiting for
their acknowledgements. Appends arriving during a sync go to the next round.

It also runs the timed work of the store: fsync every interval for
``interval`` topics, and retention.
"""

from __future__ import annotations

from typing import Any

import trio

from client.protocol import Durability

from .log import LogStore
from .logs import get_logger
from .router import Router


class Committer:
    def __init__(self, store: LogStore, router: Router, retention_check_seconds: float = 5.0) -> None:
        self.store = store
        self.router = router
        self.retention_check_seconds = retention_check_seconds
        self.committed_seq = 0
        self.rounds = 0
        self.durability = Durability.DISK
        self._wake = trio.Event()
        self._round_done = trio.Event()
        self._failed: BaseException | None = None
        self.log: Any = get_logger(component="committer")

    def wake(self) -> None:
        """Something was appended that needs a sync (called by the router)."""
        self._wake.set()

    async def wait(self, seq: int) -> Durability:
        """Return once the batch with hold sequence ``seq`` is durable."""
        while self.committed_seq < seq:
            if self._failed is not None:
                raise self._failed
            await self._round_done.wait()
        return self.durability

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timed_work)
            task_status.started()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                target = self.router.held_seq
                try:
                    self.durability = await self.store.sync()
                except OSError as exc:
                    # A failed fsync means we cannot promise durability for
                    # anything appended: fail the waiters loudly, stop.
                    self.log.error("fsync failed; acknowledgements stop", error=repr(exc))
                    self._failed = exc
                    self._finish_round()
                    raise
                self.committed_seq = target
                self.rounds += 1
                self.router.release(target)
                self._finish_round()

    def _finish_round(self) -> None:
        done, self._round_done = self._round_done, trio.Event()
        done.set()

    async def _timed_work(self) -> None:
        next_retention = trio.current_time() + self.retention_check_seconds
        while True:
            interval = self.store.sync_interval
            step = min(interval, self.retention_check_seconds) if interval else self.retention_check_seconds
            await trio.sleep(step)
            if interval:
                await self.store.sync_interval_topics()
            if trio.current_time() >= next_retention:
                next_retention = trio.current_time() + self.retention_check_seconds
                self.store.enforce_retention()
