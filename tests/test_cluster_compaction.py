"""Index compaction (pybroker.server.cluster.compaction; docs/cluster.md §13)
on real etcd and SeaweedFS: the owner merges runs of old index entries into
one object and one entry; every offset reads back the same bytes before
and after, on readers that held the old entries too; a former owner's
merge is refused; an entry whose bytes do not check is left alone."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import pytest
import trio


pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

from pybroker.protocol import encode_batch  # noqa: E402
from pybroker.server.cluster.cache import RangeCache  # noqa: E402
from pybroker.server.cluster.compaction import (  # noqa: E402
    CompactionSettings,
    IndexCompactor,
    _Held,
    plan,
)
from pybroker.server.cluster.etcd import Etcd  # noqa: E402
from pybroker.server.cluster.index import PartitionIndex  # noqa: E402
from pybroker.server.cluster.janitor import Janitor  # noqa: E402
from pybroker.server.cluster.keys import ClusterKeys  # noqa: E402
from pybroker.server.cluster.lease import LeaseKeeper  # noqa: E402
from pybroker.server.cluster.objects import ObjectStore  # noqa: E402
from pybroker.server.cluster.entries import IndexEntry  # noqa: E402
from pybroker.server.cluster.partition import PartitionOwner, PartitionReader  # noqa: E402
from pybroker.server.cluster.retention import Cut, Retention, cut  # noqa: E402
from pybroker.server.cluster.tail import IndexedReader  # noqa: E402
from pybroker.server.storage.base import StoredBatch  # noqa: E402
from pybroker.server.storage.errors import DataLoss  # noqa: E402

WAIT = 30.0
TOPIC = "compacted"
BUCKET = "pybroker-compaction-tests"
SMALL = CompactionSettings(keep=5, fan_in=4, max_object_bytes=1 << 20)


# -- choosing runs (no servers) ------------------------------------------------


def held(first: int, count: int = 1, size: int = 10, level: int = 0) -> _Held:
    return _Held(IndexEntry(first, f"o{first}", 0, size, count, 0, level), b"k%d" % first, 1)


def firsts(runs: list[list[_Held]]) -> list[list[int]]:
    return [[h.entry.first for h in run] for run in runs]


def test_full_runs_of_one_level_are_merged_and_a_partial_one_waits() -> None:
    entries = [held(i) for i in range(10)]
    runs, floor = plan(entries, 4, 1000)
    assert firsts(runs) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert floor == 0  # the first run's merged entry joins a level-1 run later


def test_a_level_change_a_hole_or_a_bad_entry_ends_a_run() -> None:
    entries = [held(0, level=1), held(1), held(2), held(3), held(4), held(6), held(7), held(8), held(9)]
    runs, floor = plan(entries, 3, 1000, frozenset({8}))
    # level 1 alone; 1-4 dense at level 0: [1,2,3] full, [4] ends at the hole; [6,7] ends at the bad 8.
    assert firsts(runs) == [[1, 2, 3]]
    assert floor == 0


def test_the_size_bound_closes_a_run_and_such_runs_are_not_looked_at_again() -> None:
    entries = [held(0, size=60), held(1, size=30), held(2, size=50), held(3, size=200), held(4, size=10)]
    runs, floor = plan(entries, 10, 100)
    # [0,1] closed by 2's size (merged), [2] closed by 3's (alone), [3] by 4's, [4] partial.
    assert firsts(runs) == [[0, 1]]
    assert floor == 4


def test_settings_stay_within_etcds_transaction_limit() -> None:
    with pytest.raises(ValueError):
        CompactionSettings(fan_in=121)
    with pytest.raises(ValueError):
        CompactionSettings(keep=0)
    assert IndexEntry.decode(0, IndexEntry(0, "o", 0, 1, 1, 0, 2).encode()).level == 2
    assert b'"l"' not in IndexEntry(0, "o", 0, 1, 1, 0).encode()  # a round's entry as before


# -- on etcd and SeaweedFS --------------------------------------------------------


@pytest.fixture
def servers(cluster_servers: tuple[str, object, str]) -> tuple[str, str]:
    """The suite's shared etcd and SeaweedFS (conftest.py)."""
    etcd_url, _etcd, s3_url = cluster_servers
    return etcd_url, s3_url


