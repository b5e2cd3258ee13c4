"""``GET /v1/topics/{topic}/events``: a topic's new messages as Server-Sent Events.

Each stream is a real subscription in the router (it shows in the topic's
subscriptions and its lag in /metrics), whose "session" is an
:class:`SseConsumer`. The router's ``deliver`` only wakes the stream; the
stream then reads forward from the topic's log at its own position, like a
lagging TCP subscriber, so memory per client is bounded by one read
(``READ_BYTES``) however far behind it is, and only what is visible
(durable, for fsync ``always`` topics) is sent.

Events: ``id:`` is the message's offset and ``data:`` one line of JSON
(topic, offset, timestamp, headers, payload or payload_base64). Resuming:
a ``Last-Event-ID`` header (what EventSource sends when it reconnects)
starts after that offset; else ``?from=OFFSET`` starts at OFFSET; else
only messages published from now on are sent. Named events ``lost``
(offsets removed by retention, damaged on disk or missing, with a ``reason``) and ``malformed`` (a
batch whose records do not decode) report gaps; comment lines keep idle
streams alive.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from pybroker.protocol import MalformedBatch, decode_batch

from ..inboxes import is_inbox
from ..storage import DataLoss
from ..router import Subscription, Topic
from ..subscriber import SubscriberInfo
from .access import require_read
from .messages import HttpError, Request, Send, StreamResponse
from .validate import check_query, parse_offset, valid_topic

if TYPE_CHECKING:
    from .server import HttpServer

#: Bytes of log read per step (one step's events are sent before the next read).
READ_BYTES = 256 * 1024
#: ... and at most this many events (small messages expand most as JSON).
MAX_EVENTS = 1000
RETRY_MS = 2000


class SseConsumer:
    """An event stream's :class:`~broker.subscriber.Subscriber`: ``deliver``
    only wakes the stream, which reads the log itself from its position."""

    def __init__(self, conn_id: int, peer: str, client: str) -> None:
        self.conn_id = conn_id
        self.peer = peer
        self.client = client
        #: Next offset to send; None until the topic exists (then its first).
        self.next_offset: int | None = None
        self.sent = 0
        self._wake = trio.Event()

    def deliver(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        batch: bytes,
        count: int,
    ) -> None:
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

    @property
    def accepting(self) -> bool:
        return True

    def position(self, sub: Subscription, topic: Topic) -> int:
        return topic.visible_next if self.next_offset is None else self.next_offset

    def describe(self) -> SubscriberInfo:
        return SubscriberInfo("sse", self.conn_id, self.client, self.peer)


async def events(http: HttpServer, request: Request, params: Mapping[str, str]) -> StreamResponse:
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
    else:
        topic = http.broker.router.topics.get(name)
        if topic is not None:
            start = topic.visible_next  # only what is published from now on
    consumer = SseConsumer(request.conn_id, request.peer, request.header("user-agent") or "")
    consumer.next_offset = start

    async def produce(send: Send) -> None:
        await _stream(http, name, consumer, send)

    return StreamResponse(
        200,
        "text/event-stream; charset=utf-8",
        produce,
        headers={"x-accel-buffering": "no"},
    )


async def _stream(http: HttpServer, name: str, consumer: SseConsumer, send: Send) -> None:
    router = http.broker.router
    sub = Subscription(consumer, consumer.conn_id, name)  # no credit: the socket is its flow control
    router.add(sub)
    try:
        where = "the first" if consumer.next_offset is None else str(consumer.next_offset)
        # Sent at once, so the client sees the stream open before any event.
        await send(f"retry: {RETRY_MS}\n: pybroker events of {name} from offset {where}\n\n".encode())
        keepalive = http.settings.sse_keepalive
        while True:
            # A fresh event before looking, so a delivery between the look and
            # the wait is not missed (no await in between).
            consumer._wake = trio.Event()
            topic = router.topics.get(name)
            if topic is not None:
                if consumer.next_offset is None:
                    consumer.next_offset = topic.log.first_offset
                if consumer.next_offset < topic.visible_next:
                    await send(_read_events(topic, consumer))
                    continue
            with trio.move_on_after(keepalive):
                await consumer._wake.wait()
                continue
            await send(b": keepalive\n\n")
    finally:
        router.remove(sub)


def _read_events(topic: Topic, consumer: SseConsumer) -> bytes:
    """Events for the visible messages from the consumer's position: at most
    one read (``READ_BYTES`` of batches) and ``MAX_EVENTS`` messages."""
    assert consumer.next_offset is not None
    position = consumer.next_offset
    log = topic.log
    out: list[bytes] = []
    first = log.first_offset
    if position < first:
        out.append(_named("lost", {"topic": topic.name, "from": position, "to": first - 1, "reason": "retention"}))
        position = first
    sent = 0
    size = 0
    try:
        batches = log.read(position, READ_BYTES) if position < topic.visible_next else []
    except DataLoss as lost:
        # Damaged or missing in the log: say so, go on after it next send.
        last = min(lost.last, topic.visible_next - 1)
        out.append(_named("lost", {"topic": topic.name, "from": lost.first, "to": last, "reason": lost.reason}))
        batches = []
        position = last + 1
    for stored in batches:
        if stored.base_offset >= topic.visible_next or sent >= MAX_EVENTS:
            break  # appended but not yet durable, or enough for one send
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
            continue
        size += len(stored.batch)
        for i, (payload, headers) in enumerate(records):
            offset = stored.base_offset + i
            if offset < position:
                continue  # resuming inside a batch
            if sent >= MAX_EVENTS:
                break  # the rest of this batch goes in the next send
            out.append(_event(topic.name, offset, stored.timestamp, payload, headers))
            sent += 1
            position = offset + 1
        else:
            position = stored.next_offset
    if position == consumer.next_offset and not out:
        # Nothing readable at this position (cannot happen with a sane log):
        # step over it rather than spin.
        position = topic.visible_next
    consumer.next_offset = position
    consumer.sent += sent
    topic.messages_out += sent
    topic.bytes_out += size
    return b"".join(out)


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
    try:
        value["payload"] = payload.decode("utf-8")
    except UnicodeDecodeError:
        value["payload_base64"] = base64.b64encode(payload).decode("ascii")
    return value


def _event(topic: str, offset: int, timestamp_us: int, payload: bytes, headers: Mapping[str, str]) -> bytes:
    # ensure_ascii: the data line can hold no raw line separator of any kind.
    data = json.dumps(message_json(topic, offset, timestamp_us, payload, headers), separators=(",", ":"))
    return b"id: %d\ndata: %s\n\n" % (offset, data.encode("ascii"))


def _named(kind: str, value: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(value, separators=(",", ":")).encode("ascii"))

