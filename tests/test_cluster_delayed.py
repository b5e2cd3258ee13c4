"""Delayed delivery in cluster mode (broker/cluster/delayed.py), against a
real etcd and a real SeaweedFS on loopback: a DELAYED publish to any node
is acknowledged once it is in etcd (large ones in the object store), kept
there across the death of the node that took it, and released by the
topic's owner when due, in due order, once (an exactly-once resend is
scheduled once)."""

from __future__ import annotations

import time
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
    stop_gracefully,
    store_of,
    urls,
    wait_for,
)
from helpers.raw import raw_client
from pybroker.protocol import NO_OFFSET, PubAck, Publish, encode_batch
from pybroker.server.cluster.delayed import INLINE_BYTES

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")


async def delay_keys(node: object) -> list[bytes]:
    store = store_of(node)  # type: ignore[arg-type]
    return [kv.key for kv in (await store.etcd.get_prefix(store.settings.keys.prefix + b"delay/")).kvs]


async def test_delayed_messages_are_kept_in_the_cluster_and_released_by_the_owner(
    urls: dict[str, str], tmp_path: Path
) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "timers", [b"created"], "p")
        owner = await settled_owner(nodes, "timers")
        other = b if owner is a else a
        # Scheduled through the node that does not own the topic (any node
        # takes them), out of order, one over the inline bound.
        async with raw_client(other) as raw:
            welcome = await raw.handshake("delays", {"error_fields": "1"})
            assert "max_delay_ms" in welcome.limits
        now_ms = int(time.time() * 1000)
        big = b"B" * (INLINE_BYTES + 1)
        async with pybroker.connect(owner.url) as sub_client:
            sub = await sub_client.subscribe("timers", start="new")
            async with pybroker.connect(other.url, reconnect=True) as pub:
                acks = [
                    await pub.publish("timers", b"third", deliver_at=(now_ms + 2500) / 1000),
                    await pub.publish("timers", big, deliver_at=(now_ms + 2000) / 1000),
                    await pub.publish("timers", b"first", deliver_at=(now_ms + 1500) / 1000),
                ]
            assert [ack.offset for ack in acks] == [-1, -1, -1]
            assert pub.reconnects == 0
            assert len(await delay_keys(a)) == 3
            got = []
            with trio.fail_after(WAIT):
                async for message in sub:
                    got.append((message.payload, time.time() * 1000 - now_ms))
                    if len(got) == 3:
                        break
        assert [p for p, _ in got] == [b"first", big, b"third"]
        # Not before it was due (and within the looks' period after it).
        for (_, at), due in zip(got, (1500, 2000, 2500)):
            assert at >= due, got
        # A release is counted once its key and (for the large one) its
        # object are deleted: the key goes first.
        with trio.fail_after(WAIT):
            while await delay_keys(a) or owner.broker.schedule.released < 3:
                await trio.sleep(0.05)
        assert owner.broker.schedule.released == 3


async def test_a_delayed_message_outlives_the_node_that_took_it_and_is_scheduled_once(
    urls: dict[str, str], tmp_path: Path
) -> None:
    async with cluster_node(urls, "a", tmp_path) as a:
        async with cluster_node(urls, "b", tmp_path) as b:
            nodes = [a, b]
            await publish_to_owner(nodes, "alarms", [b"created"], "p")
            await settled_owner(nodes, "alarms")
            # Taken by the node that will stop, with a msg-id, sent twice
            # (a resend after a lost PUBACK): one key.
            taker = b
            due = str(int(time.time() * 1000) + 3000)
            batch = encode_batch([(b"ring", {"deliver-at": due, "msg-id": "alarm-1"})])
            async with raw_client(taker) as raw:
                await hello(raw, "twice")
                for rid in (1, 2):
                    await raw.send_event(Publish(rid, "alarms", batch, dedup=True, delayed=True))
                    ack = await raw.next_event()
                    assert isinstance(ack, PubAck) and (ack.request_id, ack.base_offset) == (rid, NO_OFFSET), ack
            assert len(await delay_keys(a)) == 1
            await stop_gracefully(taker)
        # b is gone; a owns the topic now and releases it when due, once.
        await wait_for(lambda: store_of(a).manager is not None and store_of(a).manager.local("alarms", 0) is not None)
        async with pybroker.connect(a.url) as c:
            sub = await c.subscribe("alarms", start="earliest")
            got = []
            with trio.fail_after(WAIT):
                async for message in sub:
                    got.append(message.payload)
                    if message.payload == b"ring":
                        break
            assert got == [b"created", b"ring"]
            with trio.fail_after(WAIT):
                while await delay_keys(a):
                    await trio.sleep(0.05)
            # Released once: the next message is offset 2.
            assert (await c.publish("alarms", b"after")).offset == 2
