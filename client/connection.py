"""The async client (Trio or asyncio, through anyio): one connection to a broker, publishing and subscribing.

Two tasks run in a task group the client owns: the reader decodes frames and
resolves acknowledgements and deliveries without ever blocking; the writer
turns queued publishes into batches (one per topic per wake-up, Kafka-style)
and sends everything queued with one ``send_all``.

Batching is adaptive, like Nagle's algorithm: while fewer than
``max_inflight_batches`` batches await their PUBACK, messages go out at once
(low latency when idle); beyond that they accumulate until an ack returns,
so batches grow by themselves under load. ``linger`` adds an optional wait.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import itertools
import json
import logging
import math
import secrets
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, TaskGroup

from ._cancel import cancel_check
from ._owners import Held, Owners, Peer, PeerFactory
from ._partitions import Partitioner, unbatched
from ._publishing import Frame, Run, Topic
from ._publishing import PendingAck as PendingAck  # re-exported: pybroker.PendingAck
from .errors import (
    AuthenticationError,
    BrokerError,
    ConnectionClosed,
    MessageTooLarge,
    NoReceivers,
    NotOwner,
    Partitioned,
    Timeout,
    broker_error,
)
from .message import Message, PublishAck
from .reconnect import RETRYABLE_CODES, Reconnect
from .protocol import (
    CLOSED,
    DELIVER_AT_HEADER,
    ERROR_FIELDS_OPTION,
    MAX_ACK_RANGES,
    MAX_PARTITIONS,
    NEED_DATA,
    UNLIMITED_CREDIT,
    Connection,
    Credit,
    Deliver,
    Error,
    ErrorCode,
    Ack,
    AckKind,
    Goodbye,
    GroupDeliver,
    Groups,
    GroupsAction,
    GroupsReply,
    Hello,
    Info,
    InfoReply,
    MalformedBatch,
    Ping,
    Pong,
    ProtocolError,
    PubAck,
    Publish,
    RefKind,
    Role,
    StartKind,
    SubAck,
    Subscribe,
    TopicInfo,
    Topics,
    TopicsAction,
    TopicsReply,
    UnsubAck,
    Unsubscribe,
    Welcome,
    check_batch,
    decode_batch_columns,
    decode_frame,
    encode_batch_from_records,
    encode_publish,
    encode_record,
    RECORD_HEADER,
    max_publish_records,
    pattern_error,
    server_frame_limit,
    split_records,
    topic_error,
    with_msg_id,
    MSG_ID_HEADER,
)
from .subscription import Batch, Subscription
from .transport import CAFile, TLSOption, client_context, open_stream

DEFAULT_URL = "pybroker://127.0.0.1:7420"
DEFAULT_PORT = 7420
RECEIVE_SIZE = 256 * 1024
_TOPIC_CACHE_LIMIT = 4096
#: Seconds a client follows NOT_OWNER answers without a PUBACK between
#: before it lets the PUBLISH fail: a bound on moving between cluster nodes
#: (a take-over after a crash waits for the owner's lease: 10 s by default).
REDIRECT_SECONDS = 60.0
#: Redirects one admin request follows at most (REDIRECT_SECONDS bounds
#: them first unless they come quickly).
MAX_ASK_REDIRECTS = 1000

Callback = Callable[[Message], Awaitable[None] | None]
Start = str | int | _dt.datetime
StreamOpener = Callable[[], Awaitable[ByteStream]]

# A library logs through the standard library and configures nothing: the
# application decides where records go (the broker's process routes them
# through its structlog setup).
_log = logging.getLogger(__name__)

#: Failures of one reconnect attempt that the next attempt may not meet.
#: OSError includes the failure to connect to any address, ssl's errors and
#: TimeoutError (a connect or handshake that took too long).
_RETRY_AFTER = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ConnectionClosed,
    ProtocolError,
    BrokerError,  # one of RETRYABLE_CODES
)


def parse_url(url: str) -> tuple[str, int]:
    """``pybroker://host:port`` or ``pybrokers://host:port`` (TLS; port
    defaults to 7420) -> (host, port): the first address of a URL that
    lists several (:func:`parse_urls`)."""
    return parse_urls(url)[0]


def parse_urls(url: str) -> list[tuple[str, int]]:
    """Every (host, port) of a URL, in order: ``pybroker://h1:7420,h2:7421``
    names several brokers of one cluster (a client tries them in turn).
    ValueError for a URL that is not one, an empty or unbracketed IPv6
    address, a port out of range, or more than MAX_ADDRESSES."""
    return _split_url(url)[0]


#: Addresses one URL may list.
MAX_ADDRESSES = 64


def _split_url(url: str) -> tuple[list[tuple[str, int]], bool]:
    """(the (host, port) addresses, whether the scheme asks for TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("pybroker", "pybrokers"):
        raise ValueError(
            f"unsupported URL scheme in {url!r}: expected pybroker://host:port"
            " or pybrokers://host:port (TLS)"
        )
    # urlsplit's hostname and port take one address; a cluster's URL lists
    # several, comma-separated, after the user info.
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise ValueError(f"no host in {url!r}")
    items = hosts.split(",")
    if len(items) > MAX_ADDRESSES:
        raise ValueError(f"more than {MAX_ADDRESSES} addresses in {url!r}")
    return [_split_address(item, url) for item in items], parts.scheme == "pybrokers"


def _split_address(item: str, url: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, closed, rest = item[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {item!r} in {url!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = item.partition(":")
        if ":" in port_text:
            raise ValueError(f"bad address {item!r} in {url!r}: an IPv6 address goes in brackets")
    if not host:
        raise ValueError(f"no host in {item!r} of {url!r}")
    if not port_text:
        return host.lower(), DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} in {url!r}")
    return host.lower(), int(port_text)


def url_credentials(url: str) -> dict[str, str]:
    """HELLO credential options from a URL's user info (protocol.md,
    "Authentication"): ``pybroker://user:password@host`` or
    ``pybroker://token@host``; percent-escapes are decoded."""
    parts = urlsplit(url)
    if parts.username is None:
        return {}
    username = unquote(parts.username)
    if parts.password is None:
        return {"token": username}
    return {"user": username, "password": unquote(parts.password)}


def _credentials(
    url: str, token: str | None, user: str | None, password: str | None
) -> dict[str, str]:
    """Explicit arguments win over the URL's user info."""
    if token is not None and user is not None:
        raise ValueError("give a token or a user name and password, not both")
    if token is not None:
        return {"token": token}
    if user is not None:
        return {"user": user, "password": password or ""}
    if password is not None:
        raise ValueError("a password needs a user name")
    return url_credentials(url)


_pack_record_header = RECORD_HEADER.pack


def _due_ms(delay: float | _dt.timedelta | None, deliver_at: _dt.datetime | float | None) -> int:
    """A delayed publish's due time, in ms since the epoch."""
    if delay is not None and deliver_at is not None:
        raise TypeError("give delay or deliver_at, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, _dt.timedelta) else float(delay)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
        return int((_dt.datetime.now(_dt.timezone.utc).timestamp() + seconds) * 1000)
    if isinstance(deliver_at, _dt.datetime):
        if deliver_at.tzinfo is None:
            raise ValueError("deliver_at must be an aware datetime (say which time zone)")
        return int(deliver_at.timestamp() * 1000)
    assert deliver_at is not None
    when = float(deliver_at)
    if not math.isfinite(when) or when < 0:
        raise ValueError(f"deliver_at must be seconds since the epoch, not {deliver_at!r}")
    return int(when * 1000)


class _Waiter:
    """A request (SUBSCRIBE, UNSUBSCRIBE, PING, INFO) waiting for its answer."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: BaseException | None = None
        self.result: Any = None

    def done(self, error: BaseException | None = None, result: Any = None) -> None:
        self.error = error
        self.result = result
        self.event.set()


class _SubscribeCall:
    """What ``Client.subscribe`` returns: await it, or ``async with`` it."""

    def __init__(self, client: Client, args: tuple[Any, ...]) -> None:
        self._client = client
        self._args = args
        self._sub: Subscription | None = None

    def __await__(self) -> Generator[Any, None, Subscription]:
        return self._client._subscribe(*self._args).__await__()

    async def __aenter__(self) -> Subscription:
        self._sub = await self._client._subscribe(*self._args)
        return self._sub

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._sub.__aexit__(*exc)


class Client:
    """A connection to a broker. Make one with :func:`connect`."""

    def __init__(
        self,
        stream: ByteStream,
        task_group: TaskGroup,
        *,
        name: str,
        address: str = "",
        linger: float,
        max_pending: int,
        max_inflight_batches: int,
        credentials: Mapping[str, str] | None = None,
        opener: StreamOpener | None = None,
        retarget: Callable[[str], bool] | None = None,
        advance: Callable[[], None] | None = None,
        reconnect: Reconnect | None = None,
        connect_timeout: float = 10.0,
        keepalive: float | None = None,
        idempotent: bool = True,
    ) -> None:
        self._stream = stream
        #: HELLO options; kept (not logged) so a reconnect can send them again.
        self._credentials = dict(credentials or {})
        self._task_group = task_group
        #: host:port, for error messages.
        self._address = address
        self._opener = opener
        #: Points the opener at another ``host:port`` (a cluster's NOT_OWNER
        #: names the topic's owner); False if it cannot.
        self._retarget = retarget
        #: Points the opener at the next address of the URL (a broker that
        #: answered the HELLO with a retryable refusal: e.g. a cluster node
        #: cut off from the cluster, which sends its clients elsewhere).
        self._advance = advance
        #: When the NOT_OWNER answers followed since the last PUBACK or
        #: SUBACK began (None: none since), and how many there were.
        self._redirecting_since: float | None = None
        self._redirects = 0
        #: Seconds the next reconnect waits first after NOT_OWNER answers in
        #: a row, doubling per answer (see _follow_owner).
        self._owner_wait = 0.0
        self._reconnect_policy = reconnect if opener is not None else None
        self._connect_timeout = connect_timeout
        self._keepalive_interval = keepalive
        #: Set while a connection is up; a lost one is replaced by a new
        #: unset Event until the client has reconnected.
        self._connected = anyio.Event()
        self._connected.set()
        self._loss: BaseException | None = None
        self._conn_scope = anyio.CancelScope()
        #: Times the connection was lost and got back.
        self.reconnects = 0
        self.name = name
        self._linger = linger
        self._max_pending = max_pending
        self._max_inflight_batches = max_inflight_batches
        self._conn = Connection(Role.CLIENT)
        self.server: Welcome | None = None
        self._max_batch_messages = 100_000
        self._max_frame_bytes = self._conn.max_frame_bytes
        self._max_topic_bytes = 255
        self._max_topic_depth = 16
        # Exactly-once publishing (protocol.md, "Publishing exactly once"):
        # each batch is named "<producer>.<n>" on its first message, once
        # the broker says it understands (WELCOME's dedup_window_ms).
        self._want_dedup = idempotent
        self._dedup = False
        self._delay_supported = False
        self._producer = secrets.token_hex(8)
        self._batch_names = itertools.count(1)
        self._out: list[bytes] = []
        self._wake = anyio.Event()
        #: publish_nowait has set _wake since the writer last made a new one
        #: (so a loop of sends sets it once, not once per message).
        self._wake_set = False
        # The topics with messages not yet sent (a subset of _topics).
        self._unsent: dict[str, Topic] = {}
        self._unsent_count = 0
        self._pending_count = 0  # unsent + in flight
        self._inflight: dict[int, Frame] = {}
        # The PUBLISH frames of _inflight, sent again after a reconnect.
        self._inflight_frames: dict[int, bytes] = {}
        # What the writer sends first on a new connection (_resume_frames).
        self._resume: list[bytes] = []
        self._room = anyio.Event()
        self._drained = anyio.Event()
        self._drained.set()
        self._request_ids = itertools.count(1)
        self._sub_ids = itertools.count(1)
        self._subs: dict[int, Subscription] = {}
        self._waiters: dict[int, _Waiter] = {}
        self._info_waiters: dict[int, _Waiter] = {}
        self._inbox: str | None = None
        self._replies: dict[str, _Waiter] = {}
        # Group acknowledgements waiting for the writer, by frame key.
        self._settlements: dict[tuple[int, str, AckKind, int], list[int]] = {}
        #: Valid topics published to (the check depends on the WELCOME's
        #: limits: redone with each).
        self._topics: dict[str, Topic] = {}
        #: Partitioned topics' counts, and where their messages go.
        self._partitioner = Partitioner()
        #: A connection per cluster node that owns topics published to
        #: (_owners.py); set by connect() for a client that reconnects.
        self._owners: Owners | None = None
        self._closed: ConnectionClosed | None = None
        self._goodbye_received = anyio.Event()
        self._reader_done = anyio.Event()
        self._closing_by_us = False
        # When the reader last got bytes from the broker (keepalive).
        self._received_at = anyio.current_time()
        self._cancel_requested, self._checkpoint_if_cancelled = cancel_check()

    # -- lifecycle --------------------------------------------------------

    async def _handshake(self) -> None:
        # Ask for ERROR fields: DATA_LOST then says which offsets, as numbers.
        hello = Hello(client_name=self.name, options={**self._credentials, ERROR_FIELDS_OPTION: "1"})
        with anyio.move_on_after(self._connect_timeout) as scope:
            await self._stream.send(self._conn.send(hello))
            event = await self._welcome()
        if scope.cancelled_caught:
            raise Timeout(
                f"connecting to {self._address}: no WELCOME within {self._connect_timeout:g} s"
            )
        self.server = event
        limits = event.limits
        self._max_batch_messages = limits.get("max_batch_messages", self._max_batch_messages)
        self._max_frame_bytes = limits.get("max_frame_bytes", self._max_frame_bytes)
        # Accept what the server may send: a DELIVER carries a batch that fit
        # a PUBLISH under max_frame_bytes, with a larger header (protocol.md).
        self._conn.max_frame_bytes = max(
            self._conn.max_frame_bytes, server_frame_limit(self._max_frame_bytes)
        )
        self._max_topic_bytes = limits.get("max_topic_bytes", self._max_topic_bytes)
        self._max_topic_depth = limits.get("max_topic_depth", self._max_topic_depth)
        if self.reconnects == 0:
            # Decided once: frames named on one connection are resent as they are.
            self._dedup = self._want_dedup and "dedup_window_ms" in limits
        self._delay_supported = "max_delay_ms" in limits
        # Never more PUBLISH frames awaiting their PUBACK than the broker
        # answers at once: past that it would only stop reading us.
        self._max_inflight_batches = max(
            1, min(self._max_inflight_batches, limits.get("max_inflight_publishes", 1 << 62))
        )
        # Topic syntax and frame limits may have changed: topics are checked
        # again when next published to, except those with messages queued
        # (accepted already), whose limit is brought up to date.
        self._topics = dict(self._unsent)
        for topic, known in self._topics.items():
            known.limit = max_publish_records(self._max_frame_bytes, topic, self._dedup)

    async def _welcome(self) -> Welcome:
        """The broker's answer to our HELLO."""
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                self._conn.receive_data(await self._receive())
                continue
            if isinstance(event, Welcome):
                return event
            if isinstance(event, Error):
                if event.code == ErrorCode.AUTH_FAILED:
                    raise AuthenticationError(event.code, event.message)
                raise BrokerError(event.code, event.message)
            raise ConnectionClosed(f"no WELCOME from the broker (got {event!r})")

    async def _receive(self) -> bytes:
        """The next bytes from the broker; b"" once it closed its side (what
        the codec takes as the end of the stream)."""
        try:
            return await self._stream.receive(RECEIVE_SIZE)
        except anyio.EndOfStream:
            return b""

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def connected(self) -> bool:
        """False while the client is reconnecting (and once it is closed)."""
        return self._closed is None and self._connected.is_set()

    async def _wait_connected(self) -> None:
        while not self._connected.is_set():
            self._check_open()
            await self._connected.wait()
        self._check_open()

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed

    def _fail(self, error: ConnectionClosed) -> None:
        """The connection is over: fail everything still waiting.

        Subscriptions end with ``error`` unless we closed on purpose (our
        GOODBYE went out), in which case their iteration simply stops.
        """
        if self._closed is not None:
            return
        self._closed = error
        sub_error = None if self._closing_by_us else error
        for unsent in self._unsent.values():
            unsent.fail(error)
        self._unsent.clear()
        for frame in self._inflight.values():
            frame.fail(error)
        self._inflight.clear()
        self._inflight_frames.clear()
        if self._owners is not None:
            for held in self._owners.held.values():
                for frame, _ in held.frames:
                    frame.fail(error)
            self._owners.held.clear()
            self._owners.closing.set()
        self._pending_count = self._unsent_count = 0
        for waiters in (self._waiters, self._info_waiters, self._replies):
            for waiter in waiters.values():
                waiter.done(error)
            waiters.clear()
        for sub in self._subs.values():
            sub._close(sub_error)
        self._room.set()
        self._drained.set()
        self._wake.set()
        self._connected.set()  # wakes _wait_connected, which then raises
        self._conn_scope.cancel()

    def _lost(self, error: ConnectionClosed) -> None:
        """The connection broke: reconnect if allowed, else close for good."""
        if self._reconnect_policy is None or self._closing_by_us or self._closed is not None:
            self._fail(error)
            return
        if self._connected.is_set():  # the first task to notice
            self._connected = anyio.Event()
            self._loss = error
            self._forget_connection()
        self._conn_scope.cancel()

    def _forget_connection(self) -> None:
        """Drop what only the lost connection could answer.

        Queued frames were encoded for it; SUBSCRIBEs awaiting their SUBACK
        stay (every subscription is sent again on the next connection), an
        UNSUBSCRIBE is done (the subscription went with the connection), and
        PING, INFO and GROUPS requests fail: their answers are gone.
        """
        self._out = []
        self._resume = []
        lost = ConnectionClosed(f"connection lost: {self._loss}")
        for key, waiter in list(self._waiters.items()):
            sub = self._subs.get(key) if key > 0 else None
            if sub is not None and not sub._unsubscribing:
                continue
            del self._waiters[key]
            if sub is not None:
                del self._subs[key]
                sub._close()
                waiter.done()
            else:
                waiter.done(lost)
        for waiter in self._info_waiters.values():
            waiter.done(lost)
        self._info_waiters.clear()

    async def aclose(self, timeout: float = 5.0, *, graceful: bool = True) -> None:
        """Flush publishes, say GOODBYE, wait for the broker's, close."""
        self._closing_by_us = True
        try:
            if graceful and self._closed is None:
                with anyio.move_on_after(timeout):
                    await self.flush()
                    if self._owners is not None:
                        await self._owners.close()
                    if self._closed is None and self._connected.is_set():
                        if self._settlements:
                            self._out.extend(self._take_settlements())
                        self._out.append(self._conn.send(Goodbye()))
                        self._wake.set()
                        await self._reader_done.wait()
        finally:
            # Also when the graceful part is cancelled from outside: the
            # socket must not be left open.
            self._fail(ConnectionClosed("client closed"))
            # Close before cancelling our task group: an await inside the
            # cancelled scope would raise Cancelled over an exception the
            # caller's body is propagating, and the task group would then
            # swallow both.
            await anyio.aclose_forcefully(self._stream)
            self._task_group.cancel_scope.cancel()

    # -- publishing -------------------------------------------------------

    def _topic(self, topic: str) -> Topic:
        """``topic``'s queue and limit; ValueError if ``topic`` is no valid
        topic name. Kept for the topics published to (up to a bound; a
        partitioned topic's name never: _destination routes it first): a
        hot loop of publishes pays one dict lookup for both checks."""
        known = self._topics.get(topic)
        if known is not None:
            return known
        problem = topic_error(topic, self._max_topic_bytes, self._max_topic_depth)
        if problem is not None:
            raise ValueError(problem)
        if len(self._topics) >= _TOPIC_CACHE_LIMIT:
            self._topics = dict(self._unsent)  # what has messages queued stays
        known = self._topics[topic] = Topic(
            topic, max_publish_records(self._max_frame_bytes, topic, self._dedup)
        )
        return known

    def publish_nowait(
        self, topic: str, payload: bytes | str, headers: Mapping[str, str] | None = None
    ) -> PendingAck:
        """Queue one message; return its PendingAck at once.

        ``payload`` is bytes, or a ``str``, which is sent encoded as UTF-8
        (the same for every publishing method); anything else raises
        ``TypeError``.

        Raises ``anyio.WouldBlock`` (also ``pybroker.WouldBlock``) when
        ``max_pending`` messages are already queued or awaiting
        acknowledgement.
        """
        # The hot path of every publish: checks and calls are inlined where
        # that saved measurable time per message (benchmarks/README.md).
        if self._closed is not None:
            raise self._closed
        known = self._topics.get(topic)
        if known is None:
            topic, peer = self._destination(topic, headers)
            if peer is not None:
                return peer.publish_nowait(topic, payload, headers)
            known = self._topic(topic)
        count = self._pending_count
        if count >= self._max_pending:
            raise anyio.WouldBlock
        if type(payload) is not bytes:
            payload = _payload_bytes(payload)
        if headers:
            record = encode_record(payload, headers)
        else:
            record = _pack_record_header(len(payload), 0) + payload
        if len(record) > known.limit:
            self._too_large(topic, record, len(payload))
        records = known.run.records
        pending = PendingAck(topic, known.run, len(records))
        if not records:
            self._unsent[topic] = known
        records.append(record)
        self._unsent_count += 1
        self._pending_count = count + 1
        if not count:
            # Set exactly while nothing is pending (flush waits for it).
            self._drained = anyio.Event() if self._drained.is_set() else self._drained
        if not self._wake_set:
            self._wake_set = True
            self._wake.set()
        return pending

    def _destination(self, topic: str, headers: Mapping[str, str] | None) -> tuple[str, Client | None]:
        """Where a message to ``topic`` goes: its partition for a
        partitioned topic, and the peer that publishes that topic, if one
        does (None: this connection)."""
        name = self._partitioner.route(topic, headers) or topic
        owners = self._owners
        peer = owners.routes.get(name) if owners is not None else None
        if peer is not None and peer.closed:  # it gave up: this connection, and NOT_OWNER again
            del owners.routes[name]  # type: ignore[union-attr]
            peer = None
        return name, peer

    def _too_large(self, topic: str, record: bytes, payload_len: int) -> None:
        """A message must fit one PUBLISH frame under the broker's
        max_frame_bytes; refuse it here rather than have the broker close
        the connection with FRAME_TOO_LARGE."""
        limit = self._topic(topic).limit
        extra = len(record) - payload_len  # record header and headers block
        raise MessageTooLarge(
            f"message of {payload_len} payload bytes ({len(record)} with its headers) "
            f"is too large for topic {topic!r}: the broker's max_frame_bytes "
            f"({self._max_frame_bytes}) leaves room for {max(0, limit - extra)} payload "
            "bytes with these headers"
        )

    async def send(
        self, topic: str, payload: bytes | str, headers: Mapping[str, str] | None = None
    ) -> PendingAck:
        """Queue one message, waiting for room if the pipeline is full;
        return its PendingAck without waiting for the acknowledgement.

        It yields to other tasks only when it has to wait for room, so a loop
        of ``send`` calls fills large batches instead of sending one message
        per scheduler pass (the writer runs when this task waits).
        """
        # A cancelled scope stops it before it queues anything; the check is
        # a plain call unless the scope is cancelled (_cancel.py).
        if self._cancel_requested():
            await self._checkpoint_if_cancelled()
        while self._pending_count >= self._max_pending:
            await self._wait_room()
        # publish_nowait(), inlined: its call was a tenth of a send() (keep
        # the two in step; test_publish_paths_agree checks they do).
        if self._closed is not None:
            raise self._closed
        known = self._topics.get(topic)
        if known is None:
            topic, peer = self._destination(topic, headers)
            if peer is not None:
                return await peer.send(topic, payload, headers)
            known = self._topic(topic)
        count = self._pending_count
        if type(payload) is not bytes:
            payload = _payload_bytes(payload)
        if headers:
            record = encode_record(payload, headers)
        else:
            record = _pack_record_header(len(payload), 0) + payload
        if len(record) > known.limit:
            self._too_large(topic, record, len(payload))
        records = known.run.records
        pending = PendingAck(topic, known.run, len(records))
        if not records:
            self._unsent[topic] = known
        records.append(record)
        self._unsent_count += 1
        self._pending_count = count + 1
        if not count:
            self._drained = anyio.Event() if self._drained.is_set() else self._drained
        if not self._wake_set:
            self._wake_set = True
            self._wake.set()
        return pending

    async def _wait_room(self) -> None:
        """Wait for an acknowledgement (or the end). Several tasks may wait:
        they share one event, and a new one is made only once it fired."""
        self._check_open()
        if self._room.is_set():
            self._room = anyio.Event()
        await self._room.wait()

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        headers: Mapping[str, str] | None = None,
        *,
        delay: float | _dt.timedelta | None = None,
        deliver_at: _dt.datetime | float | None = None,
    ) -> PublishAck:
        """Publish one message and return once the broker acknowledged it.

        ``delay`` (seconds or a timedelta) or ``deliver_at`` (an aware
        datetime, or seconds since the epoch) schedules it: the broker keeps
        it, durably, and publishes it to ``topic`` at that time (protocol.md,
        "Delayed delivery"); until then it has no offset (the ack's
        ``offset`` is -1 and ``deliver_at`` says when). A time already past
        publishes at once.
        """
        if delay is None and deliver_at is None:
            pending = await self.send(topic, payload, headers)
            return await pending.wait()
        due_ms = _due_ms(delay, deliver_at)
        self._check_open()
        topic, peer = self._destination(topic, headers)
        if peer is not None:
            return await peer.publish(topic, payload, headers, delay=delay, deliver_at=deliver_at)
        limit = self._topic(topic).limit
        if not self._delay_supported:
            raise RuntimeError("this broker does not support delayed delivery (no max_delay_ms in its WELCOME)")
        delayed_headers = dict(headers or {})
        delayed_headers[DELIVER_AT_HEADER] = str(due_ms)
        payload = _payload_bytes(payload)
        record = encode_record(payload, delayed_headers)
        if len(record) > limit:
            self._too_large(topic, record, len(payload))
        while self._pending_count >= self._max_pending:
            await self._wait_room()
        dedup = self._dedup
        if dedup:
            record = with_msg_id(record, f"{self._producer}.{next(self._batch_names)}")
        pending = self._send_single(topic, record, dedup=dedup, delayed=True)
        ack = await pending.wait()
        if ack.offset == -1:
            return PublishAck(ack.topic, -1, ack.timestamp_us, ack.durability, deliver_at=due_ms / 1000)
        return ack

    def _send_single(
        self, topic: str, record: bytes, *, dedup: bool = False, delayed: bool = False, needs_receiver: bool = False
    ) -> PendingAck:
        """One record as a PUBLISH of its own, outside the batch writer (a
        delayed publish, a request: their flags are per frame), in flight
        like any other (resent on a reconnect); its PendingAck."""
        run = Run(topic)
        pending = PendingAck(topic, run, 0)
        request_id = next(self._request_ids)
        self._inflight[request_id] = run.frame(1)
        self._pending_count += 1
        self._drained = anyio.Event() if self._drained.is_set() else self._drained
        batch = encode_batch_from_records([record])
        frame = encode_publish(request_id, topic, batch, dedup=dedup, delayed=delayed, needs_receiver=needs_receiver)
        self._inflight_frames[request_id] = frame
        if self._connected.is_set():
            self._queue(frame)  # else it goes out when reconnected
        return pending

    async def publish_many(
        self, topic: str, payloads: Iterable[bytes | str | tuple[bytes | str, Mapping[str, str] | None]]
    ) -> list[PublishAck]:
        """Publish many messages pipelined; return their acks in order."""
        pendings = []
        for item in payloads:
            if isinstance(item, tuple):
                pendings.append(await self.send(topic, item[0], item[1]))
            else:
                pendings.append(await self.send(topic, item))
        return [await p.wait() for p in pendings]

    async def request(
        self,
        topic: str,
        payload: bytes | str,
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float = 5.0,
    ) -> Message:
        """Publish a request and return the first reply to it.

        Raises :class:`NoReceivers` at once when no subscription or group
        matches ``topic``, and :class:`Timeout` (a ``TimeoutError``) when no
        reply comes within ``timeout`` seconds (protocol.md, "Request and reply").
        Replies come to this client's private inbox; when a reconnect cannot
        take it back (the broker still holds the lost connection), requests
        waiting for a reply raise :class:`ConnectionClosed` and later ones
        use a new inbox.
        """
        self._check_open()
        payload = _payload_bytes(payload)
        waiter: _Waiter | None = None
        with anyio.move_on_after(timeout) as scope:
            # A partitioned topic's partition; learned from the broker's
            # refusal of the first request to it, then asked again.
            for attempt in range(2):
                try:
                    waiter = await self._request_once(topic, payload, headers)
                    break
                except Partitioned:
                    if attempt or self._partitioner.route(topic, headers) is None:
                        raise
        if scope.cancelled_caught:
            raise Timeout(f"request on topic {topic!r}: no reply within {timeout:g} s")
        assert waiter is not None
        if waiter.error is not None:
            raise waiter.error
        reply: Message = waiter.result
        return reply

    async def _request_once(self, topic: str, payload: bytes, headers: Mapping[str, str] | None) -> _Waiter:
        """Send one request (to its partition, for a partitioned topic) and
        wait for its reply; the waiter holding it."""
        topic = self._partitioner.route(topic, headers) or topic
        limit = self._topic(topic).limit
        inbox = await self._reply_inbox()
        correlation = str(next(self._request_ids))
        request_headers = dict(headers or {})
        request_headers["reply-to"] = inbox
        request_headers["correlation-id"] = correlation
        record = encode_record(payload, request_headers)
        if len(record) > limit:
            self._too_large(topic, record, len(payload))
        # Not held to the batch window: waiting for a slot there could
        # starve behind a busy publisher. Past the broker's
        # max_inflight_publishes it merely reads us more slowly.
        waiter = self._replies[correlation] = _Waiter()
        try:
            pending = self._send_single(topic, record, needs_receiver=True)
            try:
                await pending.wait()
            except BrokerError as exc:
                if exc.code == ErrorCode.NO_RECEIVERS:
                    raise NoReceivers(exc.code, exc.message) from None
                raise
            await waiter.event.wait()
        finally:
            self._replies.pop(correlation, None)
        return waiter

    async def respond(
        self, request: Message, payload: bytes | str, headers: Mapping[str, str] | None = None
    ) -> PublishAck:
        """Answer a request message (publish to its ``reply-to`` topic)."""
        reply_to = request.headers.get("reply-to")
        if not reply_to:
            raise ValueError("the message is not a request (no reply-to header)")
        reply_headers = dict(headers or {})
        correlation = request.headers.get("correlation-id")
        if correlation is not None:
            reply_headers["correlation-id"] = correlation
        return await self.publish(reply_to, payload, reply_headers)

    async def _reply_inbox(self) -> str:
        """This client's reply topic, subscribed on first use."""
        if self._inbox is None:
            inbox = f"_inbox.{secrets.token_hex(8)}"
            await self.subscribe(inbox, self._on_reply)
            self._inbox = inbox
        return self._inbox

    def _lose_inbox(self, error: BrokerError) -> None:
        """The reply inbox could not be taken back after a reconnect (the
        broker still holds it for the lost connection, or gave it away):
        the next request uses a new one, and requests waiting for a reply
        there fail now rather than time out."""
        _log.warning("reply inbox %s not resumed; using a new one: %s", self._inbox, error)
        self._inbox = None
        lost = ConnectionClosed(f"the reply inbox was lost with the connection: {error}")
        for waiter in self._replies.values():
            waiter.done(lost)
        self._replies.clear()

    def _on_reply(self, msg: Message) -> None:
        waiter = self._replies.pop(msg.headers.get("correlation-id", ""), None)
        if waiter is not None:
            waiter.done(result=msg)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every message queued so far is acknowledged (or failed).

        With ``timeout`` (seconds), raise :class:`Timeout` naming the topics
        still waiting if that takes longer; the messages stay queued.
        """
        with anyio.move_on_after(math.inf if timeout is None else timeout) as scope:
            while self._pending_count and self._closed is None:
                await self._drained.wait()
            if self._owners is not None:
                await self._owners.flush()
            await anyio.lowlevel.checkpoint()
        if scope.cancelled_caught:
            raise Timeout(
                f"flush: {self._pending_count} messages not acknowledged within {timeout:g} s"
                f" (topics {', '.join(repr(t) for t in self._waiting_topics())})"
            )

    def _waiting_topics(self, limit: int = 5) -> list[str]:
        """Some of the topics with messages not yet acknowledged, for errors."""
        topics = dict.fromkeys(self._unsent)
        for frame in self._inflight.values():
            if len(topics) >= limit:
                break
            topics[frame.run.topic] = None
        names = list(topics)[:limit]
        return names + ["..."] if len(topics) > limit else names

    def _take_batches(self, room: int) -> list[bytes]:
        """Turn what is unsent into at most ``room`` PUBLISH frames, within
        the broker's limits; the rest waits for the next acknowledgement."""
        frames: list[bytes] = []
        max_messages = self._max_batch_messages
        held = self._owners.held if self._owners is not None else None
        for topic in list(self._unsent):
            if held and topic in held:
                continue  # waiting to go to its owner's peer (_owners.py)
            known = self._unsent[topic]
            known.seal()
            max_body = max_publish_records(self._max_frame_bytes, topic, self._dedup)
            sealed = known.sealed
            while sealed and len(frames) < room:
                run = sealed[0]
                records = run.records
                if len(records) <= max_messages and sum(map(len, records)) <= max_body:
                    # The usual case: all of it is one frame, no per-message loop.
                    frames.append(self._batch_frame(topic, run, records))
                    start = len(records)
                else:
                    start = 0
                    size = 0
                    for i, record in enumerate(records):
                        if i > start and (i - start >= max_messages or size + len(record) > max_body):
                            frames.append(self._batch_frame(topic, run, records[start:i]))
                            start, size = i, 0
                            if len(frames) >= room:
                                break
                        size += len(record)
                    else:
                        frames.append(self._batch_frame(topic, run, records[start:]))
                        start = len(records)
                self._unsent_count -= start
                if start < len(records):
                    run.records = records[start:]  # out of room
                else:
                    run.records = []  # in its frames now
                    sealed.popleft()
            if sealed:
                break  # out of room
            del self._unsent[topic]
            if len(frames) >= room:
                break
        return frames

    def _batch_frame(self, topic: str, run: Run, records: list[bytes]) -> bytes:
        """One PUBLISH of ``run``'s next ``records`` (a list this may change)."""
        request_id = next(self._request_ids)
        self._inflight[request_id] = run.frame(len(records))
        dedup = self._dedup
        if dedup:
            try:
                records[0] = with_msg_id(records[0], f"{self._producer}.{next(self._batch_names)}")
            except ValueError:
                dedup = False  # headers too large for one more: at-least-once for this batch
        batch = encode_batch_from_records(records)
        frame = self._inflight_frames[request_id] = encode_publish(request_id, topic, batch, dedup=dedup)
        return frame

    # -- subscribing ------------------------------------------------------

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
    ) -> _SubscribeCall:
        """Subscribe to a topic or pattern (``*`` one token, ``>`` the rest).

        ``await c.subscribe(p, callback)`` calls ``callback(msg)`` (sync or
        async) for every message in a task the client owns;
        ``async with c.subscribe(p) as sub: async for msg in sub`` iterates.
        ``start``: ``"new"`` (default), ``"earliest"``, an offset (int, for a
        topic without wildcards) or a ``datetime`` (first message at or after
        it). ``window`` is the credit: at most that many messages (plus one
        batch) are buffered in this process for the subscription.

        ``group="workers"`` joins a consumer group: each message goes to one
        member, which settles it (``await msg.ack()``, ``nak(delay)``,
        ``term()``, ``in_progress()``). With a callback and ``auto_ack``, a
        callback that returns acks and one that raises naks (and the error is
        logged, not raised). ``ack_wait``, ``max_deliver``, ``backoff``
        (seconds a nak'ed message waits before its next delivery: the n-th
        wait after the n-th delivery, the last repeating), ``backoff_jitter``
        (each wait up to this fraction longer, at random) and
        ``dead_letter`` set the group up when this call creates it
        (protocol.md). ``max_ack_pending`` is this member's own prefetch:
        at most that many of the group's messages are handed to it
        unsettled; by default ``concurrency``, so a member is never given
        work it will not start while another member sits idle (raise it for
        throughput with quick handlers). ``concurrency`` callbacks run at
        once, in a task group the client owns. ``ordering="key"`` (when this
        call creates the group) keeps messages with the same ``key`` header
        in order: one at a time, to one member at a time, the next only
        once the one before it is settled; different keys run in parallel.
        """
        options: dict[str, str] = {}
        if group is not None:
            options["group"] = group
            # The member's prefetch: by default what it works on at once.
            options |= _group_options(
                ack_wait, max_deliver, backoff, backoff_jitter,
                max_ack_pending if max_ack_pending is not None else concurrency, dead_letter, ordering,
            )
        elif any(
            x is not None
            for x in (ack_wait, max_deliver, backoff, backoff_jitter, max_ack_pending, dead_letter, ordering)
        ):
            raise ValueError(
                "ack_wait, max_deliver, backoff, backoff_jitter, max_ack_pending, dead_letter and ordering need group="
            )
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        return _SubscribeCall(
            self, (pattern, callback, start, window, options, concurrency, auto_ack)
        )

    async def _subscribe(
        self,
        pattern: str,
        callback: Callback | None,
        start: Start,
        window: int,
        options: dict[str, str],
        concurrency: int,
        auto_ack: bool,
    ) -> Subscription:
        self._check_open()
        problem = pattern_error(pattern, self._max_topic_bytes, self._max_topic_depth)
        if problem is not None:
            raise ValueError(problem)
        if not 1 <= window < UNLIMITED_CREDIT:
            raise ValueError("window must be between 1 and 2**32 - 2")
        kind, value = _start_position(start)
        sub_id = next(self._sub_ids)
        sub = Subscription(
            self, sub_id, pattern, window, group=options.get("group"), start=(kind, value), options=options
        )
        self._subs[sub_id] = sub
        waiter = self._waiters[sub_id] = _Waiter()
        # Group members are flow-controlled by max_ack_pending, not credit.
        credit = UNLIMITED_CREDIT if sub.group else window
        if self._connected.is_set():
            self._queue(self._conn.send(Subscribe(sub_id, pattern, kind, value, credit, options)))
        # else: reconnecting, which sends every subscription in _subs
        try:
            await waiter.event.wait()
        except BaseException:
            # Cancelled (a timeout): forget it here, and on the broker, or
            # every reconnect would resume a subscription nobody reads.
            self._waiters.pop(sub_id, None)
            if self._subs.pop(sub_id, None) is not None and self.connected:
                self._queue(self._conn.send(Unsubscribe(sub_id)))
            sub._close()
            raise
        if waiter.error is not None:
            self._subs.pop(sub_id, None)
            raise waiter.error
        if callback is not None:
            self._task_group.start_soon(
                _run_callback, sub, callback, concurrency, auto_ack, name=f"pybroker sub {pattern}"
            )
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        self._check_open()
        if not self._connected.is_set():
            # Reconnecting: the broker forgot it with the old connection.
            self._subs.pop(sub.sub_id, None)
            sub._close()
            await anyio.lowlevel.checkpoint()
            return
        sub._unsubscribing = True
        waiter = self._waiters[sub.sub_id] = _Waiter()
        self._queue(self._conn.send(Unsubscribe(sub.sub_id)))
        await waiter.event.wait()
        self._subs.pop(sub.sub_id, None)
        sub._close()
        if waiter.error is not None and not isinstance(waiter.error, BrokerError):
            raise waiter.error

    def _settle(self, sub_id: int, topic: str, offset: int, kind: AckKind, delay: float) -> None:
        """Queue one group acknowledgement; the writer sends them as ranges."""
        if self._closed is not None or sub_id not in self._subs or self._conn.we_finished:
            return  # the broker redelivers whatever was not settled
        key = (sub_id, topic, kind, max(0, round(delay * 1000)))
        offsets = self._settlements.get(key)
        if offsets is None:
            offsets = self._settlements[key] = []
        offsets.append(offset)
        self._wake.set()

    def _take_settlements(self) -> list[bytes]:
        frames = []
        for (sub_id, topic, kind, delay_ms), offsets in self._settlements.items():
            ranges = _ranges(offsets)
            for i in range(0, len(ranges), MAX_ACK_RANGES):
                frames.append(
                    self._conn.send(
                        Ack(sub_id, kind, topic, tuple(ranges[i : i + MAX_ACK_RANGES]), delay_ms)
                    )
                )
        self._settlements = {}
        return frames

    def _grant_credit(self, sub_id: int, messages: int) -> None:
        # While reconnecting nothing is sent: the resumed SUBSCRIBE carries
        # the credit the subscription has room for.
        # After our GOODBYE nothing more may be sent; callbacks may still be
        # draining what was buffered.
        if (
            self._closed is None
            and sub_id in self._subs
            and self._connected.is_set()
            and not self._conn.we_finished
        ):
            self._queue(self._conn.send(Credit(sub_id, messages)))

    async def ping(self) -> None:
        """Round trip to the broker (PING, wait for PONG)."""
        await self._wait_connected()
        nonce = next(self._request_ids)
        waiter = self._waiters[-nonce] = _Waiter()
        self._queue(self._conn.send(Ping(nonce)))
        await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error

    async def _ask(self, make: Callable[[int], Info | Groups | Topics]) -> Any:
        """Send one INFO, GROUPS or TOPICS request (``make`` builds it from
        its request id) and return its reply, or raise what refused it."""
        request_id = next(self._request_ids)
        waiter = self._info_waiters[request_id] = _Waiter()
        self._queue(self._conn.send(make(request_id)))
        await waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    async def _ask_owner(self, make: Callable[[int], Info | Groups | Topics]) -> Any:
        """``_ask``, following NOT_OWNER (a cluster: a group is made at its
        topic's owner, where its members subscribe): the connection moves to the
        owner named, or back to this node after the reconnect delay while
        the topic has no owner yet, and the request is asked again there."""
        for _ in range(MAX_ASK_REDIRECTS):
            try:
                reply = await self._ask(make)
            except NotOwner as refused:
                if not self._move_to_owner(refused.fields.get("owner", ""), refused):
                    raise
                await self._wait_connected()
                continue
            self._redirecting_since = None
            self._redirects = 0
            return reply
        raise ConnectionClosed(f"no owner answered in {MAX_ASK_REDIRECTS} redirects")

    async def _topics_request(
        self, topic: str, action: TopicsAction, keep_from: int = 0, settings: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """A TOPICS request for ``topic`` and its JSON answer."""
        await self._wait_connected()
        problem = topic_error(topic, self._max_topic_bytes, self._max_topic_depth)
        if problem is not None:
            raise ValueError(problem)
        reply: TopicsReply = await self._ask(lambda rid: Topics(rid, action, topic, keep_from, dict(settings or {})))
        document: dict[str, Any] = json.loads(reply.document)
        return document

    async def topics(self, pattern: str = ">") -> list[TopicInfo]:
        """The topics matching ``pattern`` with their first and next offsets,
        retained bytes and subscription counts, by name (every one of them:
        a listing longer than one reply is asked for page by page)."""
        await self._wait_connected()
        problem = pattern_error(pattern, self._max_topic_bytes, self._max_topic_depth)
        if problem is not None:
            raise ValueError(problem)
        found: list[TopicInfo] = []
        # One reply holds what fits a frame: ask for the rest after the last
        # name (protocol.md, "INFO"); every page moves the name on.
        while True:
            after = found[-1].topic if found else ""
            reply: InfoReply = await self._ask(lambda rid: Info(rid, pattern, after))
            found.extend(reply.topics)
            if not reply.truncated or not reply.topics:
                return found

    async def groups(self, action: str = "list", name: str = "") -> dict[str, Any]:
        """Consumer-group admin: ``"list"``, ``"inspect"`` or ``"delete"``
        (with ``name``); returns the broker's JSON answer (protocol.md)."""
        await self._wait_connected()
        kinds = {"list": GroupsAction.LIST, "inspect": GroupsAction.INSPECT, "delete": GroupsAction.DELETE}
        if action not in kinds:
            raise ValueError(f"action must be one of {', '.join(kinds)}")
        listed: list[Any] = []
        after = name if action == "list" else ""
        # A list longer than one reply comes page by page (protocol.md,
        # "GROUPS"): each page names the next one's start; every page moves on.
        while True:
            target = after if action == "list" else name
            reply: GroupsReply = await self._ask(lambda rid: Groups(rid, kinds[action], target))
            document: dict[str, Any] = json.loads(reply.document)
            if action != "list":
                return document
            listed.extend(document.get("groups", []))
            following = document.get("next")
            if not isinstance(following, str) or following <= after:
                return {"groups": listed}
            after = following

    async def create_topic(self, topic: str, partitions: int = 1) -> dict[str, Any]:
        """Create ``topic`` before its first publish, with ``partitions``
        partitions (1 to 4096; protocol.md, "Partitioned topics"): topics
        ``topic~0`` to ``topic~N-1``, each ordered on its own, that
        :meth:`publish` to ``topic`` spreads messages over (by their
        ``key`` header) and subscriptions to ``topic`` read together. Same
        rights as :meth:`delete_topic`. Returns ``{"topic", "partitions",
        "created"}`` (created false when it exists so already); BrokerError
        BAD_REQUEST when it exists with another partition count."""
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be 1 to {MAX_PARTITIONS}")
        answer: dict[str, Any] = await self._topics_request(
            topic, TopicsAction.CREATE, settings={"partitions": str(partitions)}
        )
        if partitions > 1:
            self._partitioner.learn(topic, partitions)
            self._topics.pop(topic, None)
        return answer

    async def delete_topic(self, topic: str) -> dict[str, Any]:
        """Delete ``topic``: its messages and files; its subscribers and
        the groups reading it are told, and a publish to the name later
        starts a new topic at offset 0. Needs admin or a ``manage``
        permission for it (PermissionDenied). Returns ``{"deleted": topic,
        "messages": n}``; BrokerError UNKNOWN_TOPIC if there is none. A
        partitioned topic goes whole, partitions and all."""
        answer = await self._topics_request(topic, TopicsAction.DELETE)
        self._partitioner.counts.pop(topic, None)
        return answer

    async def set_topic(self, topic: str, **settings: int | float | str | None) -> dict[str, Any]:
        """Change ``topic``'s ``retention_bytes``, ``retention_seconds`` (a
        number or "7d") or ``segment_bytes`` while the broker runs (None:
        no retention limit); kept across restarts. Same rights as
        :meth:`delete_topic`. Returns ``{"topic", "settings"}``."""
        options = {k: "none" if v is None else str(v) for k, v in settings.items()}
        return await self._topics_request(topic, TopicsAction.SET, settings=options)

    async def purge_topic(self, topic: str, keep_from: int | None = None) -> dict[str, Any]:
        """Remove ``topic``'s messages before the stored batch holding offset
        ``keep_from`` (None: all of them); offsets go on from where they
        were. Same rights as :meth:`delete_topic`. Returns ``{"topic",
        "first_offset", "next_offset", "purged"}``."""
        if keep_from is not None and not 0 <= keep_from < 1 << 64:
            raise ValueError("keep_from must be an offset (0 or more)")
        value = (1 << 64) - 1 if keep_from is None else keep_from
        return await self._topics_request(topic, TopicsAction.PURGE, value)

    async def create_group(
        self,
        name: str,
        pattern: str,
        *,
        start: Start = "new",
        ack_wait: float | None = None,
        max_deliver: int | None = None,
        backoff: Sequence[float] | None = None,
        backoff_jitter: float | None = None,
        max_ack_pending: int | None = None,
        dead_letter: str | None = None,
        ordering: str | None = None,
    ) -> dict[str, Any]:
        """Declare consumer group ``name`` reading ``pattern`` before any
        member joins: messages from ``start`` on (``"new"``: published from
        now, ``"earliest"``, an offset or a datetime, as in subscribe) wait
        for its first member. The settings are subscribe's (
        ``max_ack_pending`` here is the prefetch of members that send none).
        An existing group with the same pattern is left as it is. Returns
        the group's summary with ``created`` (protocol.md, "GROUPS")."""
        await self._wait_connected()
        problem = pattern_error(pattern, self._max_topic_bytes, self._max_topic_depth)
        if problem is not None:
            raise ValueError(problem)
        kind, value = _start_position(start)
        options = _group_options(
            ack_wait, max_deliver, backoff, backoff_jitter, max_ack_pending, dead_letter, ordering
        )
        reply: GroupsReply = await self._ask_owner(
            lambda rid: Groups(rid, GroupsAction.CREATE, name, pattern, kind, value, options)
        )
        document: dict[str, Any] = json.loads(reply.document)
        return document

    # -- the tasks --------------------------------------------------------

    async def _run(self) -> None:
        """Run the reader and writer of each connection; between connections,
        reconnect (when allowed) and resume where the last one stopped."""
        while True:
            # The first connection's event is the one made in __init__: aclose
            # may already wait on it before this task runs (a client closed
            # right after connect). A reconnect makes a fresh one below.
            async with anyio.create_task_group() as tasks:
                self._conn_scope = tasks.cancel_scope
                tasks.start_soon(self._reader, name="pybroker reader")
                tasks.start_soon(self._writer, name="pybroker writer")
                if self._keepalive_interval is not None:
                    self._received_at = anyio.current_time()
                    tasks.start_soon(
                        self._keepalive, self._keepalive_interval, name="pybroker keepalive"
                    )
            if self._closed is not None:
                return
            if self._connected.is_set():  # both tasks ended without a word
                self._lost(ConnectionClosed("the connection ended"))
                if self._closed is not None:
                    return
            await anyio.aclose_forcefully(self._stream)  # the lost one
            self._reader_done = anyio.Event()  # for the next connection's reader
            if not await self._reconnect():
                return

    async def _reconnect(self) -> bool:
        """Get a new connection and resume on it; False once given up."""
        assert self._reconnect_policy is not None and self._opener is not None
        error = self._loss
        _log.warning("connection to %s lost; reconnecting: %s", self._address, error)
        attempts = 0
        if self._owner_wait:
            wait, self._owner_wait = self._owner_wait, 0.0
            await anyio.sleep(wait)
        for delay in self._reconnect_policy.delays():
            await anyio.sleep(delay)
            if self._closed is not None:
                break  # (a graceful close keeps trying while it flushes)
            attempts += 1
            stream: ByteStream | None = None
            try:
                with anyio.fail_after(self._connect_timeout):
                    stream = await self._opener()
                    self._stream = stream
                    self._conn = Connection(Role.CLIENT)
                    await self._handshake()
            except BaseException as exc:
                # Also when cancelled (the client is closing): this stream
                # may never have become self._stream, which aclose() closes.
                if stream is not None:
                    await anyio.aclose_forcefully(stream)
                    if self._advance is not None and isinstance(exc, _RETRY_AFTER):
                        self._advance()  # it answered, but not with a WELCOME: try the next one
                if isinstance(exc, BrokerError) and exc.code not in RETRYABLE_CODES:
                    self._fail(ConnectionClosed(f"reconnecting was refused: {exc}"))
                    return False
                if not isinstance(exc, _RETRY_AFTER):
                    raise
                error = exc
                continue
            if self._closed is not None:  # closed while we were connecting
                await anyio.aclose_forcefully(stream)
                return False
            # Built and marked connected with no await in between: a call
            # made from now on queues its frames after the resume, and one
            # made before is part of it.
            self._resume = self._resume_frames()
            self.reconnects += 1
            self._connected.set()
            self._wake.set()
            _log.info(
                "reconnected to %s after %d attempts; resuming %d subscriptions",
                self._address,
                attempts,
                len(self._subs),
            )
            return True
        self._fail(
            ConnectionClosed(f"gave up reconnecting after {attempts} attempts; last error: {error!r}")
        )
        return False

    def _resume_frames(self) -> list[bytes]:
        """Every subscription, continued, then every unacknowledged PUBLISH again.

        The writer sends these before anything else, so nothing a
        subscription's messages need (group ACKs, CREDIT) overtakes its
        SUBSCRIBE.
        """
        self._out = []  # encoded for the lost connection
        limit = self._max_frame_bytes
        frames = [self._conn.send(sub._resubscribe(limit)) for sub in self._subs.values()]
        # A PUBLISH whose PUBACK was lost may have been stored: sending it
        # again may store it twice, never loses it (protocol.md).
        frames.extend(self._inflight_frames.values())
        return frames

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._wake.set()

    async def _writer(self) -> None:
        try:
            while True:
                if (
                    self._unsent_count
                    and self._linger > 0
                    and self._unsent_count < self._max_batch_messages
                    and not self._out
                ):
                    await anyio.sleep(self._linger)
                # After a reconnect the resumed subscriptions go first. Then
                # acknowledgements: an UNSUBSCRIBE or GOODBYE queued after
                # them must not overtake them (the broker would redeliver
                # acknowledged messages).
                frames, self._resume = self._resume, []
                if self._settlements:
                    frames.extend(self._take_settlements())
                frames.extend(self._out)
                self._out = []
                room = self._max_inflight_batches - len(self._inflight)
                if self._unsent_count and room > 0:
                    frames.extend(self._take_batches(room))
                if frames:
                    await self._stream.send(b"".join(frames))
                    continue
                if self._closed is not None:
                    return
                await self._wake.wait()
                self._wake = anyio.Event()
                self._wake_set = False
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._lost(ConnectionClosed(f"connection lost while sending: {exc!r}"))

    async def _reader(self) -> None:
        conn = self._conn
        try:
            while self._closed is None:
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    if event is CLOSED:
                        self._lost(ConnectionClosed("the broker closed the connection"))
                        return
                    self._on_event(event)
                    if self._closed is not None or not self._connected.is_set():
                        return
                conn.receive_data(await self._receive())
                self._received_at = anyio.current_time()
        except ProtocolError as exc:
            try:
                await self._stream.send(
                    conn.send(Error(int(exc.code), exc.message, fatal=True))
                )
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.BusyResourceError, ProtocolError):
                pass
            self._fail(ConnectionClosed(f"protocol error: {exc}"))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._lost(ConnectionClosed(f"connection lost: {exc!r}"))
        finally:
            self._reader_done.set()

    async def _keepalive(self, interval: float) -> None:
        """Notice a broker that is gone without closing the connection (its
        host died, the network was cut): after ``interval`` seconds without
        a byte from it, PING; if nothing arrives within ``interval`` more,
        the connection is over and everything waiting fails."""
        while self._closed is None:
            await anyio.sleep_until(self._received_at + interval)
            if self._conn.we_finished:
                return  # we said GOODBYE: closing has its own timeout
            if anyio.current_time() < self._received_at + interval:
                continue  # it spoke meanwhile
            sent_at = anyio.current_time()
            self._queue(self._conn.send(Ping(next(self._request_ids))))
            await anyio.sleep(interval)
            if self._closed is None and self._received_at <= sent_at:
                # Ends this connection's reader and writer; reconnects if allowed.
                self._lost(
                    ConnectionClosed(f"no answer from the broker within {interval:g} s of a PING")
                )
                return

    def _on_event(self, event: Any) -> None:
        if isinstance(event, Deliver):
            self._on_deliver(event)
        elif isinstance(event, GroupDeliver):
            self._on_group_deliver(event)
        elif isinstance(event, PubAck):
            self._on_puback(event)
        elif isinstance(event, SubAck):
            sub = self._subs.get(event.sub_id)
            if sub is not None:
                self._redirecting_since = None
                self._redirects = 0
                sub._resuming = False
                if sub._registered_us is None:
                    sub._registered_us = event.timestamp
            waiter = self._waiters.pop(event.sub_id, None)
            if waiter is not None:
                waiter.done()
        elif isinstance(event, UnsubAck):
            waiter = self._waiters.pop(event.sub_id, None)
            if waiter is not None:
                waiter.done()
        elif isinstance(event, Ping):
            self._queue(self._conn.send(Pong(event.nonce)))
        elif isinstance(event, Pong):
            waiter = self._waiters.pop(-event.nonce, None)
            if waiter is not None:
                waiter.done()
        elif isinstance(event, Error):
            self._on_error(event)
        elif isinstance(event, (InfoReply, GroupsReply, TopicsReply)):
            waiter = self._info_waiters.pop(event.request_id, None)
            if waiter is not None:
                waiter.done(result=event)
        elif isinstance(event, Goodbye):
            self._goodbye_received.set()
            self._lost(ConnectionClosed("the broker said goodbye"))

    def _on_deliver(self, d: Deliver) -> None:
        sub = self._subs.get(d.sub_id)
        if sub is None:
            return  # unsubscribed; these were in flight
        _check_crc(d.topic, d.base_offset, d.batch)
        try:
            payloads, headers = decode_batch_columns(d.batch)
        except MalformedBatch as exc:
            sub._note_malformed(d.topic, d.base_offset, d.timestamp, check_batch(d.batch)[0])
            _log.warning("skipping malformed batch at %s@%d: %s", d.topic, d.base_offset, exc)
            return
        # Messages are made as they are handed over (subscription.py).
        sub._push(Batch(d.topic, d.base_offset, d.timestamp, payloads, headers, _msg_id_of(headers)))

    def _on_group_deliver(self, d: GroupDeliver) -> None:
        sub = self._subs.get(d.sub_id)
        if sub is None:
            return  # left the group; the broker gives these to another member
        _check_crc(d.topic, d.base_offset, d.batch)
        try:
            payloads, headers = decode_batch_columns(d.batch)
        except MalformedBatch as exc:
            sub._note_malformed(d.topic, d.base_offset, d.timestamp, 0)  # groups: not credit-counted
            _log.warning("skipping malformed batch at %s@%d: %s", d.topic, d.base_offset, exc)
            return
        sub._push(
            Batch(
                d.topic, d.base_offset, d.timestamp, payloads, headers, _msg_id_of(headers),
                d.deliveries, self, d.sub_id,
            )
        )

    def _on_puback(self, ack: PubAck) -> None:
        frame = self._inflight.pop(ack.request_id, None)
        if frame is None:
            return
        self._inflight_frames.pop(ack.request_id, None)
        self._redirecting_since = None
        self._redirects = 0
        frame.resolve(ack.base_offset, ack.timestamp, ack.durability)  # every message of it at once
        self._settled(frame.count)
        if self._owners is not None and self._owners.held:
            self._hand_over(frame.run.topic)

    def _settled(self, count: int) -> None:
        self._pending_count -= count
        self._room.set()
        self._wake.set()  # an in-flight slot is free
        if not self._pending_count:
            self._drained.set()

    def _follow_owner(self, err: Error, error: BrokerError) -> bool:
        """A cluster node does not own the topic of an unanswered PUBLISH, or
        of a consumer group's subscription (refused, or ended because the
        node stopped owning the topic). A PUBLISH naming an owner goes to
        that owner's peer, with its topic (_hold, _owners.py). Otherwise
        move this connection to the owner it
        names (to the same node again, after the reconnect delay, while the
        topic has no owner), where the PUBLISH is sent again, with its
        msg-id, like every other one in flight, and every subscription is
        made again. Only with reconnecting on, and for at most
        REDIRECT_SECONDS without a PUBACK or SUBACK; False when not followed
        (the PUBLISH or SUBSCRIBE fails with NOT_OWNER)."""
        known = self._inflight if err.ref_kind is RefKind.REQUEST else self._subs
        if err.ref not in known:
            return False
        owner = err.fields.get("owner", "")
        if (
            err.ref_kind is RefKind.REQUEST
            and self._owners is not None
            and owner
            and owner != self._address
            and self._hold(err.ref, owner)
        ):
            return True
        return self._move_to_owner(owner, error)

    def _move_to_owner(self, owner: str, error: BrokerError) -> bool:
        """Move this connection to ``owner`` (a NOT_OWNER answer's; "": to
        the same node again after the reconnect delay); False when it is not
        followed: reconnecting off, REDIRECT_SECONDS of answers without a
        PUBACK, SUBACK or GROUPS reply, or not an address."""
        if self._reconnect_policy is None or self._retarget is None:
            return False
        now = anyio.current_time()
        if self._redirecting_since is None:
            self._redirecting_since = now
        elif now - self._redirecting_since > REDIRECT_SECONDS:
            return False
        if owner and not self._retarget(owner):
            return False
        self._redirects += 1
        policy = self._reconnect_policy
        # The first move to an owner named is at once; answers that keep
        # coming (no owner yet, or one named that cannot be reached: a
        # take-over can take a lease's TTL) wait longer and longer.
        steps = self._redirects - (1 if owner else 0)
        self._owner_wait = min(policy.max_delay, max(policy.initial_delay, 0.05) * 2 ** min(steps - 1, 16)) if steps else 0.0
        _log.info("%s; moving to %s", error, owner or f"{self._address} again")
        if owner:
            self._address = owner
        self._lost(ConnectionClosed(f"redirected: {error}"))
        return True

    def _partitioned(self, err: Error) -> bool:
        """A PUBLISH to a partitioned topic was refused: learn the count,
        and publish every message to that topic not yet acknowledged again,
        each to its partition, in the order they were sent (those in flight
        first: the broker refuses them all); a delayed one fails. False when
        the refusal is not of ours to follow."""
        topic = err.fields.get("topic", "")
        count_text = err.fields.get("partitions", "")
        if not count_text.isdigit() or not 1 < int(count_text) <= MAX_PARTITIONS:
            return False
        frame = self._inflight.get(err.ref)
        if frame is None:
            return self._partitioner.counts.get(topic) == int(count_text)  # moved already
        if frame.run.topic != topic:
            return False
        self._partitioner.learn(topic, int(count_text))
        known = self._topics.pop(topic, None)
        self._unsent.pop(topic, None)
        for request_id in sorted(r for r, f in self._inflight.items() if f.run.topic == topic):
            frame = self._inflight.pop(request_id)
            sent = decode_frame(self._inflight_frames.pop(request_id))
            assert isinstance(sent, Publish), sent
            if sent.delayed or sent.needs_receiver:
                # Their flags do not survive a move: a request asks again,
                # routed (request()); a delayed publish fails.
                frame.fail(broker_error(err.code, err.message, err.fields))
            else:
                frame.move([self._publish_again(topic, record) for record in split_records(sent.batch)])
            self._settled(frame.count)
        if known is not None:
            self._move_unsent(known, self)
        _log.info("topic %s has %s partitions: publishing to them", topic, count_text)
        return True

    def _move_unsent(self, known: Topic, target: Client) -> None:
        """Publish the messages queued to ``known`` and not yet sent again
        through ``target`` (routed again: to its partition, its peer)."""
        known.seal()
        for run in known.sealed:
            records, run.records = run.records, []
            if not records:
                continue
            self._unsent_count -= len(records)
            run.frame(len(records)).move([target._publish_again(known.name, record) for record in records])
            self._settled(len(records))
        known.sealed.clear()

    def _publish_again(self, topic: str, record: bytes) -> PendingAck:
        """Queue a message taken out of a refused PUBLISH (or out of a
        queue moving to a peer) for where it goes now: its partition, its
        owner's peer. Room was taken when it was first queued."""
        record, headers = unbatched(record)
        name, peer = self._destination(topic, headers)
        if peer is not None and peer is not self:
            return peer._publish_again(name, record)
        known = self._topic(name)
        records = known.run.records
        pending = PendingAck(known.name, known.run, len(records))
        if not records:
            self._unsent[known.name] = known
        records.append(record)
        self._unsent_count += 1
        self._pending_count += 1
        self._wake.set()
        return pending

    def _hold(self, request_id: int, owner: str) -> bool:
        """A PUBLISH refused with NOT_OWNER naming ``owner``: keep it (and
        send nothing more to its topic here) for the owner's peer, which
        gets everything of the topic once no answer is owed here
        (_owners.py). False when that is not for it: a request or a delayed
        publish (the connection moves to the owner, as without peers: a
        request's reply comes to this connection's inbox), an owner that
        is no ``host:port``, or no peer to be had (too many)."""
        owners = self._owners
        assert owners is not None
        frame = self._inflight[request_id]
        topic = frame.run.topic
        sent = decode_frame(self._inflight_frames[request_id])
        if not isinstance(sent, Publish) or sent.needs_receiver or sent.delayed:
            return False
        host, sep, number = owner.rpartition(":")
        if not sep or not host or not number.isdigit() or not 0 < int(number) < 65536:
            return False
        if owners.peer(self, owner) is None:
            return False
        held = owners.held.get(topic)
        if held is None:
            held = owners.held[topic] = Held(owner)
        held.owner = owner
        del self._inflight[request_id]
        held.frames.append((frame, self._inflight_frames.pop(request_id)))
        self._hand_over(topic)
        return True

    def _hand_over(self, topic: str) -> None:
        """Give a held topic to its owner's peer, if the peer is open and
        every PUBLISH to the topic sent here has been answered."""
        owners = self._owners
        if owners is None or topic not in owners.held:
            return
        held = owners.held[topic]
        peer = owners.peers.get(held.owner)
        if peer is None or peer.client is None or peer.client.closed:
            return
        if any(frame.run.topic == topic for frame in self._inflight.values()):
            return  # its answer first: answers come in PUBLISH order
        target = peer.client
        del owners.held[topic]
        owners.route(topic, target)
        for frame, data in held.frames:
            sent = decode_frame(data)
            assert isinstance(sent, Publish), sent  # plain ones only (_hold)
            frame.move([target._publish_again(topic, record) for record in split_records(sent.batch)])
            self._settled(frame.count)
        known = self._topics.pop(topic, None)
        self._unsent.pop(topic, None)
        if known is not None:
            self._move_unsent(known, target)
        _log.info("publishing %s through %s, its owner", topic, held.owner)

    def _peer_failed(self, peer: Peer) -> None:
        """A peer could not be opened (no node of the URL answered): what
        waited for it fails with why."""
        owners = self._owners
        assert owners is not None
        error = ConnectionClosed(f"cannot reach {peer.address}, the owner named by NOT_OWNER: {peer.error}")
        for topic in [t for t, h in owners.held.items() if h.owner == peer.address]:
            held = owners.held.pop(topic)
            for frame, _ in held.frames:
                frame.fail(error)
                self._settled(frame.count)
            known = self._topics.pop(topic, None)
            if known is not None:
                queued = sum(len(run.records) for run in (*known.sealed, known.run))
                known.fail(error)
                self._unsent.pop(topic, None)
                self._unsent_count -= queued
                self._settled(queued)

    def _on_error(self, err: Error) -> None:
        error = broker_error(err.code, err.message, err.fields)
        if err.fatal:
            closed = ConnectionClosed(f"the broker closed the connection: {error}")
            if err.code in RETRYABLE_CODES:
                self._lost(closed)
            else:
                self._fail(closed)
            return
        if err.ref_kind is RefKind.REQUEST:
            if err.code == ErrorCode.NOT_OWNER and self._follow_owner(err, error):
                return
            if err.code == ErrorCode.PARTITIONED and self._partitioned(err):
                return
            frame = self._inflight.pop(err.ref, None)
            if frame is not None:
                self._inflight_frames.pop(err.ref, None)
                frame.fail(error)
                self._settled(frame.count)
                if self._owners is not None and self._owners.held:
                    self._hand_over(frame.run.topic)
                return
            waiter = self._info_waiters.pop(err.ref, None)
            if waiter is not None:
                waiter.done(error)
                return
        elif err.ref_kind is RefKind.SUBSCRIPTION:
            if err.code == ErrorCode.NOT_OWNER and self._follow_owner(err, error):
                return
            waiter = self._waiters.pop(err.ref, None)
            if waiter is not None:
                waiter.done(error)
                return
            sub = self._subs.get(err.ref)
            if sub is not None and err.code == ErrorCode.DATA_LOST:
                sub._note_lost(_lost_count(err))
            elif sub is not None and err.code == ErrorCode.TOPIC_DELETED:
                # Its next messages, if the name is used again, start at 0:
                # a resume must not ask for the old topic's offsets.
                sub._forget_topic(err.fields.get("topic", ""))
                _log.info("topic %s deleted (subscription %s)", err.fields.get("topic"), sub.pattern)
                return
            elif sub is not None and sub._resuming:
                # The broker refused to continue it on the new connection.
                del self._subs[err.ref]
                if sub.pattern == self._inbox:
                    self._lose_inbox(error)
                    sub._close()  # not its callback's error to raise
                    return
                sub._close(error)
                _log.warning("subscription %s not resumed: %s", sub.pattern, error)
                return
        _log.warning("error from broker: %s (code %d, ref %d)", err.message, err.code, err.ref)


def _payload_bytes(payload: object) -> bytes:
    """A payload as bytes: ``str`` is encoded as UTF-8; bytes-like objects
    pass; anything else is refused before anything is queued."""
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(
        f"a payload must be bytes or str (sent as UTF-8), not {type(payload).__name__}"
    )


def _lost_count(err: Error) -> int:
    """How many messages a DATA_LOST reports, from its fields (protocol.md,
    "ERROR"); a broker that sends none gets its message text parsed."""
    try:
        if "first" in err.fields and "last" in err.fields:
            return int(err.fields["last"]) - int(err.fields["first"]) + 1
        # "topic T: offsets A..B were removed ..."
        span = err.message.split("offsets ", 1)[1].split(" ", 1)[0]
        first, last = span.split("..")
        return int(last) - int(first) + 1
    except (IndexError, ValueError):
        return 0


def _start_position(start: Start) -> tuple[StartKind, int]:
    if isinstance(start, bool):
        raise TypeError("start must be 'new', 'earliest', an offset or a datetime")
    if isinstance(start, int):
        if start < 0:
            raise ValueError("a start offset cannot be negative")
        return StartKind.OFFSET, start
    if isinstance(start, _dt.datetime):
        if start.tzinfo is None:
            raise ValueError("a start datetime must be timezone-aware")
        return StartKind.TIME, max(0, math.floor(start.timestamp() * 1_000_000))
    if start == "new":
        return StartKind.NEW, 0
    if start == "earliest":
        return StartKind.EARLIEST, 0
    raise ValueError(f"start must be 'new', 'earliest', an offset or a datetime, not {start!r}")


def _group_options(
    ack_wait: float | None,
    max_deliver: int | None,
    backoff: Sequence[float] | None,
    backoff_jitter: float | None,
    max_ack_pending: int | None,
    dead_letter: str | None,
    ordering: str | None = None,
) -> dict[str, str]:
    """A group's settings as SUBSCRIBE / GROUPS create options (protocol.md,
    "Consumer groups"); waits must be positive (not quietly clamped)."""
    if ack_wait is not None and ack_wait <= 0:
        raise ValueError("ack_wait must be positive")
    if backoff is not None and any(b <= 0 for b in backoff):
        raise ValueError("backoff waits must be positive")
    if backoff_jitter is not None and not 0 <= backoff_jitter <= 1:
        raise ValueError("backoff_jitter must be between 0 and 1")
    options: dict[str, str] = {}
    if ack_wait is not None:
        options["ack_wait_ms"] = str(max(1, round(ack_wait * 1000)))
    if max_deliver is not None:
        options["max_deliver"] = str(max_deliver)
    if backoff:
        options["backoff_ms"] = ",".join(str(max(1, round(b * 1000))) for b in backoff)
    if backoff_jitter:
        options["backoff_jitter_pct"] = str(round(backoff_jitter * 100))
    if max_ack_pending is not None:
        options["max_ack_pending"] = str(max_ack_pending)
    if dead_letter is not None:
        options["dead_letter"] = dead_letter
    if ordering is not None:
        if ordering not in ("key", ""):
            raise ValueError(f"ordering must be 'key' (or '' for none), got {ordering!r}")
        options["ordering"] = ordering
    return options


def _ranges(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges covering ``offsets``."""
    out: list[tuple[int, int]] = []
    for offset in sorted(set(offsets)):
        if out and out[-1][1] + 1 == offset:
            out[-1] = (out[-1][0], offset)
        else:
            out.append((offset, offset))
    return out


async def _run_callback(
    sub: Subscription, callback: Callback, concurrency: int, auto_ack: bool
) -> None:
    """Call ``callback`` for every message, up to ``concurrency`` at a time."""
    # A semaphore, not a CapacityLimiter: a slot is taken by the dispatching
    # loop and given back by whichever task ran the callback.
    slots = anyio.Semaphore(concurrency)

    async def handle(msg: Message) -> None:
        try:
            try:
                result = callback(msg)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                if not (msg.is_group_message and auto_ack):
                    raise  # plain subscriptions: errors are the application's
                _log.exception("callback failed for %s@%d; nak", msg.topic, msg.offset)
                if msg.settled is None or msg.settled is AckKind.IN_PROGRESS:
                    msg._settle(AckKind.NAK)
                return
            if msg.is_group_message and auto_ack:
                if msg.settled is None or msg.settled is AckKind.IN_PROGRESS:
                    msg._settle(AckKind.ACK)
        finally:
            if concurrency > 1:
                slots.release()

    if concurrency == 1:
        # No slots to take: a semaphore's await is a scheduler trip per
        # message, which cut this path to a quarter of its speed. A plain
        # subscription's messages are never group messages, so its callback
        # is called directly, without a coroutine around it per message.
        await sub._for_each(callback if sub.group is None else handle)
        return
    async with anyio.create_task_group() as tasks:
        async for msg in sub:
            try:
                slots.acquire_nowait()
            except anyio.WouldBlock:
                await slots.acquire()
            tasks.start_soon(handle, msg)


@asynccontextmanager
async def connect(
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
) -> AsyncIterator[Client]:
    """Connect to a broker for the body of an ``async with``.

    On a normal exit the client waits (up to ``close_timeout``) for every
    queued publish to be acknowledged, then closes cleanly with GOODBYE.

    With ``reconnect=True`` (or a :class:`Reconnect` policy) a lost
    connection is reopened with backoff and jitter, and every subscription
    resumes where it stopped: no message is skipped, unacknowledged
    publishes are sent again, group members rejoin and get
    what they had not acknowledged redelivered. Meanwhile publishes queue
    (up to ``max_pending``) and requests wait. The first connection is not
    retried: a broker that is not there fails ``connect`` at once.

    A cluster's URL may list several of its brokers,
    ``pybroker://h1:7420,h2:7420,h3:7420``: the first connection tries
    them in order (and fails if none answers), and a reconnect that cannot
    reach a broker tries the next one, so a client outlives the node it
    was connected to.

    Credentials for a broker with a users file: ``token``, or ``user`` and
    ``password``, or in the URL (``pybroker://user:password@host``,
    ``pybroker://token@host``). Refused ones raise
    :class:`AuthenticationError`; an action the user may not take raises
    :class:`PermissionDenied` where it is awaited.

    TLS: a ``pybrokers://`` URL, ``tls=True`` or a ``ca_file`` connects
    over TLS, verifying the broker's certificate and host name against the
    system's CAs or those in ``ca_file``; ``tls`` may also be a ready
    ``ssl.SSLContext``. A failed verification raises
    ``ssl.SSLCertVerificationError``.

    The client always answers the broker's PINGs (its idle timeout).
    ``keepalive=S`` also PINGs the broker after S seconds without hearing
    from it, and ends the connection (``ConnectionClosed``) if it does not
    answer within S more: a broker that vanished without closing the
    connection is noticed in at most 2 S.

    In a cluster (with reconnecting on), a publish a node refuses with
    NOT_OWNER goes to the owner it names over one more connection, kept
    per owner for the topics it owns, while subscriptions stay where they
    are: a publisher to partitions that several nodes own publishes to
    each directly, in order per topic.

    Publishing is exactly-once across reconnects (``idempotent=True``, the
    default, with a broker that announces it): every batch carries a
    ``msg-id`` header on its first message, unique to this client, and a
    batch sent again after a reconnect is recognised by the broker (within
    its ``--dedup-window``) and acknowledged with its original offsets
    instead of being stored twice. ``idempotent=False`` sends no msg-ids:
    a resent batch may then be stored twice (at-least-once).
    """
    if keepalive is not None and not keepalive > 0:
        raise ValueError("keepalive must be a positive number of seconds")
    addresses, url_tls = _split_url(url)
    host, port = addresses[0]
    ssl_context = client_context(tls, ca_file, url_tls=url_tls)
    credentials = _credentials(url, token, user, password)
    policy: Reconnect | None = None
    if isinstance(reconnect, Reconnect):
        policy = reconnect
    elif reconnect:
        policy = Reconnect()

    target: list[tuple[str, int]] = [addresses[0]]

    async def opener() -> ByteStream:
        where, number = target[0]
        try:
            return await open_stream(where, number, ssl_context=ssl_context, timeout=connect_timeout)
        except OSError:
            advance()
            raise

    def advance() -> None:
        """After a broker that cannot be reached (it stopped, or died) or
        that refused the HELLO: the next try goes to the next address the
        URL gives; from an owner a NOT_OWNER named, to the first one, which
        names whoever owns the topic by then."""
        at = addresses.index(target[0]) + 1 if target[0] in addresses else 0
        target[0] = addresses[at % len(addresses)]

    def retarget(address: str) -> bool:
        """``host:port`` from a NOT_OWNER answer; False if it is not one."""
        name, sep, number = address.rpartition(":")
        if not sep or not name or not number.isdigit() or not 0 < int(number) < 65536:
            return False
        target[0] = (name.strip("[]"), int(number))
        return True

    # The first connection tries each address once, in order.
    for attempt in range(len(addresses)):
        try:
            stream = await opener()
            break
        except OSError:
            if attempt == len(addresses) - 1:
                raise
    try:
        async with anyio.create_task_group() as task_group:
            client = Client(
                stream,
                task_group,
                name=name,
                address=f"{host}:{port}",
                linger=linger,
                max_pending=max_pending,
                max_inflight_batches=max_inflight_batches,
                credentials=credentials,
                opener=opener,
                retarget=retarget,
                advance=advance,
                reconnect=policy,
                connect_timeout=connect_timeout,
                keepalive=keepalive,
                idempotent=idempotent,
            )
            # Bounded by connect_timeout each; a retryable refusal (a broker
            # stopping, or a cluster node cut off from the cluster) moves on
            # to the next address, once each.
            for tried in range(1, len(addresses) + 1):
                try:
                    await client._handshake()
                    break
                except BaseException as exc:
                    await anyio.aclose_forcefully(client._stream)
                    retryable = isinstance(exc, BrokerError) and exc.code in RETRYABLE_CODES
                    if not retryable or tried == len(addresses):
                        raise
                advance()
                client._stream = await opener()
                client._conn = Connection(Role.CLIENT)
            if policy is not None:

                def peer_factory(address: str) -> AbstractAsyncContextManager[Client]:
                    """A connection to ``address`` (an owner NOT_OWNER named), then
                    the URL's brokers; for publishing, with this one's settings
                    and credentials (the URL's user info, as it was written)."""
                    where, _, number = address.rpartition(":")
                    owner = (where.strip("[]"), int(number))
                    listed = [owner, *(a for a in addresses if a != owner)]
                    scheme = "pybrokers" if url_tls else "pybroker"
                    userinfo, at, _ = urlsplit(url).netloc.rpartition("@")
                    return connect(
                        f"{scheme}://{userinfo}{at}" + ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in listed),
                        name=name,
                        linger=linger,
                        max_pending=max_pending,
                        max_inflight_batches=max_inflight_batches,
                        connect_timeout=connect_timeout,
                        close_timeout=close_timeout,
                        reconnect=policy,
                        tls=ssl_context,
                        keepalive=keepalive,
                        idempotent=idempotent,
                        token=token,
                        user=user,
                        password=password,
                    )

                client._owners = Owners(peer_factory)
            task_group.start_soon(client._run, name="pybroker connection")
            try:
                yield client
            except BaseException:
                await client.aclose(graceful=False)
                raise
            await client.aclose(close_timeout)
    except BaseExceptionGroup as group:
        # The task group is ours, not the caller's: hand back a lone exception
        # as itself (a failing body, a callback's error) rather than a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        # Every callback subscription ends with the same lost connection.
        if all(isinstance(e, ConnectionClosed) for e in group.exceptions):
            raise group.exceptions[0] from None
        raise


def _check_crc(topic: str, base_offset: int, batch: bytes) -> None:
    """The broker checked this batch against its CRC before sending it
    (protocol.md, DELIVER), so a mismatch here was made between its memory
    and ours. Nothing in this connection can be trusted after that: the
    reader answers with a fatal MALFORMED_FRAME and the connection closes
    (and reconnects, resuming after the last message handed over, if asked
    to)."""
    if not check_batch(batch)[1]:
        raise ProtocolError(
            ErrorCode.MALFORMED_FRAME,
            f"batch at {topic}@{base_offset} does not match its CRC",
        )


def _msg_id_of(headers: list[Mapping[str, str]]) -> str | None:
    """Take the batch's msg-id out of its first message's headers: it names
    the batch (exactly-once publishing), it is not the application's, and
    the message shows it as ``Message.msg_id``. O(1) per batch."""
    first = headers[0]
    if MSG_ID_HEADER not in first:
        return None
    rest = dict(first)
    msg_id = rest.pop(MSG_ID_HEADER)
    headers[0] = rest
    return msg_id
