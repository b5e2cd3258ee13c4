"""Exactly-once appends in cluster mode on real etcd and SeaweedFS
(PartitionOwner.append_once, pybroker.server.cluster.dedup;
docs/cluster.md §3, §5).

An exactly-once batch commits ``dedup/{topic}/{partition}/{msg-id}`` =
``"{base} {count}"`` in its round's transaction, under a window lease that
ends on its own; a resend, to the same owner or to a later one, gets the
original's offsets and is not stored again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
import trio

from helpers.cluster import Server, etcd_server, weed_server
from pybroker.protocol import encode_batch
from pybroker.server.cluster.dedup import DedupMemory, decode_entry, encode_entry
from pybroker.server.cluster.etcd import Etcd, EtcdUnavailable, KeyValue, TxnResult
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.lease import LeaseKeeper
from pybroker.server.cluster.objects import ObjectStore
from pybroker.server.cluster.outcomes import MsgIdConflict, NotOwner, OutcomeUnknown
from pybroker.server.cluster.partition import Appended, PartitionOwner, PartitionReader

WAIT = 30.0
TOPIC = "pay/ments"
BUCKET = "pybroker-dedup-tests"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server, str]]:
    tmp = tmp_path_factory.mktemp("cluster")
    with etcd_server(tmp) as (etcd_url, etcd), weed_server(tmp) as (s3_url, _weed):
        yield etcd_url, etcd, s3_url


@attrs.frozen
class Cluster:
    etcd_url: str
    s3_url: str
    keys: ClusterKeys
    etcd: Etcd
    store: ObjectStore

    async def owner(self, *, window: float = 0.005, dedup_window: float = 60.0, etcd: Etcd | None = None) -> PartitionOwner:
        etcd = etcd or self.etcd
        keeper = LeaseKeeper(etcd, 10)
        await keeper.grant()
        owner = PartitionOwner(
            etcd, self.store, keeper, TOPIC, 0, keys=self.keys, window=window, dedup_window=dedup_window
        )
        assert await owner.acquire()
        return owner

    async def stored(self) -> list[bytes]:
        """Every batch of the partition, in offset order (dense from 0)."""
        reader = PartitionReader(self.etcd, self.store, TOPIC, 0, keys=self.keys)
        end = await reader.next_offset()
        out, offset = [], 0
        for _ in range(end + 1):
            if offset >= end:
                break
            for b in await reader.read(offset):
                assert b.base_offset == offset
                out.append(b.batch)
                offset = b.next_offset
        assert offset == end
        return out


@pytest.fixture
async def cluster(servers: tuple[str, Server, str], request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    etcd_url, _etcd, s3_url = servers
    name = request.node.name
    async with Etcd(etcd_url) as etcd, ObjectStore(s3_url, BUCKET, prefix=f"{name}/") as store:
        with trio.fail_after(WAIT):
            await store.create_bucket()
        yield Cluster(etcd_url, s3_url, ClusterKeys(f"/t/{name}/".encode()), etcd, store)


def batch_of(tag: str, count: int) -> bytes:
    return encode_batch([f"{tag}#{i}".encode() for i in range(count)])


def test_entries_and_memory() -> None:
    assert decode_entry(encode_entry(42, 3)) == (42, 3)
    for bad in (b"", b"1", b"1 0", b"a b", b"1 2 3", b"-1 2"):
        with pytest.raises(ValueError):
            decode_entry(bad)
    memory = DedupMemory(max_ids=2)
    memory.remember(b"a", 0, 1, expires=10.0)
    memory.remember(b"b", 1, 1, expires=10.0)
    memory.remember(b"c", 2, 1, expires=10.0)  # over the bound: the oldest goes
    assert memory.find(b"a", 0.0) is None and memory.find(b"c", 0.0) is not None
    assert memory.find(b"b", 10.0) is None  # expired
    keys = ClusterKeys(b"/p/")
    assert keys.dedup("a/b", 1, b"\xff\x00id") == b"/p/dedup/a%2Fb/1/_wBpZA"  # base64url, unpadded


async def test_a_resent_batch_is_stored_once(cluster: Cluster) -> None:
    """Resends after the acknowledgement and concurrent duplicates within
    one round get the original's offsets; the batch is stored once; the
    same msg-id with another count is refused; the entry is in etcd under
    a window lease of 1.25 x the window."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner(window=0.5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            first = batch_of("first", 2)
            assert await owner.append_once(first, b"id-1") == Appended(0, 2, duplicate=False)
            assert await owner.append_once(first, b"id-1") == Appended(0, 2, duplicate=True)
            with pytest.raises(MsgIdConflict, match="already names a batch of 2 messages at offset 0"):
                await owner.append_once(batch_of("other", 3), b"id-1")
            plain = batch_of("plain", 1)
            assert await owner.append(plain) == 2  # without a msg-id: stored whatever
            answers: list[Appended] = []

            async def send(batch: bytes) -> None:
                answers.append(await owner.append_once(batch, b"id-concurrent"))

            concurrent = batch_of("concurrent", 4)
            async with trio.open_nursery() as senders:
                for _ in range(5):
                    senders.start_soon(send, concurrent)
            assert sorted(answers, key=lambda a: a.duplicate) == [Appended(3, 4)] + [Appended(3, 4, True)] * 4
            assert owner.duplicates == 5
            with pytest.raises(ValueError):
                await owner.append_once(first, b"")
            with pytest.raises(ValueError):
                await owner.append_once(first, b"x" * 129)
            nursery.cancel_scope.cancel()
        assert await cluster.stored() == [first, plain, concurrent]
        entry = await cluster.etcd.get(cluster.keys.dedup(TOPIC, 0, b"id-1"))
        assert entry is not None and entry.value == b"0 2"
        assert entry.lease not in (0, owner.keeper.lease)  # a window lease, not the member lease
        assert 60 <= await cluster.etcd.time_to_live(entry.lease) <= 75


