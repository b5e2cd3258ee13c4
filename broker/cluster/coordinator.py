"""Coordinators of consumer groups that read several topics, in cluster
mode (docs/cluster.md §10).

A group whose pattern has wildcards reads topics that different nodes
own, so no partition's owner can run it. One node *coordinates* it: it
holds ``grpown/{group}``, created only if absent under its member lease,
whose create revision is the group's epoch. Every write of the group's
state compares it, as an owner's writes compare its partition's epoch
(groupstate.py), so a node that no longer holds the key (its lease ended,
it stopped, the group was deleted) cannot write. The coordinator reads
every matching topic from its own copies: every node follows every topic.

Who coordinates: the node the rendezvous ranking puts first for the
group's name (ranked as partition -1 of a topic named after the group, a
space no topic's partitions use) takes the key when a member comes to it.
Once held, the key stays with its holder for as long as its lease lives
(a node joining does not take it over); members that come to another
node are sent to the holder once a refused acquisition has named it, else
to the first choice. Bounds: the holders learned are remembered for
``HOLDER_TTL`` seconds each, at most ``MAX_HOLDERS`` of them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import trio

from ..logs import get_logger
from ..storage.errors import NotOwnerError
from .etcd import Compare, Delete, Etcd, EtcdError, Get, Put
from .lease import LeaseKeeper
from .ranking import first

if TYPE_CHECKING:
    from .store import ClusterStore

#: Seconds a holder learned from a refused acquisition is believed.
HOLDER_TTL = 1.0
MAX_HOLDERS = 10_000


class GroupCoordinator:
    """This node's hold on ``grpown/{group}``: the epoch holder of one
    group over several topics (the counterpart of a PartitionOwner for
    groupstate.py)."""

    def __init__(self, etcd: Etcd, keeper: LeaseKeeper, key: bytes, pattern: str, node: str, addr: str) -> None:
        self.etcd = etcd
        self.keeper = keeper
        self.own_key = key
        #: For the logs and the save hook: what the group reads.
        self.topic = pattern
        self.node = node
        self.addr = addr
        #: The create revision of the key; 0 until acquired.
        self.epoch = 0
        self.lost: str | None = None
        #: Who holds the key when ``acquire`` found it taken.
        self.holder: dict[str, Any] | None = None
        #: Awaited before the key is released (the group's last save).
        self.before_release: Callable[[], Awaitable[None]] | None = None

    @property
    def owning(self) -> bool:
        return self.epoch != 0 and self.lost is None and self.keeper.held()

    @property
    def accepting(self) -> bool:
        return self.owning

    async def acquire(self) -> bool:
        """Create the key if absent, under the keeper's lease: True if this
        node now coordinates the group, False if another does (``holder``)."""
        value = json.dumps({"node": self.node, "addr": self.addr}).encode()
        result = await self.etcd.txn(
            [Compare.create_revision(self.own_key, "==", 0)],
            [Put(self.own_key, value, self.keeper.lease)],
            [Get(self.own_key)],
        )
        if not result.succeeded:
            found = result.responses[0] if result.responses else None
            if isinstance(found, list) and found:
                try:
                    holder = json.loads(found[0].value)
                except ValueError:
                    holder = None
                self.holder = holder if isinstance(holder, dict) else None
            return False
        self.epoch = result.revision
        return True

    async def release(self) -> bool:
        """Give the group up: the key goes, fenced on the epoch."""
        self.stop("released")
        if not self.epoch:
            return False
        result = await self.etcd.txn([Compare.create_revision(self.own_key, "==", self.epoch)], [Delete(self.own_key)])
        return result.succeeded

    def stop(self, why: str) -> None:
        if self.lost is None:
            self.lost = why


class Coordinators:
    """The groups over several topics this node coordinates, and where to
    send the members of the others."""

    def __init__(self, store: ClusterStore) -> None:
        self.store = store
        self._held: dict[str, GroupCoordinator] = {}
        self._acquiring: set[str] = set()
        #: name -> (addr, http, when learned): holders refused acquisitions named.
        self._holders: dict[str, tuple[str, str, float]] = {}
        self.nursery: trio.Nursery | None = None
        self.logger: Any = get_logger(component="cluster-groups")

    def local(self, name: str) -> GroupCoordinator | None:
        coordinator = self._held.get(name)
        return coordinator if coordinator is not None and coordinator.accepting else None

    def admit(self, name: str, pattern: str) -> GroupCoordinator:
        """This node's coordinator of group ``name``, or NotOwnerError naming
        where to go (nobody: this node is taking it, ask again shortly)."""
        coordinator = self.local(name)
        if coordinator is not None:
            return coordinator
        addr, url = self.where(name)
        if not addr:
            self._acquire_soon(name, pattern)
            raise NotOwnerError(f"group {name!r}: this node is taking it over (ask again shortly)", topic=pattern)
        raise NotOwnerError(f"group {name!r} is coordinated by {addr}", topic=pattern, owner=addr, owner_url=url)

    def where(self, name: str) -> tuple[str, str]:
        """Where group ``name`` runs as this node knows it: (addr, http) of
        its holder or first choice, ("", "") when that is this node."""
        manager = self.store.manager
        if manager is None:
            return "", ""
        holder = self._holders.get(name)
        if holder is not None and anyio.current_time() - holder[2] < HOLDER_TTL and holder[0] != self.store.addr:
            return holder[0], holder[1]
        if not manager.keeper.held():
            refused = self.store._not_owner(name)  # cut off: another member, which knows better
            return refused.owner, refused.owner_url
        chosen = first({*manager.membership.members, manager.node}, name, -1)
        member = manager.membership.members.get(chosen) if chosen is not None else None
        if chosen == manager.node or member is None or not member.addr:
            return "", ""
        return member.addr, member.http

    def _acquire_soon(self, name: str, pattern: str) -> None:
        if name in self._acquiring or self.nursery is None:
            return
        self._acquiring.add(name)
        self.nursery.start_soon(self._acquire, name, pattern)

    async def _acquire(self, name: str, pattern: str) -> None:
        try:
            manager = self.store.manager
            if manager is None or not manager.keeper.held():
                return
            key = self.store.settings.keys.coordinator(name)
            coordinator = GroupCoordinator(self.store.etcd, manager.keeper, key, pattern, manager.node, self.store.addr)
            try:
                with trio.fail_after(self.store.etcd.timeout * 2):
                    won = await coordinator.acquire()
            except (EtcdError, TimeoutError) as exc:
                self.logger.info("group coordination not taken", group=name, error=repr(exc))
                return
            if won:
                self._held[name] = coordinator
                self._holders.pop(name, None)
                self.logger.info("coordinating group", group=name, epoch=coordinator.epoch)
                return
            holder = coordinator.holder or {}
            if len(self._holders) >= MAX_HOLDERS:
                self._holders.clear()
            self._holders[name] = (str(holder.get("addr", "")), self._http_of(str(holder.get("node", ""))), anyio.current_time())
        finally:
            self._acquiring.discard(name)

    def _http_of(self, node: str) -> str:
        manager = self.store.manager
        member = manager.membership.members.get(node) if manager is not None else None
        return member.http if member is not None else ""

    async def release(self, name: str) -> None:
        """Give group ``name`` up (deleted, or this node stops), if held."""
        coordinator = self._held.pop(name, None)
        if coordinator is None:
            return
        try:
            with trio.fail_after(self.store.etcd.timeout * 2):
                await coordinator.release()
        except (EtcdError, TimeoutError) as exc:  # its lease ends it anyway
            self.logger.info("group coordination not released", group=name, error=repr(exc))

    async def release_all(self) -> None:
        for name in list(self._held):
            await self.release(name)
