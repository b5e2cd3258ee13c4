"""Batches handed to a topic another node owns: dead letters (docs/cluster.md §10).

A consumer group runs at its topic's owner, and its dead-letter topic may
be owned by another node, which alone may append to it. The group's node
does not send it there over the network (it would need an identity of its
own when ``--auth`` is on); it leaves the batch in etcd, where the
dead-letter topic's owner finds it:

- **Handing off** (``send``): the batch, named by a ``msg-id`` header on
  its first message, goes to ``{p}handoff/{topic}/{msg-id}``, inline (a
  value of ``i`` and the batch) when it is at most ``INLINE_BYTES``, else
  as an object ``handoff/{topic}/{msg-id}`` in the store with the key
  holding its name (``o`` and the name): etcd's requests stay far below
  its 1.5 MiB limit. Once the key is written, ``done`` is called: the
  group settles the message. Until then it stays pending, and the group
  tries again after its retry pause; so does a node that takes the group
  over after a crash. Writing the same key again is harmless.
- **Taking** (``run``, on every node): every ``POLL`` seconds, and when
  this node's holdings change, the hand-offs of the topics this node owns
  are published here through ``take`` (the broker's own publish, with the
  msg-id: a batch taken twice, by two owners in turn, is stored once
  within the dedup window) and, once durable, the key is deleted (compared
  on its mod revision) and then its object.

At-least-once, as dead letters are: a crash between the publish and the
delete publishes again, deduplicated within the window. Bounded: at most
``MAX_SENDING`` hand-offs in flight per node (beyond that ``send`` does
nothing and the group's retry comes back), as many being taken
(``MAX_TAKING``; the rest wait for the next look), ``PAGE`` keys read per
read.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from pybroker.protocol import partition_of

from ..logs import get_logger
from .etcd import Compare, Delete, EtcdError, prefix_end
from .keys import escape, unescape
from .objects import NoSuchKey, ObjectStoreError

if TYPE_CHECKING:
    from .etcd import Etcd, KeyValue
    from .keys import ClusterKeys
    from .objects import ObjectStore
    from .ownership import OwnershipManager

#: Batches larger than this go to the object store, their name to etcd.
INLINE_BYTES = 512 * 1024
#: Hand-offs in flight from one node, and being taken by one node.
MAX_SENDING = 64
MAX_TAKING = 64
#: Seconds between looks for hand-offs to take; keys read per look.
POLL = 1.0
PAGE = 256

Take = Callable[[str, bytes], Awaitable[None]]


class TakeRefused(Exception):
    """``take`` could not publish the batch here: now (this node no longer
    owns the topic, its store refused it: the key stays for a later look),
    or ever (``permanent``: a batch no broker stores; it is dropped)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class HandOffs:
    def __init__(self, etcd: Etcd, objects: ObjectStore, keys: ClusterKeys, register: Callable[[str], None]) -> None:
        self.etcd = etcd
        self.objects = objects
        self.prefix = keys.prefix + b"handoff/"
        #: Makes sure a topic handed to has an owner (ClusterStore.register).
        self.register = register
        #: Publishes a taken batch on this node and waits until it is
        #: durable (set by the broker's core; raises when refused).
        self.take: Take | None = None
        #: Where sends run (the store's nursery while it runs).
        self.nursery: trio.Nursery | None = None
        self._sending: set[bytes] = set()
        self._taking: set[bytes] = set()
        self.sent = self.taken = 0
        self.logger = get_logger(component="cluster-handoff")

    def key(self, topic: str, msg_id: str) -> bytes:
        return self.prefix + escape(topic) + b"/" + base64.urlsafe_b64encode(msg_id.encode("utf-8")).rstrip(b"=")

    def topic_of(self, key: bytes) -> str:
        """The topic a hand-off key is for (ValueError if it is not one)."""
        segment, sep, _ = key[len(self.prefix) :].partition(b"/")
        if not key.startswith(self.prefix) or not sep:
            raise ValueError(f"not a hand-off key: {key!r:.200}")
        return unescape(segment)

    # -- handing off ---------------------------------------------------------

    def send(self, topic: str, msg_id: str, batch: bytes, done: Callable[[], None]) -> None:
        """Hand ``batch`` (``msg_id`` names it in its first message) to
        ``topic``'s owner, in the background; ``done()`` once it is in etcd.
        Nothing happens while the same hand-off is in flight, over
        MAX_SENDING, or while the store is not running."""
        key = self.key(topic, msg_id)
        if self.nursery is None or key in self._sending or len(self._sending) >= MAX_SENDING:
            return
        self._sending.add(key)
        self.register(topic)
        self.nursery.start_soon(self._send, topic, key, batch, done)

    async def _send(self, topic: str, key: bytes, batch: bytes, done: Callable[[], None]) -> None:
        try:
            if len(batch) <= INLINE_BYTES:
                value = b"i" + batch
            else:
                name = "handoff/" + key[len(self.prefix) :].decode("utf-8")  # (topic names are UTF-8)
                await self.objects.put_if_absent(name, batch)  # (False: there from an earlier try)
                value = b"o" + name.encode("utf-8")
            await self.etcd.put(key, value)
        except (EtcdError, ObjectStoreError, OSError) as exc:
            self.logger.warning("could not hand a batch off; the group tries again", topic=topic, error=repr(exc))
            return
        finally:
            self._sending.discard(key)
        self.sent += 1
        done()

    # -- taking ----------------------------------------------------------------

    async def run(self, manager: OwnershipManager) -> None:
        """Take the hand-offs of the topics this node owns, until cancelled."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    await self._look(manager, nursery)
                except EtcdError as exc:
                    self.logger.info("cannot read hand-offs", error=repr(exc))
                with trio.move_on_after(POLL):
                    await manager.changed()

    async def _look(self, manager: OwnershipManager, nursery: trio.Nursery) -> None:
        start, end = self.prefix, prefix_end(self.prefix)
        for _ in range(1000):  # a bound: PAGE x 1000 keys per look
            found = await self.etcd.range(start, end, limit=PAGE)
            for kv in found.kvs:
                try:
                    topic = self.topic_of(kv.key)
                except ValueError:
                    continue  # not written by this code: left alone
                if len(self._taking) >= MAX_TAKING:
                    return  # the rest at the next look
                if kv.key not in self._taking and manager.local(*(partition_of(topic) or (topic, 0))) is not None:
                    self._taking.add(kv.key)
                    nursery.start_soon(self._take, topic, kv)
            if not found.more or not found.kvs:
                return
            start = found.kvs[-1].key + b"\x00"

    async def _take(self, topic: str, kv: KeyValue) -> None:
        try:
            kind, body = kv.value[:1], kv.value[1:]
            name = body.decode("utf-8", "replace") if kind == b"o" else None
            if kind == b"i":
                batch = body
            elif name is not None:
                try:
                    batch = await self.objects.get(name)
                except NoSuchKey:
                    self.logger.error("a hand-off's object is gone: dropped", topic=topic, object=name)
                    await self._forget(kv, None)
                    return
            else:
                self.logger.error("a hand-off that does not decode: dropped", topic=topic, key=kv.key[:200])
                await self._forget(kv, None)
                return
            if self.take is None:
                return
            try:
                await self.take(topic, batch)
            except TakeRefused as exc:
                if not exc.permanent:
                    self.logger.info("could not take a hand-off yet", topic=topic, error=str(exc))
                    return
                self.logger.error("a hand-off no broker would store: dropped", topic=topic, error=str(exc))
                await self._forget(kv, name)
                return
            self.taken += 1
            await self._forget(kv, name)
        except (EtcdError, ObjectStoreError, OSError) as exc:
            self.logger.info("could not take a hand-off", topic=topic, error=repr(exc))
        finally:
            self._taking.discard(kv.key)

    async def _forget(self, kv: KeyValue, name: str | None) -> None:
        # Compared on its mod revision: a key written again meanwhile (a
        # group's retry) stays, and is taken again (the msg-id makes it one).
        await self.etcd.txn([Compare.mod_revision(kv.key, "==", kv.mod_revision)], [Delete(kv.key)])
        if name is not None:
            await self.objects.delete(name)
