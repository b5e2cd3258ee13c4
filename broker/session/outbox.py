"""A connection's outbound queue: what is waiting to be written, with its bound.

The ``Outbox`` is the connection's :class:`~broker.subscriber.Subscriber`:
the router hands it batches (``deliver``), consumer groups hand it their
messages (``deliver_group``), the session queues its answers (``queue``).
Over plain TCP what is queued is written directly, every connection's at
the end of a pass of the broker's work (broker/session/flushing.py: one
``writev`` per connection per pass, no task switch per connection); what
the socket does not take, and everything over TLS, goes to the writer task,
which joins everything queued into one ``send_all`` per wake-up (write
coalescing) and, while the queue has room, refills it from the log for
subscriptions that are lagging (a replay, a full queue, no credit).

Memory is bounded (protocol.md, "Flow control"): a delivery that would take
the bytes queued plus the bytes being sent over ``limit`` is not queued;
that subscription reads the topic forward from the log instead, until it has
caught up. Answers are always queued; the session stops reading the
connection while the queue is over its bound (``over_limit``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import os
import struct

import trio

from pybroker.protocol import (
    FRAME_HEADER,
    Connection,
    Error,
    ErrorCode,
    Event,
    FrameType,
    RefKind,
    deliver_header,
    group_deliver_header,
)

from ..logs import get_logger
from ..storage import DataLoss
from ..storage.errors import ReadPending
from ..subscriber import SubscriberInfo
from . import flushing

if TYPE_CHECKING:
    from ..router import Subscription, Topic

class _Parked(Protocol):
    def unpark(self) -> None: ...


#: Buffers one writev takes (Linux's IOV_MAX); more go to the writer task.
_IOV_MAX = 1024

#: Everything of a DELIVER frame before its topic (protocol.md, "DELIVER"):
#: the frame header, sub_id, base_offset, timestamp, the topic's length. One
#: pack per delivery instead of deliver_header's three (a delivery per
#: subscriber per PUBLISH; tests/test_perframe.py checks it against the codec).
DELIVER_PREFIX = struct.Struct(">" + FRAME_HEADER.format.lstrip("<>!=@") + "IQQH")
_DELIVER_BODY_FIXED = DELIVER_PREFIX.size - FRAME_HEADER.size
_DELIVER = int(FrameType.DELIVER)


class Outbox:
    """Holds no reference to its session (which owns it) except while the
    connection is parked: a closed connection is freed by reference
    counting, not left to the garbage collector with everything it holds."""

    # Slots: one per connection (10,000 idle ones are 10,000 of these).
    __slots__ = (
        "stream", "conn", "limit", "info", "user", "named", "error_fields", "_out", "queued_bytes",
        "sending", "lagging", "_wake", "_room", "_done", "accepting", "closing", "lost", "bytes_out",
        "_flusher", "_socket", "_marked", "_nursery", "_on_broken", "_writer", "unpark", "_writer_wanted",
        "_retire",
    )

    def __init__(self, stream: trio.abc.Stream, conn: Connection, limit: int, info: SubscriberInfo) -> None:
        self.stream = stream
        self.conn = conn
        self.limit = limit
        #: Who this connection is (its client name arrives with HELLO).
        self.info = info
        #: For the logger: the authenticated user; HELLO has come (the
        #: client's name is known).
        self.user: str | None = None
        self.named = False
        #: The client asked for ERROR fields in its HELLO (protocol.md, "ERROR").
        self.error_fields = False
        self._out: list[bytes | memoryview] = []
        self.queued_bytes = 0
        self.sending = 0  # bytes handed to send_all and not yet sent
        # Insertion-ordered set of subscriptions with topics to read from the log.
        self.lagging: dict[Subscription, None] = {}
        # The writer task's wake-up, the paused reader's and the writer's
        # end: each made when first waited for (an idle connection has none).
        self._wake: trio.Event | None = None
        self._room: trio.Event | None = None
        self._done: trio.Event | None = None
        #: False once the connection is ending: nothing more is delivered.
        self.accepting = True
        self.closing = False
        self.lost = False  # the writer found the connection broken
        self.bytes_out = 0
        # Plain TCP: written directly by write_now (flushing.py); TLS has
        # its own record layer, so only its writer task writes.
        self._flusher = flushing.current() if isinstance(stream, trio.SocketStream) else None
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._marked = False  # in the flusher's dirty set
        # The writer task starts when first needed (start_writer): over
        # plain TCP an idle connection's few frames are written directly.
        self._nursery: trio.Nursery | None = None
        self._on_broken: Callable[[], None] | None = None
        self._writer = False
        #: While the connection is parked (broker/session/parking.py): its
        #: session, whose ``unpark`` gives it a task again, where the writer
        #: can start. (The session itself, not a bound method: no object
        #: made per parking.)
        self.unpark: _Parked | None = None
        self._writer_wanted = False
        # The writer task is to end once nothing is left to write (retire_writer).
        self._retire = False

    @property
    def logger(self) -> Any:
        """This connection's logger, bound when something is logged (kept,
        a bound logger and its context cost about 400 B per connection)."""
        info = self.info
        if self.user is None:
            if self.named:
                return get_logger(conn_id=info.connection, peer=info.peer, client=info.client)
            return get_logger(conn_id=info.connection, peer=info.peer)
        if self.named:
            return get_logger(conn_id=info.connection, peer=info.peer, user=self.user, client=info.client)
        return get_logger(conn_id=info.connection, peer=info.peer, user=self.user)

    @property
    def done(self) -> trio.Event:
        """Set when the writer task has ended."""
        if self._done is None:
            self._done = trio.Event()
        return self._done

    @property
    def over_limit(self) -> bool:
        return self.queued_bytes > self.limit

    def queue(self, data: bytes) -> None:
        """An answer (PUBACK, PONG, a reply, an error): always queued."""
        self._out.append(data)
        self.queued_bytes += len(data)
        self._kick()

    def _kick(self) -> None:
        """Something was queued: written at the end of this pass of work,
        or by the writer task (TLS; a write in progress)."""
        if self._flusher is not None and not self.sending:
            if not self._marked:
                self._marked = True
                self._flusher.mark(self)
        else:
            self.wake_writer()

    def start_writer(self, nursery: trio.Nursery, on_broken: Callable[[], None]) -> None:
        """Where the writer task runs, and what it calls when it finds the
        connection broken. Over TLS it starts now; over plain TCP when
        something is left for it (a write the socket did not take, refills
        from the log, the end of the connection)."""
        self._nursery = nursery
        self._on_broken = on_broken
        if self._flusher is None or self._writer_wanted:
            self._writer_wanted = False
            self.wake_writer()

    def wake_writer(self) -> None:
        """The writer task has work: wake it, or start it."""
        if self._writer:
            if self._wake is not None:
                self._wake.set()
            return
        if self._nursery is None or self._on_broken is None:
            if self.unpark is not None:
                # Parked: the session's next task starts the writer.
                self._writer_wanted = True
                self.unpark.unpark()
            return  # else the connection is over (writer_gone): nothing more is sent
        self._writer = True
        self._nursery.start_soon(self.run, self._on_broken)

    def retire_writer(self) -> None:
        """The connection has been idle a while: over plain TCP, end the
        writer task once it has nothing to write (the session may then be
        parked)."""
        if self._writer and self._flusher is not None and not self.closing:
            self._retire = True
            if self._wake is not None:
                self._wake.set()

    def writer_gone(self) -> None:
        """The session's nursery is closed: no writer task can start now.
        Drops the nursery and the session's callback, which would otherwise
        keep the session in a reference cycle (freed only by the collector)."""
        self._nursery = None
        self._on_broken = None

    def write_now(self) -> None:
        """Write what is queued straight to the socket, as much as it takes
        without blocking; the rest is the writer task's (it waits until the
        socket can take more). Only while the writer is not in a send."""
        self._marked = False
        if not self._out or self.sending or self.lost or self._socket is None or (
            self._done is not None and self._done.is_set()
        ):
            return
        try:
            self._writev(self._socket)
        except (OSError, trio.ClosedResourceError):
            # Broken: the writer says so in the usual way.
            self.wake_writer()
            return
        if self._out or (self.lagging and self.accepting):
            self.wake_writer()  # the rest, or refills from the log, are the writer's

    def _writev(self, sock: Any) -> None:
        """One ``writev`` of what is queued (plain TCP), as much as the
        socket takes now; raises OSError when the connection is broken."""
        # The socket's number now: -1 once closed, so never a number
        # reused by another connection (no await between here and writev).
        fd = sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError
        out = self._out
        try:
            written = os.writev(fd, out if len(out) <= _IOV_MAX else out[:_IOV_MAX])
        except BlockingIOError:
            return
        self.bytes_out += written
        self.queued_bytes -= written
        if not self.queued_bytes:
            out.clear()
        else:
            done = 0
            while done < len(out) and written >= len(out[done]):
                written -= len(out[done])
                done += 1
            rest = out[done:]
            if written:
                # A view, not a copy: a batch of megabytes written in many
                # pieces would otherwise be copied once per piece.
                rest[0] = memoryview(rest[0])[written:]
            self._out = rest
        if self._room is not None:
            self._room.set()

    def notify_room(self) -> None:
        """Something a paused reader waits for changed (answers went out)."""
        if self._room is not None:
            self._room.set()

    def refuse(
        self,
        code: ErrorCode,
        message: str,
        ref: int,
        ref_kind: RefKind,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        """Queue a request's ERROR (not fatal)."""
        self.queue(self.refusal(code, message, ref, ref_kind, fields))

    def send(self, event: Event) -> bytes:
        """``event``'s frame; nothing once the connection can send nothing
        more (the writer found the peer gone, or the session finished):
        answers still owed then have nobody to go to."""
        if self.conn.we_finished:
            return b""
        return self.conn.send(event)

    def refusal(
        self,
        code: ErrorCode,
        message: str,
        ref: int,
        ref_kind: RefKind,
        fields: Mapping[str, str] | None = None,
    ) -> bytes:
        """A request's ERROR frame, with fields if the client asked for them;
        nothing once the connection can send nothing more (the writer found
        the peer gone, or the session finished): the answer has nobody to go to."""
        self.logger.info("request refused", code=int(code), error=code.name, detail=message, ref=ref)
        if not self.error_fields:
            fields = None
        return self.send(Error(int(code), message, ref, ref_kind, fatal=False, fields=dict(fields or {})))

    def _data_lost(self, sub: Subscription, lost: DataLoss) -> None:
        """Tell a subscription which offsets it will never get, and why."""
        self.refuse(ErrorCode.DATA_LOST, lost.describe(), sub.sub_id, RefKind.SUBSCRIPTION, lost.fields())
        self.logger.warning(
            "subscriber skipped lost offsets",
            sub_id=sub.sub_id,
            topic=lost.topic,
            first_missing=lost.first,
            count=lost.count,
            reason=lost.reason,
        )

    # -- the Subscriber protocol ---------------------------------------------

    def topic_deleted(self, sub: Subscription, topic: Topic) -> None:
        self.refuse(
            ErrorCode.TOPIC_DELETED,
            f"topic {topic.name!r} was deleted",
            sub.sub_id,
            RefKind.SUBSCRIPTION,
            {"topic": topic.name},
        )

    def deliver(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        batch: bytes,
        count: int,
    ) -> None:
        """Hand one batch to one subscription (called by the router: the
        hot path, no per-message work)."""
        if sub.lag and topic in sub.lag:
            return  # the log reader will get to it, in order
        size = len(batch)
        if sub.credit <= 0 or (
            (self._out or self.sending) and self.queued_bytes + self.sending + size > self.limit
        ):
            sub.lag[topic] = base_offset
            self.lagging[sub] = None
            return
        sub.credit -= count
        topic.messages_out += count
        topic.bytes_out += size
        name = topic.name_bytes
        n = len(name)
        header = DELIVER_PREFIX.pack(_DELIVER_BODY_FIXED + n + size, _DELIVER, 0, sub.sub_id, base_offset, timestamp, n) + name
        out = self._out
        out.append(header)
        out.append(batch)
        self.queued_bytes += len(header) + size
        self._kick()

    def deliver_group(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        deliveries: int,
        batch: bytes,
    ) -> None:
        """Queue a batch for a group member. Not subject to the queue bound:
        the group's max_ack_pending already bounds what a member holds."""
        header = group_deliver_header(sub.sub_id, topic.name_bytes, base_offset, timestamp, deliveries, len(batch))
        self._out.append(header)
        self._out.append(batch)
        self.queued_bytes += len(header) + len(batch)
        self._kick()

    def position(self, sub: Subscription, topic: Topic) -> int:
        return sub.lag.get(topic, topic.visible_next)

    def describe(self) -> SubscriberInfo:
        return self.info

    def start_lagging(self, sub: Subscription) -> None:
        """A new subscription with topics to read from the log first."""
        if sub.lag:
            self.lagging[sub] = None
            self.wake_writer()

    def credit_added(self, sub: Subscription) -> None:
        if sub in self.lagging:
            self.wake_writer()

    def forget(self, sub: Subscription) -> None:
        self.lagging.pop(sub, None)

    # -- reading from the log ---------------------------------------------

    def refill(self) -> None:
        """Queue batches from the log for lagging subscriptions, up to the bound."""
        limit = self.limit
        for sub in list(self.lagging):
            lag = sub.lag
            for topic in list(lag):
                offset = lag[topic]
                log = topic.log
                # Read only what is visible: with fsync "always", batches
                # still waiting for their fsync are delivered on release.
                # Every pass delivers a batch, steps over lost offsets, or
                # leaves the loop (a read pending leaves it until woken):
                # it cannot spin.
                while offset < topic.visible_next:
                    if sub.credit <= 0:
                        break
                    if self.queued_bytes + self.sending >= limit:
                        lag[topic] = offset
                        return
                    first = log.first_offset
                    try:
                        if offset < first:
                            raise DataLoss(topic.name, offset, first - 1, "retention")
                        batches = log.read(offset, limit - self.queued_bytes - self.sending)
                    except ReadPending as pending:
                        # Cluster mode, older than the node's copy: being
                        # fetched. Read again when it is here (the writer is
                        # woken then; asking again adds no second wake-up).
                        pending.notify(self.wake_writer)
                        break
                    except DataLoss as lost:
                        if lost.last >= topic.visible_next:  # not yet visible: not ours to report
                            lost = DataLoss(lost.topic, lost.first, topic.visible_next - 1, lost.reason)
                        self._data_lost(sub, lost)
                        offset = lost.last + 1
                        continue
                    if not batches:
                        # The log holds less than it said: never spin on it.
                        self.logger.error(
                            "log read returned nothing below the visible end",
                            topic=topic.name, offset=offset, visible_next=topic.visible_next,
                        )
                        break
                    for stored in batches:
                        if stored.base_offset >= topic.visible_next:
                            break  # appended, not yet durable: release() delivers it
                        sub.credit -= stored.count
                        topic.messages_out += stored.count
                        topic.bytes_out += len(stored.batch)
                        header = deliver_header(
                            sub.sub_id, topic.name_bytes, stored.base_offset, stored.timestamp, len(stored.batch)
                        )
                        self._out.append(header)
                        self._out.append(stored.batch)
                        self.queued_bytes += len(header) + len(stored.batch)
                        offset = stored.next_offset
                        if sub.credit <= 0:
                            break
                if offset < topic.visible_next:
                    lag[topic] = offset  # out of credit: resume when CREDIT comes
                else:
                    del lag[topic]  # caught up: live delivery takes over
            if not lag:
                del self.lagging[sub]

    # -- writing --------------------------------------------------------------

    async def run(self, on_broken: Callable[[], None]) -> None:
        """The writer task: until ``closing`` and everything is written, or
        the peer is gone (``on_broken``: the transport is unusable). Over
        plain TCP, once ``retire_writer`` asked, also until nothing is left
        to write: an idle connection keeps no writer task (``wake_writer``
        starts another when needed), so that it can be parked
        (broker/session/parking.py). A busy one keeps its writer: starting
        a task per drained queue would cost more than waking one."""
        wake = self._wake = trio.Event()
        idle = False
        try:
            while True:
                if self.lagging and self.queued_bytes < self.limit and self.accepting:
                    self.refill()
                if self._out and self._socket is not None:
                    # Plain TCP: writev what is queued as it is, never
                    # joined into one copy, and wait until the socket can
                    # take the rest (answers and deliveries queued meanwhile
                    # join it; write_now may write some too).
                    try:
                        self._writev(self._socket)
                    except OSError as exc:
                        raise trio.BrokenResourceError from exc
                    if self._out:
                        await trio.lowlevel.wait_writable(self._socket)
                    else:
                        await trio.lowlevel.checkpoint()
                    continue
                if self._out:
                    out = self._out
                    data = out[0] if len(out) == 1 else b"".join(out)
                    self._out = []
                    self.queued_bytes = 0
                    self.sending = len(data)
                    if self._room is not None:
                        self._room.set()
                    await self.stream.send_all(data)
                    self.sending = 0
                    self.bytes_out += len(data)
                    continue
                if self.closing:
                    return
                if self._retire:
                    # Nothing to write, and what is queued from now on is
                    # written directly (or by the next writer task).
                    idle = True
                    self._writer = self._retire = False
                    return
                await wake.wait()
                wake = self._wake = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The peer is gone. Not an error of ours: stop reading and let
            # the session close up (raising here would reach it wrapped in
            # an ExceptionGroup and read as an internal error).
            self.lost = True
            self.conn.send_failed()
            on_broken()
        finally:
            if not idle:
                self.done.set()

    async def wait_for_room(self, more_waiting: Callable[[], bool]) -> None:
        """Until the queue is back under its bound and ``more_waiting`` is false."""
        try:
            while self.over_limit or more_waiting():
                self._room = trio.Event()
                await self._room.wait()
        finally:
            self._room = None

