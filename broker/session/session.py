"""One client connection: read frames, turn them into broker-core calls,
write the answers.

Up to three tasks per connection, all owned by the session's nursery:

- the reader (``_read_loop``) decodes every complete frame of each socket
  read and handles it synchronously (no awaits on the hot path): each frame
  becomes a call on the core (broker/core.py), each answer or refusal a
  frame in the outbox;
- the writer (``Outbox.run``): write coalescing and catch-up from the log,
  started when a write does not complete at once (over plain TCP the
  outbox writes directly: broker/session/flushing.py), for catch-up from
  the log, or at the end of the connection;
- the acker (``Acks.run``): PUBACKs that wait for the fsync covering them,
  started when the first one does (a subscriber's connection has none).

An idle connection has none: a plain TCP connection whose reader has waited
a while on a silent socket, with no other task, is parked (its task ends;
broker/session/parking.py) and gets a task again when the socket has input,
the outbox needs its writer or the session must stop. Each such task is an
*episode* (``_run``): the nursery, the reader, and either parking again or
the end of the connection.

The rules of the broker are the core's; what stays here is the
connection's own: the handshake and authentication, the idle timeout (PING,
then ERROR 107, checked by one server-wide task calling ``check_idle``),
backpressure (the reader stops while the outbox is over its bound or
``max_inflight_publishes`` PUBLISH frames are unanswered) and the limits
that are per connection (``max_subscriptions``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import trio

from pybroker.protocol import (
    CLOSED,
    ERROR_FIELDS_OPTION,
    HEADER_SIZE,
    NEED_DATA,
    UNLIMITED_CREDIT,
    Ack,
    Connection,
    Credit,
    Error,
    ErrorCode,
    Event,
    Goodbye,
    Groups,
    GroupsAction,
    GroupsReply,
    Topics,
    TopicsAction,
    TopicsReply,
    Hello,
    Info,
    InfoReply,
    Ping,
    Pong,
    Publish,
    RefKind,
    RemoteProtocolError,
    Role,
    State,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
)

from .. import __version__
from ..closing import linger_close
from ..config import Config
from ..core import Broker, Refused, SubscribeRequest
from ..framebudget import MAX_HELLO_BYTES, FrameBudget
from ..principal import ANYONE, Principal
from ..router import Subscription
from ..subscriber import SubscriberInfo
from . import flushing
from .acks import Acks
from .outbox import Outbox
from .parking import ParkingLot
from .reading import ReadSizer

_MAX_CREDIT = UNLIMITED_CREDIT - 1
#: TOPICS requests one connection may have in progress (each is a task).
MAX_TOPICS_REQUESTS = 4
#: What the reader returns when the parking lot stopped it (not an end).
_PARKED = "parked"


class _Stop(Exception):
    """Ends the read loop with a reason for the log."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Session:
    # Slots: 10,000 idle connections are 10,000 of these (with a dict each
    # it was 1.6 KB, more than all its slots).
    __slots__ = (
        "broker", "config", "limits", "stream", "conn_id", "peer", "conn", "client_name", "subs",
        "principal", "outbox", "acks", "reads", "_flusher", "_read_scope", "_lot", "_fd",
        "_waiting_read", "_parking", "_parked", "_stop", "reading_paused", "_max_inflight",
        "_idle_deadline", "_idle_pinged", "_idle_expired", "_ping_nonce", "_pending_fatal",
        "messages_in", "_nursery", "_topics_requests", "__weakref__",
    )

    def __init__(
        self,
        broker: Broker,
        config: Config,
        frame_budget: FrameBudget,
        stream: trio.abc.Stream,
        conn_id: int,
        peer: str,
        lot: ParkingLot,
    ) -> None:
        self.broker = broker
        self.config = config
        self.limits = config.limits
        self.stream = stream
        self.conn_id = conn_id
        self.peer = peer
        self.conn = Connection(Role.SERVER, max_frame_bytes=self.limits.max_frame_bytes)
        self.client_name = ""
        self.subs: dict[int, Subscription] = {}
        #: Who the connection authenticated as (broker/principal.py).
        self.principal = ANYONE
        # The parts hold no reference back to the session: when the
        # connection ends, reference counting frees it all.
        self.outbox = Outbox(stream, self.conn, config.outbound_queue_bytes, self._info())
        self.acks = Acks(broker, self.outbox)
        self.reads = ReadSizer(stream, self.conn, frame_budget)
        self._flusher = flushing.current()
        #: The reader's cancel scope while it runs (each episode has its own).
        self._read_scope: trio.CancelScope | None = None
        # Parking (broker/session/parking.py): the lot; the socket's number
        # (-1 over TLS: never parked); the reader waits for input (the one
        # place where the lot may stop it); the lot asked it to stop; parked.
        self._lot = lot
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        self._waiting_read = False
        self._parking = False
        self._parked = False
        #: The reader must stop for good (shutdown, idle timeout, broken).
        self._stop = False
        #: The reader waits for the peer (backpressure); for tests and metrics.
        self.reading_paused = False
        self._max_inflight = self.limits.max_inflight_publishes
        # Idle timeout (config.idle_timeout, see check_idle): when it acts
        # next, whether it sent its PING, whether it gave up.
        self._idle_deadline = trio.current_time() + config.idle_timeout
        self._idle_pinged = False
        self._idle_expired = False
        self._ping_nonce = 0
        # A protocol error's fatal ERROR, held back until the PUBACKs still
        # owed (waiting for a sync) are out: nothing may follow a fatal ERROR.
        self._pending_fatal: RemoteProtocolError | None = None
        self.messages_in = 0
        # TOPICS requests wait for fsyncs and file work: each runs in a task
        # of the session's nursery, at most MAX_TOPICS_REQUESTS at once.
        self._nursery: trio.Nursery | None = None
        self._topics_requests = 0

    @property
    def logger(self) -> Any:
        """This connection's logger (the outbox's: made when used)."""
        return self.outbox.logger

    @property
    def bytes_out(self) -> int:
        return self.outbox.bytes_out

    def _info(self) -> SubscriberInfo:
        return SubscriberInfo("tcp", self.conn_id, self.client_name, self.peer)

    # -- lifecycle --------------------------------------------------------

    async def run(self) -> None:
        """The connection's first task (the server's handler)."""
        self.logger.info("connection opened")
        await self._run()

    async def resumed(self) -> None:
        """A parked connection's next task (started by the parking lot)."""
        self._parked = False
        self.outbox.unpark = None
        await self._run()

    async def _run(self) -> None:
        """One episode: read until the connection ends or is parked."""
        reason = "closed"
        parked = False
        if self._fd >= 0:
            self._lot.active.add(self)  # a candidate for parking (never over TLS)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.outbox.start_writer(nursery, self._broken)
                self.acks.nursery = nursery  # the acker starts when first needed
                while True:
                    reason = await self._read_loop()
                    if reason is not _PARKED:
                        break
                    if self._may_park(nursery):
                        # No await from here until the task ends: nothing can
                        # start in this nursery, and the session is parked
                        # before anything can wake it.
                        self._nursery = self.acks.nursery = None
                        self.outbox.writer_gone()
                        parked = self._park()
                        if parked:
                            return  # the nursery has no task left: it closes at once
                        self._nursery = self.acks.nursery = nursery
                        self.outbox.start_writer(nursery, self._broken)
                    # A task started meanwhile, or the lot is closed: read on.
                self._drop_subscriptions()
                await self.acks.finish()
                if self._pending_fatal is not None:
                    self._fatal(self._pending_fatal.code, self._pending_fatal.message)
                if self.conn.state is State.OPEN and not self.conn.we_finished:
                    self.outbox.queue(self.conn.send(Goodbye()))
                self.outbox.closing = True
                self.outbox.wake_writer()
                with trio.move_on_after(self.config.shutdown_grace):
                    await self.outbox.done.wait()
                nursery.cancel_scope.cancel()
            if self.outbox.lost and reason == "server shutdown":
                # The writer found the peer gone and stopped the reader. A
                # reason the reader gave itself stands: over TLS, the ERROR
                # after a handshake timeout cannot be sent at all.
                reason = "connection lost"
        except Exception:
            self.logger.exception("internal error; closing this connection")
            reason = "internal error"
        finally:
            if not parked:
                self._stop = True
                self._nursery = None
                self._lot.active.discard(self)
                self._lot.sessions.discard(self)
                self.outbox.writer_gone()
                self.outbox.unpark = None
                self.acks.nursery = None  # a reference cycle otherwise
                self._drop_subscriptions()
                self.reads.release()  # whatever frame budget is still held
                with trio.CancelScope(shield=True):
                    await linger_close(self.stream)
                self.logger.info("connection closed", reason=reason, client=self.client_name)

    def shutdown(self) -> None:
        """Server shutdown: stop reading; the session then flushes and says GOODBYE."""
        self._stop_reading()

    def _broken(self) -> None:
        """The writer found the connection broken."""
        self._stop_reading()

    def _stop_reading(self) -> None:
        """Stop the reader for good (a parked connection gets a task to end in)."""
        self._stop = True
        if self._read_scope is not None:
            self._read_scope.cancel()
        self.unpark()

    def unpark(self) -> None:
        """Give a parked connection its task back (the outbox needs its
        writer, or the session must stop)."""
        if self._parked:
            self._lot.resume(self, self._fd)

    def abandon(self) -> None:
        """Close a parked connection at once: the server was cancelled, no
        task will run for it again (ParkingLot.abandon)."""
        self._stop = True
        self._parked = False
        self.outbox.unpark = None
        self.outbox.writer_gone()
        self._drop_subscriptions()
        self.reads.release()
        assert isinstance(self.stream, trio.SocketStream)  # only plain TCP is parked
        self.stream.socket.close()
        self.logger.info("connection closed", reason="server cancelled", client=self.client_name)

    def park_if_idle(self, now: float, after: float) -> None:
        """Called by the parking lot for connections with a task: stop the
        reader if it has waited ``after`` seconds on a silent socket with
        nothing buffered and is the session's only task. It is stopped only
        while it waits for input (``_waiting_read``), where a cancellation
        takes nothing from the socket (the read after it is a checkpoint
        before the recv)."""
        if (
            self._waiting_read
            and not self._parking
            and not self._stop
            and self._fd >= 0
            and now - after >= self._idle_deadline - self.config.idle_timeout
            and self._read_scope is not None
            and self._nursery is not None
            and not self.conn.buffered_bytes
            and not self.reads.held
        ):
            if self._nursery.child_tasks:
                # The writer task, once idle, ends if asked: parked at a
                # later sweep. (An acker, once started, stays: not parked.)
                self.outbox.retire_writer()
                return
            self._parking = True
            self._read_scope.cancel()

    def _may_park(self, nursery: trio.Nursery) -> bool:
        """Nothing but the reader runs or is owed: the task may end."""
        return (
            not self._stop
            and not nursery.child_tasks
            and not self.conn.buffered_bytes
            and not self.reads.held
            and not self.acks.unacked
            and not self._topics_requests
            and self._pending_fatal is None
            and not self.outbox.sending
        )

    def _park(self) -> bool:
        """Hand the socket to the parking lot; False if it would not take it."""
        self.outbox.unpark = self
        if not self._lot.park(self, self._fd):
            self.outbox.unpark = None
            return False
        self._parked = True
        return True

    def _drop_subscriptions(self) -> None:
        self.outbox.accepting = False
        self.broker.disconnected(self.outbox, list(self.subs.values()))
        self.subs.clear()
        self.outbox.lagging.clear()

    # -- reading ----------------------------------------------------------

    def _must_pause(self) -> bool:
        return self.outbox.over_limit or self.acks.unacked >= self._max_inflight

    async def _read_loop(self) -> str:
        conn = self.conn
        deadline = trio.current_time() + self.config.handshake_timeout
        idle = self.config.idle_timeout
        if conn.state is not State.OPEN:
            # Until the handshake is done the only frame is a HELLO, and a
            # read takes no more than the largest one (broker/framebudget.py).
            conn.max_frame_bytes = min(MAX_HELLO_BYTES, self.limits.max_frame_bytes)
        hello_read = HEADER_SIZE + min(MAX_HELLO_BYTES, self.limits.max_frame_bytes)
        outbox, acks, max_inflight = self.outbox, self.acks, self._max_inflight
        self._parking = False
        self._read_scope = read_scope = trio.CancelScope()
        if self._stop:
            read_scope.cancel()
        with read_scope:
            try:
                while True:
                    if self._must_pause():
                        await self._pause_reading()
                    if conn.state is State.OPEN:
                        self._waiting_read = True  # the lot may stop it here
                        size = await self.reads.next_size()
                        self._waiting_read = False
                        if self.reads.waited:
                            self.reads.waited = False
                            self._not_idle()
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
                    self.reads.keep()
                    framed = False
                    while True:
                        # Every complete PUBLISH frame in a row, in one pass
                        # (as many as max_inflight_publishes lets in: the
                        # reader pauses at the same frame as one at a time).
                        run = conn.next_publishes(max_inflight - acks.unacked)
                        if run:
                            framed = True
                            self._on_publishes(run)
                            # Inline _must_pause: checked once per run.
                            if outbox.queued_bytes > outbox.limit or acks.unacked >= max_inflight:
                                await self._pause_reading()
                            continue
                        event = conn.next_event()
                        if event is NEED_DATA:
                            break
                        if event is CLOSED:
                            return "peer closed"
                        framed = True
                        if type(event) is Publish:
                            self._on_publish(event)  # most frames: no dispatch
                        elif type(event) is Hello:
                            # The one await between frames: checking a
                            # password runs scrypt in a worker thread.
                            if not await self._hello(event, deadline):
                                return "authentication failed"
                            continue
                        else:
                            self._handle(event)  # type: ignore[arg-type]
                        # Checked per frame, not per read: one read holds
                        # thousands of small frames, each of which may queue
                        # an answer (an INFO_REPLY can be large). Inline
                        # _must_pause: this runs once per frame.
                        if outbox.queued_bytes > outbox.limit or acks.unacked >= max_inflight:
                            await self._pause_reading()
                    self.reads.keep()
                    if framed:
                        self._idle_deadline = trio.current_time() + idle
                        self._idle_pinged = False
                    self.acks.flush()
                    # This read's answers and deliveries, every connection's,
                    # written now (broker/session/flushing.py).
                    self._flusher.flush()
            except RemoteProtocolError as exc:
                self.acks.flush()
                self.logger.warning(
                    "protocol error", code=int(exc.code), error=exc.code.name, detail=exc.message
                )
                self.outbox.accepting = False
                # Without its traceback: that holds this frame, hence the
                # session, in a cycle only the garbage collector would free.
                self._pending_fatal = exc.with_traceback(None)
                return f"protocol error {exc.code.name}"
            except _Stop as stop:
                self.acks.flush()
                return stop.reason
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "connection lost"
            finally:
                self._waiting_read = False
                if self._parking and not self._stop:
                    self.reads.keep()  # parking: nothing buffered, budget given back
                else:
                    self.reads.release()
        self._read_scope = None
        if self._parking and not self._stop:
            return _PARKED
        if self._idle_expired:
            self._fatal(ErrorCode.IDLE_TIMEOUT, f"no frame for {2 * idle:g} s, not even PONG")
            return "idle timeout"
        return "server shutdown"

    async def _pause_reading(self) -> None:
        """Backpressure: stop reading until the peer has taken what we queued
        for it and the PUBLISHes read so far are answered.

        Bounds the memory of a peer that does not read (PUBACKs, PONGs,
        replies pile up otherwise) and of one that publishes faster than its
        acknowledgements can be given (fsync). Never an error.
        """
        self.acks.flush()
        self.reading_paused = True
        try:
            await self.outbox.wait_for_room(lambda: self.acks.unacked >= self._max_inflight)
        finally:
            self.reading_paused = False
        self._not_idle()

    def _not_idle(self) -> None:
        """We were not reading (backpressure, waiting for frame budget): not
        the peer's silence. A fresh idle period."""
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
            (self.reading_paused and not self.reads.held)
            or self.reads.waiting
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
            self.outbox.queue(self.outbox.send(Ping(self._ping_nonce)))
            self.logger.debug("idle; ping sent", idle_timeout=idle)
            return
        self._idle_expired = True
        self._stop_reading()

    # -- frames -----------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if type(event) is Publish:
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
            # After the answers to every earlier PUBLISH: a PONG is a barrier.
            self.acks.pong(self.outbox.send(Pong(event.nonce)))
        elif isinstance(event, Info):
            self._on_info(event)
        elif isinstance(event, Groups):
            self._on_groups(event)
        elif isinstance(event, Topics):
            self._on_topics(event)
        elif isinstance(event, Goodbye):
            raise _Stop("client said goodbye")
        elif isinstance(event, Error):
            self.logger.warning("error from client", code=event.code, detail=event.message)
            if event.fatal:
                raise _Stop("client sent a fatal error")
        # Pong: nothing to do.

    async def _hello(self, hello: Hello, deadline: float) -> bool:
        """WELCOME, or AUTH_FAILED or SHUTTING_DOWN (False); then frames of any size."""
        if self.broker.stepped_aside:
            self._fatal(
                ErrorCode.SHUTTING_DOWN,
                "this node is cut off from the cluster's coordination (etcd): connect to another node",
            )
            return False
        auth = self.broker.auth
        if auth is not None:
            user = None
            with trio.move_on_at(deadline) as scope:
                user = await auth.hello(hello.options)
            if user is None:
                # Never the secret itself; the user name helps the operator.
                self.logger.warning(
                    "authentication failed",
                    client=hello.client_name,
                    user=hello.options.get("user"),
                    method="token" if "token" in hello.options else "password" if "user" in hello.options else "none",
                    reason="timed out" if scope.cancelled_caught else "bad or missing credentials",
                )
                self._fatal(ErrorCode.AUTH_FAILED, "authentication failed")
                return False
            self.principal = Principal(user, cached=True)
            self.outbox.user = user.name
        self.client_name = hello.client_name
        self.outbox.info = self._info()
        self.outbox.error_fields = hello.options.get(ERROR_FIELDS_OPTION) == "1"
        self.outbox.named = True  # its logger names the client from now on
        welcome = Welcome(
            server_version=__version__,
            server_name=self.config.server_name,
            # dedup_window_ms: PUBLISH flag DEDUP is understood, and for how long.
            limits={
                **self.limits.announced(),
                "dedup_window_ms": int(self.config.dedup_window * 1000),
                # max_delay_ms: PUBLISH flag DELAYED is understood, and how far ahead.
                **(
                    {"max_delay_ms": int(self.config.max_delay * 1000)}
                    if self.broker.keeps_delayed
                    else {}
                ),
            },
        )
        self.outbox.queue(self.conn.send(welcome))
        self.logger.debug("handshake done")
        self.conn.max_frame_bytes = self.limits.max_frame_bytes
        return True

    def _on_publishes(self, frames: list[tuple[int, str, bytes, int]]) -> None:
        """PUBLISH frames of one read, in order (Broker.publish_run): their
        answers in their places among the PUBACKs. A batch that cannot be a
        batch closes the connection, after the frames before it."""
        results, error = self.broker.publish_run(self.principal, frames)
        self.messages_in += self.acks.add_run(frames, results)
        if error is not None:
            raise error

    def _on_publish(self, pub: Publish) -> None:
        try:
            published = self.broker.publish(
                self.principal,
                pub.topic,
                pub.batch,
                needs_receiver=pub.needs_receiver,
                dedup=pub.dedup,
                delayed=pub.delayed,
            )
        except Refused as refused:
            # In its place among the PUBACKs (protocol.md, "Ordering and guarantees").
            self.acks.refuse(
                pub.request_id,
                self.outbox.refusal(refused.code, refused.message, pub.request_id, RefKind.REQUEST, refused.fields),
            )
            return
        self.messages_in += published.count
        if pub.request_id:
            self.acks.add(pub.request_id, published)

    def _on_subscribe(self, req: Subscribe) -> None:
        sid = req.sub_id
        if sid in self.subs:
            self._request_error(ErrorCode.DUPLICATE_SUBSCRIPTION, f"sub_id {sid} is active", sid)
            return
        if len(self.subs) >= self.limits.max_subscriptions:
            self._request_error(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"limit is {self.limits.max_subscriptions} per connection", sid
            )
            return
        credit = None if req.credit == UNLIMITED_CREDIT else req.credit
        request = SubscribeRequest(sid, req.pattern, req.start, req.start_value, credit, req.options)
        try:
            sub = self.broker.subscribe(self.principal, self.outbox, request)
        except Refused as refused:
            self._refused(refused, sid, RefKind.SUBSCRIPTION)
            return
        self.subs[sid] = sub
        self.outbox.queue(self.outbox.send(SubAck(sid, time.time_ns() // 1000)))
        self.outbox.start_lagging(sub)
        self.logger.debug("subscribed", sub_id=sid, pattern=req.pattern, group=req.options.get("group"))

    def _on_info(self, req: Info) -> None:
        try:
            entries, truncated = self.broker.topic_infos(self.principal, req.pattern, req.after)
        except Refused as refused:
            self._refused(refused, req.request_id, RefKind.REQUEST)
            return
        self.outbox.queue(self.outbox.send(InfoReply(req.request_id, tuple(entries), truncated)))

    def _on_groups(self, req: Groups) -> None:
        try:
            if req.action is GroupsAction.CREATE:
                document = self.broker.create_group(
                    self.principal, req.name, req.pattern, req.start, req.start_value, req.options
                )
            else:
                document = self.broker.groups_request(self.principal, req.action, req.name)
        except Refused as refused:
            self._refused(refused, req.request_id, RefKind.REQUEST)
            return
        self.outbox.queue(self.outbox.send(GroupsReply(req.request_id, document)))

    def _on_topics(self, req: Topics) -> None:
        if self._topics_requests >= MAX_TOPICS_REQUESTS or self._nursery is None:
            self.outbox.refuse(
                ErrorCode.BAD_REQUEST,
                f"at most {MAX_TOPICS_REQUESTS} TOPICS requests at once per connection",
                req.request_id,
                RefKind.REQUEST,
            )
            return
        self._topics_requests += 1
        self._nursery.start_soon(self._topics_request, req)

    async def _topics_request(self, req: Topics) -> None:
        try:
            if req.action is TopicsAction.DELETE:
                document = await self.broker.delete_topic(self.principal, req.topic)
            elif req.action is TopicsAction.PURGE:
                document = await self.broker.purge_topic(self.principal, req.topic, req.keep_from)
            elif req.action is TopicsAction.SET:
                document = await self.broker.set_topic(self.principal, req.topic, req.settings)
            elif req.action is TopicsAction.CREATE:
                document = await self.broker.create_topic(self.principal, req.topic, req.settings)
            else:
                raise Refused(ErrorCode.BAD_REQUEST, f"unknown TOPICS action {int(req.action)}")
        except Refused as refused:
            self._refused(refused, req.request_id, RefKind.REQUEST)
        else:
            self.outbox.queue(self.outbox.send(TopicsReply(req.request_id, json.dumps(document))))
        finally:
            self._topics_requests -= 1

    def _on_credit(self, req: Credit) -> None:
        sub = self.subs.get(req.sub_id)
        if sub is None:
            return  # may cross an UNSUBACK; harmless
        sub.credit = min(sub.credit + req.messages, max(sub.credit, _MAX_CREDIT))
        self.outbox.credit_added(sub)

    def _on_unsubscribe(self, req: Unsubscribe) -> None:
        sub = self.subs.pop(req.sub_id, None)
        if sub is None:
            self._request_error(ErrorCode.UNKNOWN_SUBSCRIPTION, f"sub_id {req.sub_id} is not active", req.sub_id)
            return
        self.broker.unsubscribe(sub)
        self.outbox.forget(sub)
        self.outbox.queue(self.outbox.send(UnsubAck(req.sub_id)))

    def _on_ack(self, req: Ack) -> None:
        sub = self.subs.get(req.sub_id)
        if sub is None:
            self._request_error(
                ErrorCode.BAD_REQUEST, f"sub_id {req.sub_id} is not an active group member", req.sub_id
            )
            return
        try:
            self.broker.settle(sub, req.topic, req.kind, req.ranges, req.delay_ms / 1000)
        except Refused as refused:
            self._refused(refused, req.sub_id, RefKind.SUBSCRIPTION)

    # -- answers ----------------------------------------------------------

    def _fatal(self, code: ErrorCode, message: str) -> None:
        self.outbox.accepting = False
        if not self.conn.we_finished:
            self.outbox.queue(self.conn.send(Error(int(code), message, fatal=True)))

    def _refused(self, refused: Refused, ref: int, ref_kind: RefKind) -> None:
        self.outbox.refuse(refused.code, refused.message, ref, ref_kind, refused.fields)

    def _request_error(self, code: ErrorCode, message: str, ref: int) -> None:
        """A refusal the session itself decides (per-connection rules)."""
        self.outbox.refuse(code, message, ref, RefKind.SUBSCRIPTION)
