"""Reads and tails through the index view, on real etcd and SeaweedFS
(pybroker.server.cluster.index and .tail; docs/cluster.md §7).

A PartitionOwner appends; another "node" (its own etcd and store
connections) keeps the partition's index from a range read and a watch,
reads through a RangeCache and tails. What it yields is compared byte for
byte with PartitionReader's answer (the index read from etcd on every
call). Every test has its own key prefix in etcd and object prefix in the
bucket.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from helpers.cluster import Server, etcd_server, restart, weed_server
from pybroker.protocol import encode_batch
from pybroker.server.cluster.cache import RangeCache
from pybroker.server.cluster.etcd import Delete, Etcd, EtcdUnavailable, Put
from pybroker.server.cluster.index import PartitionIndex
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.lease import LeaseKeeper
from pybroker.server.cluster.objects import ObjectStore
from pybroker.server.cluster.entries import IndexEntry, encode_stored
from pybroker.server.cluster.partition import PartitionOwner, PartitionReader
from pybroker.server.cluster.tail import IndexedReader, Tail
from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.errors import DataLoss

WAIT = 60.0
TOPIC = "orders/eu"
BUCKET = "pybroker-index-tests"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server, str]]:
    """(etcd URL, etcd server, S3 endpoint), one of each for the module."""
    tmp = tmp_path_factory.mktemp("cluster")
    with etcd_server(tmp) as (etcd_url, etcd), weed_server(tmp) as (s3_url, _weed):
        yield etcd_url, etcd, s3_url


class CountingEtcd(Etcd):
    """An etcd client that counts its unary calls (watches are streams,
    not counted): reads served from the index view make none."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.calls: list[str] = []

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(path)
        return await super()._call(path, body)


