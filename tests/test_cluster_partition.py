"""One partition's append and read path on real etcd and SeaweedFS
(pybroker.server.cluster.partition; docs/cluster.md §4-§7).

An owner takes ``own/{topic}/{partition}`` under its lease (epoch = create
revision) and commits each window's appends as one object (conditional
PUT) and one etcd transaction fenced on its epoch and the expected next
offset; a reader on another connection finds offsets through the index in
etcd and fetches them with ranged GETs. Every test has its own key prefix
in etcd and object prefix in the bucket.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator

import attrs
import pytest
import trio

from helpers.cluster import Server, etcd_server, weed_server
from pybroker.protocol import encode_batch
from pybroker.server.cluster.entries import IndexEntry, decode_stored, encode_stored
from pybroker.server.cluster.etcd import Etcd, EtcdUnavailable, TxnResult
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.lease import LeaseKeeper
from pybroker.server.cluster.objects import ObjectStore, ObjectStoreError
from pybroker.server.cluster.outcomes import AppendFailed, NotOwner, OutcomeUnknown
from pybroker.server.cluster.partition import PartitionOwner, PartitionReader
from pybroker.server.storage.errors import DataLoss

WAIT = 30.0
TOPIC = "orders/eu"  # a "/" in the name: keys escape it
BUCKET = "pybroker-partition-tests"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server, str]]:
    """(etcd URL, etcd server, S3 endpoint), one of each for the module."""
    tmp = tmp_path_factory.mktemp("cluster")
    with etcd_server(tmp) as (etcd_url, etcd), weed_server(tmp) as (s3_url, _weed):
        yield etcd_url, etcd, s3_url


@attrs.frozen
class Cluster:
    etcd_url: str
    etcd_server: Server
    s3_url: str
    keys: ClusterKeys
    object_prefix: str
    etcd: Etcd
    store: ObjectStore

    def connect(self, *, timeout: float = 5.0) -> tuple[Etcd, ObjectStore]:
        """Another node's own connections to the same cluster."""
        return Etcd(self.etcd_url, timeout=timeout), ObjectStore(self.s3_url, BUCKET, prefix=self.object_prefix)

    def reader(self) -> PartitionReader:
        return PartitionReader(self.etcd, self.store, TOPIC, 0, keys=self.keys)

    async def owner(
        self, *, ttl: int = 10, window: float = 0.005, etcd: Etcd | None = None, store: ObjectStore | None = None
    ) -> PartitionOwner:
        """A node's owner of partition 0, with a fresh lease (not yet acquired)."""
        etcd = etcd or self.etcd
        keeper = LeaseKeeper(etcd, ttl)
        await keeper.grant()
        return PartitionOwner(
            etcd, store or self.store, keeper, TOPIC, 0, keys=self.keys, window=window, node=f"node-{keeper.lease:x}"
        )

    async def data_objects(self) -> list[str]:
        return [info.key for info in await self.store.list("data/")]

    async def indexed_objects(self) -> list[str]:
        prefix = self.keys.index_prefix(TOPIC, 0)
        kvs = (await self.etcd.get_prefix(prefix)).kvs
        return [IndexEntry.decode(int(kv.key[len(prefix) :]), kv.value).object for kv in kvs]


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


async def read_all(reader: PartitionReader, end: int) -> dict[int, bytes]:
    """Every batch from offset 0 to ``end``, by base offset, read in pieces
    (bounded: one read per batch at most), checking dense offsets."""
    out: dict[int, bytes] = {}
    offset = 0
    for _ in range(end + 1):
        if offset >= end:
            break
        batches = await reader.read(offset, max_bytes=1)
        assert batches and batches[0].base_offset == offset, (offset, batches[:1])
        for stored in batches:
            assert stored.base_offset == offset
            out[offset] = stored.batch
            offset = stored.next_offset
    assert offset == end
    assert await reader.read(end) == []
    return out


def test_stored_batches_round_trip_and_damage_is_refused() -> None:
    one, two = batch_of("a", 3), batch_of("b", 1)
    data = encode_stored(7, 3, 1000, one) + encode_stored(10, 1, 2000, two)
    assert [(b.base_offset, b.count, b.timestamp, b.batch) for b in decode_stored(data, 7, 4, "t")] == [
        (7, 3, 1000, one),
        (10, 1, 2000, two),
    ]
    damaged = bytearray(data)
    damaged[-1] ^= 1
    with pytest.raises(DataLoss, match="damaged"):
        decode_stored(bytes(damaged), 7, 4, "t")
    with pytest.raises(DataLoss):
        decode_stored(data, 7, 5, "t")  # the entry promises more than the bytes hold