async def test_a_new_owner_answers_the_former_owners_msg_ids(cluster: Cluster) -> None:
    """The owner commits an exactly-once batch but cannot acknowledge it
    (its lease passes its deadline during the commit), then dies; the
    publisher resends to the next owner, which finds the msg-id in etcd and
    answers with the original offsets without storing it again."""
    with trio.fail_after(WAIT):
        old = await cluster.owner()

        async def deadline_passes(_name: str) -> None:
            old.keeper.safe_until = trio.current_time()

        batch = batch_of("once", 3)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old.run)
            assert await old.append_once(batch_of("before", 1), b"before") == Appended(0, 1)
            old.before_commit = deadline_passes
            with pytest.raises(OutcomeUnknown, match="not acknowledged"):
                await old.append_once(batch, b"the-id")
            with pytest.raises(NotOwner):
                await old.append_once(batch, b"the-id")  # it answers nothing more, not even from memory
            nursery.cancel_scope.cancel()
        await cluster.etcd.revoke(old.keeper.lease)  # it dies
        new = await cluster.owner()
        assert new.epoch > old.epoch and new.next_offset == 4
        async with trio.open_nursery() as nursery:
            nursery.start_soon(new.run)
            assert await new.append_once(batch, b"the-id") == Appended(1, 3, duplicate=True)
            assert await new.append_once(batch_of("before", 1), b"before") == Appended(0, 1, duplicate=True)
            after = batch_of("after", 1)
            assert await new.append_once(after, b"after") == Appended(4, 1)
            nursery.cancel_scope.cancel()
        assert await cluster.stored() == [batch_of("before", 1), batch, after]


class LosesAnswersWhileArmed(Etcd):
    """Once armed, the next transaction is applied but its answer lost, and
    every call after it fails as unreachable until disarmed: the owner
    cannot resolve the round, whose outcome stays unknown."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout=2.0)
        self.armed = False
        self.applied = False

    async def txn(self, *args: Any, **kwargs: Any) -> TxnResult:
        if self.armed:
            if not self.applied:
                self.applied = True
                assert (await super().txn(*args, **kwargs)).succeeded
            raise EtcdUnavailable("injected: no answer")
        return await super().txn(*args, **kwargs)

    async def get(self, key: bytes) -> KeyValue | None:
        if self.armed:
            raise EtcdUnavailable("injected: no answer")
        return await super().get(key)


async def test_a_resend_after_an_unknown_outcome_is_read_back_from_etcd(cluster: Cluster) -> None:
    """A round's commit is applied but the owner never learns it (every
    answer lost until it gives up: outcome unknown). The resend of its
    exactly-once batch reads the msg-id back from etcd and gets the
    original's offsets; a resend of one whose commit never happened (a
    fault between PUT and transaction) is stored then."""
    with trio.fail_after(WAIT):
        etcd = LosesAnswersWhileArmed(cluster.etcd_url)
        async with etcd:
            owner = await cluster.owner(etcd=etcd)

            async def crash(_name: str) -> None:
                raise RuntimeError("injected crash between PUT and transaction")

            applied, crashed = batch_of("applied", 2), batch_of("crashed", 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(owner.run)
                etcd.armed = True
                with pytest.raises(OutcomeUnknown, match="could not be confirmed"):
                    await owner.append_once(applied, b"applied")
                etcd.armed = False
                owner.before_commit = crash
                with pytest.raises(OutcomeUnknown, match="injected crash"):
                    await owner.append_once(crashed, b"crashed")
                owner.before_commit = None
                assert await owner.append_once(applied, b"applied") == Appended(0, 2, duplicate=True)
                assert await owner.append_once(crashed, b"crashed") == Appended(2, 1)
                nursery.cancel_scope.cancel()
        assert await cluster.stored() == [applied, crashed]


async def test_msg_ids_end_with_their_window_lease(cluster: Cluster) -> None:
    """With a 2 s window the entry's lease (TTL 3 s, never renewed) ends on
    its own and takes the entry with it; a send of the same msg-id after
    that is stored again, as on a single node after the window."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner(dedup_window=2.0)
        batch = batch_of("windowed", 1)
        key = cluster.keys.dedup(TOPIC, 0, b"w")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            async with cluster.etcd.watch(key) as watch:
                assert await owner.append_once(batch, b"w") == Appended(0, 1)
                put = await watch.__anext__()
                assert [e.type for e in put.events] == ["PUT"]
                assert 0 < await cluster.etcd.time_to_live(put.events[0].kv.lease) <= 3
                assert await owner.append_once(batch, b"w") == Appended(0, 1, duplicate=True)
                gone = await watch.__anext__()  # the window lease ends by itself
                assert [e.type for e in gone.events] == ["DELETE"]
            assert await owner.append_once(batch, b"w") == Appended(1, 1)
            assert owner.windows is not None and owner.windows.granted == 2  # a new lease for the later entry
            nursery.cancel_scope.cancel()
        assert await cluster.stored() == [batch, batch]
