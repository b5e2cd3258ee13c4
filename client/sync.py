"""A blocking client, for code without an event loop: threads, Flask and
Django views, Celery tasks, scripts, notebooks.

    import pybroker.sync

    with pybroker.sync.connect("pybroker://127.0.0.1:7420") as c:
        ack = c.publish("orders.created", b"...")          # waits for the ack
        c.subscribe("orders.>", lambda msg: print(msg.payload))   # worker thread
        with c.subscribe("jobs", group="workers") as sub:
            for msg in sub.messages(timeout=5):
                msg.ack()

How it works: the async client (:func:`pybroker.connect`) runs in a thread
of its own under its own ``trio.run``, and this module uses only its public
API. A blocking call hands a coroutine to that thread and waits for the
result; its timeout is a cancel scope in the loop, so a call that times out
is cancelled there, not left running. Messages from ``send()`` and
``publish()`` in any number of threads go through one bounded queue that a
single task in the loop thread hands to the async client in order, with no
round trip per message, so they form batches as they do in async code; a
``publish()`` then waits on a lock that another task releases once its
acknowledgement is in. Subscriptions pass messages to the calling thread a
batch at a time.

Everything between the threads is bounded: the queue of messages not yet
handed over (``OUTBOX_LIMIT``, then ``send()`` blocks, up to its
timeout), the messages fetched ahead for a subscription (``TAKE_LIMIT``),
the worker threads (``concurrency``), and every wait (``timeout=``; ``None``
waits as long as it takes).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import trio

# The async client's public names only (pybroker's __init__ and the
# protocol façade): this module is a layer over that API, nothing more.
from . import DEFAULT_URL, ConnectionClosed, PublishAck, Reconnect, SubscriptionStatistics, TopicInfo
from . import Client as AsyncClient
from . import Message as AsyncMessage
from . import PendingAck as AsyncPendingAck
from . import Subscription as AsyncSubscription
from . import connect as async_connect
from .protocol import AckKind, Welcome

# Type aliases of connect()'s and subscribe()'s parameters (imported, not
# only for the type checker, so that typing.get_type_hints works).
from .connection import Start
from .transport import CAFile, TLSOption

__all__ = [
    "Client",
    "Message",
    "PendingAck",
    "Subscription",
    "connect",
]

_log = logging.getLogger("pybroker.sync")

T = TypeVar("T")

#: Messages queued by send() and publish() and not yet handed to the async
#: client; past this, send() blocks (up to its timeout). The async client's
#: own bound (``max_pending``) follows.
OUTBOX_LIMIT = 8192
#: Threads waiting for room in a full outbox are woken once it is this low.
_LOW_WATER = OUTBOX_LIMIT // 2
#: Longest a thread waits for room before looking again, in seconds.
_ROOM_SLICE = 0.05
#: Messages a subscription fetches into the calling thread per round trip.
TAKE_LIMIT = 1024
#: Worker threads one callback subscription may have (``concurrency``).
MAX_CONCURRENCY = 256
#: Default bound, in seconds, on a blocking call (publish, flush, subscribe...).
TIMEOUT = 30.0
#: Extra time the blocking side of request() allows beyond its own timeout.
_GRACE = 5.0

Callback = Callable[["Message"], object]


class _Expired(Exception):
    """A blocking call's own timeout fired (in the loop thread)."""


class _GiveUp(Exception):
    """close() ran out of close_timeout: leave connect() at once."""