async def test_acknowledged_appends_read_back_at_their_offsets(cluster: Cluster) -> None:
    """Sequential appends (one round each): dense offsets, and any node
    reads each batch back byte for byte from any offset inside it."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        assert await owner.acquire() and owner.epoch > 0 and owner.next_offset == 0
        sent: dict[int, bytes] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            for i, count in enumerate([1, 5, 2, 7, 1, 3]):
                batch = batch_of(f"seq{i}", count)
                base = await owner.append(batch)
                sent[base] = batch
            nursery.cancel_scope.cancel()
        assert sorted(sent) == [0, 1, 6, 8, 15, 16] and owner.next_offset == 19
        etcd, store = cluster.connect()
        async with etcd, store:
            reader = PartitionReader(etcd, store, TOPIC, 0, keys=cluster.keys)
            assert await reader.next_offset() == 19
            assert await read_all(reader, 19) == sent
            # An offset inside a batch reads from that batch on.
            inside = await reader.read(10, max_bytes=1)
            assert [(b.base_offset, b.batch) for b in inside] == [(8, sent[8])]
            everything = await reader.read(0, max_bytes=1 << 30)
            assert [b.base_offset for b in everything] == sorted(sent)
            # The entry holding an offset is found directly (a reverse range
            # read), not by scanning the index from its start.
            short = PartitionReader(etcd, store, TOPIC, 0, keys=cluster.keys, max_entries=1)
            assert [(b.base_offset, b.batch) for b in await short.read(17)] == [(16, sent[16])]
        assert len(await cluster.data_objects()) == 6
        assert sorted(await cluster.indexed_objects()) == sorted(await cluster.data_objects())


async def test_appends_in_one_window_go_into_one_object(cluster: Cluster) -> None:
    """Twenty concurrent appends within one (long) window: one object, one
    index entry, twenty dense acknowledged offsets."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner(window=2.0)
        assert await owner.acquire()
        sent: dict[int, bytes] = {}

        async def publish(i: int) -> None:
            batch = batch_of(f"c{i}", 1 + i % 4)
            sent[await owner.append(batch)] = batch

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            async with trio.open_nursery() as publishers:
                for i in range(20):
                    publishers.start_soon(publish, i)
            nursery.cancel_scope.cancel()
        total = sum(1 + i % 4 for i in range(20))
        assert len(sent) == 20 and owner.next_offset == total
        assert len(await cluster.data_objects()) == 1
        assert await cluster.indexed_objects() == await cluster.data_objects()
        assert await read_all(cluster.reader(), total) == sent


