"""Brokers in cluster mode (``--cluster`` / ``--object-store``), in process,
against a real etcd and a real SeaweedFS on loopback (docs/cluster.md §5,
§7, §8): a topic's owner takes its publishes and acknowledges them once the
round is in the object store and committed in etcd; every other node answers
NOT_OWNER naming the owner; subscribers on any node get what the owner
committed, in order; when the owner stops, another node takes the topic
over where the committed log ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from helpers.cluster import Server as Process
from helpers.cluster import etcd_server, weed_server
from helpers.raw import RawClient, raw_client
from pybroker.protocol import (
    Deliver,
    Durability,
    Error,
    ErrorCode,
    PubAck,
    Publish,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    decode_batch,
    encode_batch,
)
from pybroker.server.cluster.partition import PartitionReader
from pybroker.server.cluster.store import ClusterStore
from pybroker.server.server import Server
from pybroker.server.testing import running_broker

WAIT = 60.0
BUCKET = "pybroker-broker-tests"

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Process, str]]:
    tmp = tmp_path_factory.mktemp("cluster-broker")
    with etcd_server(tmp) as (etcd_url, etcd), weed_server(tmp) as (s3_url, _weed):
        yield etcd_url, etcd, s3_url


@pytest.fixture
def urls(servers: tuple[str, Process, str], request: pytest.FixtureRequest) -> dict[str, str]:
    """``--cluster`` and ``--object-store`` for this test: its own etcd
    prefix and object prefix, so tests share the servers, not their data."""
    etcd_url, _etcd, s3_url = servers
    name = request.node.name.replace("[", "-").replace("]", "")
    return {
        "cluster": f"etcd://{etcd_url.removeprefix('http://')}/t/{name}",
        "object_store": f"s3://{s3_url.removeprefix('http://')}/{BUCKET}/{name}",
    }


def store_of(server: Server) -> ClusterStore:
    store = server.broker.store
    assert isinstance(store, ClusterStore), store
    return store


@asynccontextmanager
async def cluster_node(urls: dict[str, str], name: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[Server]:
    async with running_broker(data_dir=tmp_path / name, node_name=name, **urls, **overrides) as server:
        with trio.fail_after(WAIT):
            await store_of(server).joined.wait()
        yield server


async def hello(raw: RawClient, name: str) -> None:
    await raw.handshake(name, {"error_fields": "1"})


async def wait_for(predicate: Any, timeout: float = WAIT) -> None:
    """Poll (bounded) a condition that changes with etcd watch events."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def owner_node(nodes: list[Server], topic: str) -> Server | None:
    for node in nodes:
        manager = store_of(node).manager
        if manager is not None and manager.local(topic, 0) is not None:
            return node
    return None


async def publish_to_owner(nodes: list[Server], topic: str, payloads: list[bytes], name: str) -> tuple[PubAck, int]:
    """Publish through any node, following NOT_OWNER to the address it names
    (again shortly while there is no owner); the acknowledgement and how many
    NOT_OWNER answers came first."""
    by_addr = {f"127.0.0.1:{n.port}": n for n in nodes}
    target = nodes[0]
    redirects = 0
    with trio.fail_after(WAIT):
        while True:
            async with raw_client(target) as raw:
                await hello(raw, name)
                await raw.send_event(Publish(1, topic, encode_batch(payloads)))
                event = await raw.next_event()
            if isinstance(event, PubAck):
                return event, redirects
            assert isinstance(event, Error) and event.code == ErrorCode.NOT_OWNER, event
            assert event.ref == 1 and event.ref_kind is RefKind.REQUEST and not event.fatal, event
            assert event.fields["topic"] == topic, event
            redirects += 1
            owner = event.fields.get("owner")
            if owner:
                target = by_addr[owner]
            else:
                await trio.sleep(0.05)  # no owner yet: again shortly


