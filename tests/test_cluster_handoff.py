"""Batches handed through etcd to the node that owns their topic
(broker/cluster/handoff.py; docs/cluster.md §10: dead letters), against a
real etcd and SeaweedFS. The group side is in tests/test_cluster_groups.py;
here the hand-off itself: a batch too large for an etcd value goes through
the object store, and one no broker would store is dropped, not retried
forever.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from helpers.cluster_broker import (  # noqa: F401 (servers, urls: fixtures)
    WAIT,
    cluster_node,
    publish_to_owner,
    servers,
    settled_owner,
    store_of,
    urls,
)
from pybroker.protocol import decode_batch, encode_batch
from pybroker.server.cluster.handoff import INLINE_BYTES, HandOffs
from pybroker.server.cluster.objects import NoSuchKey
from pybroker.server.server import Server

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")


async def gone(hand_offs: HandOffs, key: bytes) -> None:
    """Until the owner's next look took (or dropped) the key: bounded."""
    with trio.fail_after(WAIT):
        while await hand_offs.etcd.get(key) is not None:
            await trio.sleep(0.02)


async def owned(node: Server, topic: str) -> None:
    await publish_to_owner([node], topic, [b"first"], "creator")
    await settled_owner([node], topic)


async def test_a_batch_too_large_for_etcd_goes_through_the_object_store(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a:
        await owned(a, "big.dead")
        hand_offs = store_of(a).hand_offs
        payload = bytes(range(256)) * (INLINE_BYTES // 256 + 1)
        batch = encode_batch([(payload, {"msg-id": "large-1"})])
        done = trio.Event()
        hand_offs.send("big.dead", "large-1", batch, done.set)
        key = hand_offs.key("big.dead", "large-1")
        with trio.fail_after(WAIT):
            await done.wait()
        await gone(hand_offs, key)
        assert hand_offs.taken == 1
        # Stored once, whole; the object the key named is deleted.
        log = store_of(a).topic("big.dead")
        assert log.next_offset == 2
        (stored,) = log.read(1, 4 << 20)
        assert decode_batch(stored.batch)[0][0] == payload
        # The key goes first, then its object (handoff.py, _forget): wait
        # for the object too.
        name = "handoff/" + key[len(hand_offs.prefix) :].decode()
        with trio.fail_after(WAIT):
            while True:
                try:
                    await hand_offs.objects.get(name)
                except NoSuchKey:
                    break
                await trio.sleep(0.02)


async def test_a_batch_no_broker_would_store_is_dropped(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a:
        await owned(a, "bad.dead")
        hand_offs = store_of(a).hand_offs
        damaged = bytearray(encode_batch([(b"payload", {"msg-id": "bad-1"})]))
        damaged[-1] ^= 0xFF  # its CRC no longer matches
        key = hand_offs.key("bad.dead", "bad-1")
        await hand_offs.etcd.put(key, b"i" + bytes(damaged))
        await gone(hand_offs, key)
        assert hand_offs.taken == 0
        assert store_of(a).topic("bad.dead").next_offset == 1  # nothing stored


async def test_a_hand_off_waits_for_its_topics_owner(urls: dict[str, str], tmp_path: Path) -> None:
    """Handed to a topic nobody has published to yet: the hand-off makes it
    (so it gets an owner), and the owner takes it."""
    async with cluster_node(urls, "a", tmp_path) as a:
        hand_offs = store_of(a).hand_offs
        done = trio.Event()
        hand_offs.send("new.dead", "new-1", encode_batch([(b"letter", {"msg-id": "new-1"})]), done.set)
        with trio.fail_after(WAIT):
            await done.wait()
        await gone(hand_offs, hand_offs.key("new.dead", "new-1"))
        log = store_of(a).topic("new.dead")
        assert log.next_offset == 1
        assert decode_batch(log.read(0, 1 << 20)[0].batch)[0][0] == b"letter"
