"""The committer's round boundaries (broker/committer.py) over a real file
store and the real router: a round covers exactly the batches held before
it started, a waiter whose batch is covered does not wait for another
round, a failed fsync refuses its round and the offsets are handed out
again, and retention runs on the committer's timer.
"""

from __future__ import annotations

import errno
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


async def test_retention_runs_on_the_committers_timer(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    store = open_store(tmp_path, segment_bytes=1024, retention_bytes=2048)
    log = store.topic("t")
    for i in range(60):
        log.append(encode_batch([b"x" * 100]), 1, 1000 + i)
    before = len(log.segments)
    assert before > 4
    router = Router(store)
    committer = Committer(store, router, retention_check_seconds=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await trio.sleep(4.9)
        assert len(log.segments) == before
        await trio.sleep(0.2)
        assert len(log.segments) < before
        assert log.size_bytes - log.segments[-1].size <= 2048
        nursery.cancel_scope.cancel()
    store.close()