async def test_owner_acknowledges_others_redirect_and_every_node_delivers(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        # The first publish creates the topic; until an owner has it the
        # answer is NOT_OWNER without an address.
        ack, _ = await publish_to_owner(nodes, "orders", [b"first"], "creator")
        assert (ack.base_offset, ack.count, ack.durability) == (0, 1, Durability.DISK)
        owner = owner_node(nodes, "orders")
        assert owner is not None
        other = b if owner is a else a
        # The other node names the owner, and stores nothing.
        async with raw_client(other) as raw:
            await hello(raw, "misdirected")
            await raw.send_event(Publish(7, "orders", encode_batch([b"lost?"])))
            refused = await raw.next_event()
        assert isinstance(refused, Error) and refused.code == ErrorCode.NOT_OWNER, refused
        assert refused.fields == {"topic": "orders", "owner": f"127.0.0.1:{owner.port}"}
        assert refused.ref == 7 and not refused.fatal

        # A subscriber on each node, from the start of the topic.
        async with raw_client(a) as sub_a, raw_client(b) as sub_b, raw_client(owner) as pub:
            for raw, name in ((sub_a, "sub-a"), (sub_b, "sub-b")):
                await hello(raw, name)
                await raw.send_event(Subscribe(1, "orders", StartKind.EARLIEST, 0))
                assert await raw.next_event() == SubAck(1)
            await hello(pub, "publisher")
            for i in range(1, 40):
                await pub.send_event(Publish(i, "orders", encode_batch([f"m{i}.{j}".encode() for j in range(3)])))
            expected_offset = 1
            for i in range(1, 40):
                got = await pub.next_event()
                assert isinstance(got, PubAck), got
                assert (got.request_id, got.base_offset, got.count) == (i, expected_offset, 3)
                expected_offset += 3
            want = [b"first"] + [f"m{i}.{j}".encode() for i in range(1, 40) for j in range(3)]
            for raw in (sub_a, sub_b):
                seen: list[tuple[int, bytes]] = []
                with trio.fail_after(WAIT):
                    while len(seen) < len(want):
                        event = await raw.next_event()
                        assert isinstance(event, Deliver), event
                        for k, (payload, _headers) in enumerate(decode_batch(event.batch)):
                            seen.append((event.base_offset + k, payload))
                assert seen == list(enumerate(want))

        # What was acknowledged is in the object store, dense, at its offsets.
        store = store_of(a)
        reader = PartitionReader(store.etcd, store.objects, "orders", 0, keys=store.settings.keys)
        batches = await reader.read(0, 1 << 20)
        stored = [p for batch in batches for p, _ in decode_batch(batch.batch)]
        while len(stored) < len(want):
            more = await reader.read(batches[-1].next_offset, 1 << 20)
            assert more, (len(stored), len(want))
            batches += more
            stored += [p for batch in more for p, _ in decode_batch(batch.batch)]
        assert stored == want


async def test_takeover_continues_where_the_committed_log_ends(urls: dict[str, str], tmp_path: Path) -> None:
    async with AsyncExitStack() as stack_a, AsyncExitStack() as stack_b:
        a = await stack_a.enter_async_context(cluster_node(urls, "a", tmp_path))
        b = await stack_b.enter_async_context(cluster_node(urls, "b", tmp_path))
        nodes = [a, b]
        for i in range(10):
            ack, _ = await publish_to_owner(nodes, "jobs", [f"before-{i}".encode()], "p")
            assert ack.base_offset == i
        owner = owner_node(nodes, "jobs")
        assert owner is not None
        survivor, stack = (b, stack_a) if owner is a else (a, stack_b)
        # The owner stops (gracefully: it hands the topic over); the
        # survivor takes it where the committed log ends.
        await stack.aclose()
        for i in range(10, 20):
            ack, _ = await publish_to_owner([survivor], "jobs", [f"after-{i}".encode()], "p")
            assert ack.base_offset == i
        assert owner_node([survivor], "jobs") is survivor
        async with raw_client(survivor) as raw:
            await hello(raw, "reader")
            await raw.send_event(Subscribe(1, "jobs", StartKind.EARLIEST, 0))
            assert await raw.next_event() == SubAck(1)
            seen: list[bytes] = []
            with trio.fail_after(WAIT):
                while len(seen) < 20:
                    event = await raw.next_event()
                    assert isinstance(event, Deliver), event
                    seen += [p for p, _ in decode_batch(event.batch)]
        assert seen == [f"before-{i}".encode() for i in range(10)] + [f"after-{i}".encode() for i in range(10, 20)]
