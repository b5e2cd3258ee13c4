"""Partitioned topics in cluster mode (docs/cluster.md §2, protocol.md
"Partitioned topics"), against a real etcd and a real SeaweedFS on
loopback: TOPICS create writes the topic's record with its count; the
ownership manager gives each partition its own owner, spread over the
nodes; a partition's publishes go to its owner (NOT_OWNER elsewhere, naming
it), each partition's offsets are dense and committed under its own keys;
subscribers on every node read every partition."""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import pybroker
import trio

from helpers.cluster_broker import (  # noqa: F401 (servers, urls: fixtures)
    WAIT,
    addr_of,
    cluster_node,
    hello,
    servers,
    stop_gracefully,
    store_of,
    urls,
    wait_for,
)
from helpers.raw import raw_client
from pybroker.protocol import Error, ErrorCode, Publish, decode_batch, encode_batch, partition_topic
from pybroker.server.cluster.partition import PartitionReader
from pybroker.server.server import Server

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

PARTITIONS = 8


def partition_owners(nodes: list[Server], topic: str, partitions: int) -> list[str] | None:
    """Each partition's owner (``host:port``) once ownership has settled:
    every node sees the others, one node holds it and takes appends, every
    node names that one, and it is the one the ranking puts first (right
    after the topic is made a node that has not seen another yet may take
    a partition, and then hands it over: helpers/cluster_broker.py's
    settled_owner)."""
    names = {store_of(n).manager.node for n in nodes if store_of(n).manager is not None}  # type: ignore[union-attr]
    if any(store_of(n).manager is None or set(store_of(n).manager.membership.members) != names for n in nodes):  # type: ignore[union-attr]
        return None
    owners = []
    for p in range(partitions):
        holders = []
        for node in nodes:
            manager = store_of(node).manager
            if manager is None:
                return None
            owner = manager.local(topic, p)
            if owner is not None and owner.accepting:
                holders.append(node)
        if len(holders) != 1:
            return None
        for node in nodes:
            manager = store_of(node).manager
            assert manager is not None
            info = manager.owner_of(topic, p)
            if info is None or info.addr != addr_of(holders[0]) or manager.first_choice(topic, p) != info.node:
                return None
        owners.append(addr_of(holders[0]))
    return owners


async def settled_partitions(nodes: list[Server], topic: str, partitions: int) -> list[str]:
    """Each partition's owner, once ownership has settled and every node
    knows the topic's count (its view of the topics follows etcd's watch
    and may lag the owner keys': until then a node answers a partition's
    publish with NOT_OWNER and no owner, "ask again shortly")."""
    await wait_for(lambda: all(store_of(n).partition_count(topic) == partitions for n in nodes))
    await wait_for(lambda: partition_owners(nodes, topic, partitions) is not None)
    owners = partition_owners(nodes, topic, partitions)
    assert owners is not None
    return owners


