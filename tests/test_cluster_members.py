"""Membership and the topic registry on a real etcd
(pybroker.server.cluster.members, topics, mirror; docs/cluster.md §2-§4).

A node registers ``members/{node}`` under its member lease; every node
keeps the live member set from a range read and a watch from the read's
revision + 1, and starts over with a fresh read when etcd cancels the
watch (its start revision compacted). Topics are created only if absent,
with a partition count that cannot change.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from helpers.cluster import etcd_server
from pybroker.server.cluster.etcd import Etcd, Watch, WatchCanceled
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.lease import LeaseKeeper, LeaseLost
from pybroker.server.cluster.members import Membership
from pybroker.server.cluster.mirror import MirrorTooLarge, PrefixMirror
from pybroker.protocol import partition_for
from pybroker.server.cluster.topics import PartitionCountMismatch, TopicError, TopicRegistry

WAIT = 30.0
TTL = 2


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with etcd_server(tmp_path_factory.mktemp("etcd")) as (url, _server):
        yield url


@pytest.fixture
def keys(request: pytest.FixtureRequest) -> ClusterKeys:
    return ClusterKeys(f"/t/{request.node.name}/".encode())


async def until(version_of: Any, predicate: Any) -> None:
    """Wait on a mirror's change events until ``predicate()`` holds
    (the caller bounds it with trio.fail_after)."""
    while not predicate():
        await version_of.changed()


async def test_members_register_see_each_other_and_vanish_with_their_lease(etcd_url: str, keys: ClusterKeys) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nodes = []
            for name in ["a", "b/2", "c"]:  # a "/" in a name is escaped in the key
                etcd = Etcd(etcd_url)
                keeper = LeaseKeeper(etcd, TTL)
                membership = Membership(etcd, keeper, name, keys=keys, addr=f"{name}:7000", http=f"{name}:8080")
                await membership.register()
                nursery.start_soon(keeper.run)
                nursery.start_soon(membership.run)
                nodes.append((etcd, keeper, membership))
            for _etcd, _keeper, membership in nodes:
                await until(membership, lambda m=membership: m.live() == ["a", "b/2", "c"])
            seen = nodes[0][2].members["b/2"]
            assert (seen.addr, seen.http, seen.lease) == ("b/2:7000", "b/2:8080", nodes[1][1].lease)
            assert abs(seen.started - nodes[1][2].me.started) == 0 and seen.started > 0
            raw = await nodes[0][0].get(keys.member("b/2"))
            assert raw is not None and raw.key == keys.prefix + b"members/b%2F2"
            assert json.loads(raw.value) == {"addr": "b/2:7000", "http": "b/2:8080", "started": seen.started}
            # b's lease ends (as if b died): every node sees it go.
            await nodes[1][0].revoke(nodes[1][1].lease)
            for i in (0, 2):
                await until(nodes[i][2], lambda m=nodes[i][2]: m.live() == ["a", "c"])
            # c leaves on purpose: its key goes at once, its lease stays.
            await nodes[2][2].leave()
            await until(nodes[0][2], lambda: nodes[0][2].live() == ["a"])
            assert await nodes[2][0].time_to_live(nodes[2][1].lease) > 0
            # Registering needs a held lease.
            with pytest.raises(LeaseLost):
                await nodes[1][2].register()
            nursery.cancel_scope.cancel()
        for etcd, _keeper, _membership in nodes:
            await etcd.aclose()


class GatedWatchEtcd(Etcd):
    """Holds each watch back until ``gate`` is set (then re-armed), so the
    test can change and compact etcd between the mirror's read and its
    watch: the watch then really starts at a compacted revision."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = trio.Event()
        self.watches = 0
        self.waiting = trio.Event()

    @asynccontextmanager
    async def watch(self, key: bytes, **kwargs: Any) -> AsyncIterator[Watch]:
        self.watches += 1
        if self.watches == 1:
            self.waiting.set()
            await self.gate.wait()
        async with super().watch(key, **kwargs) as watch:
            yield watch


