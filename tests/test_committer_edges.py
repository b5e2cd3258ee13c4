"""The committer's round boundaries (broker/committer.py) over a real file
store and the real router: a round covers exactly the batches held before
it started, a waiter whose batch is covered does not wait for another
round, a failed fsync refuses its round and the offsets are handed out
again, and retention runs on the committer's timer.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from pybroker.protocol import Durability, encode_batch
from pybroker.server.committer import Committer
from pybroker.server.router import Held, Router
from pybroker.server.storage import StorageError

from helpers.faults import FaultyOps
from helpers.logs import open_store

TIMEOUT = 10.0


async def settled(committer: Committer, held: Held) -> Durability:
    """What the broker does before acknowledging a held batch
    (broker/core.py, ``durable``): wait for the round that covers it, then
    refuse it if that round's fsync failed."""
    durability = await committer.wait_seq(held.seq)
    if held.error is not None:
        raise held.error
    return durability


def _publish(router: Router, n: int, tag: str = "m") -> list[Held]:
    topic = router.topic("t")
    out = []
    for i in range(n):
        _base, _ts, held = router.publish(topic, encode_batch([f"{tag}{i}".encode()]), 1, 1000 + i)
        assert held is not None
        out.append(held)
    return out


async def test_a_round_covers_what_was_held_before_it_and_no_more(tmp_path: Path) -> None:
    store = open_store(tmp_path)  # fsync "always": every batch is held
    router = Router(store)
    committer = Committer(store, router, retention_check_seconds=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        first = _publish(router, 3)
        assert [h.seq for h in first] == [1, 2, 3]
        committer.wake()
        with trio.fail_after(TIMEOUT):
            assert await settled(committer, first[-1]) is Durability.DISK
        assert (committer.committed_seq, committer.rounds, store.fsyncs) == (3, 1, 1)
        assert router.topic("t").visible_next == 3

        # Covered already: no other round is needed (or run).
        with trio.fail_after(TIMEOUT):
            await committer.wait_seq(3)
            await settled(committer, first[0])
        assert committer.rounds == 1

        # Held after the round: waits for the next one, which covers it.
        [fourth] = _publish(router, 1, "late")
        done = trio.Event()

        async def waiter() -> None:
            await settled(committer, fourth)
            done.set()

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set() and router.topic("t").visible_next == 3
        committer.wake()
        with trio.fail_after(TIMEOUT):
            await done.wait()
        assert (committer.committed_seq, committer.rounds) == (4, 2)
        assert router.topic("t").visible_next == 4
        nursery.cancel_scope.cancel()
    store.close()


async def test_a_failed_fsync_refuses_its_round_and_the_offsets_are_reused(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    router = Router(store)
    committer = Committer(store, router, retention_check_seconds=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        ok = _publish(router, 1)
        committer.wake()
        with trio.fail_after(TIMEOUT):
            await settled(committer, ok[0])
        ops.sync_errno = errno.EIO
        doomed = _publish(router, 2, "doomed")
        committer.wake()
        for held in doomed:
            with trio.fail_after(TIMEOUT), pytest.raises(StorageError):
                await settled(committer, held)
        assert store.topic("t").next_offset == 1
        assert router.topic("t").visible_next == 1
        ops.sync_errno = None
        again = _publish(router, 1, "again")
        assert again[0].base == 1  # the refused offsets were never handed out
        committer.wake()
        with trio.fail_after(TIMEOUT):
            assert await settled(committer, again[0]) is Durability.DISK
        assert store.topic("t").read(0, 1 << 20)[-1].batch == encode_batch([b"again0"])
        nursery.cancel_scope.cancel()
    store.close()




class _StallingOps(FaultyOps):
    """fdatasync waits (in the committer's worker thread) until the test
    lets it go, then fails or not: a sync that is in progress on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.go = threading.Event()
        self.stall = False

    def fdatasync(self, fd: int) -> None:
        if self.stall:
            self.entered.set()
            self.go.wait(TIMEOUT)
        super().fdatasync(fd)


async def test_batches_appended_during_a_failed_round_are_settled_without_another_publish(tmp_path: Path) -> None:
    """A batch appended while the round that fails is fsyncing is rolled
    back with it; its publisher gets the refusal from a round the
    committer starts by itself, not only when someone publishes again."""
    ops = _StallingOps()
    store = open_store(tmp_path, ops)
    router = Router(store)
    committer = Committer(store, router, retention_check_seconds=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        [first] = _publish(router, 1)
        ops.stall = True
        ops.sync_errno = errno.EIO
        committer.wake()
        with trio.fail_after(TIMEOUT):
            await trio.to_thread.run_sync(ops.entered.wait, TIMEOUT)
        [during] = _publish(router, 1, "during")  # after the round took its target
        assert during.seq > first.seq
        ops.stall = False
        ops.go.set()
        for held in (first, during):
            with trio.fail_after(TIMEOUT), pytest.raises(StorageError):
                await settled(committer, held)
        assert committer.rounds >= 2 and store.topic("t").next_offset == 0
        nursery.cancel_scope.cancel()
    store.close()


async def test_retention_runs_on_the_committers_timer_every_check_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = open_store(tmp_path, segment_bytes=1024, retention_bytes=2048)
    log = store.topic("t")

    def fill() -> int:
        for i in range(30):
            log.append(encode_batch([b"x" * 100]), 1, 1000 + i)
        return len(log.segments)

    before = fill()
    committer = Committer(store, Router(store), retention_check_seconds=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await trio.sleep(4.9)
        assert len(log.segments) == before
        await trio.sleep(0.2)
        assert len(log.segments) < before
        again = fill()
        await trio.sleep(4.7)  # 9.8 s: the second check is not due yet
        assert len(log.segments) == again
        await trio.sleep(0.4)
        assert len(log.segments) < again
        nursery.cancel_scope.cancel()
    store.close()


async def test_interval_topics_are_fsynced_on_the_committers_timer(tmp_path: Path) -> None:
    store = open_store(tmp_path, fsync="interval", fsync_interval_ms=10)
    log = store.topic("t")
    log.append(encode_batch([b"x"]), 1, 1000)
    seg = log.segments[-1]
    assert seg.dirty and store.fsyncs == 0
    synced = trio.Event()
    real = store.sync_interval_topics

    async def watched() -> None:
        await real()
        if not seg.dirty:
            synced.set()

    store.sync_interval_topics = watched  # type: ignore[method-assign]
    committer = Committer(store, Router(store), retention_check_seconds=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        with trio.fail_after(TIMEOUT):
            await synced.wait()
        assert store.fsyncs >= 1 and committer.rounds == 0  # no publish woke it
        nursery.cancel_scope.cancel()
    store.close()


async def test_degraded_storage_is_probed_on_the_committers_timer(tmp_path: Path) -> None:
    """After a failed append the store is degraded; once the disk works
    again the committer's timed probe clears it without any publish."""
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    log = store.topic("t")
    ops.fill()
    with pytest.raises(StorageError):
        log.append(encode_batch([b"x"]), 1, 1000)
    assert store.problem is not None
    ops.free()
    cleared = trio.Event()
    real = store.probe

    async def watched() -> None:
        await real()
        if store.problem is None:
            cleared.set()

    store.probe = watched  # type: ignore[method-assign]
    committer = Committer(store, Router(store), retention_check_seconds=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        with trio.fail_after(TIMEOUT):
            await cleared.wait()
        assert log.next_offset == 0 and committer.rounds == 0
        nursery.cancel_scope.cancel()
    store.close()


async def test_interval_fsyncs_do_not_run_retention_before_its_time(tmp_path: Path) -> None:
    """With an ``interval`` topic the committer wakes every 10 ms to fsync
    it; retention still runs only every ``retention_check_seconds`` (here
    1 s), the first time and after. Each check below happens right after
    a tick, when the committer has decided about retention for it."""
    store = open_store(tmp_path, segment_bytes=1024, retention_bytes=2048, fsync="interval", fsync_interval_ms=10)
    log = store.topic("t")

    def fill() -> int:
        for i in range(30):
            log.append(encode_batch([b"x" * 100]), 1, 1000 + i)
        return len(log.segments)

    ticks: trio.MemorySendChannel[int]
    ticks, tick_times = trio.open_memory_channel[int](1000)
    real_sync, real_retention = store.sync_interval_topics, store.enforce_retention
    deleted = trio.Event()

    async def watched_sync() -> None:
        await real_sync()
        ticks.send_nowait(len(log.segments))

    def watched_retention() -> int:
        n = real_retention()
        if n:
            deleted.set()
        return n

    store.sync_interval_topics = watched_sync  # type: ignore[method-assign]
    store.enforce_retention = watched_retention  # type: ignore[method-assign]
    before = fill()
    committer = Committer(store, Router(store), retention_check_seconds=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        with trio.fail_after(TIMEOUT):
            await tick_times.receive()  # the first tick, long before 1 s
        assert len(log.segments) == before
        with trio.fail_after(TIMEOUT):
            await deleted.wait()
        again = fill()
        with trio.fail_after(TIMEOUT):
            while tick_times.statistics().current_buffer_used:
                tick_times.receive_nowait()  # ticks from before the refill
            await tick_times.receive()
            await tick_times.receive()
        assert len(log.segments) == again  # the next check is a second away
        nursery.cancel_scope.cancel()
    store.close()