class CountingStore(ObjectStore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gets = 0

    async def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        self.gets += 1
        return await super().get(key, start, end)


@attrs.frozen
class Cluster:
    etcd_url: str
    etcd_server: Server
    s3_url: str
    keys: ClusterKeys
    object_prefix: str
    etcd: Etcd
    store: ObjectStore

    def node(self, *, timeout: float = 5.0) -> tuple[CountingEtcd, CountingStore]:
        """Another node's own connections to the same cluster."""
        return (
            CountingEtcd(self.etcd_url, timeout=timeout),
            CountingStore(self.s3_url, BUCKET, prefix=self.object_prefix),
        )

    def index(self, etcd: Etcd, **kwargs: Any) -> PartitionIndex:
        return PartitionIndex(etcd, TOPIC, 0, keys=self.keys, **kwargs)

    async def owner(self, *, window: float = 0.005) -> PartitionOwner:
        """Partition 0's owner, acquired (its commit loop not started)."""
        keeper = LeaseKeeper(self.etcd, 10)
        await keeper.grant()
        owner = PartitionOwner(self.etcd, self.store, keeper, TOPIC, 0, keys=self.keys, window=window)
        assert await owner.acquire()
        return owner

    async def expected(self, end: int) -> list[StoredBatch]:
        """Every batch up to ``end``, as PartitionReader (etcd on every
        call, no cache) reads them."""
        reader = PartitionReader(self.etcd, self.store, TOPIC, 0, keys=self.keys)
        out: list[StoredBatch] = []
        offset = 0
        for _ in range(end + 1):
            if offset >= end:
                break
            batches = await reader.read(offset, max_bytes=1 << 30)
            assert batches and batches[0].base_offset == offset
            out += batches
            offset = batches[-1].next_offset
        assert offset == end
        return out


@pytest.fixture
async def cluster(servers: tuple[str, Server, str], request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    etcd_url, etcd_srv, s3_url = servers
    name = request.node.name
    object_prefix = f"{name}/"
    async with Etcd(etcd_url) as etcd, ObjectStore(s3_url, BUCKET, prefix=object_prefix) as store:
        with trio.fail_after(WAIT):
            await store.create_bucket()
        yield Cluster(etcd_url, etcd_srv, s3_url, ClusterKeys(f"/t/{name}/".encode()), object_prefix, etcd, store)


def batch_of(tag: str, count: int) -> bytes:
    return encode_batch([f"{tag}:{i}:".encode() + bytes(range(256)) * (i % 3) for i in range(count)])


def fields(batches: list[StoredBatch]) -> list[tuple[int, int, int, bytes]]:
    return [(b.base_offset, b.count, b.timestamp, b.batch) for b in batches]


def from_offset(batches: list[StoredBatch], offset: int) -> list[StoredBatch]:
    """What a read or tail from ``offset`` yields: from the batch holding it on."""
    return [b for b in batches if b.next_offset > offset]


async def follow(tail: Tail, end: int, into: list[StoredBatch], seen: trio.MemorySendChannel[int] | None = None) -> None:
    """Collect the tail's batches until its position reaches ``end``
    (bounded: the caller's fail_after), telling ``seen`` each position."""
    async for batch in tail:
        into.append(batch)
        if seen is not None:
            await seen.send(tail.position)
        if tail.position >= end:
            return


async def wait_position(seen: trio.MemoryReceiveChannel[int], offset: int) -> None:
    """Until the tail reporting to ``seen`` is at or past ``offset``."""
    async for position in seen:
        if position >= offset:
            return


async def append_waves(owner: PartitionOwner, tag: str, waves: list[list[int]]) -> None:
    """Each wave's batches appended concurrently (one round, one entry,
    when they meet in a window), the waves one after another."""
    for w, counts in enumerate(waves):
        async with trio.open_nursery() as publishers:
            for i, count in enumerate(counts):
                publishers.start_soon(owner.append, batch_of(f"{tag}{w}.{i}", count))


WAVES_A = [[1], [5, 2], [7], [1, 3, 2]]
WAVES_B = [[4], [2, 2, 1], [6], [1]]
TOTAL = sum(map(sum, WAVES_A + WAVES_B))


async def test_tails_from_before_during_and_after_appends_yield_each_batch_once(cluster: Cluster) -> None:
    """Tails started before any append, while appends go on, and after the
    last one, from 0 and from offsets inside batches: each yields every
    acknowledged batch from the one holding its offset, once, in order,
    byte for byte as PartitionReader reads it."""
    got: dict[str, list[StoredBatch]] = {}
    starts: dict[str, int] = {}
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        etcd, store = cluster.node()
        async with etcd, store, trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            index = cluster.index(etcd)
            await nursery.start(index.run)
            reader = IndexedReader(index, RangeCache(store))
            async with trio.open_nursery() as tails:  # each tail ends once it reaches TOTAL

                def start(name: str, offset: int) -> None:
                    starts[name], got[name] = offset, []
                    tails.start_soon(follow, reader.tail(offset), TOTAL, got[name])

                start("before", 0)
                await append_waves(owner, "a", WAVES_A[:2])
                start("during-0", 0)
                start("during-inside", owner.next_offset - 1)  # inside the last batch (it holds 2 or 5 messages)
                async with trio.open_nursery() as appending:
                    appending.start_soon(append_waves, owner, "a", WAVES_A[2:])
                    start("racing", 3)
                await append_waves(owner, "b", WAVES_B)
                assert owner.next_offset == TOTAL
                start("after-0", 0)
                start("after-inside", TOTAL - 3)
                start("after-end", TOTAL - 1)
            stats = index.statistics()
            assert (stats.loads, stats.gaps, stats.canceled, stats.reconnects) == (1, 0, 0, 0)  # the watch missed nothing
            nursery.cancel_scope.cancel()
    expected = await cluster.expected(TOTAL)
    assert len(expected) == sum(len(w) for w in WAVES_A + WAVES_B)
    for name, offset in starts.items():
        assert fields(got[name]) == fields(from_offset(expected, offset)), name
    assert fields(got["before"]) == fields(expected)


async def test_reads_match_partition_reader_without_asking_etcd(cluster: Cluster) -> None:
    """read(offset, max_bytes) answers as PartitionReader does for every
    offset and several sizes, and once the index is loaded a read asks etcd
    nothing; each entry's bytes are fetched once, then served from the cache."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            await append_waves(owner, "r", WAVES_A)
            nursery.cancel_scope.cancel()
        end = owner.next_offset
        etcd, store = cluster.node()
        async with etcd, store, trio.open_nursery() as nursery:
            index = cluster.index(etcd)
            await nursery.start(index.run)
            reader = IndexedReader(index, RangeCache(store))
            direct = PartitionReader(cluster.etcd, cluster.store, TOPIC, 0, keys=cluster.keys)
            calls = len(etcd.calls)
            for max_bytes in (1, 300, 1 << 20):
                for offset in range(end + 2):
                    mine = await reader.read(offset, max_bytes)
                    theirs = await direct.read(offset, max_bytes)
                    assert fields(mine) == fields(theirs), (offset, max_bytes)
            assert etcd.calls[calls:] == []
            assert store.gets == len(index) == len(await cluster.store.list("data/"))
            assert index.next_offset == end == reader.next_offset
            nursery.cancel_scope.cancel()


async def test_the_window_bounds_memory_and_older_offsets_come_from_etcd(cluster: Cluster) -> None:
    """max_entries=3: the view never holds more than 3 entries while 10
    rounds are appended; a view started afterwards loads the newest 3 (in
    pages of 2); offsets below the window are read through etcd lookups
    and are still byte for byte right, and a tail from 0 yields them all."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        etcd, store = cluster.node()
        async with etcd, store, trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            live = cluster.index(etcd, max_entries=3)
            await nursery.start(live.run)
            sizes = []
            for i in range(10):
                await owner.append(batch_of(f"w{i}", 1 + i % 3))
                await live.wait_beyond(owner.next_offset - 1)
                sizes.append(len(live))
            assert sizes == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
            end = owner.next_offset
            expected = await cluster.expected(end)
            assert [e.first for e in live.entries()] == [b.base_offset for b in expected[-3:]]

            loaded = cluster.index(etcd, max_entries=3, page=2)
            await nursery.start(loaded.run)
            assert loaded.entries() == live.entries() and loaded.low == expected[-3].base_offset
            reader = IndexedReader(loaded, RangeCache(store), lookup=2)
            calls = len(etcd.calls)
            assert fields(await reader.read(loaded.low, 1 << 20)) == fields(expected[-3:])
            assert etcd.calls[calls:] == []  # inside the window: no etcd call
            everything = await reader.read(0, 1 << 20)
            assert fields(everything) == fields(expected)
            assert etcd.calls[calls:].count("/v3/kv/range") >= 2  # below the window: looked up
            inside = expected[4].base_offset + expected[4].count - 1
            assert fields(await reader.read(inside, 1)) == fields([expected[4]])
            tailed: list[StoredBatch] = []
            await follow(reader.tail(0), end, tailed)
            assert fields(tailed) == fields(expected)
            assert len(loaded) == 3 and len(live) == 3
            nursery.cancel_scope.cancel()


async def test_the_view_survives_etcd_compaction(cluster: Cluster) -> None:
    """A running watch is not disturbed by a compaction past its start. A
    watch opened from a compacted revision (injected: appends and a
    compaction between the view's range read and its watch) is canceled by
    etcd; the view loads afresh and a tail started before everything
    yields every batch exactly once."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        etcd, store = cluster.node()
        async with etcd, store, trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            await append_waves(owner, "early", WAVES_A[:1])
            index = cluster.index(etcd)
            hooked: list[int] = []

            async def compact_before_watching(start: int) -> None:
                hooked.append(start)
                if len(hooked) == 1:
                    await append_waves(owner, "between", WAVES_A[1:])
                    now = (await cluster.etcd.range(b"any")).revision
                    assert now > start
                    await cluster.etcd.compact(now)

            index.before_watch = compact_before_watching
            reader = IndexedReader(index, RangeCache(store))
            tailed: list[StoredBatch] = []
            send, seen = trio.open_memory_channel[int](1000)
            nursery.start_soon(follow, reader.tail(0), TOTAL, tailed, send)
            await nursery.start(index.run)
            middle = sum(map(sum, WAVES_A))
            await wait_position(seen, middle)
            assert index.statistics().canceled == 1 and index.statistics().loads == 2
            # A compaction past the live watch's revision: it carries on.
            await append_waves(owner, "b", WAVES_B[:2])
            await cluster.etcd.compact((await cluster.etcd.range(b"any")).revision)
            await append_waves(owner, "b2", WAVES_B[2:])
            await wait_position(seen, TOTAL)
            stats = index.statistics()
            assert stats.canceled == 1 and stats.loads == 2 and len(hooked) == 2 and stats.watching
            nursery.cancel_scope.cancel()
        expected = await cluster.expected(TOTAL)
        assert fields(tailed) == fields(expected)


async def test_a_tail_resumes_after_etcd_is_stopped_and_continued(cluster: Cluster) -> None:
    """SIGSTOP etcd while a tail follows the partition: reads of what the
    view holds still answer (no etcd needed), an append in flight waits;
    after SIGCONT it is acknowledged and the tail yields it and everything
    after, once each."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        etcd, store = cluster.node(timeout=1.0)
        async with etcd, store, trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            index = cluster.index(etcd)
            await nursery.start(index.run)
            reader = IndexedReader(index, RangeCache(store))
            tailed: list[StoredBatch] = []
            send, seen = trio.open_memory_channel[int](1000)
            end = TOTAL + 4
            nursery.start_soon(follow, reader.tail(0), end, tailed, send)
            await append_waves(owner, "a", WAVES_A)
            before = owner.next_offset
            await wait_position(seen, before)

            put_done = trio.Event()

            async def object_written(_name: str) -> None:
                put_done.set()

            owner.before_commit = object_written
            cluster.etcd_server.pause()
            try:
                async with Etcd(cluster.etcd_url, timeout=0.5) as probe:
                    with pytest.raises(EtcdUnavailable):
                        await probe.get(b"stopped?")
                appended: list[int] = []

                async def append_in_flight() -> None:
                    appended.append(await owner.append(batch_of("paused", 4)))

                nursery.start_soon(append_in_flight)
                await put_done.wait()
                # Served from the view and the cache while etcd is stopped.
                calls = len(etcd.calls)
                assert fields(await reader.read(0, 1 << 20)) == fields(tailed)
                assert etcd.calls[calls:] == [] and index.next_offset == before
            finally:
                cluster.etcd_server.resume()
            owner.before_commit = None
            await wait_position(seen, before + 4)
            assert appended == [before]
            await append_waves(owner, "b", WAVES_B)
            await wait_position(seen, end)
            nursery.cancel_scope.cancel()
        expected = await cluster.expected(end)
        assert fields(tailed) == fields(expected)


async def test_a_broken_watch_reconnects_and_a_compacted_one_loads_afresh(
    servers: tuple[str, Server, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """etcd is SIGKILLed and started again (same data, same port) while a
    tail follows: the watch breaks and is opened again from the last
    revision applied, no fresh load. On the next break, appends and a
    compaction happen before the view reconnects (injected in the hook
    that runs before each watch is opened): that watch is canceled, the
    view loads afresh. The tail yields every batch once, in order."""
    _etcd_url, _etcd, s3_url = servers
    keys = ClusterKeys(f"/t/{request.node.name}/".encode())
    with etcd_server(tmp_path) as (url, first_server):
        servers_now = [first_server]
        try:
            async with Etcd(url) as etcd, ObjectStore(s3_url, BUCKET, prefix=f"{request.node.name}/") as store:
                cluster = Cluster(url, first_server, s3_url, keys, f"{request.node.name}/", etcd, store)
                with trio.fail_after(WAIT):
                    await store.create_bucket()
                    owner = await cluster.owner()
                    node_etcd, node_store = cluster.node(timeout=1.0)
                    async with node_etcd, node_store, trio.open_nursery() as nursery:
                        nursery.start_soon(owner.run)
                        index = cluster.index(node_etcd)
                        await nursery.start(index.run)
                        reader = IndexedReader(index, RangeCache(node_store))
                        tailed: list[StoredBatch] = []
                        send, seen = trio.open_memory_channel[int](1000)
                        nursery.start_soon(follow, reader.tail(0), TOTAL, tailed, send)
                        await append_waves(owner, "a", WAVES_A[:2])
                        await wait_position(seen, owner.next_offset)

                        servers_now.append(await trio.to_thread.run_sync(restart, servers_now[-1], tmp_path))
                        await append_waves(owner, "b", WAVES_A[2:3])
                        await wait_position(seen, owner.next_offset)
                        stats = index.statistics()
                        assert stats.reconnects >= 1 and stats.loads == 1 and stats.canceled == 0

                        back = trio.Event()
                        compacted: list[int] = []

                        async def behind_a_compaction(start: int) -> None:
                            if not compacted:
                                await back.wait()  # the view's first try after the break: etcd is back now
                                await append_waves(owner, "c", WAVES_A[3:])
                                # One more revision, so that compacting to now removes the watch's start.
                                compacted.append(await etcd.put(b"/t/bump", b""))
                                assert compacted[0] > start
                                await etcd.compact(compacted[0])

                        index.before_watch = behind_a_compaction
                        servers_now.append(await trio.to_thread.run_sync(restart, servers_now[-1], tmp_path))
                        back.set()
                        await wait_position(seen, sum(map(sum, WAVES_A)))
                        await append_waves(owner, "d", WAVES_B)
                        await wait_position(seen, TOTAL)
                        stats = index.statistics()
                        assert compacted and stats.canceled == 1 and stats.loads == 2 and stats.reconnects >= 2
                        nursery.cancel_scope.cancel()
                    assert fields(tailed) == fields(await cluster.expected(TOTAL))
        finally:
            for server in servers_now[1:]:
                server.kill()


async def test_a_gap_loads_afresh_and_a_hole_is_data_loss(cluster: Cluster) -> None:
    """An entry appears past the next offset (a hole, injected by direct
    writes): the view sees the gap, loads afresh and keeps the dense run
    above the hole; reads up to the hole return what is there, a read in
    it raises DataLoss (missing) with the hole's range, and past it reads
    go on."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        etcd, store = cluster.node()
        async with etcd, store, trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            await append_waves(owner, "a", WAVES_A[:2])
            end = owner.next_offset
            index = cluster.index(etcd)
            await nursery.start(index.run)
            reader = IndexedReader(index, RangeCache(store))
            assert index.statistics().loads == 1
            expected = await cluster.expected(end)
            # Offsets end..end+2 never committed; an entry for end+3 is.
            far = end + 3
            batch = batch_of("far", 2)
            data = encode_stored(far, 2, 42, batch)
            assert await cluster.store.put_if_absent("data/far", data)
            entry = IndexEntry(far, "data/far", 0, len(data), 2, 42)
            await cluster.etcd.txn(
                [],
                [Put(cluster.keys.index(TOPIC, 0, far), entry.encode()), Put(cluster.keys.next(TOPIC, 0), b"%d" % (far + 2))],
            )
            await index.wait_beyond(far)
            stats = index.statistics()
            assert stats.gaps == 1 and stats.loads == 2
            assert index.entries() == [entry] and index.low == far and index.next_offset == far + 2
            assert fields(await reader.read(0, 1 << 30)) == fields(expected)  # stops before the hole
            with pytest.raises(DataLoss) as lost:
                await reader.read(end, 1 << 30)
            assert (lost.value.first, lost.value.last, lost.value.reason) == (end, far - 1, "missing")
            with pytest.raises(DataLoss, match="missing"):
                await reader.read(end + 1)
            assert fields(await reader.read(far)) == [(far, 2, 42, batch)]
            tail = reader.tail(0)
            tailed: list[StoredBatch] = []
            with pytest.raises(DataLoss, match="missing"):
                await follow(tail, far + 2, tailed)
            assert fields(tailed) == fields(expected) and tail.position == end
            nursery.cancel_scope.cancel()


async def test_retention_and_index_compaction_deletes_are_applied(cluster: Cluster) -> None:
    """Deletes arrive through the watch: the two oldest entries cut (as
    retention will), then three entries replaced by one merged entry over
    a new object (as index compaction will: one transaction puts the
    merged entry and deletes the others). The view follows without loading
    afresh; reads answer as PartitionReader does, from the merged object."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        etcd, store = cluster.node()
        async with etcd, store, trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            for i in range(7):
                await owner.append(batch_of(f"e{i}", 1 + i % 2))
            end = owner.next_offset
            index = cluster.index(etcd)
            await nursery.start(index.run)
            reader = IndexedReader(index, RangeCache(store))
            entries = index.entries()
            assert len(entries) == 7
            before = await cluster.expected(end)

            await cluster.etcd.txn([], [Delete(cluster.keys.index(TOPIC, 0, e.first)) for e in entries[:2]])
            merged_parts = entries[2:5]
            data = b"".join([await cluster.store.get(e.object, e.start, e.start + e.size - 1) for e in merged_parts])
            assert await cluster.store.put_if_absent("data/merged", data)
            merged = IndexEntry(
                merged_parts[0].first, "data/merged", 0, len(data), sum(e.count for e in merged_parts), merged_parts[0].timestamp
            )
            result = await cluster.etcd.txn(
                [],
                [Put(cluster.keys.index(TOPIC, 0, merged.first), merged.encode())]
                + [Delete(cluster.keys.index(TOPIC, 0, e.first)) for e in merged_parts[1:]],
            )
            assert result.succeeded
            await index.wait_revision(result.revision)
            assert index.entries() == [merged, *entries[5:]]
            stats = index.statistics()
            assert stats.loads == 1 and stats.gaps == 0
            kept = from_offset(before, entries[2].first)
            assert fields(await reader.read(0, 1 << 30)) == fields(kept)  # below the first entry: from it
            # One read serves the rest of the merged entry (as PartitionReader does).
            assert [b.base_offset for b in await reader.read(entries[3].first, 1)] == [entries[3].first, entries[4].first]
            direct = PartitionReader(cluster.etcd, cluster.store, TOPIC, 0, keys=cluster.keys)
            for offset in range(end):
                assert fields(await reader.read(offset, 1)) == fields(await direct.read(offset, 1)), offset
            nursery.cancel_scope.cancel()


def test_entries_decode_strictly() -> None:
    with pytest.raises(ValueError):
        IndexEntry.decode(0, json.dumps({"o": "x", "b": 0, "n": 0, "c": 1, "ts": 0}).encode())