async def test_a_mirror_whose_watch_was_compacted_starts_over_from_a_fresh_read(etcd_url: str, keys: ClusterKeys) -> None:
    """Between the mirror's range read and its watch, keys change and etcd
    compacts past the read's revision: etcd cancels the watch
    (WatchCanceled), and the mirror reads afresh, so it holds the changes
    made in between and keeps following."""
    prefix = keys.prefix + b"m/"
    with trio.fail_after(WAIT):
        async with GatedWatchEtcd(etcd_url) as etcd, Etcd(etcd_url) as writer:
            await writer.put(prefix + b"old", b"1")
            mirror = PrefixMirror(etcd, prefix)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mirror.run)
                await etcd.waiting.wait()
                assert set(mirror.kvs) == {prefix + b"old"} and mirror.restarts == 0
                read_at = mirror.revision
                await writer.delete(prefix + b"old")
                revision = await writer.put(prefix + b"new", b"2")
                await writer.put(keys.prefix + b"elsewhere", b"x")  # outside the prefix: not mirrored
                await writer.compact(revision)
                assert revision > read_at + 1
                etcd.gate.set()
                await until(mirror, lambda: mirror.restarts == 1 and set(mirror.kvs) == {prefix + b"new"})
                assert isinstance(mirror.last_error, WatchCanceled) and mirror.last_error.compact_revision == revision
                await writer.put(prefix + b"later", b"3")
                await until(mirror, lambda: set(mirror.kvs) == {prefix + b"new", prefix + b"later"})
                assert mirror.kvs[prefix + b"later"].value == b"3"
                nursery.cancel_scope.cancel()


async def test_a_mirror_refuses_a_prefix_over_its_bound(etcd_url: str, keys: ClusterKeys) -> None:
    prefix = keys.prefix + b"many/"
    with trio.fail_after(WAIT):
        async with Etcd(etcd_url) as etcd:
            for i in range(3):
                await etcd.put(prefix + b"%d" % i, b"")
            with pytest.raises(MirrorTooLarge):
                await PrefixMirror(etcd, prefix, max_keys=2).run()


async def test_topics_are_created_once_with_a_fixed_partition_count(etcd_url: str, keys: ClusterKeys) -> None:
    with trio.fail_after(WAIT):
        async with Etcd(etcd_url) as etcd, Etcd(etcd_url) as other:
            registry = TopicRegistry(etcd, keys=keys)
            created = await registry.create("orders/eu", 12, {"retention": "1d"})
            assert created.partitions == 12 and created.created > 0
            raw = await etcd.get(keys.topic("orders/eu"))
            assert raw is not None and raw.key == keys.prefix + b"topics/orders%2Feu"
            assert json.loads(raw.value) == {"partitions": 12, "settings": {"retention": "1d"}}
            # Again with the same count: the existing record, unchanged.
            again = await TopicRegistry(other, keys=keys).create("orders/eu", 12, {"retention": "9d"})
            assert again.created == created.created and again.settings == {"retention": "1d"}
            with pytest.raises(PartitionCountMismatch, match="exists with 12 partitions, not 4"):
                await registry.create("orders/eu", 4)
            assert (await registry.get("orders/eu")) == created
            assert await registry.get("absent") is None
            with pytest.raises(TopicError):
                await registry.create("bad", 0)
            # Racing creations with different counts: exactly one count wins.
            outcomes: list[int | str] = []

            async def create(client: Etcd, partitions: int) -> None:
                try:
                    outcomes.append((await TopicRegistry(client, keys=keys).create("raced", partitions)).partitions)
                except PartitionCountMismatch as exc:
                    outcomes.append(f"refused:{exc.existing}")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(create, etcd, 3)
                nursery.start_soon(create, other, 5)
            assert sorted(map(str, outcomes)) in (["3", "refused:3"], ["5", "refused:5"])
            # Every node's registry mirror sees the topics.
            watcher = TopicRegistry(other, keys=keys)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watcher.run)
                await until(watcher, lambda: {"orders/eu", "raced"} <= set(watcher.topics))
                await registry.create("late", 2)
                await until(watcher, lambda: "late" in watcher.topics)
                assert watcher.topics["late"].partitions == 2
                # A record that does not decode is left out, not fatal.
                await etcd.put(keys.topic("broken"), b"{not json")
                await etcd.put(keys.topic("zero"), b'{"partitions": 0}')
                await registry.create("after", 1)
                await until(watcher, lambda: "after" in watcher.topics)
                assert "broken" not in watcher.topics and "zero" not in watcher.topics
                with pytest.raises(TopicError):
                    await registry.get("broken")
                nursery.cancel_scope.cancel()


def test_a_key_goes_to_crc32_mod_n() -> None:
    assert zlib.crc32(b"a") == 0xE8B7BE43
    assert partition_for(b"a", 12) == 0xE8B7BE43 % 12 == 3
    assert partition_for(b"", 7) == 0
    counts = [0] * 8
    for i in range(800):
        counts[partition_for(b"key-%d" % i, 8)] += 1
    assert min(counts) > 50  # keys spread over every partition
    with pytest.raises(ValueError):
        partition_for(b"a", 0)
