"""Deleting a topic in cluster mode (TOPICS delete; broker/cluster/deletion.py),
against a real etcd and a real SeaweedFS on loopback: through any node, one
transaction removes everything etcd holds of the topic, its owner is
fenced, subscribers on every node are told (TOPIC_DELETED), the name
starts afresh at offset 0, and a consumer group's state does not outlive
it."""

from __future__ import annotations

from pathlib import Path

import pytest
import pybroker
import trio

from helpers.cluster_broker import (  # noqa: F401 (servers, urls: fixtures)
    WAIT,
    cluster_node,
    hello,
    publish_to_owner,
    servers,
    settled_owner,
    store_of,
    urls,
    wait_for,
)
from helpers.raw import raw_client
from pybroker.server.cluster.delayed import INLINE_BYTES
from pybroker.protocol import (
    Deliver,
    Error,
    ErrorCode,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    decode_batch,
    partition_topic,
)
from pybroker.server.server import Server

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")


async def etcd_keys_of(node: Server, topic: str) -> list[bytes]:
    """Every key etcd holds naming ``topic`` (record, owners, next offsets,
    index, exactly-once entries, groups)."""
    store = store_of(node)
    prefix = store.settings.keys.prefix
    found = []
    for kv in (await store.etcd.get_prefix(prefix)).kvs:
        parts = kv.key[len(prefix) :].split(b"/")
        if topic.encode() in parts[1:3]:
            found.append(kv.key)
    return found


