"""The range cache of data objects on a real SeaweedFS
(pybroker.server.cluster.cache; docs/cluster.md §7), and what a reader
does with damaged bytes (with a real etcd for the index).

GETs are counted by a store that wraps the real one, and can be held at a
gate so that concurrent readers are provably waiting on one GET.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from helpers.cluster import Server, etcd_server, weed_server
from pybroker.protocol import encode_batch
from pybroker.server.cluster.cache import DEFAULT_MAX_BYTES, RangeCache
from pybroker.server.cluster.etcd import Etcd
from pybroker.server.cluster.index import PartitionIndex
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.lease import LeaseKeeper
from pybroker.server.cluster.objects import NoSuchKey, ObjectStore, ObjectStoreError
from pybroker.server.cluster.partition import PartitionOwner, PartitionReader
from pybroker.server.cluster.tail import IndexedReader
from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.errors import DataLoss

WAIT = 60.0
BUCKET = "pybroker-cache-tests"
TOPIC = "cached"


@attrs.frozen
class Servers:
    etcd_url: str
    s3_url: str
    weed: Server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("cluster")
    with etcd_server(tmp) as (etcd_url, _etcd), weed_server(tmp) as (s3_url, weed):
        yield Servers(etcd_url, s3_url, weed)


class CountingStore(ObjectStore):
    """The real store, counting GETs; while ``gate`` is set, each GET
    waits for it before it is sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gets = 0
        self.gate: trio.Event | None = None

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self.gets += 1
        if self.gate is not None:
            await self.gate.wait()
        return await super().get(key, start, end)


@pytest.fixture
async def store(servers: Servers, request: pytest.FixtureRequest) -> AsyncIterator[CountingStore]:
    async with CountingStore(servers.s3_url, BUCKET, prefix=f"{request.node.name}/") as store:
        with trio.fail_after(WAIT):
            await store.create_bucket()
        yield store