async def test_partitions_are_owned_across_the_nodes_and_read_on_each(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        async with pybroker.connect(a.url) as admin:
            assert await admin.create_topic("orders", partitions=PARTITIONS) == {
                "topic": "orders",
                "partitions": PARTITIONS,
                "created": True,
            }
        # Another node sees the same record: the same count again is no
        # change, another count is refused.
        async with pybroker.connect(b.url) as admin:
            assert (await admin.create_topic("orders", partitions=PARTITIONS))["created"] is False
            with pytest.raises(pybroker.BrokerError) as other_count:
                await admin.create_topic("orders", partitions=2)
            assert other_count.value.code == ErrorCode.BAD_REQUEST
        owners = await settled_partitions(nodes, "orders", PARTITIONS)
        # Rendezvous hashing over 8 partitions leaves a node none with
        # probability 2/256; these node names give each some.
        assert set(owners) == {addr_of(a), addr_of(b)}, owners

        # The topic itself is refused on every node with its count; a
        # partition on a node that does not own it, naming its owner.
        for node in nodes:
            async with raw_client(node) as raw:
                await hello(raw, "raw")
                await raw.send_event(Publish(1, "orders", encode_batch([b"x"])))
                refused = await raw.next_event()
                assert isinstance(refused, Error) and refused.code == ErrorCode.PARTITIONED, refused
                assert refused.fields["partitions"] == str(PARTITIONS)
                elsewhere = next(p for p, owner in enumerate(owners) if owner != addr_of(node))
                await raw.send_event(Publish(2, partition_topic("orders", elsewhere), encode_batch([b"x"])))
                redirected = await raw.next_event()
                assert isinstance(redirected, Error) and redirected.code == ErrorCode.NOT_OWNER, redirected
                assert redirected.fields["owner"] == owners[elsewhere]

        both = f"pybroker://{addr_of(a)},{addr_of(b)}"
        keys = [f"customer-{i % 16}" for i in range(120)]
        async with pybroker.connect(a.url) as on_a, pybroker.connect(b.url) as on_b:
            subs = [await on_a.subscribe("orders", start="earliest"), await on_b.subscribe("orders", start="earliest")]
            # A publisher that knows nothing: refused with the count, then
            # each message to its key's partition, at that partition's
            # owner: through its own connection (to a) for a's partitions,
            # through one more, to b, for b's, without moving (before
            # connections per owner, 45 moves for these 120 publishes).
            async with pybroker.connect(both, name="publisher", reconnect=True) as pub:
                acks = [await pub.publish("orders", b"%d" % i, {"key": key}) for i, key in enumerate(keys)]
                assert pub.reconnects == 0
                assert pub._owners is not None and list(pub._owners.peers) == [addr_of(b)]
            per_partition: dict[str, list[int]] = defaultdict(list)
            for key, ack in zip(keys, acks):
                assert ack.topic == partition_topic("orders", zlib.crc32(key.encode()) % PARTITIONS)
                per_partition[ack.topic].append(ack.offset)
            for offsets in per_partition.values():
                assert offsets == list(range(len(offsets)))
            # Every node's subscriber gets each message once, each key's in order.
            for sub in subs:
                got: dict[str, list[int]] = defaultdict(list)
                with trio.fail_after(WAIT):
                    async for m in sub:
                        got[m.headers["key"]].append(int(m.payload))
                        if sum(map(len, got.values())) == len(keys):
                            break
                for key in set(keys):
                    assert got[key] == [i for i, k in enumerate(keys) if k == key]

        # Each partition is committed under its own keys, read back from
        # etcd and the object store.
        store = store_of(a)
        for name, offsets in per_partition.items():
            p = int(name.rpartition("~")[2])
            reader = PartitionReader(store.etcd, store.objects, "orders", p, keys=store.settings.keys)
            stored = [int(payload) for b in await reader.read(0, 1 << 20) for payload, _ in decode_batch(b.batch)]
            assert stored == [i for i, ack in enumerate(acks) if ack.topic == name]


async def test_pipelined_publishes_refused_by_a_node_reach_the_owner_in_order(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """Thousands of sends in flight to a node that does not own the topic:
    the client stops sending that topic there at the first NOT_OWNER,
    waits for the answers it is owed, and hands everything not yet
    acknowledged to the owner's connection in the order it was queued; its
    subscription stays on the first node."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        async with pybroker.connect(a.url) as admin:
            await admin.create_topic("lines", partitions=2)
        owners = await settled_partitions(nodes, "lines", 2)
        # A client on the node that does not own partition 0.
        other = b if owners[0] == addr_of(a) else a
        async with pybroker.connect(other.url, name="pipelined", reconnect=True) as client:
            sub = await client.subscribe(partition_topic("lines", 0), start="earliest")
            pendings = [await client.send(partition_topic("lines", 0), b"%d" % i) for i in range(3000)]
            acks = [await p.wait() for p in pendings]
            assert [ack.offset for ack in acks] == list(range(3000))
            assert client.reconnects == 0 and client.connected
            got = []
            with trio.fail_after(WAIT):
                async for m in sub:
                    got.append(int(m.payload))
                    if len(got) == 3000:
                        break
            assert got == list(range(3000))
            # Later publishes go straight to the owner's connection.
            assert (await client.publish(partition_topic("lines", 0), b"later")).offset == 3000


async def test_one_partition_is_purged_on_every_node_and_the_others_keep_theirs(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """Offsets are per partition, so purges are: the floor goes into the
    topic's record for that partition alone (``floors``), etcd loses that
    partition's entries before it, every node's copy follows."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        async with pybroker.connect(a.url) as admin:
            await admin.create_topic("logs", partitions=2)
        owners = await settled_partitions(nodes, "logs", 2)
        for p in (0, 1):
            owner = a if owners[p] == addr_of(a) else b
            async with pybroker.connect(owner.url) as pub:
                for i in range(5):  # one at a time: a round, so an index entry, each
                    assert (await pub.publish(partition_topic("logs", p), b"%d" % i)).offset == i
        await wait_for(
            lambda: all(store_of(n).topic(partition_topic("logs", p)).next_offset == 5 for n in nodes for p in (0, 1))
        )
        # Purged through the node that does not own partition 1.
        other = b if owners[1] == addr_of(a) else a
        async with pybroker.connect(other.url) as admin:
            answer = await admin.purge_topic(partition_topic("logs", 1), keep_from=3)
        assert answer == {"topic": "logs~1", "first_offset": 3, "next_offset": 5, "purged": 3}
        store = store_of(a)
        for p, first in ((0, 0), (1, 3)):
            prefix = store.settings.keys.index_prefix("logs", p)
            kept = [int(kv.key[len(prefix) :]) for kv in (await store.etcd.get_prefix(prefix)).kvs]
            assert kept == list(range(first, 5)), (p, kept)
        await wait_for(lambda: all(store_of(n).topic("logs~1").first_offset == 3 for n in nodes))
        assert all(store_of(n).topic("logs~0").first_offset == 0 for n in nodes)
        for node in nodes:
            async with pybroker.connect(node.url) as c:
                async with c.subscribe("logs", start="earliest") as sub:
                    got = []
                    with trio.fail_after(WAIT):
                        async for m in sub:
                            got.append((m.topic, m.offset))
                            if len(got) == 7:
                                break
            assert sorted(got) == [("logs~0", i) for i in range(5)] + [("logs~1", 3), ("logs~1", 4)]


async def saved_group(node: Server, group: str, topic: str, partitions: int) -> list[dict[str, Any] | None]:
    """The group's saved state in each partition of ``topic``, from etcd."""
    store = store_of(node)
    out: list[dict[str, Any] | None] = []
    for p in range(partitions):
        kv = await store.etcd.get(store.settings.keys.group(group, topic, p))
        out.append(None if kv is None else json.loads(kv.value))
    return out


async def test_a_group_over_a_partitioned_topic_reads_every_partition_and_resumes_each(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """A consumer group over a partitioned topic runs at the owner of its
    partition 0 and reads every partition from that node's copies, wherever
    each is committed; ordering=key keeps each key's messages in order
    across two members. Its state is saved per partition
    (``grp/{group}/{topic}/{p}``), so after a graceful stop of that node the
    other resumes each partition where it was: nothing acked comes again."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        async with pybroker.connect(a.url) as admin:
            await admin.create_topic("jobs", partitions=4)
        owners = await settled_partitions(nodes, "jobs", 4)
        assert set(owners) == {addr_of(a), addr_of(b)}, owners  # the group reads partitions of both
        both = f"pybroker://{addr_of(a)},{addr_of(b)}"
        keys = [f"k{i % 9}" for i in range(60)]
        async with pybroker.connect(both, name="publisher", reconnect=True) as pub:
            acks = [await pub.publish("jobs", b"%d" % i, {"key": key}) for i, key in enumerate(keys)]
        counts = [sum(1 for ack in acks if ack.topic == partition_topic("jobs", p)) for p in range(4)]
        got: dict[str, list[int]] = defaultdict(list)
        seen: list[tuple[str, int]] = []

        async def member(name: str) -> None:
            async with pybroker.connect(both, name=name, reconnect=True) as m:
                async with m.subscribe(
                    "jobs", group="workers", start="earliest", ordering="key", auto_ack=False, max_ack_pending=5
                ) as sub:
                    async for message in sub:
                        got[message.headers["key"]].append(int(message.payload))
                        seen.append((message.topic, message.offset))
                        await message.ack()
                        if len(seen) == len(keys):
                            await m.ping()  # the last ack is sent
                            nursery.cancel_scope.cancel()

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(member, "one")
                nursery.start_soon(member, "two")
        assert sorted(seen) == sorted((ack.topic, ack.offset) for ack in acks)
        for key in set(keys):
            assert got[key] == [i for i, k in enumerate(keys) if k == key]
        coordinator = a if owners[0] == addr_of(a) else b
        survivor = b if coordinator is a else a
        with trio.fail_after(WAIT):
            while True:  # saved by the coordinator's next transaction after the acks
                states = await saved_group(survivor, "workers", "jobs", 4)
                if [(s or {}).get("cursor") for s in states] == counts and not any(s and s["pending"] for s in states):
                    break
                await trio.sleep(0.02)

        await stop_gracefully(coordinator)
        await wait_for(lambda: partition_owners([survivor], "jobs", 4) is not None)
        async with pybroker.connect(survivor.url, name="publisher") as pub:
            more = [await pub.publish("jobs", b"%d" % i, {"key": f"k{i % 9}"}) for i in range(60, 80)]
        async with pybroker.connect(survivor.url, name="three") as m:
            async with m.subscribe("jobs", group="workers", auto_ack=False) as sub:
                again: list[tuple[str, int, int]] = []
                with trio.fail_after(WAIT):
                    async for message in sub:
                        again.append((message.topic, message.offset, message.deliveries))
                        await message.ack()
                        if len(again) == len(more):
                            break
        assert sorted(again) == sorted((ack.topic, ack.offset, 1) for ack in more)
        # Deleting the topic deletes the group's keys in every partition.
        store = store_of(survivor)
        prefix = store.settings.keys.group_prefix("workers", "jobs")
        assert len((await store.etcd.get_prefix(prefix)).kvs) == 4
        async with pybroker.connect(survivor.url) as admin:
            await admin.delete_topic("jobs")
        assert (await store.etcd.get_prefix(prefix)).kvs == []