async def test_a_topic_deleted_through_any_node_goes_everywhere(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        for i in range(5):
            await publish_to_owner(nodes, "doomed", [b"m%d" % i], "p")
        owner = await settled_owner(nodes, "doomed")
        other = b if owner is a else a
        await wait_for(lambda: all(store_of(n).topic("doomed").next_offset == 5 for n in nodes))
        # A group with state in etcd, and a plain subscriber on each node.
        async with pybroker.connect(owner.url, reconnect=True) as member:
            async with member.subscribe("doomed", group="g", start="earliest", auto_ack=False) as sub:
                with trio.fail_after(WAIT):
                    got = 0
                    async for message in sub:
                        await message.ack()
                        got += 1
                        if got == 5:
                            break
        with trio.fail_after(WAIT):  # the group's state is saved within 0.2 s
            while not any(b"grp/" in key for key in await etcd_keys_of(owner, "doomed")):
                await trio.sleep(0.05)
        # Delayed batches waiting for it (one in an object), and one for
        # another topic, which stays.
        async with pybroker.connect(owner.url) as client:
            await client.publish("doomed", b"later", delay=600)
            await client.publish("doomed", b"L" * (INLINE_BYTES + 1), delay=600)
            await client.publish("kept", b"later", delay=600)
        store = store_of(owner)
        delay_prefix = store.settings.keys.prefix + b"delay/"
        assert len((await store.etcd.get_prefix(delay_prefix)).kvs) == 3
        assert len(await store.objects.list("delay/")) == 1
        async with raw_client(a) as sub_a, raw_client(b) as sub_b:
            for raw, name in ((sub_a, "sub-a"), (sub_b, "sub-b")):
                await hello(raw, name)
                await raw.send_event(Subscribe(1, "doomed", StartKind.EARLIEST, 0))
                assert await raw.next_event() == SubAck(1)
            # Deleted through the node that does not own it.
            async with pybroker.connect(other.url) as admin:
                assert await admin.delete_topic("doomed") == {"deleted": "doomed", "messages": 5}
            for raw in (sub_a, sub_b):
                with trio.fail_after(WAIT):
                    while True:
                        event = await raw.next_event()
                        if isinstance(event, Error):
                            break
                assert (event.code, event.ref_kind, event.ref) == (ErrorCode.TOPIC_DELETED, RefKind.SUBSCRIPTION, 1)
        assert await etcd_keys_of(a, "doomed") == []
        left = (await store.etcd.get_prefix(delay_prefix)).kvs
        assert [kv.key.split(b"/")[-2] for kv in left] == [b"kept"]
        assert await store.objects.list("delay/") == []
        await wait_for(lambda: all("doomed" not in store_of(n).topic_names() for n in nodes))
        # The name again: a new topic, from offset 0, and the group starts
        # from the new topic's beginning, not from its old cursor.
        ack, _ = await publish_to_owner(nodes, "doomed", [b"new"], "p")
        assert ack.base_offset == 0
        owner = await settled_owner(nodes, "doomed")
        async with pybroker.connect(owner.url, reconnect=True) as member:
            async with member.subscribe("doomed", group="g", start="earliest") as sub:
                with trio.fail_after(WAIT):
                    async for message in sub:
                        assert (message.offset, message.payload) == (0, b"new")
                        break


async def test_a_partitioned_topic_is_deleted_whole_and_made_again_with_another_count(
    urls: dict[str, str], tmp_path: Path
) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        ab = f"pybroker://127.0.0.1:{a.port},127.0.0.1:{b.port}"
        async with pybroker.connect(ab, reconnect=True) as client:
            await client.create_topic("parts", partitions=4)
            await wait_for(lambda: all(store_of(n).partition_count("parts") == 4 for n in nodes))
            acks = [await client.publish("parts", b"%d" % i, {"key": str(i)}) for i in range(20)]
            assert len({ack.topic for ack in acks}) > 1
            answer = await client.delete_topic("parts")
            assert (answer["deleted"], answer["messages"], answer["partitions"]) == ("parts", 20, 4)
            assert await etcd_keys_of(a, "parts") == []
            await wait_for(lambda: all(store_of(n).partition_count("parts") == 0 for n in nodes))
            await wait_for(lambda: not any(name.startswith("parts") for n in nodes for name in store_of(n).topic_names()))
            # Made again with 2: the old count is gone with it.
            assert (await client.create_topic("parts", partitions=2))["created"] is True
            await wait_for(lambda: all(store_of(n).partition_count("parts") == 2 for n in nodes))
            ack = await client.publish("parts", b"again", {"key": "k"})
            assert ack.offset == 0 and ack.topic in (partition_topic("parts", 0), partition_topic("parts", 1))


async def test_a_node_that_joins_again_does_not_take_its_topics_for_deleted(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """A node whose member lease ends behind its back joins again as a new
    incarnation, whose topic registry starts empty until its first read.
    Its subscribers are not told TOPIC_DELETED for a topic nobody deleted,
    and get what is published after it rejoined. (Before the registry's
    first read was waited for, every topic it knew looked deleted: the
    subscriber got TOPIC_DELETED.)"""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "lasting", [b"before"], "p")
        owner = await settled_owner(nodes, "lasting")
        other = b if owner is a else a
        async with raw_client(owner) as sub:
            await hello(sub, "sub")
            await sub.send_event(Subscribe(1, "lasting", StartKind.EARLIEST, 0))
            assert await sub.next_event() == SubAck(1)
            first = await sub.next_event()
            assert isinstance(first, Deliver) and first.base_offset == 0, first
            old = store_of(owner).manager
            assert old is not None
            await store_of(other).etcd.revoke(old.keeper.lease)

            def rejoined() -> bool:
                manager = store_of(owner).manager
                return manager is not None and manager is not old and manager.keeper.held()

            await wait_for(rejoined)
            await settled_owner(nodes, "lasting")
            ack, _ = await publish_to_owner(nodes, "lasting", [b"after"], "p")
            assert ack.base_offset == 1
            with trio.fail_after(WAIT):
                event = await sub.next_event()
            assert isinstance(event, Deliver), event
            assert (event.base_offset, [p for p, _ in decode_batch(event.batch)]) == (1, [b"after"])
        assert "lasting" in store_of(owner).topic_names()
