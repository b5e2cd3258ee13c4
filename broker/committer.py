"""Group commit: one task makes appended batches durable for everyone.

Publishing sessions append to topic logs synchronously; for topics whose
fsync policy is ``always`` the router holds the batch back from subscribers
and the session holds back its PUBACK. This task runs one ``store.sync()``
per round, covering every batch appended before the round started (one
fsync for all of them, whatever connection they came from), then releases
the held deliveries in append order and wakes the sessions waiting for
their acknowledgements. Appends arriving during a sync go to the next round.
A store whose ``sync_depth`` is above 1 (a cluster's) gets the next round's
sync while the last one's is still out; results are released in order.

It also runs the timed work of the store: fsync every interval for
``interval`` topics, and retention.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pybroker.protocol import Durability

from .storage import LogStore
from .logs import get_logger
from .router import Held, Router


class Committer:
    def __init__(self, store: LogStore, router: Router, retention_check_seconds: float = 5.0) -> None:
        self.store = store
        self.router = router
        self.retention_check_seconds = retention_check_seconds
        self.committed_seq = 0
        self.rounds = 0
        self.durability = Durability.DISK
        #: More to make durable in each round, after the topics' sync (the
        #: delayed-delivery schedule): its waiters share the topics' rounds.
        self.also_sync: Callable[[], Awaitable[None]] | None = None
        self._wake = trio.Event()
        self._round_done = trio.Event()
        self.logger: Any = get_logger(component="committer")

    def wake(self) -> None:
        """Something was appended that needs a sync (called by the router)."""
        self._wake.set()

    async def wait_seq(self, seq: int) -> Durability:
        """Return once every held batch with sequence <= ``seq`` is settled:
        durable, or refused (its ``Held.error`` set) because its fsync failed."""
        while self.committed_seq < seq:
            await self._round_done.wait()
        return self.durability

    async def wait(self, held: Held) -> Durability:
        """Return once ``held`` is durable; raise its StorageError if its
        fsync failed (it was rolled back: not stored, not delivered)."""
        durability = await self.wait_seq(held.seq)
        if held.error is not None:
            raise held.error
        return durability

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timed_work)
            task_status.started()
            # A store whose sync is a round trip to other servers (a
            # cluster's object PUT and etcd transaction) lets the next
            # round start before the last is answered; a local fsync does not.
            depth = max(1, self.store.sync_depth)
            slots = trio.Semaphore(depth)
            previous: trio.Event | None = None
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await slots.acquire()
                # The round covers every batch held before its sync starts.
                target = self.router.held_seq
                if depth == 1:
                    await self._round(target, None)
                    slots.release()
                    continue
                done = trio.Event()
                nursery.start_soon(self._overlapping_round, target, previous, done, slots)
                previous = done

    async def _overlapping_round(
        self, target: int, previous: trio.Event | None, done: trio.Event, slots: trio.Semaphore
    ) -> None:
        try:
            await self._round(target, previous)
        finally:
            done.set()
            slots.release()

    async def _round(self, target: int, previous: trio.Event | None) -> None:
        # A failed fsync is never retried and then trusted: the store
        # rolled those segments back to their last good sync, and the
        # batches it would have covered are refused (release below).
        result = await self.store.sync()
        if previous is not None:
            await previous.wait()  # results go out in the order the syncs began
        if self.also_sync is not None:
            await self.also_sync()
        self.durability = result.durability
        self.committed_seq = target
        self.rounds += 1
        self.router.release(target, result.failed)
        if result.on_released is not None:
            result.on_released()
        if result.failed:
            self.logger.error(
                "a sync failed; the batches it covered are refused",
                topics={name: cut for name, (cut, _) in result.failed.items()},
                errors={name: str(error)[:200] for name, (_, error) in result.failed.items()},
            )
            # Batches appended during the failed round were dropped
            # too: a round soon settles their waiters.
            self._wake.set()
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
                # Degraded storage: see whether it works again, so that
                # readiness recovers without waiting for a publish.
                await self.store.probe()