async def test_offsets_stay_dense_across_many_rounds(cluster: Cluster) -> None:
    """Waves of concurrent appends over many short rounds: every offset is
    assigned once, no gap, and what was acknowledged is what is read."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner(window=0.002)
        assert await owner.acquire()
        sent: dict[int, bytes] = {}

        async def publish(wave: int, i: int) -> None:
            batch = batch_of(f"w{wave}.{i}", 1 + (wave + i) % 3)
            base = await owner.append(batch)
            assert base not in sent
            sent[base] = batch

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            for wave in range(8):
                async with trio.open_nursery() as publishers:
                    for i in range(6):
                        publishers.start_soon(publish, wave, i)
            nursery.cancel_scope.cancel()
        total = sum(1 + (w + i) % 3 for w in range(8) for i in range(6))
        assert owner.next_offset == total and len(sent) == 48
        assert await read_all(cluster.reader(), total) == sent
        objects = await cluster.data_objects()
        assert 8 <= len(objects) <= 48 and sorted(await cluster.indexed_objects()) == sorted(objects)


async def test_two_owners_race_and_a_revoked_owner_is_fenced(cluster: Cluster) -> None:
    """Two nodes race for the partition: exactly one holds it. Its lease is
    then revoked behind its back (it still believes it owns the partition);
    the other takes over and appends; the old owner's append is refused by
    etcd, and every offset holds exactly what was acknowledged for it."""
    with trio.fail_after(WAIT):
        a, b = await cluster.owner(), await cluster.owner()
        won: dict[str, bool] = {}

        async def race(name: str, owner: PartitionOwner) -> None:
            won[name] = await owner.acquire()

        async with trio.open_nursery() as racers:
            racers.start_soon(race, "a", a)
            racers.start_soon(race, "b", b)
        assert sorted(won.values()) == [False, True]
        old, new = (a, b) if won["a"] else (b, a)
        assert new.holder == {"node": old.node, "addr": ""}
        with pytest.raises(NotOwner, match="not acquired"):
            await new.append(batch_of("loser", 1))
        sent: dict[int, bytes] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old.run)
            for i in range(3):
                batch = batch_of(f"old{i}", 2)
                sent[await old.append(batch)] = batch
            # The old owner's lease ends without it knowing (as if etcd
            # expired it while the owner was cut off).
            await cluster.etcd.revoke(old.keeper.lease)
            assert old.keeper.held()
            successor = await cluster.owner()
            assert await successor.acquire() and successor.epoch > old.epoch and successor.next_offset == 6
            nursery.start_soon(successor.run)
            # The old owner still expects next offset 6, which is right:
            # only its epoch makes etcd refuse it.
            refused = batch_of("refused", 4)
            with pytest.raises(NotOwner, match="fenced"):
                await old.append(refused)
            batch = batch_of("new0", 3)
            sent[await successor.append(batch)] = batch
            assert old.lost is not None and "fenced" in old.lost
            with pytest.raises(NotOwner):
                await old.append(batch_of("again", 1))  # no second try: it knows it lost the partition
            batch = batch_of("new1", 1)
            sent[await successor.append(batch)] = batch
            nursery.cancel_scope.cancel()
        assert sorted(sent) == [0, 2, 4, 6, 9]
        assert await read_all(cluster.reader(), 10) == sent
        # The refused round's object exists and nothing references it: garbage.
        orphans = set(await cluster.data_objects()) - set(await cluster.indexed_objects())
        assert len(orphans) == 1
        (orphan,) = orphans
        assert refused in await cluster.store.get(orphan)


async def test_a_released_partition_is_taken_over_at_once(cluster: Cluster) -> None:
    """Hand-over: the owner deletes its key (fenced on its epoch) and stops;
    the next owner takes the partition without waiting for a lease to end
    and continues densely."""
    with trio.fail_after(WAIT):
        old = await cluster.owner()
        assert await old.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old.run)
            first = batch_of("first", 2)
            assert await old.append(first) == 0
            assert await old.release()
            with pytest.raises(NotOwner, match="released"):
                await old.append(batch_of("after release", 1))
            nursery.cancel_scope.cancel()
        assert not await old.release()  # already not ours: the fenced delete is refused
        successor = await cluster.owner()
        assert await successor.acquire() and successor.next_offset == 2
        assert not await old.release()  # nor does it delete the successor's key
        assert (await cluster.etcd.get(cluster.keys.own(TOPIC, 0))).create_revision == successor.epoch  # type: ignore[union-attr]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(successor.run)
            second = batch_of("second", 1)
            assert await successor.append(second) == 2
            nursery.cancel_scope.cancel()
        assert await read_all(cluster.reader(), 3) == {0: first, 2: second}


async def test_an_owner_whose_lease_expired_acknowledges_nothing(cluster: Cluster) -> None:
    """The lease is not renewed: by its own clock the owner stops before
    etcd expires the lease, then the next owner continues densely."""
    with trio.fail_after(WAIT):
        old = await cluster.owner(ttl=2)
        assert await old.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old.run)
            first = batch_of("before", 2)
            assert await old.append(first) == 0
            async with cluster.etcd.watch(old.keys.own(TOPIC, 0)) as watch:
                batch = await watch.__anext__()  # etcd expires the lease, deleting the owner key
            assert [e.type for e in batch.events] == ["DELETE"]
            assert not old.keeper.held()
            with pytest.raises(NotOwner, match="deadline"):
                await old.append(batch_of("late", 1))
            nursery.cancel_scope.cancel()
        successor = await cluster.owner()
        assert await successor.acquire() and successor.next_offset == 2
        async with trio.open_nursery() as nursery:
            nursery.start_soon(successor.run)
            second = batch_of("after", 1)
            assert await successor.append(second) == 2
            nursery.cancel_scope.cancel()
        assert await read_all(cluster.reader(), 3) == {0: first, 2: second}


async def test_a_commit_past_the_deadline_is_not_acknowledged(cluster: Cluster) -> None:
    """The lease's deadline passes between PUT and transaction (injected:
    the hook moves safe_until to now). etcd still has the lease, so the
    transaction commits, but the owner acknowledges nothing and stops."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        assert await owner.acquire()

        async def deadline_passes(_name: str) -> None:
            owner.keeper.safe_until = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            owner.before_commit = deadline_passes
            late = batch_of("late", 2)
            with pytest.raises(OutcomeUnknown, match="not acknowledged"):
                await owner.append(late)
            with pytest.raises(NotOwner):
                await owner.append(batch_of("after", 1))
            nursery.cancel_scope.cancel()
        # It did commit (the outcome the publisher must treat as unknown).
        assert await read_all(cluster.reader(), 2) == {0: late}


