"""One client connection: read frames, act on them, write what they produce.

Three tasks per connection, all owned by the session's nursery:

- the reader decodes every complete frame of each socket read and handles
  them synchronously (no awaits on the hot path), then queues the PUBACKs of
  that read in one go;
- the writer joins everything queued into one ``send_all`` per wake-up
  (write coalescing) and, when the queue has room, refills it from the log
  for subscriptions that are lagging (replay, or a queue that was full);
- the acker, only for stores whose acknowledgements wait for an fsync,
  awaits ``store.sync()`` (group commit) and then queues the PUBACKs it covers.

The idle timeout (PING, then ERROR 107) is checked by one server-wide task
(``Server._sweep_idle`` calling ``check_idle``), not one per connection.

Memory per connection is bounded. A delivery that would take the bytes
queued plus the bytes being sent over ``outbound_queue_bytes`` is not
queued; that subscription reads the topic forward from the log instead until
it has caught up (protocol.md, "Flow control"). Answers (PUBACK, PONG,
replies) are always queued, but after every frame the reader checks the
queue and the PUBLISHes not yet answered, and stops reading until the peer
catches up (protocol.md, "Limits"): the queue and the bytes being sent each
stay under the bound plus one batch, one frame's answer or
``max_inflight_publishes`` PUBACKs.

Input is bounded the same way: each read is sized so that what the
connection holds of a frame not yet complete stays within its free
allowance plus what it holds of the broker-wide budget
(broker/framebudget.py); a frame that needs more waits for budget.
"""

from __future__ import annotations

import fcntl
import json
import struct
import termios
import time
from typing import TYPE_CHECKING, Any

import trio

from client.protocol import (
    CLOSED,
    ERROR_FIELDS_OPTION,
    Groups,
    GroupsAction,
    GroupsReply,
    Ack,
    AckKind,
    UNLIMITED_CREDIT,
    RESUME_OPTION_PREFIX,
    Credit,
    RefKind,
    NEED_DATA,
    Connection,
    Error,
    ErrorCode,
    Goodbye,
    Hello,
    Info,
    InfoReply,
    Ping,
    Pong,
    PubAck,
    Publish,
    RemoteProtocolError,
    Role,
    StartKind,
    State,
    SubAck,
    Subscribe,
    TopicInfo,
    UnsubAck,
    Unsubscribe,
    Welcome,
    check_batch,
    deliver_header,
    group_deliver_header,
    encode_puback,
    pattern_error,
    topic_error,
    HEADER_SIZE,
    MAX_INFO_ENTRIES,
    Durability,
    Event,
    tokens_match,
)

from . import __version__
from .auth import User
from .logs import get_logger
from .closing import linger_close
from .framebudget import FREE_BYTES, MAX_HELLO_BYTES
from .groups import GroupConfig, group_name_error
from .inboxes import has_wildcard, is_inbox
from .permissions import DecisionCache, Permissions
from .storage import DataLoss, StorageError
from .router import Held, Subscription, Topic

if TYPE_CHECKING:
    from .server import Server

#: The largest read; smaller ones while a connection may hold less of a
#: frame in progress (broker/framebudget.py).
RECEIVE_SIZE = 256 * 1024
#: Over TLS a frame in progress past its free allowance grows by a TLS
#: record's worth per read (Session._read_size).
TLS_GROW = 16 * 1024
_FIONREAD = struct.Struct("i")
#: Credit standing for "unlimited": large enough never to run out.
_NO_FLOW_CONTROL = 1 << 62
_MAX_CREDIT = UNLIMITED_CREDIT - 1


class _PendingAck:
    """A PUBLISH read whose PUBACK (or refusal) is not queued yet."""

    __slots__ = ("request_id", "base", "count", "timestamp", "held", "durability")

    def __init__(
        self, request_id: int, base: int, count: int, timestamp: int, held: Held | None, durability: Durability
    ) -> None:
        self.request_id = request_id
        self.base = base
        self.count = count
        self.timestamp = timestamp
        #: Set when the topic needs sync: the PUBACK waits for its commit round.
        self.held = held
        self.durability = durability


