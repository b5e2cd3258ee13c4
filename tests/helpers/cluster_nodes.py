"""Cluster nodes for the ownership tests: each with its own etcd client,
object store client, member lease (LeaseKeeper), membership, topic
registry and ownership manager, run in one process (``ClusterNode``) or as
a subprocess (``tests/helpers/cluster_node_runner.py``); plus a publisher
that routes appends to the owners and a checker over what it recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs
import trio

from pybroker.protocol import encode_batch
from pybroker.server.cluster.etcd import Etcd
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.lease import LeaseKeeper, LeaseLost
from pybroker.server.cluster.members import Membership
from pybroker.server.cluster.objects import ObjectStore
from pybroker.server.cluster.ownership import OwnershipManager
from pybroker.server.cluster.outcomes import AppendError, NotOwner, OutcomeUnknown
from pybroker.server.cluster.partition import PartitionReader
from pybroker.server.cluster.ranking import first
from pybroker.server.cluster.topics import TopicRegistry


@attrs.frozen
class ClusterConfig:
    etcd_url: str
    s3_url: str
    bucket: str
    object_prefix: str
    keys: ClusterKeys
    ttl: int = 4
    window: float = 0.005
    resync: float = 0.5
    etcd_timeout: float = 2.0


class ClusterNode:
    """One node in this process. ``run`` (started with ``nursery.start``)
    grants a lease, registers and manages ownership; when the lease is lost
    it starts again with a new lease if ``rejoin``, else it ends.
    ``incarnations`` counts the leases it ran under."""

    def __init__(self, config: ClusterConfig, name: str, *, rejoin: bool = True) -> None:
        self.config = config
        self.name = name
        self.rejoin = rejoin
        self.etcd = Etcd(config.etcd_url, timeout=config.etcd_timeout)
        self.store = ObjectStore(config.s3_url, config.bucket, prefix=config.object_prefix)
        self.keeper: LeaseKeeper | None = None
        self.manager: OwnershipManager | None = None
        self.incarnations = 0
        self.lease_lost = trio.Event()
        self.ended = trio.Event()
        self.started = trio.Event()
        self._scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                while True:
                    keeper = LeaseKeeper(self.etcd, self.config.ttl)
                    await keeper.grant()
                    membership = Membership(self.etcd, keeper, self.name, keys=self.config.keys, addr=f"addr-{self.name}")
                    topics = TopicRegistry(self.etcd, keys=self.config.keys)
                    manager = OwnershipManager(
                        self.etcd, self.store, keeper, membership, topics,
                        keys=self.config.keys, resync=self.config.resync,
                        owner_options={"window": self.config.window},
                    )  # fmt: skip
                    self.keeper, self.manager = keeper, manager
                    self.incarnations += 1
                    if not self.started.is_set():
                        self.started.set()
                        task_status.started()
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(keeper.run)
                            await manager.run()
                    except* LeaseLost:
                        self.lease_lost.set()
                    if not self.rejoin:
                        return
        finally:
            self.ended.set()
            await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.etcd.aclose()
            await self.store.aclose()

    async def leave(self) -> None:
        """Graceful stop: hand everything over, then end the lease."""
        assert self.manager is not None and self.keeper is not None
        await self.manager.leave()
        keeper = self.keeper
        self._scope.cancel()
        await self.ended.wait()
        async with Etcd(self.config.etcd_url) as etcd:
            await etcd.revoke(keeper.lease)

    def stop(self) -> None:
        """Stop at once (the lease runs out on its own: a crash)."""
        self._scope.cancel()


async def wait_until(nodes: Sequence[ClusterNode], predicate: Callable[[], bool], timeout: float) -> None:
    """Wait until ``predicate()`` holds, re-checking whenever any node's
    manager reports a change (and at least every 0.2 s, for changes made
    only in etcd or in a node that was replaced); TimeoutError after
    ``timeout``."""
    with trio.fail_after(timeout):
        while not predicate():
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    if node.manager is not None:
                        nursery.start_soon(_cancel_when, node.manager.changed, nursery.cancel_scope)
                nursery.start_soon(_cancel_after, 0.2, nursery.cancel_scope)


async def _cancel_when(wait: Callable[[], object], scope: trio.CancelScope) -> None:
    await wait()  # type: ignore[misc]
    scope.cancel()


async def _cancel_after(seconds: float, scope: trio.CancelScope) -> None:
    await trio.sleep(seconds)
    scope.cancel()


def live(nodes: Iterable[ClusterNode]) -> list[ClusterNode]:
    return [n for n in nodes if n.manager is not None and not n.ended.is_set()]


def settled(nodes: Sequence[ClusterNode], topic: str, partitions: int) -> bool:
    """Every running node sees the same members (the running nodes), and for
    every partition the node ranked first holds it and every node agrees
    on that owner."""
    running = live(nodes)
    names = {n.name for n in running}
    for node in running:
        assert node.manager is not None
        if set(node.manager.membership.members) != names:
            return False
    for partition in range(partitions):
        top = first(names, topic, partition)
        for node in running:
            assert node.manager is not None
            info = node.manager.owner_of(topic, partition)
            if info is None or info.node != top:
                return False
            holds = node.manager.local(topic, partition) is not None
            if holds != (node.name == top):
                return False
    return True


def batch_of(tag: str, count: int = 1) -> bytes:
    return encode_batch([f"{tag}#{i}".encode() for i in range(count)])


@attrs.define
class Outcome:
    partition: int
    batch: bytes
    #: "ok" (acknowledged at ``offset``), "unknown" or "refused" (NotOwner or another error: not committed).
    result: str
    offset: int = -1
    node: str = ""
    epoch: int = 0
    at: float = 0.0


class Publisher:
    """Sends appends to whichever node owns the partition (as a client
    following NOT_OWNER would) and records every outcome."""

    def __init__(self, nodes: Sequence[ClusterNode], topic: str) -> None:
        self.nodes = nodes
        self.topic = topic
        self.history: list[Outcome] = []

    def _owner(self, partition: int) -> ClusterNode | None:
        for node in live(self.nodes):
            assert node.manager is not None
            info = node.manager.owner_of(self.topic, partition)
            if info is None:
                continue
            for candidate in live(self.nodes):
                if candidate.name == info.node and candidate.manager is not None:
                    if candidate.manager.local(self.topic, partition) is not None:
                        return candidate
        return None

    async def append(self, partition: int, batch: bytes, *, timeout: float = 30.0) -> Outcome:
        """One batch, resent to the current owner after each refusal (a
        NotOwner means nothing was committed) until acknowledged or unknown."""
        with trio.fail_after(timeout):
            while True:
                node = self._owner(partition)
                owner = node.manager.local(self.topic, partition) if node and node.manager else None
                if node is None or owner is None:
                    await wait_until(self.nodes, lambda: self._owner(partition) is not None, timeout)
                    continue
                try:
                    offset = await owner.append(batch)
                except OutcomeUnknown:
                    outcome = Outcome(partition, batch, "unknown", node=node.name, epoch=owner.epoch, at=trio.current_time())
                    self.history.append(outcome)
                    return outcome
                except AppendError as exc:
                    self.history.append(
                        Outcome(partition, batch, "refused", node=node.name, epoch=owner.epoch, at=trio.current_time())
                    )
                    if not isinstance(exc, NotOwner):
                        raise
                    await self._any_change()  # then look the owner up again
                    continue
                outcome = Outcome(partition, batch, "ok", offset, node.name, owner.epoch, trio.current_time())
                self.history.append(outcome)
                return outcome

    async def _any_change(self) -> None:
        """Wait for any node's next change, or 0.2 s (bounded by the caller's timeout)."""
        async with trio.open_nursery() as nursery:
            for node in live(self.nodes):
                assert node.manager is not None
                nursery.start_soon(_cancel_when, node.manager.changed, nursery.cancel_scope)
            nursery.start_soon(_cancel_after, 0.2, nursery.cancel_scope)

    async def stream(self, partition: int, tag: str, stop: trio.Event, *, limit: int = 10_000) -> None:
        """Append batches to one partition one after another until ``stop``."""
        for i in range(limit):
            if stop.is_set():
                return
            await self.append(partition, batch_of(f"{tag}.p{partition}.{i}", 1 + i % 3))

    def acked(self, partition: int) -> list[Outcome]:
        return [o for o in self.history if o.partition == partition and o.result == "ok"]


async def check_partition(reader: PartitionReader, history: Sequence[Outcome], partition: int) -> int:
    """Read the whole partition: offsets dense from 0; every acknowledged
    batch at its offset, byte for byte; every unknown one at most once;
    every refused one nowhere; nothing else. Returns the end offset."""
    end = await reader.next_offset()
    stored: dict[int, bytes] = {}
    offset = 0
    for _ in range(end + 1):
        if offset >= end:
            break
        batches = await reader.read(offset, max_bytes=1 << 20)
        assert batches and batches[0].base_offset == offset, (partition, offset)
        for b in batches:
            assert b.base_offset == offset, (partition, offset, b.base_offset)
            stored[offset] = b.batch
            offset = b.next_offset
    assert offset == end, (partition, offset, end)
    mine = [o for o in history if o.partition == partition]
    where: dict[bytes, list[int]] = {}
    for at, batch in stored.items():
        where.setdefault(batch, []).append(at)
    for o in mine:
        found = where.get(o.batch, [])
        if o.result == "ok":
            assert found == [o.offset], (partition, o)
        elif o.result == "unknown":
            assert len(found) <= 1, (partition, o, found)
        else:
            acked_elsewhere = [x for x in mine if x.batch == o.batch and x.result != "refused"]
            if not acked_elsewhere:
                assert found == [], (partition, o, found)
    known = {o.batch for o in mine}
    assert set(where) <= known, (partition, set(where) - known)
    return end

