"""What a cluster commit round keeps of its msg-ids in etcd, on real etcd
and SeaweedFS (pybroker.server.cluster.dedup, ``PartitionOwner.ids_writes``;
docs/cluster.md §3, §5, §7).

The broker's exactly-once window reads msg-ids back from a node's copy of
the topic; for a node taking a partition over beyond its copy, each round
with named batches writes ``ids/{topic}/{partition}/{first}`` (msg-id,
offset, count, time of each) in its transaction, under a window lease
that ends on its own. What a next owner does with them is tested with
broker processes in tests/test_cluster_broker.py
(``test_a_resend_older_than_the_next_owners_copy_is_not_stored_twice``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import attrs
import pytest
import trio

from helpers.cluster import Server, etcd_server, weed_server
from pybroker.protocol import encode_batch
from pybroker.server.cluster.dedup import decode_ids, encode_ids
from pybroker.server.cluster.etcd import Etcd
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.lease import LeaseKeeper
from pybroker.server.cluster.objects import ObjectStore
from pybroker.server.cluster.partition import PartitionOwner, PartitionReader

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

    async def owner(self, *, dedup_window: float = 60.0) -> PartitionOwner:
        keeper = LeaseKeeper(self.etcd, 10)
        await keeper.grant()
        owner = PartitionOwner(self.etcd, self.store, keeper, TOPIC, 0, keys=self.keys, dedup_window=dedup_window)
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


def test_ids_values_and_keys() -> None:
    named = [("order-1", 0, 2, 1_700_000_000_000_000), ("é/ü", 5, 1, 7)]
    assert decode_ids(encode_ids(named)) == named
    # Written whole by an owner: anything else is left out, never raised.
    assert decode_ids(b"not json") == [] and decode_ids(b'{"a": 1}') == []
    assert decode_ids(b'[["ok", 1, 1, 1], ["short", 1], [1, 1, 1, 1], ["bool", true, 1, 1]]') == [("ok", 1, 1, 1)]
    assert ClusterKeys(b"/p/").ids("a/b", 1, 42) == b"/p/ids/a%2Fb/1/00000000000000000042"


def rounds_of(*tags: str) -> list[tuple[bytes, int, int]]:
    return [(batch_of(tag, 1), 1, 1000 + i) for i, tag in enumerate(tags)]


async def test_a_round_with_msg_ids_writes_them_under_a_window_lease(cluster: Cluster) -> None:
    """A round's named batches go into one ``ids/`` key at its first offset,
    in its transaction, under a window lease of 1.25 x the window (not the
    member lease), shared by the rounds of the next window/4; a round
    without msg-ids writes none."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            assert await owner.append_round(rounds_of("plain")) == 0
            assert await owner.append_round(rounds_of("a", "b", "c"), ["id-a", None, "id-c"]) == 1
            assert await owner.append_round(rounds_of("d"), ["id-d"]) == 4
            nursery.cancel_scope.cancel()
        assert len(await cluster.stored()) == 5
        found = await cluster.etcd.get_prefix(cluster.keys.ids_prefix(TOPIC, 0))
        assert [kv.key for kv in found.kvs] == [cluster.keys.ids(TOPIC, 0, 1), cluster.keys.ids(TOPIC, 0, 4)]
        assert decode_ids(found.kvs[0].value) == [("id-a", 1, 1, 1000), ("id-c", 3, 1, 1002)]
        assert decode_ids(found.kvs[1].value) == [("id-d", 4, 1, 1000)]
        lease = found.kvs[0].lease
        assert lease not in (0, owner.keeper.lease) and found.kvs[1].lease == lease
        assert 60 <= await cluster.etcd.time_to_live(lease) <= 75
        assert owner.windows is not None and owner.windows.granted == 1


async def test_ids_keys_end_with_their_window_lease(cluster: Cluster) -> None:
    """With a 2 s window the key's lease (TTL 3 s, never renewed) ends on
    its own and takes the key with it, so etcd holds msg-ids for the window
    and no longer; a later round gets a new lease."""
    with trio.fail_after(WAIT):
        owner = await cluster.owner(dedup_window=2.0)
        key = cluster.keys.ids(TOPIC, 0, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            async with cluster.etcd.watch(key) as watch:
                assert await owner.append_round(rounds_of("w"), ["w"]) == 0
                put = await watch.__anext__()
                assert [e.type for e in put.events] == ["PUT"]
                assert 0 < await cluster.etcd.time_to_live(put.events[0].kv.lease) <= 3
                gone = await watch.__anext__()  # the window lease ends by itself
                assert [e.type for e in gone.events] == ["DELETE"]
            assert await owner.append_round(rounds_of("later"), ["later"]) == 1
            assert owner.windows is not None and owner.windows.granted == 2
            nursery.cancel_scope.cancel()
        assert await cluster.etcd.get(cluster.keys.ids(TOPIC, 0, 1)) is not None
