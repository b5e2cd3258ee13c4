"""Delayed delivery in cluster mode (protocol.md, "Delayed delivery";
docs/cluster.md §10 "Delayed messages").

A single broker keeps delayed batches in its own files; a cluster node
keeps nothing of its own, so its acknowledgement of a DELAYED publish must
promise what its other acknowledgements do: the batch is in etcd (or, when
large, in the object store with etcd naming it) before the PUBACK.

- **Scheduling** (``add``, then ``sync`` in the committer's round, so the
  PUBACK waits as any publish's does): any node writes
  ``{p}delay/{due_ms:015d}/{topic}/{id}``, created only if absent. The value
  is ``i`` or ``o``, then ``d`` (published with DEDUP) or ``-``, then the
  batch inline (at most INLINE_BYTES) or the name of an object holding it.
  ``id`` is the batch's msg-id when it was published exactly-once, so a
  resend of the same delayed publish finds its key there and is not
  scheduled twice; else a random name.
- **Releasing** (``run``, on every node): every POLL seconds a node reads
  the keys due by now (they sort by due time), in due order, and publishes
  those of topics it owns through the core (as the broker itself, with
  DEDUP when the publisher asked for it), waits until each is durable,
  then deletes its key (compared on its mod revision) and its object.
  Keys of topics other nodes own are theirs to release.

At-least-once, as on a single broker: a node that dies between a release
and the key's deletion leaves it for the next owner, which publishes it
again (stored once when it was published exactly-once). Bounded: at most
MAX_SCHEDULED keys in the cluster (a delayed publish past it is refused,
STORAGE_FULL), MAX_WAITING scheduled and not yet written per node, PAGE
keys per read and PAGES reads per look, RELEASE_ROUND releases per look,
WRITERS writes at once.
The release time is the due time to within POLL seconds (a single broker:
to within its timers').
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from pybroker.protocol import MalformedBatch, first_msg_id

from ..delays import Entry
from ..delays.schedule import Durable, Release, wall_ms
from ..logs import get_logger
from ..storage.errors import StorageError
from .etcd import Compare, Delete, EtcdError, Put
from .keys import escape, unescape
from .objects import NoSuchKey, ObjectStoreError

if TYPE_CHECKING:
    from ..router import Held
    from .store import ClusterStore

#: A batch up to this size goes in its key's value; a larger one in an object.
INLINE_BYTES = 512 * 1024
#: Seconds between looks for due batches.
POLL = 1.0
#: Keys read per page, pages read per look at most, and batches released
#: per look (in due order).
PAGE = 256
PAGES = 16
RELEASE_ROUND = 256
#: Delayed batches the cluster keeps at most (etcd stays far below its quota:
#: docs/cluster.md §13), and scheduled on one node, not yet written.
MAX_SCHEDULED = 100_000
MAX_WAITING = 10_000
#: Writes to etcd (and the object store) at once, per node.
WRITERS = 16
DUE_DIGITS = 15

class ClusterSchedule:
    """What ``broker/delays/Schedule`` is to a single broker, for a cluster node."""

    def __init__(self, store: ClusterStore, *, clock: Callable[[], int] = wall_ms) -> None:
        self.store = store
        self.prefix = store.settings.keys.prefix + b"delay/"
        self.clock = clock
        #: Delayed batches in the cluster at the last look (metrics), and
        #: those this node released.
        self.pending = 0
        self.released = 0
        self._waiting: list[tuple[bytes, str, bytes, bool, Held | None]] = []
        self._releasing: set[bytes] = set()
        self.logger: Any = get_logger(component="cluster-delays")

    def recover(self) -> int:
        return 0  # nothing of it is on this node

    def key(self, due_ms: int, topic: str, name: bytes) -> bytes:
        return b"%s%0*d/%s/%s" % (self.prefix, DUE_DIGITS, due_ms, escape(topic), name)

    def parse(self, key: bytes) -> tuple[int, str]:
        """(due_ms, topic) of a delay key; ValueError if it is not one."""
        due, topic, name = key[len(self.prefix) :].split(b"/")
        if not key.startswith(self.prefix) or not due.isdigit() or not name:
            raise ValueError(f"not a delay key: {key!r:.200}")
        return int(due), unescape(topic)

    # -- scheduling ------------------------------------------------------------

    def add(self, due_ms: int, topic: str, batch: bytes, dedup: bool, held: Held | None) -> None:
        """Schedule a delayed batch: written to etcd in the next round
        (``sync``), which its acknowledgement waits for. StorageError, with
        nothing kept, over the bounds."""
        if self.pending >= MAX_SCHEDULED:
            raise StorageError(
                f"storage full: the cluster keeps at most {MAX_SCHEDULED} delayed batches", full=True, topic=topic
            )
        if len(self._waiting) >= MAX_WAITING:
            raise StorageError(f"{MAX_WAITING} delayed batches are waiting to be written", full=True, topic=topic)
        msg_id = None
        if dedup:
            try:
                msg_id = first_msg_id(batch)
            except MalformedBatch:
                msg_id = None
        name = base64.urlsafe_b64encode(msg_id.encode("utf-8")).rstrip(b"=") if msg_id else b"~" + secrets.token_urlsafe(12).encode()
        self._waiting.append((self.key(due_ms, topic, name), topic, batch, dedup, held))

    async def sync(self) -> None:
        """Write what was scheduled since the last round; a batch that could
        not be written is refused (its ``Held.error``)."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        limiter = trio.CapacityLimiter(WRITERS)
        async with trio.open_nursery() as nursery:
            for item in waiting:
                nursery.start_soon(self._write, limiter, *item)

    async def _write(
        self, limiter: trio.CapacityLimiter, key: bytes, topic: str, batch: bytes, dedup: bool, held: Held | None
    ) -> None:
        flag = b"d" if dedup else b"-"
        async with limiter:
            try:
                with trio.fail_after(self.store.etcd.timeout * 2):
                    if len(batch) <= INLINE_BYTES:
                        value = b"i" + flag + batch
                    else:
                        name = "delay/" + key[len(self.prefix) :].decode("utf-8")
                        await self.store.objects.put_if_absent(name, batch)
                        value = b"o" + flag + name.encode("utf-8")
                    # Created only if absent: the same exactly-once publish
                    # sent again finds its key there, and is scheduled once.
                    await self.store.etcd.txn([Compare.create_revision(key, "==", 0)], [Put(key, value)])
            except (EtcdError, ObjectStoreError, OSError, TimeoutError) as exc:
                self.logger.warning("could not schedule a delayed batch: refused", topic=topic, error=repr(exc))
                if held is not None:
                    held.error = StorageError(
                        f"the delayed batch could not be kept in the cluster: {exc}", full=False, topic=topic
                    )
                return
        self.pending += 1

    # -- releasing ---------------------------------------------------------------

    async def run(self, release: Release, durable: Durable, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Release the due batches of the topics this node owns, forever."""
        task_status.started()
        while True:
            try:
                await self.step(release, durable)
            except EtcdError as exc:
                self.logger.info("cannot read delayed batches", error=repr(exc))
            await trio.sleep(POLL)

    async def step(self, release: Release, durable: Durable) -> int:
        """One look: release what is due of the topics this node owns, in
        due order; how many were released."""
        etcd = self.store.etcd
        counted = await etcd.range(self.prefix, self.prefix + b"\xff", limit=1, keys_only=True)
        self.pending = counted.count
        start, end = self.prefix, b"%s%0*d" % (self.prefix, DUE_DIGITS, self.clock() + 1)
        released = 0
        # Pages on while this node finds nothing of its own in them (others'
        # due batches, or those of a topic waiting for an owner, must not
        # hold its own back), within a bound.
        for _ in range(PAGES):
            # Keys only: a page of values could be PAGE inline batches of
            # up to INLINE_BYTES each; a batch is read when it is released.
            found = await etcd.range(start, end, limit=PAGE, keys_only=True)
            for listed in found.kvs:
                if released >= RELEASE_ROUND:
                    return released
                try:
                    due_ms, topic = self.parse(listed.key)
                except ValueError:
                    continue  # not written by this code: left alone
                if not self._owned(topic) or listed.key in self._releasing:
                    continue
                self._releasing.add(listed.key)
                try:
                    kv = await etcd.get(listed.key)
                    if kv is not None:  # (else released meanwhile)
                        released += await self._release(kv, due_ms, topic, release, durable)
                finally:
                    self._releasing.discard(listed.key)
            if not found.more or not found.kvs:
                break
            start = found.kvs[-1].key + b"\x00"
        return released

    def _owned(self, topic: str) -> bool:
        manager = self.store.manager
        return manager is not None and manager.local(*self.store.address(topic)) is not None

    async def _release(self, kv: Any, due_ms: int, topic: str, release: Release, durable: Durable) -> int:
        kind, flag, body = kv.value[:1], kv.value[1:2], kv.value[2:]
        name = body.decode("utf-8", "replace") if kind == b"o" else None
        try:
            if kind == b"i":
                batch = body
            elif name is not None:
                try:
                    batch = await self.store.objects.get(name)
                except NoSuchKey:
                    self.logger.error("a delayed batch's object is gone: dropped", topic=topic, object=name)
                    await self._forget(kv, None)
                    return 0
            else:
                self.logger.error("a delayed batch that does not decode: dropped", topic=topic, key=kv.key[:200])
                await self._forget(kv, None)
                return 0
            try:
                await durable(release(Entry(0, 0, due_ms, topic, batch, flag == b"d")))
            except Exception as exc:  # refused here (no longer the owner, storage): the next look
                self.logger.info("delayed batch not released yet", topic=topic, error=str(exc))
                return 0
            await self._forget(kv, name)
        except (EtcdError, ObjectStoreError, OSError) as exc:
            self.logger.info("could not finish a delayed batch's release", topic=topic, error=repr(exc))
            return 0
        self.released += 1
        self.pending = max(0, self.pending - 1)
        return 1

    async def _forget(self, kv: Any, name: str | None) -> None:
        # Compared on its mod revision: a key written again meanwhile stays.
        await self.store.etcd.txn([Compare.mod_revision(kv.key, "==", kv.mod_revision)], [Delete(kv.key)])
        if name is not None:
            await self.store.objects.delete(name)
