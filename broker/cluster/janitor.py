"""The janitor: objects no index entry references are deleted (docs/cluster.md §9).

Garbage is an object whose round never committed: its owner died or lost
the partition between the PUT and the transaction, or the transaction was
refused or its outcome lost and later found not applied. One node at a time
is the janitor: it holds ``{p}janitor``, created only if absent under its
member lease, so the next node takes over when it dies. Each sweep:

1. lists ``data/`` and takes the objects older than the grace period (far
   longer than any commit of them could still be in flight);
2. writes each one's tombstone ``gone/{object}`` (value: when, in wall-clock
   ms), then reads the whole index at a later revision: an object the index
   references is kept and its tombstone deleted; any other is deleted. Every
   append transaction compares ``create_revision(gone/{object}) == 0``, so
   once the tombstone exists no commit can come to reference the object
   (a stalled owner's late commit is refused);
3. deletes tombstones older than the grace period (their objects are gone).

Bounded: index keys are read a page at a time, a sweep handles at most
``max_objects`` candidates and expires at most a page of tombstones.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import attrs

from ..logs import get_logger
from .etcd import Compare, Delete, Etcd, EtcdError, Put, prefix_end
from .keys import ClusterKeys
from .lease import LeaseKeeper
from .objects import NoSuchKey, ObjectStore, ObjectStoreError
from .entries import IndexEntry

#: docs/cluster.md §9: the grace period and the time between sweeps.
DEFAULT_GRACE = 3600.0
DEFAULT_EVERY = 600.0
#: Index keys (and tombstones) per range read; candidates per sweep.
PAGE = 1000
DEFAULT_MAX_OBJECTS = 100_000


@attrs.define
class Sweep:
    """What one sweep did."""

    listed: int = 0
    candidates: int = 0
    kept: int = 0
    deleted: int = 0
    tombstones_removed: int = 0


class Janitor:
    def __init__(
        self,
        etcd: Etcd,
        objects: ObjectStore,
        *,
        keys: ClusterKeys | None = None,
        grace: float = DEFAULT_GRACE,
        every: float = DEFAULT_EVERY,
        max_objects: int = DEFAULT_MAX_OBJECTS,
    ) -> None:
        self.etcd = etcd
        self.objects = objects
        self.keys = keys or ClusterKeys()
        self.grace = grace
        self.every = every
        self.max_objects = max_objects
        self.sweeps = 0
        self.last: Sweep | None = None
        #: Objects the sweeps of this node deleted, in all.
        self.deleted = 0
        self._log: Any = get_logger(component="cluster-janitor")

    @property
    def _key(self) -> bytes:
        return self.keys.prefix + b"janitor"

    async def run(self, keeper: LeaseKeeper) -> None:
        """Sweep every ``every`` seconds while this node holds the janitor key
        (taking it when free), until cancelled."""
        while True:
            try:
                if await self._hold(keeper):
                    self.last = await self.sweep()
                    self.sweeps += 1
                    self.deleted += self.last.deleted
                    self._log.info("swept", **attrs.asdict(self.last))
            except (EtcdError, ObjectStoreError, OSError, TimeoutError) as exc:
                self._log.warning("sweep failed; again at the next", error=repr(exc))
            await anyio.sleep(self.every)

    async def _hold(self, keeper: LeaseKeeper) -> bool:
        """Whether this node is the janitor: it holds the key under its
        lease, creating it if absent."""
        if not keeper.held():
            return False
        result = await self.etcd.txn(
            [Compare.create_revision(self._key, "==", 0)],
            [Put(self._key, b"janitor", keeper.lease)],
        )
        if result.succeeded:
            return True
        kv = await self.etcd.get(self._key)
        return kv is not None and kv.lease == keeper.lease

    async def sweep(self, now: float | None = None) -> Sweep:
        """One sweep (the steps above); ``now`` in seconds since the epoch."""
        now = time.time() if now is None else now
        done = Sweep()
        listed = await self.objects.list("data/")
        done.listed = len(listed)
        old = [o.key for o in listed if o.last_modified and o.last_modified <= now - self.grace]
        candidates = old[: self.max_objects]
        done.candidates = len(candidates)
        # 1. Tombstones first: from here on no commit can reference them.
        # One transaction each, created only if absent: the tombstone of a
        # sweep that stopped half-way stands, with its time.
        for name in candidates:
            await self.etcd.txn(
                [Compare.create_revision(self.keys.gone(name), "==", 0)],
                [Put(self.keys.gone(name), str(int(now * 1000)).encode())],
            )
        # 2. The index, read after every tombstone was written.
        referenced = await self._referenced()
        for name in candidates:
            if name in referenced:
                await self.etcd.delete(self.keys.gone(name))
                done.kept += 1
                continue
            try:
                await self.objects.delete(name)
            except NoSuchKey:
                pass
            done.deleted += 1
        # 3. Tombstones older than the grace period: their objects are gone.
        done.tombstones_removed = await self._expire_tombstones(now)
        return done

    async def _referenced(self) -> set[str]:
        """Every object the index names, read a page at a time."""
        prefix = self.keys.prefix + b"idx/"
        end = prefix_end(prefix)
        names: set[str] = set()
        start = prefix
        revision = 0
        while True:
            page = await self.etcd.range(start, end, limit=PAGE, revision=revision)
            revision = revision or page.revision  # one consistent view
            for kv in page.kvs:
                try:
                    first = int(kv.key.rsplit(b"/", 1)[1])
                    names.add(IndexEntry.decode(first, kv.value).object)
                except ValueError:
                    continue  # not an entry we can read: it references nothing we delete
            if not page.more or not page.kvs:
                return names
            start = page.kvs[-1].key + b"\0"

    async def _expire_tombstones(self, now: float) -> int:
        prefix = self.keys.prefix + b"gone/"
        found = await self.etcd.range(prefix, prefix_end(prefix), limit=PAGE)
        gone = 0
        now_ms, grace_ms = int(now * 1000), int(self.grace * 1000)
        for kv in found.kvs:
            try:
                written_ms = int(kv.value)
            except ValueError:
                continue
            if written_ms < now_ms - grace_ms:  # strictly: not those of this sweep
                result = await self.etcd.txn(
                    [Compare.mod_revision(kv.key, "==", kv.mod_revision)], [Delete(kv.key)]
                )
                gone += int(result.succeeded)
        return gone