async def test_a_crash_between_put_and_commit_changes_no_offset(cluster: Cluster) -> None:
    """A fault after the PUT and before the transaction: the append is not
    acknowledged, next offset and index are unchanged, the object is an
    orphan; the same owner's next append and, after the owner "dies", a new
    owner's are both dense."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        assert await owner.acquire()
        sent: dict[int, bytes] = {}

        async def crash(_name: str) -> None:
            raise RuntimeError("injected crash between PUT and transaction")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            batch = batch_of("ok", 3)
            sent[await owner.append(batch)] = batch
            owner.before_commit = crash
            with pytest.raises(OutcomeUnknown, match="injected crash"):
                await owner.append(batch_of("lost", 2))
            owner.before_commit = None
            reader = cluster.reader()
            assert await reader.next_offset() == 3
            assert len(await cluster.data_objects()) == 2 and len(await cluster.indexed_objects()) == 1
            batch = batch_of("same-owner", 1)
            assert await owner.append(batch) == 3
            sent[3] = batch
            owner.before_commit = crash
            with pytest.raises(OutcomeUnknown):
                await owner.append(batch_of("lost-again", 4))
            nursery.cancel_scope.cancel()
        # The owner dies: its lease ends; a new owner continues from 4.
        await cluster.etcd.revoke(owner.keeper.lease)
        successor = await cluster.owner()
        assert await successor.acquire() and successor.next_offset == 4
        async with trio.open_nursery() as nursery:
            nursery.start_soon(successor.run)
            batch = batch_of("successor", 2)
            assert await successor.append(batch) == 4
            sent[4] = batch
            nursery.cancel_scope.cancel()
        assert await read_all(cluster.reader(), 6) == sent
        orphans = set(await cluster.data_objects()) - set(await cluster.indexed_objects())
        assert len(orphans) == 2


async def test_a_tombstoned_object_cannot_be_committed(cluster: Cluster) -> None:
    """The janitor tombstones the round's object between PUT and commit
    (injected): the commit is refused, nothing is acknowledged."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        assert await owner.acquire()

        async def janitor(name: str) -> None:
            await cluster.etcd.put(cluster.keys.gone(name), b"")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            owner.before_commit = janitor
            with pytest.raises(NotOwner, match="tombstoned"):
                await owner.append(batch_of("collected", 1))
            nursery.cancel_scope.cancel()
        assert await cluster.reader().next_offset() == 0 and await cluster.indexed_objects() == []


