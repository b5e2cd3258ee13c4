"""The janitor (broker/cluster/janitor.py, docs/cluster.md §9) against a real
etcd and a real SeaweedFS: objects no index entry references are deleted,
referenced ones are kept, a tombstone refuses a commit that comes late, old
tombstones go, and one node at a time is the janitor."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import trio

from helpers.cluster_nodes import ClusterConfig, ClusterNode, Publisher, batch_of, check_partition, wait_until

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

from pybroker.server.cluster.etcd import Etcd  # noqa: E402
from pybroker.server.cluster.janitor import Janitor  # noqa: E402
from pybroker.server.cluster.keys import ClusterKeys  # noqa: E402
from pybroker.server.cluster.lease import LeaseKeeper  # noqa: E402
from pybroker.server.cluster.objects import ObjectStore  # noqa: E402
from pybroker.server.cluster.outcomes import NotOwner  # noqa: E402
from pybroker.server.cluster.partition import PartitionReader  # noqa: E402
from pybroker.server.cluster.topics import TopicRegistry  # noqa: E402

WAIT = 60.0
BUCKET = "pybroker-janitor-tests"
TOPIC = "swept"


@pytest.fixture
def servers(cluster_servers: tuple[str, object, str]) -> tuple[str, str]:
    """The suite's shared etcd and SeaweedFS (conftest.py)."""
    etcd_url, _etcd, s3_url = cluster_servers
    return etcd_url, s3_url


@pytest.fixture
async def config(servers: tuple[str, str], request: pytest.FixtureRequest) -> AsyncIterator[ClusterConfig]:
    etcd_url, s3_url = servers
    name = request.node.name
    cfg = ClusterConfig(etcd_url, s3_url, BUCKET, f"{name}/", ClusterKeys(f"/j/{name}/".encode()))
    async with ObjectStore(s3_url, BUCKET, prefix=cfg.object_prefix) as store, Etcd(etcd_url) as etcd:
        with trio.fail_after(WAIT):
            await store.create_bucket()
            await TopicRegistry(etcd, keys=cfg.keys).create(TOPIC, 1)
    yield cfg


async def one_node(nursery: trio.Nursery, config: ClusterConfig) -> ClusterNode:
    node = ClusterNode(config, "n1")
    await nursery.start(node.run)
    await wait_until([node], lambda: node.manager is not None and node.manager.local(TOPIC, 0) is not None, WAIT)
    return node


async def test_orphans_go_referenced_objects_stay(config: ClusterConfig) -> None:
    async with trio.open_nursery() as nursery:
        node = await one_node(nursery, config)
        publisher = Publisher([node], TOPIC)
        for i in range(5):
            assert (await publisher.append(0, batch_of(f"kept-{i}"))).result == "ok"
        async with Etcd(config.etcd_url) as etcd, ObjectStore(config.s3_url, BUCKET, prefix=config.object_prefix) as objects:
            # An object as a round that never committed leaves it.
            orphan = "data/00000000000000ff/000000000001"
            assert await objects.put_if_absent(orphan, b"never indexed")
            before = {o.key for o in await objects.list("data/")}
            assert orphan in before and len(before) == 6
            janitor = Janitor(etcd, objects, keys=config.keys, grace=0)
            swept = await janitor.sweep()
            assert (swept.listed, swept.candidates, swept.kept, swept.deleted) == (6, 6, 5, 1)
            after = {o.key for o in await objects.list("data/")}
            assert after == before - {orphan}
            # The orphan's tombstone stands (no commit may name it now); the
            # kept ones' were taken back.
            assert await etcd.get(config.keys.gone(orphan)) is not None
            assert [name for name in after if await etcd.get(config.keys.gone(name)) is not None] == []
            # Everything acknowledged still reads back.
            reader = PartitionReader(etcd, objects, TOPIC, 0, keys=config.keys)
            assert await check_partition(reader, publisher.history, 0) == 5
            # Within the grace period nothing is a candidate.
            patient = Janitor(etcd, objects, keys=config.keys, grace=3600)
            assert (await patient.sweep()).candidates == 0
            # Tombstones older than the grace period go.
            later = Janitor(etcd, objects, keys=config.keys, grace=60)
            assert (await later.sweep(now=time.time() + 120)).tombstones_removed == 1
            assert await etcd.get(config.keys.gone(orphan)) is None
        nursery.cancel_scope.cancel()


async def test_a_commit_after_its_object_was_swept_is_refused(config: ClusterConfig) -> None:
    """The owner stalls between its PUT and its transaction; the janitor
    (grace 0) tombstones and deletes the object meanwhile; the transaction
    then fails on the tombstone: nothing references a deleted object."""
    async with trio.open_nursery() as nursery:
        node = await one_node(nursery, config)
        publisher = Publisher([node], TOPIC)
        assert (await publisher.append(0, batch_of("before"))).result == "ok"
        async with Etcd(config.etcd_url) as etcd, ObjectStore(config.s3_url, BUCKET, prefix=config.object_prefix) as objects:
            janitor = Janitor(etcd, objects, keys=config.keys, grace=0)
            assert node.manager is not None
            owner = node.manager.local(TOPIC, 0)
            assert owner is not None
            swept: list[str] = []

            async def sweep_now(name: str) -> None:
                owner.before_commit = None
                result = await janitor.sweep()
                assert result.deleted == 1, result
                swept.append(name)

            owner.before_commit = sweep_now
            with pytest.raises(NotOwner, match="tombstoned"):
                await owner.append(batch_of("late"))
            assert len(swept) == 1
            assert swept[0] not in {o.key for o in await objects.list("data/")}
            # The partition is taken again and appends go on at the next offset.
            again = await publisher.append(0, batch_of("after"))
            assert (again.result, again.offset) == ("ok", 1)
            reader = PartitionReader(etcd, objects, TOPIC, 0, keys=config.keys)
            assert await check_partition(reader, publisher.history, 0) == 2
        nursery.cancel_scope.cancel()


async def test_one_janitor_at_a_time(config: ClusterConfig, servers: tuple[str, str]) -> None:
    async with Etcd(config.etcd_url) as etcd, ObjectStore(config.s3_url, BUCKET, prefix=config.object_prefix) as objects:
        one, two = LeaseKeeper(etcd, 4), LeaseKeeper(etcd, 4)
        await one.grant()
        await two.grant()
        janitor = Janitor(etcd, objects, keys=config.keys)
        assert await janitor._hold(one)
        assert await janitor._hold(one)  # still its own
        assert not await janitor._hold(two)
        await etcd.revoke(one.lease)  # the janitor dies: the key goes with its lease
        assert await janitor._hold(two)
        await etcd.revoke(two.lease)