@attrs.frozen
class Cluster:
    etcd_url: str
    s3_url: str
    keys: ClusterKeys
    object_prefix: str
    etcd: Etcd
    store: ObjectStore

    async def owner(self) -> PartitionOwner:
        keeper = LeaseKeeper(self.etcd, 10)
        await keeper.grant()
        owner = PartitionOwner(self.etcd, self.store, keeper, TOPIC, 0, keys=self.keys, node=f"n-{keeper.lease:x}")
        assert await owner.acquire()
        return owner

    async def entries(self) -> list[IndexEntry]:
        prefix = self.keys.index_prefix(TOPIC, 0)
        kvs = (await self.etcd.get_prefix(prefix)).kvs
        return [IndexEntry.decode(int(kv.key[len(prefix) :]), kv.value) for kv in kvs]

    async def read_all(self) -> list[tuple[int, bytes]]:
        """Every batch, through a fresh reader, one read per batch."""
        reader = PartitionReader(self.etcd, self.store, TOPIC, 0, keys=self.keys)
        return await batches_from(reader.read, await reader.next_offset())


async def batches_from(read: Callable[[int, int], Awaitable[list[StoredBatch]]], end: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    offset = 0
    for _ in range(end + 1):  # bounded: a batch per read at least
        if offset >= end:
            break
        got = await read(offset, 1)
        assert got and got[0].base_offset == offset, (offset, got[:1])
        out.append((offset, got[0].batch))
        offset = got[0].next_offset
    assert offset == end
    return out


@pytest.fixture
async def cluster(servers: tuple[str, str], request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    etcd_url, s3_url = servers
    name = request.node.name
    async with Etcd(etcd_url) as etcd, ObjectStore(s3_url, BUCKET, prefix=f"{name}/") as store:
        with trio.fail_after(WAIT):
            await store.create_bucket()
        yield Cluster(etcd_url, s3_url, ClusterKeys(f"/c/{name}/".encode()), f"{name}/", etcd, store)


@asynccontextmanager
async def running_owner(
    cluster: Cluster, *, on_written: Callable[[str, bytes], None] | None = None
) -> AsyncIterator[PartitionOwner]:
    """A node's owner of the partition, acquired and committing rounds, for
    the body's duration (bounded by WAIT)."""
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            owner = await cluster.owner()
            owner.on_written = on_written
            nursery.start_soon(owner.run)
            yield owner
            nursery.cancel_scope.cancel()


async def rounds(owner: PartitionOwner, n: int, tag: str = "m") -> None:
    """``n`` commit rounds of one batch each (2 messages): ``n`` index entries."""
    for i in range(n):
        await owner.append(encode_batch([f"{tag}{i}a".encode(), f"{tag}{i}b".encode() * (i % 5 + 1)]))


async def compact_until_done(compactor: IndexCompactor) -> int:
    total = 0
    for _ in range(10):
        merged = await compactor.compact()
        if not merged:
            return total
        total += merged
    raise AssertionError("compaction did not settle in 10 passes")


async def test_merged_entries_read_back_the_same_bytes_and_superseded_objects_go(cluster: Cluster) -> None:
    async with running_owner(cluster) as owner:
        await rounds(owner, 30)
        before = await cluster.read_all()
        assert len(before) == 30 and len(await cluster.entries()) == 30
        compactor = IndexCompactor(owner, SMALL)
        # Pass 1: the 25 entries older than the newest 5 make six runs
        # of 4 at level 0 (one left); pass 2: four of those six level-1
        # entries make one at level 2; pass 3: nothing.
        assert await compact_until_done(compactor) == 7
        entries = await cluster.entries()
        assert [e.level for e in entries] == [2, 1, 1, 0, 0, 0, 0, 0, 0]
        assert [e.count for e in entries] == [32, 8, 8, 2, 2, 2, 2, 2, 2]
        assert all(a.first + a.count == b.first for a, b in zip(entries, entries[1:], strict=False))
        assert compactor.stats.entries_merged == 28 and compactor.stats.refused == 0
        assert await cluster.read_all() == before
        # The 28 objects it superseded are garbage: the janitor takes
        # them; the merged ones and the newest rounds' stay and read.
        swept = await Janitor(cluster.etcd, cluster.store, keys=cluster.keys, grace=0).sweep()
        assert (swept.deleted, swept.kept) == (28, 9)
        assert await cluster.read_all() == before
        # New rounds go on at the next offset; the next passes merge
        # again: two level-0 runs, then the four level-1 entries.
        await rounds(owner, 8, tag="n")
        assert await compact_until_done(compactor) == 3
        assert [e.level for e in await cluster.entries()] == [2, 2, 0, 0, 0, 0, 0, 0]
        after = await cluster.read_all()
        assert after[:30] == before and len(after) == 38


async def test_a_reader_that_held_a_replaced_entry_reads_the_merged_one(cluster: Cluster) -> None:
    """A node's index view that has not yet seen the compaction (its watch
    stopped here) names objects the janitor deleted: the read finds the
    entry that replaced it in etcd, instead of reporting the range lost."""
    async with running_owner(cluster) as owner:
        await rounds(owner, 20)
        before = await cluster.read_all()
        index = PartitionIndex(cluster.etcd, TOPIC, 0, keys=cluster.keys)
        async with trio.open_nursery() as following:
            await following.start(index.run)
            following.cancel_scope.cancel()  # the view keeps what it loaded: the old entries
        assert len(index) == 20
        reader = IndexedReader(index, RangeCache(cluster.store, max_bytes=1 << 20))
        assert await compact_until_done(IndexCompactor(owner, SMALL)) >= 3
        swept = await Janitor(cluster.etcd, cluster.store, keys=cluster.keys, grace=0).sweep()
        assert swept.deleted >= 12
        assert await batches_from(reader.read, 40) == before


async def test_a_former_owners_merge_changes_nothing(cluster: Cluster) -> None:
    async with running_owner(cluster) as old:
        await rounds(old, 12)
        before = await cluster.entries()
        # The partition moves on: the old owner's key goes (its lease
        # ran out, say) and a new owner takes it, with a new epoch.
        await cluster.etcd.delete(cluster.keys.own(TOPIC, 0))
        new = await cluster.owner()
        assert new.epoch != old.epoch and old.owning  # the old one does not know yet
        stale = IndexCompactor(old, SMALL)
        assert await stale.compact() == 0
        assert stale.stats.refused == 1
        assert await cluster.entries() == before
        # The new owner's merges are taken.
        assert await IndexCompactor(new, SMALL).compact() == 1
        assert len(await cluster.entries()) == len(before) - 3


async def test_an_entry_whose_bytes_do_not_check_is_left_alone(cluster: Cluster) -> None:
    async with running_owner(cluster) as owner:
        await rounds(owner, 14)
        entries = await cluster.entries()
        damaged = entries[2]
        data = bytearray(await cluster.store.get(damaged.object))
        data[len(data) // 2] ^= 0x40  # a flipped bit in a payload
        await cluster.store.delete(damaged.object)
        assert await cluster.store.put_if_absent(damaged.object, bytes(data))
        compactor = IndexCompactor(owner, SMALL)
        await compact_until_done(compactor)
        assert compactor.stats.damaged == 1
        after = await cluster.entries()
        assert damaged in after  # as it was
        # The run that held it (0-3) stays as it was, the next (4-7) is merged.
        assert [e.level for e in after] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
        reader = PartitionReader(cluster.etcd, cluster.store, TOPIC, 0, keys=cluster.keys)
        with pytest.raises(DataLoss) as lost:
            await reader.read(damaged.first)
        assert (lost.value.first, lost.value.reason) == (damaged.first, "damaged")
        got = await reader.read(damaged.first + damaged.count, 1)
        assert got[0].base_offset == damaged.first + damaged.count


# -- retention (retention.py) -------------------------------------------------------


async def sized_rounds(owner: PartitionOwner, n: int, *, timestamp: int | None = None) -> int:
    """``n`` rounds of one 1000-byte message each; an entry's size."""
    for i in range(n):
        await owner.append(encode_batch([b"%04d" % i + b"x" * 996]), timestamp)
    entries = await owner.etcd.get_prefix(owner.keys.index_prefix(TOPIC, 0), limit=1)
    return IndexEntry.decode(0, entries.kvs[0].value).size


async def test_retention_by_bytes_cuts_the_oldest_entries_and_keeps_the_newest(cluster: Cluster) -> None:
    async with running_owner(cluster) as owner:
        size = await sized_rounds(owner, 10)
        limits = Retention(max_bytes=size * 7 // 2)  # three and a half entries: three stay
        done = await cut(cluster.etcd, cluster.keys, TOPIC, 0, owner.epoch, limits, time.time_ns() // 1000)
        assert done == Cut(7, 7)
        assert [e.first for e in await cluster.entries()] == [7, 8, 9]
        # Below the first entry reads start there (the store says DATA_LOST for it).
        got = await PartitionReader(cluster.etcd, cluster.store, TOPIC, 0, keys=cluster.keys).read(0)
        assert [b.base_offset for b in got] == [7, 8, 9]
        # Nothing more to cut; a limit below one entry keeps the newest alone.
        assert await cut(cluster.etcd, cluster.keys, TOPIC, 0, owner.epoch, limits, 0) is None
        tiny = Retention(max_bytes=1)
        assert await cut(cluster.etcd, cluster.keys, TOPIC, 0, owner.epoch, tiny, 0) == Cut(2, 9)
        assert [e.first for e in await cluster.entries()] == [9]
        assert await cut(cluster.etcd, cluster.keys, TOPIC, 0, owner.epoch, tiny, 0) is None


async def test_retention_by_age_cuts_entries_whose_successor_began_before_the_cutoff(cluster: Cluster) -> None:
    async with running_owner(cluster) as owner:
        now = time.time_ns() // 1000
        await sized_rounds(owner, 5, timestamp=now - 1000 * 1_000_000)
        await sized_rounds(owner, 3, timestamp=now)
        limits = Retention(max_age=500.0)
        # Entries 0-3 go: the entry after each began 1000 s ago. Entry 4
        # stays: the one after it began now, so 4 may hold later messages.
        assert await cut(cluster.etcd, cluster.keys, TOPIC, 0, owner.epoch, limits, now) == Cut(4, 4)
        assert [e.first for e in await cluster.entries()] == [4, 5, 6, 7]
        assert await cut(cluster.etcd, cluster.keys, TOPIC, 0, owner.epoch, limits, now) is None
        # Much later everything but the newest entry goes.
        later = now + 3600 * 1_000_000
        assert await cut(cluster.etcd, cluster.keys, TOPIC, 0, owner.epoch, limits, later) == Cut(3, 7)


async def test_a_former_owners_cut_deletes_nothing(cluster: Cluster) -> None:
    async with running_owner(cluster) as old:
        await sized_rounds(old, 6)
        await cluster.etcd.delete(cluster.keys.own(TOPIC, 0))
        new = await cluster.owner()
        tiny = Retention(max_bytes=1)
        assert await cut(cluster.etcd, cluster.keys, TOPIC, 0, old.epoch, tiny, 0) is None
        assert len(await cluster.entries()) == 6
        assert await cut(cluster.etcd, cluster.keys, TOPIC, 0, new.epoch, tiny, 0) == Cut(5, 5)


async def test_a_merge_reads_the_rounds_the_nodes_cache_holds_from_memory(cluster: Cluster) -> None:
    """The owner puts each round's object in its read cache (its tail reads
    it there); compaction reads the same rounds from there, not the store."""
    cache = RangeCache(cluster.store, max_bytes=1 << 20)
    async with running_owner(cluster, on_written=cache.put) as owner:
        await rounds(owner, 13)
        before = await cluster.read_all()
        compactor = IndexCompactor(owner, SMALL, cache=cache)
        assert await compactor.compact() == 2  # 8 entries older than the newest 5
        stats = cache.statistics()
        assert (stats.hits, stats.fetches) == (8, 0)
        assert await cluster.read_all() == before