class _Stop(Exception):
    """Ends the read loop with a reason for the log."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Session:
    def __init__(self, server: Server, stream: trio.abc.Stream, conn_id: int, peer: str) -> None:
        self.server = server
        self.router = server.router
        self.committer = server.committer
        self.config = server.config
        self.limits = server.config.limits
        self.stream = stream
        self.conn_id = conn_id
        self.peer = peer
        self.log: Any = get_logger(conn_id=conn_id, peer=peer)
        self.conn = Connection(Role.SERVER, max_frame_bytes=self.limits.max_frame_bytes)
        self.client_name = ""
        self.subs: dict[int, Subscription] = {}
        # Insertion-ordered set of subscriptions with topics to read from the log.
        self._lagging: dict[Subscription, None] = {}
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._sending = 0  # bytes handed to send_all and not yet sent
        self._out_limit = server.config.outbound_queue_bytes
        self._wake = trio.Event()
        self._room = trio.Event()
        self._closing = False
        self._writer_done = trio.Event()
        self._lost = False  # the writer found the connection broken
        self._read_scope = trio.CancelScope()
        # PUBLISHes read whose PUBACK is not queued yet (limits.max_inflight_publishes).
        self._unacked = 0
        #: The reader waits for the peer (backpressure); for tests and metrics.
        self.reading_paused = False
        # Frames in progress (broker/framebudget.py): the broker-wide budget,
        # what this connection holds of it, whether it waits for some.
        self._budget = server.frame_budget
        self._held = 0
        #: The reader waits for frame budget (backpressure); for tests.
        self.waiting_for_budget = False
        # Plain TCP: the kernel says how many bytes are there to read.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._max_inflight = self.limits.max_inflight_publishes
        # Idle timeout (config.idle_timeout, see check_idle): when it acts
        # next, whether it sent its PING, whether it gave up.
        self._idle_deadline = trio.current_time() + server.config.idle_timeout
        self._idle_pinged = False
        self._idle_expired = False
        self._ping_nonce = 0
        self._accepting_deliveries = True
        # PUBACKs of the current read, and those waiting for a commit round.
        self._acks: list[_PendingAck] = []
        self._acks_for_sync: list[_PendingAck] = []
        self._ack_wake = trio.Event()
        self._acks_closing = False
        self._acker_done = trio.Event()
        # A protocol error's fatal ERROR, held back until the PUBACKs still
        # owed (waiting for a sync) are out: nothing may follow a fatal ERROR.
        self._pending_fatal: RemoteProtocolError | None = None
        self.messages_in = 0
        self.bytes_out = 0
        #: The client asked for ERROR fields in its HELLO.
        self._error_fields = False
        # Authentication (broker/auth.py): set by the HELLO when the server
        # has a users file; None means no checks at all.
        self.user: User | None = None
        self.perms: Permissions | None = None
        self._may_publish: DecisionCache | None = None
        self._may_read: DecisionCache | None = None

    # -- lifecycle --------------------------------------------------------

    async def run(self) -> None:
        reason = "closed"
        self.log.info("connection opened")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._acker)
                reason = await self._read_loop()
                self._drop_subscriptions()
                await self._finish_acks()
                if self._pending_fatal is not None:
                    self._fatal(self._pending_fatal.code, self._pending_fatal.message)
                if self.conn.state is State.OPEN and not self.conn.we_finished:
                    self._queue(self.conn.send(Goodbye()))
                self._closing = True
                self._wake.set()
                with trio.move_on_after(self.config.shutdown_grace):
                    await self._writer_done.wait()
                nursery.cancel_scope.cancel()
            if self._lost and reason == "server shutdown":
                # The writer found the peer gone and stopped the reader. A
                # reason the reader gave itself stands: over TLS, the ERROR
                # after a handshake timeout cannot be sent at all.
                reason = "connection lost"
        except Exception:
            self.log.exception("internal error; closing this connection")
            reason = "internal error"
        finally:
            self._drop_subscriptions()
            with trio.CancelScope(shield=True):
                await linger_close(self.stream)
            self.log.info("connection closed", reason=reason, client=self.client_name)

    def shutdown(self) -> None:
        """Server shutdown: stop reading; run() then flushes and says GOODBYE."""
        self._read_scope.cancel()

    def _drop_subscriptions(self) -> None:
        self._accepting_deliveries = False
        # First: its inboxes wait for a reconnect rather than going with
        # their last subscription (Inboxes.detach).
        self.router.inboxes.release(self, trio.current_time())
        for sub in self.subs.values():
            self._remove(sub)
        self.subs.clear()
        self._lagging.clear()

    # -- reading ----------------------------------------------------------

    async def _read_loop(self) -> str:
        conn = self.conn
        deadline = trio.current_time() + self.config.handshake_timeout
        idle = self.config.idle_timeout
        out_limit = self._out_limit
        max_inflight = self._max_inflight
        # Until the handshake is done the only frame is a HELLO, and a read
        # takes no more than the largest one (broker/framebudget.py).
        conn.max_frame_bytes = min(MAX_HELLO_BYTES, self.limits.max_frame_bytes)
        hello_read = HEADER_SIZE + conn.max_frame_bytes
        with self._read_scope:
            try:
                while True:
                    if self._out_bytes > out_limit or self._unacked >= max_inflight:
                        await self._pause_reading()
                    if conn.state is State.OPEN:
                        # What this connection may still buffer: its free
                        # allowance plus the budget it holds, less what it has.
                        size = FREE_BYTES + self._held - conn.buffered_bytes
                        if self._fd >= 0 or size <= 0:
                            size = await self._read_size(size)
                        data = await self.stream.receive_some(size)
                    else:
                        size = max(1, hello_read - conn.buffered_bytes)
                        received: bytes | bytearray | None = None
                        with trio.move_on_at(deadline):
                            received = await self.stream.receive_some(size)
                        if received is None:
                            self._fatal(ErrorCode.HANDSHAKE_REQUIRED, "no HELLO in time")
                            return "handshake timeout"
                        data = received
                    conn.receive_data(data)
                    if self._held:
                        self._keep_budget()
                    framed = False
                    while True:
                        event = conn.next_event()
                        if event is NEED_DATA:
                            break
                        if event is CLOSED:
                            return "peer closed"
                        framed = True
                        if type(event) is Hello:
                            # The one await between frames: checking a
                            # password runs scrypt in a worker thread.
                            if not await self._hello(event, deadline):
                                return "authentication failed"
                            continue
                        self._handle(event)  # type: ignore[arg-type]
                        # Checked per frame, not per read: one read holds
                        # thousands of small frames, each of which may queue
                        # an answer (an INFO_REPLY can be large).
                        if self._out_bytes > out_limit or self._unacked >= max_inflight:
                            await self._pause_reading()
                    if self._held:
                        self._keep_budget()
                    if framed:
                        self._idle_deadline = trio.current_time() + idle
                        self._idle_pinged = False
                    self._flush_acks()
            except RemoteProtocolError as exc:
                self._flush_acks()
                self.log.warning(
                    "protocol error", code=int(exc.code), error=exc.code.name, detail=exc.message
                )
                self._accepting_deliveries = False
                # Without its traceback: that holds this frame, hence the
                # session, in a cycle only the garbage collector would free.
                self._pending_fatal = exc.with_traceback(None)
                return f"protocol error {exc.code.name}"
            except _Stop as stop:
                self._flush_acks()
                return stop.reason
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "connection lost"
            finally:
                # Whatever is half-sent goes now: its memory, and its budget
                # to the connections waiting for some.
                self._budget.release(self)
                self._held = 0
                conn.discard_received()
        if self._idle_expired:
            self._fatal(ErrorCode.IDLE_TIMEOUT, f"no frame for {2 * idle:g} s, not even PONG")
            return "idle timeout"
        return "server shutdown"

    async def _hello(self, hello: Hello, deadline: float) -> bool:
        """WELCOME, or AUTH_FAILED (False); then frames of any size."""
        if self.server.auth is not None:
            if not await self._authenticate(hello, deadline):
                return False
        else:
            self._on_hello(hello)
        self.conn.max_frame_bytes = self.limits.max_frame_bytes
        return True

    async def _read_size(self, room: int) -> int:
        """The size of the next read: ``room`` is what the free allowance
        and the budget this connection holds leave; beyond it, budget.

        Over plain TCP budget is taken only once bytes are waiting (FIONREAD;
        if none, it waits for some first), so none is held for a peer that
        is not sending, and what the read does not use goes back as soon as
        it returns (_keep_budget). A read takes up to RECEIVE_SIZE: the
        kernel's count at one instant would cut bursts into small reads. A
        frame in progress past its allowance (``room`` 0) waits for budget
        when there is none; a read that could make do with ``room`` takes
        budget only if it is spare.
        """
        conn = self.conn
        while True:
            if self._fd >= 0:
                if self._arrived() == 0:
                    await trio.lowlevel.wait_readable(self._fd)
                    if self._arrived() == 0:
                        return max(room, 1)  # end of stream or an error: the read says which
                want = RECEIVE_SIZE
            elif room > 0:
                return room
            else:
                # TLS: the kernel's count says nothing of the records the
                # TLS layer holds, and a read returns one record at most, so
                # a frame past its allowance grows a record at a time (held
                # while the record arrives).
                want = TLS_GROW
            if room > 0:
                if want <= room:
                    return room
            elif self._budget.waiting:
                # Others wait: at most the rest of this frame plus what the
                # next one may have without budget, so that once this frame
                # is decoded the connection holds nothing and goes to the
                # back of the queue of holders (not always: that would keep
                # reads a frame long).
                want = min(want, conn.frame_remaining + FREE_BYTES)
            got = self._budget.take(self, want - room, optional=room > 0)
            if got:
                self._held += got
                return room + got
            if room > 0:
                return room
            self.waiting_for_budget = True
            try:
                await self._budget.wait()
            finally:
                self.waiting_for_budget = False
            # Not the peer's silence: we were not reading.
            self._idle_deadline = trio.current_time() + self.config.idle_timeout
            self._idle_pinged = False

    def _arrived(self) -> int:
        """Bytes the kernel holds for this connection to read (FIONREAD); 0
        on an error, which the read that follows reports."""
        try:
            answer = fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        count: int = _FIONREAD.unpack(answer)[0]
        return count

    def _keep_budget(self) -> None:
        """Keep what the buffered bytes need beyond the free allowance and
        give the rest back (after each read and its frames)."""
        keep = self.conn.buffered_bytes - FREE_BYTES
        if keep < self._held:
            keep = max(keep, 0)
            self._budget.give(self, self._held - keep)
            self._held = keep

    async def _pause_reading(self) -> None:
        """Backpressure: stop reading until the peer has taken what we queued
        for it and the PUBLISHes read so far are answered.

        Bounds the memory of a peer that does not read (PUBACKs, PONGs,
        replies pile up otherwise) and of one that publishes faster than its
        acknowledgements can be given (fsync). Never an error.
        """
        self._flush_acks()
        self.reading_paused = True
        try:
            while self._out_bytes > self._out_limit or self._unacked >= self._max_inflight:
                self._room = trio.Event()
                await self._room.wait()
        finally:
            self.reading_paused = False
        # Not the peer's silence: we were not listening. A fresh idle period.
        self._idle_deadline = trio.current_time() + self.config.idle_timeout
        self._idle_pinged = False

    def check_idle(self, now: float, idle: float) -> None:
        """Idle timeout, called by the server's sweeper (Server._sweep_idle):
        PING a peer silent for ``idle`` seconds; stop reading (the reader
        then sends ERROR 107) if it stays silent as long again.

        Neither a deadline on every read (a cancel scope per read cost ~8 us)
        nor a task per connection (~3 KiB each): the reader stores a time
        per read, one server task looks at them all now and then.
        """
        if now < self._idle_deadline or self._idle_expired or self.conn.we_finished:
            return  # not yet, or this connection is ending anyway
        if (
            (self.reading_paused and not self._held)
            or self.waiting_for_budget
            or self.conn.state is not State.OPEN
        ):
            # Before HELLO the handshake timeout rules; while we do not
            # read (backpressure) silence says nothing about the peer. But
            # a peer that keeps part of the frame budget while it does not
            # read its answers is timed as if we read it: the budget is
            # everyone's (broker/framebudget.py).
            self._idle_deadline = now + idle
            return
        if not self._idle_pinged:
            self._idle_pinged = True
            self._idle_deadline = now + idle
            self._ping_nonce += 1
            self._queue(self.conn.send(Ping(self._ping_nonce)))
            self.log.debug("idle; ping sent", idle_timeout=idle)
            return
        self._idle_expired = True
        self._read_scope.cancel()

    def _handle(self, event: Event) -> None:
        if isinstance(event, Publish):
            self._on_publish(event)
        elif isinstance(event, Ack):
            self._on_ack(event)
        elif isinstance(event, Credit):
            self._on_credit(event)
        elif isinstance(event, Subscribe):
            self._on_subscribe(event)
        elif isinstance(event, Unsubscribe):
            self._on_unsubscribe(event)
        elif isinstance(event, Ping):
            self._queue(self.conn.send(Pong(event.nonce)))
        elif isinstance(event, Info):
            self._on_info(event)
        elif isinstance(event, Groups):
            self._on_groups(event)
        elif isinstance(event, Goodbye):
            raise _Stop("client said goodbye")
        elif isinstance(event, Error):
            self.log.warning("error from client", code=event.code, detail=event.message)
            if event.fatal:
                raise _Stop("client sent a fatal error")
        # Pong: nothing to do.

    async def _authenticate(self, hello: Hello, deadline: float) -> bool:
        """Check HELLO's credentials (protocol.md, "Authentication"); answer
        WELCOME, or ERROR AUTH_FAILED that does not say which part was wrong."""
        assert self.server.auth is not None
        user = None
        with trio.move_on_at(deadline) as scope:
            user = await self.server.auth.hello(hello.options)
        if user is None:
            # Never the secret itself; the user name helps the operator.
            self.log.warning(
                "authentication failed",
                client=hello.client_name,
                user=hello.options.get("user"),
                method="token" if "token" in hello.options else "password" if "user" in hello.options else "none",
                reason="timed out" if scope.cancelled_caught else "bad or missing credentials",
            )
            self._fatal(ErrorCode.AUTH_FAILED, "authentication failed")
            return False
        self.user = user
        self.perms = user.permissions
        self._may_publish = DecisionCache(user.permissions.may_publish)
        self._may_read = DecisionCache(user.permissions.may_read)
        self.log = self.log.bind(user=user.name)
        self._on_hello(hello)
        return True

    def _denied(self, what: str, ref: int, ref_kind: RefKind) -> None:
        who = f"user {self.user.name!r}" if self.user is not None else "this connection"
        self._request_error(ErrorCode.PERMISSION_DENIED, f"{who} may not {what}", ref, ref_kind)

    def _on_hello(self, hello: Hello) -> None:
        self.client_name = hello.client_name
        self._error_fields = hello.options.get(ERROR_FIELDS_OPTION) == "1"
        self.log = self.log.bind(client=hello.client_name)
        welcome = Welcome(
            server_version=__version__,
            server_name=self.config.server_name,
            limits=self.limits.announced(),
        )
        self._queue(self.conn.send(welcome))
        self.log.debug("handshake done")

    def _on_publish(self, pub: Publish) -> None:
        topic = self.router.topics.get(pub.topic)
        if topic is None:
            problem = topic_error(
                pub.topic, self.limits.max_topic_bytes, self.limits.max_topic_depth
            )
            if problem is not None:
                self._request_error(ErrorCode.BAD_TOPIC, problem, pub.request_id, RefKind.REQUEST)
                return
        if self._may_publish is not None and not self._may_publish(pub.topic):
            self._denied(f"publish to {pub.topic!r}", pub.request_id, RefKind.REQUEST)
            return
        count, crc_ok = check_batch(pub.batch)
        if count > self.limits.max_batch_messages:
            self._request_error(
                ErrorCode.BATCH_LIMIT,
                f"batch of {count} messages, limit {self.limits.max_batch_messages}",
                pub.request_id,
                RefKind.REQUEST,
            )
            return
        if not crc_ok:
            self._request_error(
                ErrorCode.CHECKSUM_MISMATCH, "batch CRC mismatch", pub.request_id, RefKind.REQUEST
            )
            return
        if pub.needs_receiver and not self.router.has_receivers(pub.topic):
            self._request_error(
                ErrorCode.NO_RECEIVERS,
                f"no subscription or group receives {pub.topic!r}",
                pub.request_id,
                RefKind.REQUEST,
            )
            return
        try:
            if topic is None:
                topic = self.router.topic(pub.topic)
            base, timestamp, held = self.router.publish(
                topic, pub.batch, count, time.time_ns() // 1000
            )
        except StorageError as exc:
            # Disk full or failing: an answer for this PUBLISH, not the end
            # of the connection. Nothing was stored (the log rolled back).
            self._request_error(exc.code, exc.message, pub.request_id, RefKind.REQUEST, {"topic": pub.topic})
            return
        self.messages_in += count
        if pub.request_id:
            self._acks.append(
                _PendingAck(pub.request_id, base, count, timestamp, held, topic.log.durability)
            )
            self._unacked += 1

    def _on_subscribe(self, req: Subscribe) -> None:
        sid = req.sub_id
        if sid in self.subs:
            self._request_error(ErrorCode.DUPLICATE_SUBSCRIPTION, f"sub_id {sid} is active", sid)
            return
        if len(self.subs) >= self.limits.max_subscriptions:
            self._request_error(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"limit is {self.limits.max_subscriptions} per connection",
                sid,
            )
            return
        problem = pattern_error(req.pattern, self.limits.max_topic_bytes, self.limits.max_topic_depth)
        if problem is not None:
            self._request_error(ErrorCode.BAD_PATTERN, problem, sid)
            return
        if self.perms is not None and not self.perms.may_subscribe(req.pattern):
            # Covers group members too: a group reads what its pattern does.
            self._denied(f"subscribe to {req.pattern!r}", sid, RefKind.SUBSCRIPTION)
            return
        inbox = is_inbox(req.pattern)
        if inbox and self._inbox_refused(req):
            return
        if not isinstance(req.start, StartKind):
            self._request_error(ErrorCode.BAD_REQUEST, f"unknown start kind {req.start}", sid)
            return
        resume: dict[str, int] = {}
        if "group" in req.options:
            if any(key.startswith(RESUME_OPTION_PREFIX) for key in req.options):
                self._request_error(
                    ErrorCode.BAD_REQUEST,
                    "resume positions are for plain subscriptions (a group keeps its own)",
                    sid,
                )
                return
        elif req.options:
            problem = self._resume_positions(req, resume)
            if problem is not None:
                self._request_error(ErrorCode.BAD_REQUEST, problem, sid)
                return
        if req.start is StartKind.OFFSET and ("*" in req.pattern or ">" in req.pattern):
            self._request_error(
                ErrorCode.BAD_REQUEST, "an offset start needs a pattern without wildcards", sid
            )
            return
        if req.credit == 0:
            self._request_error(ErrorCode.BAD_REQUEST, "credit must be at least 1", sid)
            return
        credit = _NO_FLOW_CONTROL if req.credit == UNLIMITED_CREDIT else req.credit
        if inbox:
            # Every check passed: a refused SUBSCRIBE claims nothing.
            self.router.inboxes.claim(req.pattern, self, self._user_name)
        sub = Subscription(self, sid, req.pattern, credit)
        if "group" in req.options:
            self._join_group(sub, req)
            return
        matched = self.router.add(sub)
        self.subs[sid] = sub
        self._queue(self.conn.send(SubAck(sid, time.time_ns() // 1000)))
        if req.start is not StartKind.NEW or resume:
            for topic in matched:
                log = topic.log
                position = resume.get(topic.name)
                if position is not None and position > log.next_offset:
                    # Past the end: this log is not the one the client read
                    # (memory storage restarted, or a crash lost an unsynced
                    # tail), so the start rule decides, as for a topic the
                    # client had not seen.
                    self.log.warning(
                        "resume position past the end of the topic",
                        topic=topic.name,
                        position=position,
                        next_offset=log.next_offset,
                    )
                    position = None
                if position is not None:
                    # Below the first retained offset: _refill reports the
                    # gap as DATA_LOST.
                    start = position
                elif req.start is StartKind.NEW:
                    continue
                elif req.start is StartKind.EARLIEST:
                    start = log.first_offset
                elif req.start is StartKind.OFFSET:
                    start = max(req.start_value, log.first_offset)
                else:
                    start = log.offset_at_time(req.start_value)
                if start < topic.visible_next:
                    sub.lag[topic] = start
            if sub.lag:
                self._lagging[sub] = None
                self._wake.set()
        self.log.debug("subscribed", sub_id=sid, pattern=req.pattern, start=req.start.name)

    @property
    def _user_name(self) -> str | None:
        return self.user.name if self.user is not None else None

    def _inbox_refused(self, req: Subscribe) -> bool:
        """Refuse a SUBSCRIBE to inboxes that are not this connection's
        (broker/inboxes.py); True when it was refused."""
        sid = req.sub_id
        if has_wildcard(req.pattern):
            self._denied(
                f"subscribe to {req.pattern!r}: inboxes are private, subscribe to your own by its exact name",
                sid,
                RefKind.SUBSCRIPTION,
            )
        elif "group" in req.options:
            self._request_error(ErrorCode.BAD_REQUEST, "an inbox takes plain subscriptions only", sid)
        elif not self.router.inboxes.may_claim(req.pattern, self, self._user_name):
            self._denied(
                f"subscribe to {req.pattern!r}: another connection's inbox", sid, RefKind.SUBSCRIPTION
            )
        else:
            return False
        return True

    def _resume_positions(self, req: Subscribe, into: dict[str, int]) -> str | None:
        """Parse ``resume:<topic>`` options into ``into``; the problem, if any."""
        tokens = req.pattern.split(".")
        for key, value in req.options.items():
            if not key.startswith(RESUME_OPTION_PREFIX):
                return f"unknown option {key!r}"
            topic = key[len(RESUME_OPTION_PREFIX) :]
            problem = topic_error(topic, self.limits.max_topic_bytes, self.limits.max_topic_depth)
            if problem is not None:
                return f"resume position for an invalid topic: {problem}"
            if not tokens_match(tokens, topic.split(".")):
                return f"resume position for {topic!r}, which {req.pattern!r} does not match"
            if not (value.isascii() and value.isdigit()) or len(value) > 20:
                return f"resume position for {topic!r} is not an offset: {value!r}"
            into[topic] = int(value)
        return None

    def _on_info(self, req: Info) -> None:
        problem = pattern_error(req.pattern, self.limits.max_topic_bytes, self.limits.max_topic_depth)
        if problem is not None:
            self._request_error(ErrorCode.BAD_PATTERN, problem, req.request_id, RefKind.REQUEST)
            return
        tokens = req.pattern.split(".")
        may_read = self._may_read
        names = sorted(
            n
            for n in self.router.topics
            if tokens_match(tokens, n.split(".")) and (may_read is None or may_read(n))
        )
        entries = []
        for name in names[:MAX_INFO_ENTRIES]:
            topic = self.router.topics[name]
            log = topic.log
            entries.append(
                TopicInfo(name, log.first_offset, log.next_offset, log.size_bytes, len(topic.subs))
            )
        truncated = len(names) > MAX_INFO_ENTRIES
        self._queue(self.conn.send(InfoReply(req.request_id, tuple(entries), truncated)))

    def _on_groups(self, req: Groups) -> None:
        manager = self.server.groups
        rid = req.request_id
        # Group administration is for those who may read the group's
        # pattern, and for admins (protocol.md, "Authentication ...").
        perms = None if self.perms is None or self.perms.admin else self.perms
        if req.action is GroupsAction.LIST:
            doc: dict[str, Any] = {
                "groups": [
                    manager.groups[n].statistics()
                    for n in sorted(manager.groups)
                    if perms is None or perms.may_subscribe(manager.groups[n].pattern)
                ]
            }
        elif not isinstance(req.action, GroupsAction):
            self._request_error(ErrorCode.BAD_REQUEST, f"unknown action {req.action}", rid, RefKind.REQUEST)
            return
        elif req.name not in manager.groups:
            self._request_error(ErrorCode.UNKNOWN_GROUP, f"no group {req.name!r}", rid, RefKind.REQUEST)
            return
        elif perms is not None and not perms.may_subscribe(manager.groups[req.name].pattern):
            action = "inspect" if req.action is GroupsAction.INSPECT else "delete"
            self._denied(f"{action} group {req.name!r} (pattern {manager.groups[req.name].pattern!r})", rid, RefKind.REQUEST)
            return
        elif req.action is GroupsAction.INSPECT:
            doc = manager.groups[req.name].statistics()
        else:
            try:
                manager.delete(req.name)
            except ValueError as exc:
                self._request_error(ErrorCode.BAD_REQUEST, str(exc), rid, RefKind.REQUEST)
                return
            self.log.info("group deleted", group=req.name)
            doc = {"deleted": req.name}
        self._queue(self.conn.send(GroupsReply(rid, json.dumps(doc))))

    def _on_credit(self, req: Credit) -> None:
        sub = self.subs.get(req.sub_id)
        if sub is None:
            return  # may cross an UNSUBACK; harmless
        sub.credit = min(sub.credit + req.messages, max(sub.credit, _MAX_CREDIT))
        if sub in self._lagging:
            self._wake.set()

    def _on_unsubscribe(self, req: Unsubscribe) -> None:
        sub = self.subs.pop(req.sub_id, None)
        if sub is None:
            self._request_error(
                ErrorCode.UNKNOWN_SUBSCRIPTION, f"sub_id {req.sub_id} is not active", req.sub_id
            )
            return
        self._remove(sub)
        self._lagging.pop(sub, None)
        self._queue(self.conn.send(UnsubAck(req.sub_id)))

    def _remove(self, sub: Subscription) -> None:
        if sub.group is not None and sub.member is not None:
            self.server.groups.leave(sub.group, sub.member)
        else:
            self.router.remove(sub)

    # -- consumer groups ----------------------------------------------------

    def _join_group(self, sub: Subscription, req: Subscribe) -> None:
        name = req.options["group"]
        problem = group_name_error(name)
        try:
            if problem:
                raise ValueError(f"group name: {problem}")
            config = GroupConfig.from_options(name, req.options)
            if (
                self._may_publish is not None
                and name not in self.server.groups.groups
                and config.max_deliver
                and not self._may_publish(config.dead_letter)
            ):
                # Creating a group picks the topic it dead-letters into.
                self._denied(
                    f"publish to {config.dead_letter!r}, the dead-letter topic of new group {name!r}",
                    req.sub_id,
                    RefKind.SUBSCRIPTION,
                )
                return
            assert isinstance(req.start, StartKind)
            sub.member = self.server.groups.join(
                sub, name, req.pattern, config, req.start, req.start_value
            )
        except ValueError as exc:
            self._request_error(ErrorCode.BAD_REQUEST, str(exc), req.sub_id)
            return
        sub.group = self.server.groups.groups[name]
        self.subs[req.sub_id] = sub
        self._queue(self.conn.send(SubAck(req.sub_id, time.time_ns() // 1000)))
        self.log.debug("joined group", sub_id=req.sub_id, group=name, pattern=req.pattern)

    def _on_ack(self, req: Ack) -> None:
        sub = self.subs.get(req.sub_id)
        problem = None
        if sub is None or sub.group is None or sub.member is None:
            problem = f"sub_id {req.sub_id} is not an active group member"
        elif not isinstance(req.kind, AckKind):
            problem = f"unknown ack kind {req.kind}"
        elif not req.ranges or any(first > last for first, last in req.ranges):
            problem = "an ACK needs ranges with first <= last"
        if problem is not None:
            self._request_error(ErrorCode.BAD_REQUEST, problem, req.sub_id)
            return
        assert sub is not None and sub.group is not None and sub.member is not None
        self.server.groups.settle(
            sub.group, sub.member, req.topic, req.kind, req.ranges, req.delay_ms / 1000
        )

    @property
    def accepting(self) -> bool:
        """Whether deliveries may still be queued (a group asks before handing out)."""
        return self._accepting_deliveries

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
        header = group_deliver_header(
            sub.sub_id, topic.name_bytes, base_offset, timestamp, deliveries, len(batch)
        )
        self._out.append(header)
        self._out.append(batch)
        self._out_bytes += len(header) + len(batch)
        self._wake.set()

    # -- acknowledgements ---------------------------------------------------

    def _flush_acks(self) -> None:
        """Queue this read's PUBACKs, or hand them to the acker when any of
        them (or an earlier one: acks go out in order) waits for a sync."""
        if not self._acks:
            return
        acks, self._acks = self._acks, []
        if self._acks_for_sync or any(a.held is not None for a in acks):
            self._acks_for_sync.extend(acks)
            self._ack_wake.set()
        else:
            self._queue_acks(acks, None)

    def _queue_acks(self, acks: list[_PendingAck], synced: Durability | None) -> None:
        counted = self.server.acks_by_durability  # for /metrics: one add per batch
        frames = []
        for a in acks:
            held = a.held
            if held is not None and held.error is not None:
                # Its fsync failed and the log rolled it back: refused,
                # never acknowledged (protocol.md, STORAGE_ERROR).
                frames.append(self._error_frame(held.error.code, held.error.message, a.request_id))
                continue
            durability = synced if held is not None and synced is not None else a.durability
            counted[durability] += 1
            frames.append(encode_puback(PubAck(a.request_id, a.base, a.count, a.timestamp, durability)))
        self._queue(b"".join(frames))
        self._unacked -= len(acks)
        self._room.set()  # a reader paused on max_inflight_publishes may go on

    async def _acker(self) -> None:
        try:
            while True:
                if self._acks_for_sync:
                    acks, self._acks_for_sync = self._acks_for_sync, []
                    synced = await self.committer.wait_seq(
                        max(a.held.seq for a in acks if a.held is not None)
                    )
                    self._queue_acks(acks, synced)
                    # Not kept while waiting for the next round: each holds
                    # its batch (Held), up to max_frame_bytes per connection.
                    del acks
                    continue
                if self._acks_closing:
                    return
                await self._ack_wake.wait()
                self._ack_wake = trio.Event()
        finally:
            self._acker_done.set()

    async def _finish_acks(self) -> None:
        self._flush_acks()
        self._acks_closing = True
        self._ack_wake.set()
        await self._acker_done.wait()

    # -- writing ----------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        self._wake.set()

    def _fatal(self, code: ErrorCode, message: str) -> None:
        self._accepting_deliveries = False
        if not self.conn.we_finished:
            self._queue(self.conn.send(Error(int(code), message, fatal=True)))

    def _request_error(
        self,
        code: ErrorCode,
        message: str,
        ref: int,
        ref_kind: RefKind = RefKind.SUBSCRIPTION,
        fields: dict[str, str] | None = None,
    ) -> None:
        self.log.info("request refused", code=int(code), error=code.name, detail=message, ref=ref)
        if not self._error_fields:
            fields = None  # the client did not ask for them (protocol.md, "ERROR")
        self._queue(self.conn.send(Error(int(code), message, ref, ref_kind, fatal=False, fields=fields or {})))

    def _error_frame(self, code: ErrorCode, message: str, request_id: int) -> bytes:
        """A request's refusal, encoded for a batch of acknowledgements."""
        self.log.info("request refused", code=int(code), error=code.name, detail=message, ref=request_id)
        return self.conn.send(Error(int(code), message, request_id, RefKind.REQUEST, fatal=False))

    def deliver(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        batch: bytes,
        count: int,
    ) -> None:
        """Hand one batch to one subscription (called by the router)."""
        if sub.lag and topic in sub.lag:
            return  # the log reader will get to it, in order
        size = len(batch)
        if sub.credit <= 0 or (
            (self._out or self._sending) and self._out_bytes + self._sending + size > self._out_limit
        ):
            sub.lag[topic] = base_offset
            self._lagging[sub] = None
            return
        sub.credit -= count
        topic.messages_out += count
        topic.bytes_out += size
        header = deliver_header(sub.sub_id, topic.name_bytes, base_offset, timestamp, size)
        out = self._out
        out.append(header)
        out.append(batch)
        self._out_bytes += len(header) + size
        self._wake.set()

    def _refill(self) -> None:
        """Queue batches from the log for lagging subscriptions, up to the bound."""
        limit = self._out_limit
        for sub in list(self._lagging):
            lag = sub.lag
            for topic in list(lag):
                offset = lag[topic]
                log = topic.log
                # Read only what is visible: with fsync "always", batches
                # still waiting for their fsync are delivered on release.
                # Every pass delivers a batch, steps over lost offsets, or
                # leaves the loop: it cannot spin.
                while offset < topic.visible_next:
                    if sub.credit <= 0:
                        break
                    if self._out_bytes + self._sending >= limit:
                        lag[topic] = offset
                        return
                    first = log.first_offset
                    try:
                        if offset < first:
                            raise DataLoss(topic.name, offset, first - 1, "retention")
                        batches = log.read(offset, limit - self._out_bytes - self._sending)
                    except DataLoss as lost:
                        if lost.last >= topic.visible_next:  # not yet visible: not ours to report
                            lost = DataLoss(lost.topic, lost.first, topic.visible_next - 1, lost.reason)
                        self._data_lost(sub, lost)
                        offset = lost.last + 1
                        continue
                    if not batches:
                        # The log holds less than it said: never spin on it.
                        self.log.error(
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
                            sub.sub_id,
                            topic.name_bytes,
                            stored.base_offset,
                            stored.timestamp,
                            len(stored.batch),
                        )
                        self._out.append(header)
                        self._out.append(stored.batch)
                        self._out_bytes += len(header) + len(stored.batch)
                        offset = stored.next_offset
                        if sub.credit <= 0:
                            break
                if offset < topic.visible_next:
                    lag[topic] = offset  # out of credit: resume when CREDIT comes
                else:
                    del lag[topic]  # caught up: live delivery takes over
            if not lag:
                del self._lagging[sub]

    def _data_lost(self, sub: Subscription, lost: DataLoss) -> None:
        """Tell a subscription which offsets it will never get, and why."""
        self._request_error(
            ErrorCode.DATA_LOST, lost.describe(), sub.sub_id, RefKind.SUBSCRIPTION, lost.fields()
        )
        self.log.warning(
            "subscriber skipped lost offsets",
            sub_id=sub.sub_id,
            topic=lost.topic,
            first_missing=lost.first,
            count=lost.count,
            reason=lost.reason,
        )

    async def _writer(self) -> None:
        try:
            while True:
                if self._lagging and self._out_bytes < self._out_limit and self._accepting_deliveries:
                    self._refill()
                if self._out:
                    out = self._out
                    data = out[0] if len(out) == 1 else b"".join(out)
                    self._out = []
                    self._out_bytes = 0
                    self._sending = len(data)
                    self._room.set()
                    await self.stream.send_all(data)
                    self._sending = 0
                    self.bytes_out += len(data)
                    continue
                if self._closing:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The peer is gone. Not an error of ours: stop reading and let
            # run() close up (raising here would reach run() wrapped in an
            # ExceptionGroup and read as an internal error).
            self.conn.send_failed()
            self._lost = True
            self._read_scope.cancel()
        finally:
            self._writer_done.set()