class _Marker:
    """Put in the outbox by the loop thread: set once everything queued
    before it has been handed to the async client."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()


class PendingAck:
    """The acknowledgement of one message queued with :meth:`Client.send`.

    ``wait(timeout)`` blocks until the broker acknowledged it (or refused
    it); ``done()`` and ``result()`` do not block.
    """

    __slots__ = ("topic", "_client", "_payload", "_headers", "_ack", "_error", "_handed", "_done")

    def __init__(
        self,
        client: Client,
        topic: str,
        payload: bytes,
        headers: Mapping[str, str] | None,
        *,
        waited: bool = False,
    ) -> None:
        self.topic = topic
        self._client = client
        self._payload = payload
        self._headers = headers
        # Written by the loop thread only.
        self._ack: AsyncPendingAck | None = None
        self._error: BaseException | None = None
        self._handed: trio.Event | None = None
        #: publish(): a lock held until the loop thread knows the outcome,
        #: which then releases it (cheaper than a round trip per message).
        self._done: threading.Lock | None = None
        if waited:
            self._done = threading.Lock()
            self._done.acquire()

    def done(self) -> bool:
        """Acknowledged or failed."""
        ack = self._ack
        return self._error is not None or (ack is not None and ack.done())

    def result(self) -> PublishAck:
        """The acknowledgement; raises if it failed, RuntimeError if it has
        not arrived yet."""
        if self._error is not None:
            raise self._error
        ack = self._ack
        if ack is None:
            raise RuntimeError("not acknowledged yet")
        return ack.result()

    def wait(self, timeout: float | None = TIMEOUT) -> PublishAck:
        """Block until acknowledged; raise what refused it (a BrokerError,
        ConnectionClosed, or ValueError/MessageTooLarge from the client), or
        TimeoutError after ``timeout`` seconds (the message stays queued and
        may still be stored)."""
        if self.done():
            return self.result()
        return self._client._call(self._wait, timeout, f"the acknowledgement of a publish to {self.topic!r}")

    # -- the loop thread's side -------------------------------------------

    async def _wait(self) -> PublishAck:
        if self._ack is None and self._error is None:
            if self._handed is None:
                self._handed = trio.Event()
            await self._handed.wait()
        if self._error is not None:
            raise self._error
        assert self._ack is not None
        return await self._ack.wait()

    def _settle(self, ack: AsyncPendingAck | None, error: BaseException | None) -> None:
        self._ack = ack
        self._error = error
        self._payload = b""  # handed over: no need to hold it twice
        self._headers = None
        if self._handed is not None:
            self._handed.set()
        if error is not None:
            self._release()

    def _release(self) -> None:
        """Wake the publish() waiting for this one (once)."""
        done, self._done = self._done, None
        if done is not None:
            done.release()


class Message:
    """A received message (the async :class:`pybroker.Message` with blocking
    ``ack()``, ``nak()``, ``term()`` and ``in_progress()`` for consumer-group
    messages)."""

    __slots__ = ("_raw", "_client")

    def __init__(self, raw: AsyncMessage, client: Client) -> None:
        self._raw = raw
        self._client = client

    @property
    def topic(self) -> str:
        return self._raw.topic

    @property
    def payload(self) -> bytes:
        return self._raw.payload

    @property
    def headers(self) -> Mapping[str, str]:
        return self._raw.headers

    @property
    def offset(self) -> int:
        return self._raw.offset

    @property
    def timestamp_us(self) -> int:
        """Broker append time, µs since the Unix epoch."""
        return self._raw.timestamp_us

    @property
    def timestamp(self) -> float:
        return self._raw.timestamp

    @property
    def datetime(self) -> _dt.datetime:
        return self._raw.datetime

    @property
    def deliveries(self) -> int:
        """How many times it was delivered, this time included (groups)."""
        return self._raw.deliveries

    @property
    def is_group_message(self) -> bool:
        return self._raw.is_group_message

    @property
    def settled(self) -> AckKind | None:
        return self._raw.settled

    @property
    def raw(self) -> AsyncMessage:
        """The async client's Message this one wraps."""
        return self._raw

    def __repr__(self) -> str:
        return (
            f"Message(topic={self.topic!r}, offset={self.offset}, payload={self.payload!r},"
            f" headers={dict(self.headers)!r}, deliveries={self.deliveries})"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Message):
            return self._raw == other._raw
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # as the async Message: mutable

    def ack(self, *, timeout: float | None = TIMEOUT) -> None:
        """Done: the group will not deliver it again."""
        self._settle(self._raw.ack, "ack", timeout)

    def nak(self, delay: float = 0.0, *, timeout: float | None = TIMEOUT) -> None:
        """Not done: deliver it again, now or after ``delay`` seconds."""

        async def nak() -> None:
            await self._raw.nak(delay)

        self._settle(nak, "nak", timeout)

    def term(self, *, timeout: float | None = TIMEOUT) -> None:
        """Never deliver it again, and do not dead-letter it."""
        self._settle(self._raw.term, "term", timeout)

    def in_progress(self, *, timeout: float | None = TIMEOUT) -> None:
        """Still working on it: restart its ack-wait clock."""
        self._settle(self._raw.in_progress, "in_progress", timeout)

    def _settle(self, settle: Callable[[], Awaitable[None]], what: str, timeout: float | None = TIMEOUT) -> None:
        if not self._raw.is_group_message:
            raise RuntimeError("only consumer-group messages are acknowledged")
        self._client._call(settle, timeout, f"{what} of {self.topic}@{self.offset}")

    def _unsettled(self) -> bool:
        settled = self._raw.settled
        return settled is None or settled is AckKind.IN_PROGRESS


