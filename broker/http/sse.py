"""Server-Sent Events: new messages of one topic
(``GET /v1/topics/{topic}/events``) or of every topic matching a pattern
(``GET /v1/events?pattern=orders.*``).

Each stream is a real subscription in the core (it shows in the topics'
subscriptions and its lag in /metrics), whose subscriber is an
:class:`SseConsumer`. The router's ``deliver`` only notes the topic and wakes
the stream; the stream then reads forward from each topic's log at its own
position, like a lagging TCP subscriber, so memory per client is bounded by
one read (``READ_BYTES``, ``MAX_EVENTS``) however far behind it is, and only
what is visible (durable, for fsync ``always`` topics) is sent. Topics with
news are served in turn, so one busy topic cannot starve the others.

Events: ``data:`` is one line of JSON (topic, offset, timestamp, headers,
payload or payload_base64). Named events ``lost`` (offsets removed by
retention, damaged on disk or missing, with a ``reason``) and ``malformed``
(a batch whose records do not decode) report gaps; comment lines keep idle
streams alive.

Resuming (what an EventSource does by itself when it reconnects, sending
the last ``id:`` it saw as ``Last-Event-ID``):

- one topic: ``id:`` is the message's offset. ``Last-Event-ID: N`` starts
  after N; else ``?from=OFFSET`` starts at OFFSET; else only messages
  published from now on are sent.
- a pattern: the id carries a position per topic (:func:`format_id`):
  ``@SINCE,TOPIC=OFFSET,...`` with SINCE the stream's start in microseconds
  of broker time and, per topic, the last offset sent on it (TOPIC
  percent-encoded). It is sent once when the stream opens (an id-only
  block: browsers record it without firing an event) and on the last event
  of each write. Resuming, a listed topic starts after its offset; every
  other topic from its first message appended at or after SINCE (what was
  not sent before). ``?from=earliest`` starts every topic at its first
  retained offset; the default, ``new``, at what is published from now on.
  The id lists at most ``MAX_ID_BYTES`` of topics, most recently sent first;
  a topic left out resumes from SINCE and so may repeat messages (never
  skip them). A client that drops in the middle of a write gets that
  write's earlier events again: ``(topic, offset)`` tells them apart.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import trio

from pybroker.protocol import MSG_ID_HEADER, MalformedBatch, StartKind, decode_batch, pattern_error, tokens_match

from ..core import Refused, SubscribeRequest
from ..inboxes import has_wildcard, is_inbox
from ..router import Subscription, Topic
from ..start import resume_offset
from ..storage import DataLoss, ReadPending
from ..subscriber import SubscriberInfo
from .access import principal, require_read
from .messages import HttpError, Request, Send, StreamResponse
from .validate import MAX_OFFSET, check_query, parse_int, parse_offset, valid_topic

if TYPE_CHECKING:
    from .server import HttpServer

#: Bytes of log read per write (one write's events are sent before the next read).
READ_BYTES = 256 * 1024
#: ... and at most this many events (small messages expand most as JSON).
MAX_EVENTS = 1000
RETRY_MS = 2000
#: Bound on a pattern stream's event id (browsers send it back as a header).
MAX_ID_BYTES = 4096
#: Characters a topic keeps in an event id; the rest are percent-encoded,
#: so "," "=" "@" and anything outside ASCII never appear raw.
_ID_SAFE = ".-_~"


class SseConsumer:
    """An event stream's :class:`~broker.subscriber.Subscriber`: ``deliver``
    notes the topic and wakes the stream, which reads the log itself."""

    def __init__(self, conn_id: int, peer: str, client: str, pattern: str | None) -> None:
        self.conn_id = conn_id
        self.peer = peer
        self.client = client
        #: None: one topic, ids are offsets; else the pattern, ids are maps.
        self.pattern = pattern
        #: Next offset to send, per topic; a topic not here starts at its
        #: first offset (it was created after the stream started).
        self.positions: dict[str, int] = {}
        #: Last offset sent per topic, most recently sent last (pattern ids).
        self.last_sent: dict[str, int] = {}
        #: Microseconds of broker time: topics missing from an id resume from here.
        self.since = 0
        #: Topics with something new, in the order they are to be served.
        self.dirty: dict[Topic, None] = {}
        self.sent = 0
        #: The stream's first block after ``retry:`` (a comment, and for a
        #: pattern the id to resume from if nothing is ever sent).
        self.opening = ""
        #: Named events to send before any message ("deleted").
        self.notices: list[bytes] = []
        self._wake = trio.Event()
        self._wakes: dict[Topic, Callable[[], None]] = {}

    def deliver(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        batch: bytes,
        count: int,
    ) -> None:
        self.dirty[topic] = None
        self._wake.set()

    def deliver_group(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        deliveries: int,
        batch: bytes,
    ) -> None:
        raise AssertionError("an event stream is never a group member")

    def topic_deleted(self, sub: Subscription, topic: Topic) -> None:
        # A topic created later under the name starts again from offset 0.
        self.dirty.pop(topic, None)
        self._wakes.pop(topic, None)
        self.positions.pop(topic.name, None)
        self.last_sent.pop(topic.name, None)
        self.notices.append(_named("deleted", {"topic": topic.name}))
        self._wake.set()

    @property
    def accepting(self) -> bool:
        return True

    def _fetched(self, topic: Topic) -> Callable[[], None]:
        """A wake for a topic whose batches a cluster node is fetching. One
        per topic, kept, so asking again while the fetch runs adds no second
        call (Waitable.notify)."""
        wake = self._wakes.get(topic)
        if wake is None:

            def wake() -> None:
                if self._wakes.get(topic) is wake:  # not deleted meanwhile
                    self.dirty[topic] = None
                    self._wake.set()

            self._wakes[topic] = wake
        return wake

    def position(self, sub: Subscription, topic: Topic) -> int:
        return self.positions.get(topic.name, topic.log.first_offset)

    def describe(self) -> SubscriberInfo:
        return SubscriberInfo("sse", self.conn_id, self.client, self.peer)

    def event_id(self) -> bytes:
        assert self.pattern is not None
        return format_id(self.since, self.last_sent).encode("ascii")

    def read(self) -> bytes:
        """Events for what the dirty topics hold past their positions: at
        most ``READ_BYTES`` of batches and ``MAX_EVENTS`` messages, topic
        after topic; a topic with more left goes to the back of the line."""
        out: list[bytes] = []
        if self.notices:
            out, self.notices = self.notices, []
        events = size = 0
        while self.dirty and events < MAX_EVENTS and size < READ_BYTES:
            topic = next(iter(self.dirty))
            del self.dirty[topic]
            position = self.positions.get(topic.name, topic.log.first_offset)
            if position >= topic.visible_next:
                continue
            part = _read_topic(topic, position, MAX_EVENTS - events, READ_BYTES - size, self.pattern is None)
            self.positions[topic.name] = part.position
            if part.last is not None and self.pattern is not None:
                self.last_sent.pop(topic.name, None)
                self.last_sent[topic.name] = part.last
            if part.pending is not None:
                part.pending.notify(self._fetched(topic))  # dirty again once the batches are here
            elif part.position < topic.visible_next:
                self.dirty[topic] = None
            out.extend(part.events)
            events += part.sent
            size += part.size
            self.sent += part.sent
        if out and self.pattern is not None:
            out[-1] = b"id: " + self.event_id() + b"\n" + out[-1]
        return b"".join(out)


def format_id(since: int, last_sent: dict[str, int]) -> str:
    """A pattern stream's event id: ``@SINCE`` then ``,TOPIC=OFFSET`` for the
    most recently sent topics that fit in ``MAX_ID_BYTES``."""
    parts = [f"@{since}"]
    room = MAX_ID_BYTES - len(parts[0])
    for name, offset in reversed(last_sent.items()):
        pair = f",{quote(name, safe=_ID_SAFE)}={offset}"
        room -= len(pair)
        if room < 0:
            break
        parts.append(pair)
    return "".join(parts)


def parse_id(text: str, pattern: str) -> tuple[int, dict[str, int]]:
    """(since, last offset per topic) from a pattern stream's event id; 400
    when it is not one, or names a topic the pattern does not match."""
    head, *pairs = text.strip().split(",")
    if not head.startswith("@"):
        raise HttpError(400, f"Last-Event-ID {text[:100]!r} is not an event id of a pattern stream (@SINCE,...)")
    since = parse_int(head[1:], "Last-Event-ID's @SINCE", 0, MAX_OFFSET)
    tokens = pattern.split(".")
    last: dict[str, int] = {}
    for pair in pairs:
        quoted, sep, offset = pair.partition("=")
        try:
            name = unquote(quoted, errors="strict")
        except UnicodeDecodeError:
            name = ""
        if not sep or not name or not tokens_match(tokens, name.split(".")):
            raise HttpError(400, f"Last-Event-ID: {pair[:100]!r} is not TOPIC=OFFSET for a topic {pattern!r} matches")
        last[name] = parse_offset(offset, f"Last-Event-ID's offset of {name!r}")
    return since, last


class _Part:
    """What one read of one topic gave."""

    __slots__ = ("events", "position", "last", "sent", "size", "pending")

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.position = 0
        #: The last offset accounted for by an event (sent, lost, malformed).
        self.last: int | None = None
        self.sent = 0
        self.size = 0
        #: Batches from ``position`` on are being fetched (cluster mode).
        self.pending: ReadPending | None = None


def _read_topic(topic: Topic, position: int, max_events: int, max_bytes: int, offset_ids: bool) -> _Part:
    """Events for the visible messages of ``topic`` from ``position``: at most
    one log read of ``max_bytes`` and ``max_events`` messages."""
    part = _Part()
    log = topic.log
    out = part.events
    first = log.first_offset
    if position < first:
        out.append(_named("lost", {"topic": topic.name, "from": position, "to": first - 1, "reason": "retention"}))
        position = first
        part.last = first - 1
    start = position
    try:
        batches = log.read(position, max_bytes) if position < topic.visible_next else []
    except ReadPending as pending:
        # Still in the object store (cluster mode): not lost; read again
        # from here once fetched.
        part.pending = pending
        part.position = position
        return part
    except DataLoss as lost:
        # Damaged or missing in the log: say so, go on after it next time.
        last = min(lost.last, topic.visible_next - 1)
        out.append(_named("lost", {"topic": topic.name, "from": lost.first, "to": last, "reason": lost.reason}))
        batches = []
        part.last = last
        position = last + 1
    for stored in batches:
        if stored.base_offset >= topic.visible_next or part.sent >= max_events:
            break  # appended but not yet durable, or enough for one write
        try:
            records = decode_batch(stored.batch)
        except MalformedBatch as exc:
            out.append(
                _named(
                    "malformed",
                    {"topic": topic.name, "offset": stored.base_offset, "count": stored.count, "error": str(exc)},
                )
            )
            position = stored.next_offset
            part.last = position - 1
            continue
        part.size += len(stored.batch)
        for i, (payload, headers) in enumerate(records):
            offset = stored.base_offset + i
            if offset < position:
                continue  # resuming inside a batch
            if part.sent >= max_events:
                break  # the rest of this batch goes in the next write
            out.append(_event(topic.name, offset, stored.timestamp, payload, headers, offset_ids))
            part.sent += 1
            position = offset + 1
            part.last = offset
        else:
            position = stored.next_offset
    if position == start and not out:
        # Nothing readable at this position (cannot happen with a sane log):
        # step over it rather than spin.
        position = topic.visible_next
    part.position = position
    topic.messages_out += part.sent
    topic.bytes_out += part.size
    return part


# -- the two routes -------------------------------------------------------------


def refuse_when_stepped_aside(http: HttpServer) -> None:
    """A cluster node cut off from etcd while another is ready ends its
    streams and takes no new ones (its copies no longer grow): 503, as
    its /readyz says, so that the browser or the load balancer goes to
    another node (docs/cluster.md §11)."""
    if http.broker.stepped_aside:
        raise HttpError(503, "this node is cut off from the cluster: stream from another node", code="unavailable")


async def events(http: HttpServer, request: Request, params: Mapping[str, str]) -> StreamResponse:
    """``GET /v1/topics/{topic}/events``."""
    refuse_when_stepped_aside(http)
    name = valid_topic(http, params["topic"])
    check_query(request, {"from"})
    require_read(request, name)
    if is_inbox(name):
        # Private to the TCP connection that owns it (broker/inboxes.py);
        # as for other reads, no such topic.
        raise HttpError(404, f"no such topic: {name}", code="topic_not_found")
    start: int | None = None
    last_id = request.header("last-event-id")
    if last_id is not None and last_id.strip():
        start = parse_offset(last_id.strip(), "Last-Event-ID") + 1
    elif "from" in request.query:
        start = parse_offset(request.query["from"], "from")
    consumer = SseConsumer(request.conn_id, request.peer, request.header("user-agent") or "", None)

    def place(topics: list[Topic]) -> None:
        if start is not None:
            consumer.positions[name] = start
        for topic in topics:
            if start is None:
                consumer.positions[name] = topic.visible_next  # only what is published from now on
            consumer.dirty[topic] = None
        where = "the first" if name not in consumer.positions else str(consumer.positions[name])
        consumer.opening = f": pybroker events of {name} from offset {where}\n"

    return _response(http, request, name, consumer, place)


async def pattern_events(http: HttpServer, request: Request, params: Mapping[str, str]) -> StreamResponse:
    """``GET /v1/events?pattern=P``."""
    refuse_when_stepped_aside(http)
    check_query(request, {"pattern", "from"})
    pattern = request.query.get("pattern")
    if not pattern:
        raise HttpError(400, "give the topics to stream as ?pattern=PATTERN (e.g. orders.* or orders.>)")
    limits = http.broker.limits
    problem = pattern_error(pattern, limits.max_topic_bytes, limits.max_topic_depth)
    if problem is not None:
        raise HttpError(400, f"bad pattern: {problem}", code="bad_pattern")
    require_read(request, pattern)
    if is_inbox(pattern):
        raise HttpError(403, "request/reply inboxes are private to their TCP connection", code="permission_denied")
    start = request.query.get("from", "new")
    if start not in ("new", "earliest"):
        raise HttpError(400, f"from must be new or earliest for a pattern (an offset needs one topic), got {start!r}")
    resume: tuple[int, dict[str, int]] | None = None
    last_id = request.header("last-event-id")
    if last_id is not None and last_id.strip():
        resume = parse_id(last_id, pattern)
    consumer = SseConsumer(request.conn_id, request.peer, request.header("user-agent") or "", pattern)

    def place(topics: list[Topic]) -> None:
        now = time.time_ns() // 1000
        if resume is not None:
            consumer.since, last = resume
            for name, offset in last.items():
                consumer.last_sent[name] = offset
        elif start == "earliest":
            consumer.since, last = 0, {}
        else:
            # A batch appended before now but still waiting for its fsync
            # is sent by this stream: a resume must find it too.
            held = [t.held[0].timestamp for t in topics if t.held]
            consumer.since, last = min([now, *held]), {}
        for topic in topics:
            log = topic.log
            if resume is None:
                position = topic.visible_next if start == "new" else log.first_offset
            else:
                resumed = resume_offset(log, last[topic.name] + 1) if topic.name in last else None
                position = log.offset_at_time(consumer.since) if resumed is None else resumed
            consumer.positions[topic.name] = position
            consumer.dirty[topic] = None
        consumer.opening = (
            f"id: {format_id(consumer.since, consumer.last_sent)}\n"
            f": pybroker events of {pattern} ({len(topics)} topics now), "
            f"{'resumed' if resume else 'from ' + start}\n"
        )

    return _response(http, request, pattern, consumer, place)


def _response(
    http: HttpServer,
    request: Request,
    pattern: str,
    consumer: SseConsumer,
    place: Callable[[list[Topic]], None],
) -> StreamResponse:
    who = principal(request)

    async def produce(send: Send) -> None:
        broker = http.broker
        try:
            sub = broker.subscribe(who, consumer, SubscribeRequest(request.conn_id, pattern, StartKind.NEW, 0, None))
        except Refused as refusal:  # checked before the 200; a race at most
            http.logger.info("event stream refused", pattern=pattern, reason=refusal.message)
            return
        try:
            # No await between subscribing and placing: no topic or batch
            # can slip between the two.
            topics = broker.router.topics
            if has_wildcard(pattern):
                tokens = pattern.split(".")
                matched = [t for name, t in topics.items() if tokens_match(tokens, name.split("."))]
            else:
                matched = [topics[pattern]] if pattern in topics else []
            place(matched)
            await _stream(http, consumer, send)
        finally:
            broker.unsubscribe(sub)

    return StreamResponse(200, "text/event-stream; charset=utf-8", produce, headers={"x-accel-buffering": "no"})


async def _stream(http: HttpServer, consumer: SseConsumer, send: Send) -> None:
    # Sent at once, so the client sees the stream open before any event.
    await send(f"retry: {RETRY_MS}\n{consumer.opening}\n".encode())
    keepalive = http.settings.sse_keepalive
    while True:
        # A fresh event before looking, so a delivery between the look and
        # the wait is not missed (no await in between).
        consumer._wake = trio.Event()
        chunk = consumer.read()
        if chunk:
            await send(chunk)
            continue
        with trio.move_on_after(keepalive):
            await consumer._wake.wait()
            continue
        await send(b": keepalive\n\n")


def message_json(
    topic: str, offset: int, timestamp_us: int, payload: bytes, headers: Mapping[str, str]
) -> dict[str, Any]:
    """A message as the JSON API shows it (also used by ``GET .../messages``)."""
    value: dict[str, Any] = {
        "topic": topic,
        "offset": offset,
        "timestamp": _dt.datetime.fromtimestamp(timestamp_us / 1_000_000, tz=_dt.timezone.utc).isoformat(),
        "timestamp_us": timestamp_us,
        "headers": dict(headers),
    }
    if MSG_ID_HEADER in headers:
        # It names the message's batch (exactly-once publishing), shown
        # apart from the application's headers, as the client library does.
        value["msg_id"] = value["headers"].pop(MSG_ID_HEADER)
    try:
        value["payload"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        value["payload_base64"] = base64.b64encode(payload).decode("ascii")
    return value


def _event(
    topic: str, offset: int, timestamp_us: int, payload: bytes, headers: Mapping[str, str], offset_id: bool
) -> bytes:
    # ensure_ascii: the data line can hold no raw line separator of any kind.
    data = json.dumps(message_json(topic, offset, timestamp_us, payload, headers), separators=(",", ":"))
    if offset_id:
        return b"id: %d\ndata: %s\n\n" % (offset, data.encode("ascii"))
    return b"data: %s\n\n" % data.encode("ascii")


def _named(kind: str, value: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(value, separators=(",", ":")).encode("ascii"))
