"""Cluster membership (docs/cluster.md §3, §4).

A node writes ``members/{node}`` = ``{"addr", "http", "started"}`` under
its member lease (kept alive by a ``LeaseKeeper``), so the key goes when
the node's lease ends, whatever happens to the node. Every node keeps the
live member set from a range read of ``members/`` and a watch from that
read's revision + 1 (a ``PrefixMirror``).
"""

from __future__ import annotations

import json
import time

import attrs

from .etcd import NOT_FOUND, Etcd, EtcdError, KeyValue
from .keys import ClusterKeys
from .lease import LeaseKeeper, LeaseLost
from .mirror import PrefixMirror

#: Bound on the member set (a registry of more is refused, not mirrored).
MAX_MEMBERS = 1024


@attrs.frozen
class Member:
    """One live node: its name, its broker address, its HTTP address, when
    it started (wall clock, ms), and the lease its key is held under."""

    node: str
    addr: str = ""
    http: str = ""
    started: int = 0
    lease: int = 0

    def encode(self) -> bytes:
        return json.dumps({"addr": self.addr, "http": self.http, "started": self.started}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, node: str, kv: KeyValue) -> Member:
        """A member from its key's value; a value that is not a JSON object
        still names a live node (with no addresses)."""
        try:
            raw = json.loads(kv.value)
        except ValueError:
            raw = None
        if not isinstance(raw, dict):
            return cls(node, lease=kv.lease)
        started = raw.get("started")
        return cls(
            node,
            str(raw.get("addr", "")),
            str(raw.get("http", "")),
            started if isinstance(started, int) else 0,
            kv.lease,
        )


class Membership:
    """This node's registration and every node's view of the live members.

    ``register`` writes this node's key under ``keeper``'s lease; ``run``
    keeps ``members`` current (run it in a task group); ``leave`` deletes
    this node's key so that the others rank without it at once.
    """

    def __init__(
        self,
        etcd: Etcd,
        keeper: LeaseKeeper,
        node: str,
        *,
        keys: ClusterKeys | None = None,
        addr: str = "",
        http: str = "",
        max_members: int = MAX_MEMBERS,
    ) -> None:
        if not node:
            raise ValueError("a node needs a name")
        self.etcd = etcd
        self.keeper = keeper
        self.node = node
        self.keys = keys or ClusterKeys()
        self.me = Member(node, addr, http, int(time.time() * 1000))
        self.mirror = PrefixMirror(etcd, self.keys.members_prefix, max_keys=max_members, name="members")

    async def register(self) -> None:
        """Write ``members/{node}`` under the member lease (granting the
        lease first if the keeper has none)."""
        if not self.keeper.lease:
            await self.keeper.grant()
        if not self.keeper.held():
            raise LeaseLost(f"lease {self.keeper.lease:x} is not held")
        self.me = attrs.evolve(self.me, lease=self.keeper.lease)
        try:
            await self.etcd.put(self.keys.member(self.node), self.me.encode(), lease=self.keeper.lease)
        except EtcdError as exc:
            if exc.code == NOT_FOUND:  # "requested lease not found": it ended
                raise LeaseLost(f"lease {self.keeper.lease:x} is gone: {exc.message}") from None
            raise

    async def leave(self) -> None:
        """Delete this node's key (its lease stays: it may still be
        handing partitions over)."""
        await self.etcd.delete(self.keys.member(self.node))

    async def run(self) -> None:
        await self.mirror.run()

    @property
    def members(self) -> dict[str, Member]:
        """The live members by name, as of ``mirror.revision``."""
        out: dict[str, Member] = {}
        for key, kv in self.mirror.kvs.items():
            try:
                node = self.keys.name_of(self.keys.members_prefix, key)
            except ValueError:
                continue  # not a member key (written by something else): ignored
            out[node] = Member.decode(node, kv)
        return out

    def live(self) -> list[str]:
        """The live members' names, sorted."""
        return sorted(self.members)

    async def changed(self) -> None:
        await self.mirror.changed()