class Subscription:
    """Messages of one subscription, for the calling thread.

    ``for msg in sub`` blocks for each message until the subscription ends
    (unsubscribed, the client closed); ``sub.messages(timeout=S)`` raises
    TimeoutError when none arrives within S seconds; ``sub.get(timeout)``
    returns one message, or None once it has ended. As a context manager it
    unsubscribes on exit. Several threads may iterate one subscription; each
    message goes to one of them.
    """

    def __init__(self, client: Client, raw: AsyncSubscription) -> None:
        self._client = client
        self._raw = raw
        self.pattern = raw.pattern
        #: The consumer group this subscription is a member of, if any.
        self.group = raw.group
        self._lock = threading.Lock()
        self._buffer: deque[Message] = deque()
        self._ended = False
        self._error: BaseException | None = None
        #: Set by close(): get() returns None, callback threads end.
        self._stopping = False
        #: The scope of the wait in _take, for close() to cancel.
        self._take_scope: trio.CancelScope | None = None
        self._workers: list[threading.Thread] = []

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message; None once the subscription has ended and what
        it had buffered is consumed. Raises TimeoutError if none arrives
        within ``timeout`` seconds (None: wait as long as it takes), and
        ConnectionClosed if the connection was lost for good."""
        if not self._stopping:
            try:
                # Atomic: no lock needed to take what was fetched (the lock
                # is for fetching, one thread at a time).
                return self._buffer.popleft()
            except IndexError:
                pass
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise TimeoutError(f"no message from {self.pattern!r} within {timeout:g} s")
        try:
            if self._stopping:
                return None  # close(): what was fetched is not handed out
            if self._buffer:
                return self._buffer.popleft()
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())

            async def take() -> list[AsyncMessage] | None:
                return await self._take(remaining)

            try:
                batch = self._client._call(take, None, f"a message from {self.pattern!r}")
            except ConnectionClosed as exc:
                if self._client._stopping or self._stopping:
                    self._ended = True  # closed on purpose: the end, not an error
                    return None
                self._error = exc
                raise
            if batch is None:
                self._ended = True
                return None
            if not batch:
                if self._stopping:
                    return None  # close() stopped the wait
                assert timeout is not None
                raise TimeoutError(f"no message from {self.pattern!r} within {timeout:g} s")
            client = self._client
            self._buffer.extend(Message(m, client) for m in batch)
            return self._buffer.popleft()
        finally:
            self._lock.release()

    def messages(self, timeout: float | None = None) -> Iterator[Message]:
        """Iterate until the subscription ends; with ``timeout``, raise
        TimeoutError when no message arrives within that many seconds."""
        while True:
            msg = self.get(timeout)
            if msg is None:
                return
            yield msg

    def __iter__(self) -> Iterator[Message]:
        return self.messages()

    def unsubscribe(self, timeout: float | None = TIMEOUT) -> None:
        """Stop the subscription and wait (up to ``timeout``) for its
        callback threads, if any, to finish what it had received; messages
        already received are still iterated."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._client.closed:
            try:
                self._client._call(self._raw.unsubscribe, timeout, f"unsubscribing from {self.pattern!r}")
            except ConnectionClosed:
                pass  # the connection is gone, and the subscription with it
        self._client._forget(self)
        self.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def join(self, timeout: float | None = None) -> None:
        """Wait for this subscription's callback threads to end (they end
        with the subscription)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            if worker is threading.current_thread():
                continue  # unsubscribing from its own callback
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def statistics(self) -> SubscriptionStatistics:
        """As the async Subscription's, with messages fetched into this
        thread's buffer counted as pending."""
        stats = self._raw.statistics()
        buffered = len(self._buffer)
        return SubscriptionStatistics(
            pattern=stats.pattern,
            pending_messages=stats.pending_messages + buffered,
            delivered_messages=stats.delivered_messages - buffered,
            malformed_batches=stats.malformed_batches,
            lost_messages=stats.lost_messages,
        )

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()

    # -- the loop thread's side -------------------------------------------

    async def _take(self, timeout: float | None) -> list[AsyncMessage] | None:
        """The next message, waiting up to ``timeout``, and those right behind
        it that are already here (up to TAKE_LIMIT); [] on timeout, None at
        the end."""
        raw = self._raw
        first: AsyncMessage | None = None
        if timeout is None or raw.statistics().pending_messages:
            timeout = float("inf")  # here already: not even timeout=0 misses it
        with trio.move_on_after(timeout) as scope:
            if self._stopping:
                scope.cancel()
            self._take_scope = scope
            try:
                first = await raw.__anext__()
            except StopAsyncIteration:
                return None
            finally:
                self._take_scope = None
        if first is None:
            return []
        batch = [first]
        # Outside the timeout's scope: what has been taken must not be lost
        # to a cancellation. Pending messages are buffered, so these calls
        # do not wait.
        while len(batch) < TAKE_LIMIT:
            pending = raw.statistics().pending_messages
            if not pending:
                break
            try:
                for _ in range(min(pending, TAKE_LIMIT - len(batch))):
                    batch.append(await raw.__anext__())
            except StopAsyncIteration:
                break
        return batch

    def _stop_taking(self) -> None:
        """In the loop thread, after ``_stopping`` was set: end a wait."""
        if self._take_scope is not None:
            self._take_scope.cancel()

    # -- callbacks --------------------------------------------------------

    def _start(self, callback: Callback, concurrency: int, auto_ack: bool) -> None:
        for i in range(concurrency):
            worker = threading.Thread(
                target=self._worker,
                args=(callback, auto_ack),
                name=f"pybroker-sync callback {self.pattern} #{i}",
                daemon=True,
            )
            self._workers.append(worker)
            worker.start()

    def _worker(self, callback: Callback, auto_ack: bool) -> None:
        """One worker thread: call ``callback`` for each message until the
        subscription ends. Group messages with ``auto_ack`` are acked when it
        returns and nak'ed when it raises (logged); an error from a plain
        subscription's callback stops the subscription and is raised again
        by ``close()``."""
        client = self._client
        while True:
            try:
                msg = self.get()
            except ConnectionClosed:
                return  # lost for good: get() raises it to iterating code too
            if msg is None:
                return
            try:
                callback(msg)
            except Exception as exc:
                if msg.is_group_message and auto_ack:
                    _log.exception("callback failed on %s@%d; nak", msg.topic, msg.offset)
                    if msg._unsettled():
                        client._soon(msg._raw.nak)
                    continue
                _log.exception(
                    "callback failed on %s@%d; the subscription to %r stops",
                    msg.topic,
                    msg.offset,
                    self.pattern,
                )
                client._callback_failed(exc)
                self._stopping = True
                client._soon(self._raw.unsubscribe)
                return
            if msg.is_group_message and auto_ack and msg._unsettled():
                client._soon(msg._raw.ack)


