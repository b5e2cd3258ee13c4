"""Brokers in cluster mode for the tests, in process, on a real etcd and a
real SeaweedFS (tests/helpers/cluster.py): the fixtures ``servers`` (both
servers, once per test module) and ``urls`` (``--cluster`` and
``--object-store`` with the test's own prefixes), a node started with
``cluster_node`` (its settings changed with ``tune``), and ways to find
and reach a topic's owner. A test module uses them with
``from helpers.cluster_broker import servers, urls, ...``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from helpers.cluster import Server as Process
from helpers.procs import BrokerProcess, broker_process
from helpers.raw import RawClient, raw_client
from pybroker.protocol import Error, ErrorCode, PubAck, Publish, RefKind, encode_batch
from pybroker.server.cluster.etcd import Etcd
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.ranking import first
from pybroker.server.cluster.store import ClusterStore
from pybroker.server.server import Server
from pybroker.server.testing import running_broker

WAIT = 60.0
BUCKET = "pybroker-broker-tests"


@pytest.fixture
def servers(cluster_servers: tuple[str, Process, str]) -> tuple[str, Process, str]:
    """The suite's shared etcd and SeaweedFS (conftest.py): these tests stop
    broker processes, never the servers."""
    return cluster_servers


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


def tune(server: Server, **settings: Any) -> ClusterStore:
    """Change a running node's ClusterSettings: the copies it makes from now
    on and those it has take ``copy_bytes`` (they evict as they grow), the
    replay and the read cache take their bounds (so a test holds more
    than a node's copy without publishing 64 MiB), and partitions it takes from now on are
    compacted with ``compaction``."""
    store = store_of(server)
    store.settings = attrs.evolve(store.settings, **settings)
    for name in store.topic_names():
        store.topic(name).copy.max_bytes = store.settings.copy_bytes
    store.replay.bound(store.settings.replay_bytes, store.settings.replay_fetches)
    store.cache.max_bytes = store.settings.cache_bytes  # (what it holds over it goes at the next insert)
    if store.manager is not None:
        store.manager.compaction = store.settings.compaction  # for the partitions it takes from now on
    return store


@asynccontextmanager
async def cluster_node(urls: dict[str, str], name: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[Server]:
    async with running_broker(data_dir=tmp_path / name, node_name=name, **urls, **overrides) as server:
        with trio.fail_after(WAIT):
            await store_of(server).joined.wait()
        yield server


async def stop_gracefully(server: Server) -> None:
    """Stop one node gracefully (it hands its topics over) while the test
    goes on with the others. Its ``cluster_node`` is left when the test
    leaves it: closing nodes' contexts out of their nesting order (an
    AsyncExitStack per node, the outer one closed first) would exit trio
    nurseries out of order, which trio refuses."""
    server.shutdown()
    with trio.fail_after(WAIT):
        await server.wait_stopped()


async def hello(raw: RawClient, name: str) -> None:
    await raw.handshake(name, {"error_fields": "1"})


async def wait_for(predicate: Any, timeout: float = WAIT) -> None:
    """Poll (bounded) a condition that changes with etcd watch events."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def settled_owner(nodes: list[Server], topic: str) -> Server:
    """The node that owns ``topic`` once ownership has settled: every node
    sees all the others, ranks the same node first, and names it as the
    owner, and that node holds the topic and takes appends. (Right after
    the first publish it may still move: the node that took it may not
    have seen the one ranked first yet, and hands it over.)"""
    names = {store_of(n).manager.node for n in nodes if store_of(n).manager is not None}  # type: ignore[union-attr]

    def settled() -> Server | None:
        holders = []
        for node in nodes:
            manager = store_of(node).manager
            if manager is None or set(manager.membership.members) != names:
                return None
            owner = manager.local(topic, 0)
            if owner is not None and owner.accepting:
                holders.append(node)
        if len(holders) != 1:
            return None
        holder = holders[0]
        for node in nodes:
            manager = store_of(node).manager
            assert manager is not None
            info = manager.owner_of(topic, 0)
            if info is None or info.addr != addr_of(holder) or manager.first_choice(topic, 0) != info.node:
                return None
        return holder

    await wait_for(lambda: settled() is not None)
    found = settled()
    assert found is not None
    return found


def addr_of(node: Server | str) -> str:
    """A node's ``host:port``: how NOT_OWNER names it."""
    return f"127.0.0.1:{node.port}" if isinstance(node, Server) else node


async def publish_to_owner(
    nodes: list[Server] | list[str],
    topic: str,
    payloads: Sequence[bytes | tuple[bytes, Mapping[str, str]]],
    name: str,
    *,
    delayed: bool = False,
) -> tuple[PubAck, int]:
    """Publish through the first node, following NOT_OWNER to the address it
    names (again shortly while there is no owner, or while the one named
    cannot be reached: a node killed before its lease ran out); the
    acknowledgement and how many NOT_OWNER answers came first."""
    live = [addr_of(n) for n in nodes]
    target = live[0]
    redirects = 0
    with trio.fail_after(WAIT):
        while True:
            try:
                async with raw_client(f"pybroker://{target}") as raw:
                    await hello(raw, name)
                    await raw.send_event(Publish(1, topic, encode_batch(payloads), delayed=delayed))
                    event = await raw.next_event()
            except OSError:
                target = live[0]
                await trio.sleep(0.1)
                continue
            if isinstance(event, PubAck):
                return event, redirects
            assert isinstance(event, Error) and event.code == ErrorCode.NOT_OWNER, event
            assert event.ref == 1 and event.ref_kind is RefKind.REQUEST and not event.fatal, event
            assert event.fields["topic"] == topic, event
            redirects += 1
            owner = event.fields.get("owner")
            if owner in live:
                target = owner
            else:
                target = live[0]
                await trio.sleep(0.05)  # no owner (or a dead one): again shortly


@asynccontextmanager
async def cluster_processes(urls: Mapping[str, str], tmp_path: Path, count: int = 2) -> AsyncIterator[list[BrokerProcess]]:
    """``count`` ``pybroker serve --cluster`` processes, started, as users
    start them. A 3 s member lease: a take-over after a SIGKILL waits for
    it to run out (the default 10 s would only lengthen the tests)."""
    flags = ("--cluster", urls["cluster"], "--object-store", urls["object_store"], "--no-http", "--cluster-lease-ttl", "3")
    async with AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(broker_process(tmp_path / f"d{i + 1}", tmp_path, *flags)) for i in range(count)
        ]
        for proc in procs:
            await proc.start()
        yield procs


async def ranked_owners(etcd: Etcd, keys: ClusterKeys, topic: str, partitions: int = 1) -> list[tuple[str, int] | None]:
    """Each partition's owner, (address, member lease), as etcd's ``own/``
    key says, where it is the member the ranking puts first; else None (a
    hand-over is due: right after a topic is made, or a node joins, the
    partition may still move)."""
    kvs = [await etcd.get(keys.own(topic, p)) for p in range(partitions)]
    found = await etcd.get_prefix(keys.members_prefix)
    members = {keys.name_of(keys.members_prefix, m.key): json.loads(m.value)["addr"] for m in found.kvs}
    owners: list[tuple[str, int] | None] = []
    for p, kv in enumerate(kvs):
        addr = json.loads(kv.value).get("addr") if kv is not None else None
        ranked = members.get(first(set(members), topic, p) or "")
        owners.append((addr, kv.lease) if kv is not None and addr and ranked == addr else None)
    return owners