async def test_an_append_whose_next_offset_moved_is_refused(cluster: Cluster) -> None:
    """Someone else moved the next offset under the owner (a bug elsewhere,
    injected by a direct write): the commit's compare refuses the round,
    which would otherwise overwrite offsets, and the owner stops."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        assert await owner.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            first = batch_of("first", 2)
            assert await owner.append(first) == 0
            await cluster.etcd.put(cluster.keys.next(TOPIC, 0), b"1")
            with pytest.raises(NotOwner, match="next offset moved: expected 2, etcd has 1"):
                await owner.append(batch_of("second", 1))
            nursery.cancel_scope.cancel()
        assert await cluster.indexed_objects() == (await cluster.data_objects())[:1]
        assert [b.batch for b in await cluster.reader().read(0)] == [first]


async def around_a_fault(owner: PartitionOwner, arm: Callable[[], None], faulty: bytes) -> dict[int, bytes]:
    """Acquire and run ``owner``; append a first batch, then ``arm()`` a
    fault and append ``faulty`` (an AppendFailed leaves it out), then one
    more batch. What was acknowledged, by offset."""
    assert await owner.acquire()
    sent: dict[int, bytes] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner.run)
        for i, batch in enumerate([batch_of("first", 2), faulty, batch_of("after", 1)]):
            if i == 1:
                arm()
            try:
                sent[await owner.append(batch)] = batch
            except AppendFailed:
                assert i == 1
        nursery.cancel_scope.cancel()
    return sent


class LosesFirstCommitAnswer(Etcd):
    """An etcd client that loses the answer to its first transaction once
    armed, in one of three ways: ``applied`` (etcd ran it, the answer never
    came), ``unsent`` (the connection broke before it was sent), ``stopped``
    (etcd is SIGSTOPped while it is sent, so the client times out, then
    resumed: whether etcd ran it is up to etcd)."""

    def __init__(self, url: str, server: Server, mode: str) -> None:
        super().__init__(url, timeout=1.0)
        self.server = server
        self.mode = mode
        self.armed = False
        self.lost_answers = 0

    async def txn(self, *args, **kwargs) -> TxnResult:  # type: ignore[no-untyped-def]
        if not self.armed:
            return await super().txn(*args, **kwargs)
        self.armed = False
        self.lost_answers += 1
        if self.mode == "applied":
            assert (await super().txn(*args, **kwargs)).succeeded
        elif self.mode == "stopped":
            self.server.pause()
            try:
                with pytest.raises(EtcdUnavailable):
                    await super().txn(*args, **kwargs)
            finally:
                self.server.resume()
        raise EtcdUnavailable(f"injected: the commit's answer was lost ({self.mode})")


@pytest.mark.parametrize("mode", ["applied", "unsent", "stopped"])
async def test_a_lost_commit_answer_is_resolved_from_the_index(cluster: Cluster, mode: str) -> None:
    """The transaction's answer is lost: the owner reads the index back and
    either finds its commit (applied) or sends the transaction again
    (unsent); either way the append is acknowledged once, at the next
    offset, and stored once, and the next append follows it densely."""
    with trio.fail_after(WAIT):
        etcd = LosesFirstCommitAnswer(cluster.etcd_url, cluster.etcd_server, mode)
        async with etcd:
            owner = await cluster.owner(etcd=etcd)
            sent = await around_a_fault(owner, lambda: setattr(etcd, "armed", True), batch_of("answer-lost", 3))
            assert etcd.lost_answers == 1
        assert list(sent) == [0, 2, 5]
        assert await read_all(cluster.reader(), 6) == sent
        assert len(await cluster.indexed_objects()) == 3 == len(await cluster.data_objects())


class FailsFirstPut(ObjectStore):
    """An object store whose first conditional PUT fails: ``applied`` (the
    object is stored, then the answer is lost: status 0), ``unsent`` (lost
    before it reached the store), ``busy`` (503 SlowDown), or ``forbidden``
    (403, which no retry mends)."""

    def __init__(self, endpoint: str, prefix: str, mode: str) -> None:
        super().__init__(endpoint, BUCKET, prefix=prefix)
        self.mode = mode
        self.armed = False
        self.puts = 0

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        self.puts += 1
        if not self.armed:
            return await super().put_if_absent(key, data)
        self.armed = False
        if self.mode == "applied":
            assert await super().put_if_absent(key, data)
        failures = {"applied": (0, ""), "unsent": (0, ""), "busy": (503, "SlowDown"), "forbidden": (403, "AccessDenied")}
        status, code = failures[self.mode]
        raise ObjectStoreError(f"injected: put {key} failed ({self.mode})", status, code)


@pytest.mark.parametrize("mode", ["applied", "unsent", "busy", "forbidden"])
async def test_a_put_that_may_pass_is_tried_again(cluster: Cluster, mode: str) -> None:
    """A PUT whose answer was lost, or that the store was too busy for, is
    tried again (a 412 then means the first try stored it): the append is
    acknowledged once, at its offset, in one object. A refusal no retry
    mends (403) refuses the append at once, and the next takes its offset."""
    with trio.fail_after(WAIT):
        store = FailsFirstPut(cluster.s3_url, cluster.object_prefix, mode)
        async with store:
            owner = await cluster.owner(store=store)
            sent = await around_a_fault(owner, lambda: setattr(store, "armed", True), batch_of("put-failed", 3))
        if mode == "forbidden":
            assert list(sent) == [0, 2]  # refused: the next append took its offset
            assert (store.puts, owner.rounds.put_retries) == (3, 0)
        else:
            assert list(sent) == [0, 2, 5]
            assert (store.puts, owner.rounds.put_retries) == (4, 1)
        assert await read_all(cluster.reader(), 3 if mode == "forbidden" else 6) == sent
        assert len(await cluster.indexed_objects()) == len(sent) == len(await cluster.data_objects())


def test_keys_escape_topic_names() -> None:
    keys = ClusterKeys(b"/p/")
    assert keys.own("a/b", 0) == b"/p/own/a%2Fb/0"
    assert keys.index("a%b", 3, 42) == b"/p/idx/a%25b/3/00000000000000000042"
    # One topic's index prefix does not reach a topic whose name extends it.
    assert not keys.index("a/b", 0, 0).startswith(keys.index_prefix("a", 0))
    assert json.loads(IndexEntry(0, "data/x", 0, 10, 1, 5).encode()) == {"o": "data/x", "b": 0, "n": 10, "c": 1, "ts": 5}