class Client:
    """A connection to a broker for blocking code; make one with
    :func:`connect`. Every method may be called from any thread."""

    def __init__(self, name: str, close_timeout: float) -> None:
        self.name = name
        self._close_timeout = close_timeout
        self._lock = threading.Lock()
        # Messages (and flush markers) for the loop thread's hand-over task.
        self._outbox: deque[PendingAck | _Marker] = deque()
        # Signalled (by the loop thread) when a full outbox has room again,
        # while _room_waiters says a thread waits for it.
        self._room = threading.Condition(self._lock)
        self._room_waiters = 0
        self._wake_scheduled = False
        #: close() began: no new subscriptions; callback threads stop.
        self._stopping = False
        #: close() stopped publishing: the hand-over task drains and ends.
        self._closing = False
        self._subs: set[Subscription] = set()
        self._callback_errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        # Set in the loop thread before connect() returns.
        self._async: AsyncClient | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._work = trio.Event()
        self._pump_done = False
        # publish()es handed over and waiting for their acknowledgements.
        self._watched: deque[tuple[AsyncPendingAck, PendingAck]] = deque()
        self._watch_wake = trio.Event()
        self._watch_stop = False
        self._watch_scope = trio.CancelScope()
        # An error the hand-over met in send(), raised by the next flush().
        self._send_error: BaseException | None = None

    # -- state --------------------------------------------------------------

    @property
    def _client(self) -> AsyncClient:
        if self._async is None:
            raise ConnectionClosed("not connected")
        return self._async

    @property
    def closed(self) -> bool:
        """True once close() began or the connection was lost for good."""
        return self._stopping or self._async is None or self._async.closed

    @property
    def connected(self) -> bool:
        """False while reconnecting, and once closed."""
        return not self._stopping and self._async is not None and self._async.connected

    @property
    def reconnects(self) -> int:
        """Times the connection was lost and got back."""
        return 0 if self._async is None else self._async.reconnects

    @property
    def server(self) -> Welcome | None:
        """The broker's WELCOME (its name, version and limits)."""
        return None if self._async is None else self._async.server

    # -- publishing ---------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float | None = TIMEOUT,
        delay: float | _dt.timedelta | None = None,
        deliver_at: _dt.datetime | float | None = None,
    ) -> PublishAck:
        """Publish one message and return once the broker acknowledged it.

        Raises what refused it, or TimeoutError after ``timeout`` seconds
        (during a reconnect, for instance): the message then stays queued
        and may still be stored. ``delay`` / ``deliver_at`` schedule it, as
        in the async ``publish``.
        """
        if delay is not None or deliver_at is not None:

            async def scheduled() -> PublishAck:
                return await self._client.publish(topic, payload, headers, delay=delay, deliver_at=deliver_at)

            return self._call(scheduled, timeout, f"publishing to {topic!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = PendingAck(self, topic, payload, headers, waited=True)
        done = pending._done
        assert done is not None
        self._enqueue(pending, timeout)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not done.acquire(timeout=-1 if remaining is None else remaining):
            raise TimeoutError(
                f"publish to {topic!r}: no acknowledgement within {timeout:g} s"
                " (the message stays queued and may still be stored)"
            )
        if not pending.done():
            raise ConnectionClosed("client closed before the acknowledgement came")
        return pending.result()

    def send(
        self,
        topic: str,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float | None = TIMEOUT,
    ) -> PendingAck:
        """Queue one message and return at once with its :class:`PendingAck`.

        Blocks only while ``OUTBOX_LIMIT`` messages wait to be handed to the
        connection (up to ``timeout``, then TimeoutError). A message the
        client refuses before sending (a bad topic, too large, the client
        closed) fails its PendingAck, and the next :meth:`flush` raises the
        first such error.
        """
        pending = PendingAck(self, topic, payload, headers)
        self._enqueue(pending, timeout)
        return pending

    def flush(self, timeout: float | None = TIMEOUT) -> None:
        """Wait until every message queued so far (by any thread) is
        acknowledged or failed; raise the first error a ``send()`` met
        before sending since the last flush (broker refusals are on each
        PendingAck, as in the async client)."""

        async def flush() -> None:
            await self._handed_over()
            await self._client.flush()
            error, self._send_error = self._send_error, None
            if error is not None:
                raise error

        self._call(flush, timeout, "flush")

    def _enqueue(self, pending: PendingAck, timeout: float | None) -> None:
        with self._lock:
            if len(self._outbox) >= OUTBOX_LIMIT and not self._closing:
                self._wait_for_room(pending.topic, timeout)
            if self._closing:
                raise ConnectionClosed("client closed")
            self._outbox.append(pending)
            wake = not self._wake_scheduled
            self._wake_scheduled = True
        if wake:
            self._run_soon(self._wake)

    def _wait_for_room(self, topic: str, timeout: float | None) -> None:
        """With the lock held: wait until the hand-over task has taken
        messages out of a full outbox (it notifies while anyone waits)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._room_waiters += 1
        try:
            while len(self._outbox) >= OUTBOX_LIMIT and not self._closing:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"publish to {topic!r}: {OUTBOX_LIMIT} messages still waiting"
                        f" to be handed to the connection after {timeout:g} s"
                    )
                # Notified at the low-water mark; the slice bounds the wait
                # should a notification go out just before we began waiting
                # (the loop thread reads _room_waiters without the lock).
                self._room.wait(_ROOM_SLICE if remaining is None else min(remaining, _ROOM_SLICE))
        finally:
            self._room_waiters -= 1

    # -- request and reply --------------------------------------------------

    def request(
        self,
        topic: str,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float = 5.0,
    ) -> Message:
        """Publish a request and return the first reply (see the async
        ``request``): NoReceivers at once if nobody subscribes, TimeoutError
        if no reply comes within ``timeout`` seconds."""

        async def request() -> AsyncMessage:
            await self._handed_over()  # after what this thread sent before
            return await self._client.request(topic, payload, headers, timeout=timeout)

        try:
            reply = self._call(request, timeout + _GRACE, f"the request on {topic!r}")
        except trio.TooSlowError:
            raise TimeoutError(f"no reply to the request on {topic!r} within {timeout:g} s") from None
        return Message(reply, self)

    def respond(
        self,
        request: Message | AsyncMessage,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float | None = TIMEOUT,
    ) -> PublishAck:
        """Answer a request message (publish to its ``reply-to`` topic)."""
        raw = request.raw if isinstance(request, Message) else request

        async def respond() -> PublishAck:
            await self._handed_over()
            return await self._client.respond(raw, payload, headers)

        return self._call(respond, timeout, f"the reply to {raw.topic}@{raw.offset}")

    # -- subscribing --------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        callback: Callback | None = None,
        *,
        start: Start = "new",
        window: int = 4096,
        group: str | None = None,
        concurrency: int = 1,
        auto_ack: bool = True,
        ack_wait: float | None = None,
        max_deliver: int | None = None,
        backoff: Sequence[float] | None = None,
        backoff_jitter: float | None = None,
        max_ack_pending: int | None = None,
        dead_letter: str | None = None,
        ordering: str | None = None,
        timeout: float | None = TIMEOUT,
    ) -> Subscription:
        """Subscribe as the async ``subscribe`` does (same options), once the
        broker confirmed it.

        With ``callback``, ``concurrency`` worker threads call it for each
        message (for a group with ``auto_ack``: it returns, the message is
        acked; it raises, it is nak'ed and the error logged). For a group,
        this member's prefetch (``max_ack_pending``) is ``concurrency``
        unless given, as in the async client. An error from
        a plain subscription's callback is logged, stops that subscription
        and is raised again by ``close()``. Without one, iterate the
        returned :class:`Subscription`.
        """
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}")

        async def subscribe() -> AsyncSubscription:
            return await self._client.subscribe(
                pattern,
                start=start,
                window=window,
                group=group,
                # No async callback here; for a group, the member's default
                # prefetch (max_ack_pending) follows the worker threads.
                concurrency=concurrency,
                ack_wait=ack_wait,
                max_deliver=max_deliver,
                backoff=backoff,
                backoff_jitter=backoff_jitter,
                max_ack_pending=max_ack_pending,
                dead_letter=dead_letter,
                ordering=ordering,
            )

        raw = self._call(subscribe, timeout, f"subscribing to {pattern!r}")
        sub = Subscription(self, raw)
        with self._lock:
            closing = self._stopping
            if not closing:
                self._subs.add(sub)
        if closing:
            sub._stopping = True
            raise ConnectionClosed("client closed")
        if callback is not None:
            sub._start(callback, concurrency, auto_ack)
        return sub

    def _forget(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def _callback_failed(self, error: BaseException) -> None:
        with self._lock:
            self._callback_errors.append(error)

    # -- the rest of the async API -----------------------------------------

    def ping(self, timeout: float | None = TIMEOUT) -> None:
        """Round trip to the broker."""
        self._call(self._client.ping, timeout, "ping")

    def topics(self, pattern: str = ">", *, timeout: float | None = TIMEOUT) -> list[TopicInfo]:
        """The topics matching ``pattern`` (see the async ``topics``)."""

        async def topics() -> list[TopicInfo]:
            return await self._client.topics(pattern)

        return self._call(topics, timeout, "listing topics")

    def groups(self, action: str = "list", name: str = "", *, timeout: float | None = TIMEOUT) -> dict[str, Any]:
        """Consumer-group admin (see the async ``groups``)."""

        async def groups() -> dict[str, Any]:
            return await self._client.groups(action, name)

        return self._call(groups, timeout, f"groups {action}")

    def create_group(
        self, name: str, pattern: str, *, timeout: float | None = TIMEOUT, **settings: Any
    ) -> dict[str, Any]:
        """Declare a consumer group before its first worker (the async
        ``create_group``'s settings, as keywords)."""

        async def create() -> dict[str, Any]:
            return await self._client.create_group(name, pattern, **settings)

        return self._call(create, timeout, f"creating group {name!r}")

    def purge_topic(
        self, topic: str, keep_from: int | None = None, *, timeout: float | None = TIMEOUT
    ) -> dict[str, Any]:
        """Remove a topic's messages, keeping it (see the async ``purge_topic``)."""

        async def purge() -> dict[str, Any]:
            return await self._client.purge_topic(topic, keep_from)

        return self._call(purge, timeout, f"purging topic {topic!r}")

    def create_topic(self, topic: str, partitions: int = 1, *, timeout: float | None = TIMEOUT) -> dict[str, Any]:
        """Create a topic, with ``partitions`` partitions (see the async ``create_topic``)."""

        async def create() -> dict[str, Any]:
            return await self._client.create_topic(topic, partitions)

        return self._call(create, timeout, f"creating topic {topic!r}")

    def delete_topic(self, topic: str, *, timeout: float | None = TIMEOUT) -> dict[str, Any]:
        """Delete a topic (see the async ``delete_topic``)."""

        async def delete() -> dict[str, Any]:
            return await self._client.delete_topic(topic)

        return self._call(delete, timeout, f"deleting topic {topic!r}")

    # -- closing ------------------------------------------------------------

    def close(self) -> None:
        """Stop the callback threads, hand over what is queued, wait (up to
        ``close_timeout``) for its acknowledgements, say goodbye, and stop
        the client's thread.

        Callback threads finish the message in hand (and may still publish);
        messages they had not started are not processed (a group redelivers
        them), and iterating threads see the end. Then publishing stops.
        Raises the first error a plain subscription's callback raised, if
        any. Calling it again does nothing more. A client still open when the
        interpreter exits is closed then (atexit), so what it queued is
        delivered.
        """
        with self._lock:
            first = not self._stopping
            self._stopping = True
            subs = list(self._subs)
            self._subs.clear()
        atexit.unregister(self._close_at_exit)
        # Callback threads, then the hand-over and the acknowledgements
        # (close_timeout), then the goodbye (close_timeout); and a margin.
        bound = 2 * self._close_timeout + 5.0
        if first:
            for sub in subs:
                sub._stopping = True
                self._run_soon(sub._stop_taking)
            deadline = time.monotonic() + bound
            for sub in subs:
                sub.join(max(0.0, deadline - time.monotonic()))
            busy = [w.name for sub in subs for w in sub._workers if w.is_alive() and w is not threading.current_thread()]
            if busy:
                _log.warning("callback threads still busy after %g s, left running: %s", bound, busy)
            with self._lock:
                self._closing = True
                self._room.notify_all()  # threads waiting for room: closed
            self._run_soon(self._wake)  # the hand-over task drains, then stops
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(bound)
            if thread.is_alive():
                _log.warning("the client's thread did not stop within %g s", bound)
        with self._lock:
            errors, self._callback_errors = self._callback_errors, []
        if errors:
            raise errors[0]

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except Exception:
            if exc is None:
                raise
            # The body's own error wins; the callback's was logged already.

    # -- between the threads ------------------------------------------------

    def _call(self, fn: Callable[[], Awaitable[T]], timeout: float | None, what: str) -> T:
        """Run ``fn()`` in the loop thread and return its result, cancelled
        there after ``timeout`` seconds (then TimeoutError here)."""
        token = self._token
        if token is None:
            raise ConnectionClosed("client closed" if self._stopping else "not connected")

        async def bounded() -> T:
            if timeout is None:
                return await fn()
            with trio.move_on_after(timeout):
                return await fn()
            raise _Expired

        try:
            return trio.from_thread.run(bounded, trio_token=token)
        except _Expired:
            raise TimeoutError(f"{what}: no answer within {timeout:g} s") from None
        except (trio.RunFinishedError, trio.Cancelled):
            # The loop thread has stopped (or is stopping): closed.
            raise ConnectionClosed("client closed") from None

    def _run_soon(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` in the loop thread, without waiting."""
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass  # stopped: whatever fn was for is over

    def _soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn()`` in the loop thread without waiting for it; its errors
        are logged (acknowledgements a worker thread makes for a callback)."""

        def spawn() -> None:
            nursery = self._nursery
            if nursery is None:
                return  # closed: the broker redelivers what was not settled
            try:
                nursery.start_soon(_quietly, fn)
            except RuntimeError:
                pass  # the nursery is closing

        self._run_soon(spawn)

    # -- the loop thread ----------------------------------------------------

    def _start(self, url: str, options: dict[str, Any], connect_timeout: float) -> None:
        ready = threading.Event()
        thread = threading.Thread(
            target=self._run_loop,
            args=(url, options, ready),
            name=f"pybroker-sync {self.name or url}",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        # connect() bounds itself by connect_timeout (the TCP/TLS connection
        # and the handshake); this only guards against a loop that hangs.
        bound = 2 * connect_timeout + 5.0
        if not ready.wait(bound):
            with self._lock:
                self._stopping = self._closing = True  # the loop leaves at once if it connects
            raise TimeoutError(f"connecting to {url}: no answer within {bound:g} s")
        if self._start_error is not None:
            thread.join(bound)
            raise self._start_error
        # A client the program never closed still delivers what it queued
        # (atexit runs before daemon threads like ours are stopped).
        atexit.register(self._close_at_exit)

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception:
            _log.exception("closing the client at exit")

    def _run_loop(self, url: str, options: dict[str, Any], ready: threading.Event) -> None:
        try:
            trio.run(self._main, url, options, ready)
        except BaseException as exc:
            if not ready.is_set():
                self._start_error = exc
            else:
                _log.error("the client's loop ended with an error", exc_info=exc)
        finally:
            self._token = None
            with self._lock:
                self._stopping = self._closing = True  # nothing more is queued
                self._room.notify_all()
            # Whatever is still queued (if the loop ended without close()).
            self._fail_outbox(ConnectionClosed("the client's loop has stopped"))
            ready.set()

    async def _main(self, url: str, options: dict[str, Any], ready: threading.Event) -> None:
        try:
            async with async_connect(url, **options) as client:
                self._work = trio.Event()
                self._watch_wake = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._async = client
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._watch)
                        ready.set()
                        in_time = await self._pump(client)
                        self._watch_stop = True  # after the acknowledgements flush waited for
                        self._watch_wake.set()
                        if not in_time:
                            self._watch_scope.cancel()
                        # Acknowledgements the callback threads left for it.
                        nursery.cancel_scope.deadline = trio.current_time() + self._close_timeout
                finally:
                    self._nursery = None
                if not in_time:
                    # Leave without a second close_timeout in connect()'s
                    # own flush: what is unacknowledged now fails at once.
                    raise _GiveUp
        except _GiveUp:
            pass

    def _wake(self) -> None:
        self._work.set()

    async def _pump(self, client: AsyncClient) -> bool:
        """Hand queued messages to the async client, in order, until close();
        then hand over the rest and wait for their acknowledgements, within
        close_timeout (False if that ran out)."""
        try:
            while True:
                with self._lock:
                    self._wake_scheduled = False
                    stopping = self._closing
                if stopping:
                    # close() set _closing under the lock before waking us:
                    # nothing is appended after this drain.
                    with trio.move_on_after(self._close_timeout) as scope:
                        await self._hand_over(client)
                        await client.flush()
                    return not scope.cancelled_caught
                await self._hand_over(client)
                await self._work.wait()
                self._work = trio.Event()
        finally:
            self._pump_done = True
            self._fail_outbox(ConnectionClosed("client closed before the message was sent"))

    async def _hand_over(self, client: AsyncClient) -> None:
        outbox = self._outbox
        while outbox:
            item = outbox.popleft()
            if self._room_waiters and len(outbox) <= _LOW_WATER:
                with self._lock:
                    self._room.notify_all()
            if isinstance(item, _Marker):
                item.event.set()
                continue
            try:
                # Waits only when the async client's max_pending is reached.
                ack = await client.send(item.topic, item._payload, item._headers)
            except Exception as exc:
                if item._done is None and self._send_error is None:
                    self._send_error = exc  # send(): nobody may wait for it; flush() tells
                item._settle(None, exc)
            except BaseException:
                item._settle(None, ConnectionClosed("client closed before the message was sent"))
                raise
            else:
                item._settle(ack, None)
                if item._done is not None:
                    if ack.done():
                        item._release()
                    else:
                        self._watched.append((ack, item))
                        self._watch_wake.set()

    async def _watch(self) -> None:
        """Release each publish() once its acknowledgement (or failure) is
        here. One task for all of them: acknowledgements come in the order
        the messages were handed over, so waiting for them in that order
        releases each without delay worth noting."""
        watched = self._watched
        try:
            with self._watch_scope:
                while True:
                    while watched:
                        ack, item = watched[0]
                        if not ack.done():
                            try:
                                await ack.wait()
                            except Exception:
                                pass  # the publish() raises it from result()
                        watched.popleft()
                        item._release()
                    if self._watch_stop:
                        return
                    self._watch_wake = trio.Event()
                    await self._watch_wake.wait()
        finally:
            # Closed before these came: their publish() raises ConnectionClosed.
            while watched:
                watched.popleft()[1]._release()

    def _fail_outbox(self, error: ConnectionClosed) -> None:
        outbox = self._outbox
        while outbox:
            item = outbox.popleft()
            if isinstance(item, _Marker):
                item.event.set()
            else:
                item._settle(None, error)
        with self._lock:
            self._room.notify_all()  # waiting threads see _closing

    async def _handed_over(self) -> None:
        """Wait until everything queued before this call is with the async
        client (so flush, request and respond come after it)."""
        if self._pump_done:
            raise ConnectionClosed("client closed")
        if not self._outbox:
            return
        marker = _Marker()
        self._outbox.append(marker)
        self._work.set()
        await marker.event.wait()


async def _quietly(fn: Callable[[], Awaitable[None]]) -> None:
    try:
        with trio.fail_after(TIMEOUT):
            await fn()
    except Exception:
        _log.debug("background call failed", exc_info=True)


def connect(
    url: str = DEFAULT_URL,
    *,
    name: str = "",
    linger: float = 0.0,
    max_pending: int = 65536,
    max_inflight_batches: int = 8,
    connect_timeout: float = 10.0,
    close_timeout: float = 5.0,
    reconnect: bool | Reconnect = False,
    token: str | None = None,
    user: str | None = None,
    password: str | None = None,
    tls: TLSOption = None,
    ca_file: CAFile = None,
    keepalive: float | None = None,
    idempotent: bool = True,
) -> Client:
    """Connect to a broker and return a blocking :class:`Client` (use it in
    a ``with`` block, or call ``close()``). The options are
    :func:`pybroker.connect`'s, with the same meaning: reconnecting and
    resuming, credentials, TLS, keepalive. Raises what ``pybroker.connect``
    raises (OSError, AuthenticationError, ssl errors...)."""
    options: dict[str, Any] = dict(
        name=name,
        linger=linger,
        max_pending=max_pending,
        max_inflight_batches=max_inflight_batches,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        reconnect=reconnect,
        token=token,
        user=user,
        password=password,
        tls=tls,
        ca_file=ca_file,
        keepalive=keepalive,
        idempotent=idempotent,
    )
    client = Client(name, close_timeout)
    client._start(url, options, connect_timeout)
    return client