def content(i: int, size: int) -> bytes:
    return (b"%05d" % i) * (size // 5)


async def test_the_byte_bound_holds_over_many_objects(store: CountingStore) -> None:
    """40 objects of 1000 bytes through a 5000-byte cache: never more than
    5000 bytes held; the last five are served from memory, the first is
    fetched again. A range over the whole bound is handed out, not kept."""
    assert RangeCache(store).max_bytes == DEFAULT_MAX_BYTES == 256 << 20
    cache = RangeCache(store, max_bytes=5000)
    with trio.fail_after(WAIT):
        for i in range(40):
            assert await store.put_if_absent(f"o{i}", content(i, 1000))
        for i in range(40):
            assert await cache.get(f"o{i}", 0, 1000) == content(i, 1000)
            stats = cache.statistics()
            assert stats.bytes <= 5000 and stats.bytes == 1000 * stats.ranges
        assert store.gets == 40 and cache.statistics().ranges == 5 and cache.statistics().evictions == 35
        for i in range(35, 40):
            assert await cache.get(f"o{i}", 100, 50) == content(i, 1000)[100:150]  # inside a cached range
        assert store.gets == 40 and cache.statistics().hits == 5
        assert await cache.get("o0", 0, 1000) == content(0, 1000)
        assert store.gets == 41
        assert await store.put_if_absent("big", content(99, 6000))
        assert await cache.get("big", 0, 6000) == content(99, 6000)
        assert ("big", 0, 6000) not in cache and cache.statistics().bytes <= 5000


async def test_the_least_recently_used_range_goes_first(store: CountingStore) -> None:
    cache = RangeCache(store, max_bytes=3000)
    with trio.fail_after(WAIT):
        for name in "abcd":
            assert await store.put_if_absent(name, name.encode() * 1000)
        for name in "abc":
            await cache.get(name, 0, 1000)
        await cache.get("a", 0, 1000)  # a is now the most recently used
        await cache.get("d", 0, 1000)  # evicts b, the least recently used
        assert [(n, 0, 1000) in cache for n in "abcd"] == [True, False, True, True]
        gets = store.gets
        await cache.get("a", 0, 1000)
        await cache.get("c", 0, 1000)
        assert store.gets == gets
        await cache.get("b", 0, 1000)  # fetched again; evicts d (a and c were used since)
        assert store.gets == gets + 1
        assert [(n, 0, 1000) in cache for n in "abcd"] == [True, True, True, False]


async def test_concurrent_readers_of_one_range_send_one_get(store: CountingStore) -> None:
    """Ten readers want the same range while its GET is held at the gate:
    one GET goes out, nine wait for it, all get the bytes. Another range
    of the same object is its own GET; a range inside one put by an owner
    needs none."""
    cache = RangeCache(store)
    data = content(7, 4000)
    with trio.fail_after(WAIT):
        assert await store.put_if_absent("shared", data)
        store.gate = trio.Event()
        got: list[bytes] = []

        async def read(start: int, size: int) -> None:
            got.append(await cache.get("shared", start, size))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(read, 1000, 2000)
            await trio.testing.wait_all_tasks_blocked()
            stats = cache.statistics()
            assert (store.gets, stats.in_flight, stats.waiting, stats.joined) == (1, 1, 9, 9)
            store.gate.set()
        assert got == [data[1000:3000]] * 10 and store.gets == 1
        store.gate = None
        assert await cache.get("shared", 0, 1000) == data[:1000] and store.gets == 2
        cache.put("written", b"owner's bytes")
        assert await cache.get("written", 8, 5) == b"bytes" and store.gets == 2


async def test_a_failed_get_wakes_every_waiter_with_the_error_and_is_not_cached(store: CountingStore) -> None:
    """The object is deleted: five readers share one failed GET, each gets
    NoSuchKey, nothing is kept, and the next read asks the store again
    (and succeeds once the object is back)."""
    cache = RangeCache(store)
    with trio.fail_after(WAIT):
        assert await store.put_if_absent("doomed", b"x" * 100)
        await store.delete("doomed")
        store.gate = trio.Event()
        errors: list[BaseException] = []

        async def read() -> None:
            try:
                await cache.get("doomed", 0, 100)
            except NoSuchKey as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert cache.statistics().waiting == 4
            store.gate.set()
        assert len(errors) == 5 and len({id(e) for e in errors}) == 5 and store.gets == 1
        stats = cache.statistics()
        assert (stats.failures, stats.ranges, stats.in_flight) == (1, 0, 0)
        store.gate = None
        with pytest.raises(NoSuchKey):
            await cache.get("doomed", 0, 100)
        assert store.gets == 2
        assert await store.put_if_absent("doomed", b"y" * 100)
        assert await cache.get("doomed", 0, 100) == b"y" * 100 and store.gets == 3


async def test_a_stopped_store_fails_every_waiter_and_then_recovers(servers: Servers, store: CountingStore) -> None:
    """SIGSTOP SeaweedFS: the one GET times out (a store client with a 1 s
    timeout) and all four readers waiting on it get the error; after
    SIGCONT the range is fetched again (nothing of the failure was kept)."""
    with trio.fail_after(WAIT):
        assert await store.put_if_absent("frozen", b"z" * 500)
    async with CountingStore(store.endpoint, store.bucket, prefix=store.prefix, timeout=1.0) as impatient:
        await frozen_reads(servers.weed, impatient)


async def frozen_reads(weed: Server, store: CountingStore) -> None:
    cache = RangeCache(store)
    with trio.fail_after(WAIT):
        errors: list[ObjectStoreError] = []

        async def read() -> None:
            try:
                await cache.get("frozen", 0, 500)
            except ObjectStoreError as exc:
                errors.append(exc)

        weed.pause()
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(read)
        finally:
            weed.resume()
        assert len(errors) == 4 and store.gets == 1
        assert all("unreachable" in str(e) for e in errors)
        assert cache.statistics().ranges == 0
        assert await cache.get("frozen", 0, 500) == b"z" * 500 and store.gets == 2


async def test_a_cancelled_fetch_is_taken_over_by_a_waiter(store: CountingStore) -> None:
    cache = RangeCache(store)
    with trio.fail_after(WAIT):
        assert await store.put_if_absent("obj", b"q" * 300)
        store.gate = trio.Event()
        got: list[bytes] = []

        async def read() -> None:
            got.append(await cache.get("obj", 0, 300))

        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as leader:
                async with trio.open_nursery() as first:
                    first.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    assert cache.statistics().waiting == 1
                    leader.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert store.gets == 2  # the waiter sent its own GET
            store.gate.set()
        assert got == [b"q" * 300] and cache.statistics().ranges == 1


def batch_of(tag: str, count: int) -> bytes:
    return encode_batch([f"{tag}:{i}".encode() * 20 for i in range(count)])


async def test_a_flipped_byte_in_an_object_is_refused_with_data_loss(
    servers: Servers, store: CountingStore, request: pytest.FixtureRequest
) -> None:
    """A committed object's byte is flipped in the store: a read of its
    batch raises DataLoss (damaged) with the entry's range, never hands
    out the bytes, and does not keep them: the next read fetches again. A
    read before it returns the good batches up to the damage; a tail stops
    there with the same error. Once the object is whole again, it is read."""
    keys = ClusterKeys(f"/t/{request.node.name}/".encode())
    with trio.fail_after(WAIT):
        async with Etcd(servers.etcd_url) as etcd:
            keeper = LeaseKeeper(etcd, 10)
            await keeper.grant()
            owner = PartitionOwner(etcd, store, keeper, TOPIC, 0, keys=keys)
            assert await owner.acquire()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(owner.run)
                for i in range(3):
                    await owner.append(batch_of(f"b{i}", 2))
                index = PartitionIndex(etcd, TOPIC, 0, keys=keys)
                await nursery.start(index.run)
                entries = index.entries()
                assert [e.first for e in entries] == [0, 2, 4]
                good = await PartitionReader(etcd, store, TOPIC, 0, keys=keys).read(0, 1 << 20)
                damaged_entry = entries[1]
                original = await store.get(damaged_entry.object)
                flipped = bytearray(original)
                flipped[len(flipped) // 2] ^= 0x10
                await store.delete(damaged_entry.object)
                assert await store.put_if_absent(damaged_entry.object, bytes(flipped))

                cache = RangeCache(store)
                reader = IndexedReader(index, cache)
                assert fields(await reader.read(0, 1 << 20)) == fields(good[:1])  # up to the damage
                gets = store.gets
                for attempt in range(2):
                    with pytest.raises(DataLoss) as lost:
                        await reader.read(2, 1 << 20)
                    assert (lost.value.first, lost.value.last, lost.value.reason) == (2, 3, "damaged")
                    assert (damaged_entry.object, damaged_entry.start, damaged_entry.size) not in cache
                    assert store.gets == gets + attempt + 1  # not kept: fetched again
                tailed: list[StoredBatch] = []
                tail = reader.tail(0)
                with pytest.raises(DataLoss, match="damaged"):
                    async for batch in tail:
                        tailed.append(batch)
                assert fields(tailed) == fields(good[:1]) and tail.position == 2

                await store.delete(damaged_entry.object)
                assert await store.put_if_absent(damaged_entry.object, original)
                assert fields(await reader.read(0, 1 << 20)) == fields(good)
                nursery.cancel_scope.cancel()


def fields(batches: list[StoredBatch]) -> list[tuple[int, int, int, bytes]]:
    return [(b.base_offset, b.count, b.timestamp, b.batch) for b in batches]
