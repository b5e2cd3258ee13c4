"""The JSON API: health, broker and topic figures, publishing and reading messages.

- ``GET /healthz``: the process answers. ``GET /readyz``: 200 once the
  listeners accept and log recovery is done, 503 before and while stopping.
- ``GET /v1/broker``: version, connections, totals.
- ``GET /v1/topics``, ``GET /v1/topics/{topic}`` (with its subscriptions).
- ``POST /v1/topics/{topic}/messages``: one message
  ``{"payload": "text", "headers": {...}}`` (or ``"payload_base64"``) or
  ``{"messages": [...]}``, or a ``text/plain`` or ``application/octet-stream``
  body as one message (:mod:`.rawbody`), published as one batch through the router, as a
  TCP PUBLISH is; for a topic that needs sync the answer waits for the
  fsync covering it. Answers the offsets and what they promise.
- ``GET /v1/topics/{topic}/messages?from=OFFSET&limit=N``: read from the log.

A publish the log refuses (disk full: 507 ``storage_full``; failing storage:
503 ``storage_error``) stores nothing. A fetch that meets offsets the log
lost (retention, damage, a missing segment) lists them under ``missing``.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from pybroker.protocol import DELIVER_AT_HEADER, MSG_ID_HEADER, NO_OFFSET, MalformedBatch, decode_batch, encode_batch, encode_headers, max_deliver_batch

from .. import __version__
from ..core import Refused
from ..storage import DataLoss, ReadPending
from . import state
from .access import principal, readable, refused, require_admin, require_publish, require_read
from .messages import HttpError, Request, Response, json_response
from .rawbody import raw_message
from .sse import message_json
from .validate import MAX_OFFSET, check_query, existing_topic, parse_int, parse_offset, valid_topic

if TYPE_CHECKING:
    from .server import HttpServer

DEFAULT_FETCH_LIMIT = 100
MAX_FETCH_LIMIT = 1000
#: Bytes of stored batches one fetch reads at most (at least one batch).
MAX_FETCH_BYTES = 1024 * 1024
#: Log reads one fetch makes at most (each returns at least one batch or
#: one lost range, so a log full of holes cannot keep a request busy).
MAX_FETCH_PASSES = 2 * MAX_FETCH_LIMIT
#: Seconds one fetch waits, in all, for older batches a cluster node is
#: fetching from the object store (ReadPending); then it answers with what
#: it has, and ``next_offset`` says where to go on.
PENDING_WAIT = 10.0
_MESSAGE_KEYS = frozenset({"payload", "payload_base64", "headers"})


async def healthz(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    return json_response({"status": "ok"})


async def readyz(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    problem = http.broker.problem
    if http.listener.ready and problem is not None:
        # Up, reading and delivering, but publishes are refused.
        raise HttpError(503, f"degraded: {problem}", code="degraded")
    if http.listener.ready:
        return json_response({"status": "ready"})
    reason = "stopping" if http.stopping else "starting"
    raise HttpError(503, f"not ready: {reason}", code="not_ready")


async def broker_info(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    check_query(request, ())
    require_admin(request)
    broker, listener = http.broker, http.listener
    topics = broker.router.topics.values()
    return json_response(
        {
            "version": __version__,
            "server_name": broker.config.server_name,
            "storage": broker.storage_kind,
            "ready": listener.ready,
            "uptime_seconds": round(time.time() - listener.started_at, 3),
            "tcp": {
                "host": listener.host,
                "port": listener.port,
                "connections": len(listener.sessions),
                "connections_total": listener.connections_total,
            },
            "http": {
                "host": http.host,
                "port": http.port,
                "connections": len(http.connections),
                "connections_total": http.connections_total,
            },
            "topics": len(broker.router.topics),
            # Request/reply inboxes are no topics: a count, never names.
            "inboxes": len(broker.router.inboxes),
            "messages_in": sum(t.messages_in for t in topics),
            "messages_out": sum(t.messages_out for t in topics),
            "publish_acks": {d.name.lower(): n for d, n in broker.acks_by_durability.items()},
            "fsyncs": getattr(broker.store, "fsyncs", 0),
            "clients": state.connections(http),
            "consumer_groups": len(broker.groups.groups),
        }
    )


async def list_topics(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    check_query(request, ())
    router = http.broker.router
    may_read = readable(request)
    topics = [
        state.topic_summary(http, router.topics[name])
        for name in sorted(router.topics)
        if may_read(name)
    ]
    return json_response({"topics": topics})


async def topic_detail(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    check_query(request, ())
    require_read(request, params["topic"])
    topic = existing_topic(http, params["topic"])
    body = state.topic_summary(http, topic)
    body["subscriptions"] = [v.json() for v in state.subscriptions(topic)]
    body["consumer_groups"] = sorted(g.name for g in topic.groups)
    return json_response(body)


async def create_topic(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    """A topic made before its first publish, with ``{"partitions": N}``
    partitions (admin, or a ``manage`` permission); 201 when made, 200 when
    it exists so already."""
    check_query(request, ())
    body = request.json() if request.body else {}
    if not isinstance(body, dict) or set(body) - {"partitions"}:
        raise HttpError(422, 'the body must be {"partitions": N} or empty')
    partitions = body.get("partitions", 1)
    if type(partitions) is not int:
        raise HttpError(422, "partitions must be a whole number")
    try:
        answer = await http.broker.create_topic(principal(request), params["topic"], {"partitions": str(partitions)})
    except Refused as refusal:
        raise refused(refusal) from None
    return json_response(answer, status=201 if answer["created"] else 200)


async def delete_topic(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    """The topic, its messages and files (admin, or a ``manage`` permission)."""
    check_query(request, ())
    try:
        body = await http.broker.delete_topic(principal(request), params["topic"])
    except Refused as refusal:
        raise refused(refusal) from None
    return json_response(body)


async def set_topic(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    """Change retention or segment size while running: a JSON object of
    settings (null lifts a retention limit)."""
    check_query(request, ())
    body = request.json()
    if not isinstance(body, dict) or not body:
        raise HttpError(422, "the body must be a JSON object of settings, e.g. {\"retention_seconds\": 86400}")
    changes = {str(k): "none" if v is None else str(v) for k, v in body.items()}
    try:
        answer = await http.broker.set_topic(principal(request), params["topic"], changes)
    except Refused as refusal:
        raise refused(refusal) from None
    return json_response(answer)


async def purge_messages(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    """The topic's messages before the batch holding ``keep_from`` (all
    without it); offsets go on (admin, or a ``manage`` permission)."""
    check_query(request, ("keep_from",))
    raw = request.query.get("keep_from")
    keep_from = (1 << 64) - 1 if raw is None else parse_int(raw, "keep_from", 0, MAX_OFFSET)
    try:
        body = await http.broker.purge_topic(principal(request), params["topic"], keep_from)
    except Refused as refusal:
        raise refused(refusal) from None
    return json_response(body)


# -- publishing ---------------------------------------------------------------


def _message(item: Any, where: str) -> tuple[bytes, dict[str, str] | None]:
    if not isinstance(item, dict):
        raise HttpError(422, f"{where} must be an object")
    unknown = sorted(set(item) - _MESSAGE_KEYS)
    if unknown:
        raise HttpError(422, f"{where}: unknown field {unknown[0]!r} (known: headers, payload, payload_base64)")
    if ("payload" in item) == ("payload_base64" in item):
        raise HttpError(422, f"{where} needs exactly one of 'payload' (text) and 'payload_base64'")
    if "payload" in item:
        text = item["payload"]
        if not isinstance(text, str):
            raise HttpError(422, f"{where}: 'payload' must be a string (use 'payload_base64' for bytes)")
        try:
            payload = text.encode("utf-8")
        except UnicodeEncodeError:
            raise HttpError(422, f"{where}: 'payload' is not valid Unicode text") from None
    else:
        encoded = item["payload_base64"]
        if not isinstance(encoded, str):
            raise HttpError(422, f"{where}: 'payload_base64' must be a string")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(422, f"{where}: 'payload_base64' is not valid base64") from None
    headers = item.get("headers")
    if headers is None:
        return payload, None
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise HttpError(422, f"{where}: 'headers' must be an object of strings")
    try:
        encode_headers(headers)
    except (ValueError, UnicodeEncodeError) as exc:
        raise HttpError(422, f"{where}: bad headers: {exc}") from None
    return payload, headers


def _parse_publish(body: Any, max_messages: int) -> list[tuple[bytes, dict[str, str] | None]]:
    if not isinstance(body, dict):
        raise HttpError(422, "the body must be a JSON object: one message or {\"messages\": [...]}")
    if "messages" in body:
        if len(body) != 1:
            raise HttpError(422, "with 'messages', the body holds nothing else")
        items = body["messages"]
        if not isinstance(items, list) or not items:
            raise HttpError(422, "'messages' must be a non-empty array")
        if len(items) > max_messages:
            raise HttpError(422, f"{len(items)} messages in one request, limit {max_messages}")
        return [_message(item, f"messages[{i}]") for i, item in enumerate(items)]
    return [_message(body, "the message")]


async def publish_messages(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    broker = http.broker
    check_query(request, ("delay",))
    name = params["topic"]
    delay_ms = None
    if "delay" in request.query:
        # Seconds, as a whole number of milliseconds' worth: "2.5" is 2500 ms.
        text = request.query["delay"].strip()
        try:
            delay_ms = round(float(text) * 1000)
        except (ValueError, OverflowError):  # not a number, nan, inf
            delay_ms = -1
        if not text or delay_ms < 0 or delay_ms > broker.config.max_delay * 1000:
            raise HttpError(400, f"delay must be seconds from 0 to {broker.config.max_delay:g}, got {text!r}")
    # The cheap refusals first, before the body is parsed (400, 403).
    valid_topic(http, name)
    require_publish(request, name)
    raw = raw_message(request)  # text/plain or octet-stream: one message, bytes as sent
    if raw is not None:
        messages, single = [raw], True
    else:
        body = request.json()
        messages = _parse_publish(body, broker.limits.max_batch_messages)
        single = "messages" not in body
    if delay_ms is not None:
        # The same as a deliver-at header on the first message (protocol.md,
        # "Delayed delivery").
        first_payload, first_headers = messages[0]
        due = time.time_ns() // 1_000_000 + delay_ms
        messages[0] = (first_payload, {**(first_headers or {}), DELIVER_AT_HEADER: str(due)})
    batch = encode_batch(messages)
    # A published batch must still fit a subscriber's DELIVER.
    limit = max_deliver_batch(broker.limits.max_frame_bytes, name)
    if len(batch) > limit:
        raise HttpError(413, f"the batch is {len(batch)} bytes, limit {limit}")
    # A msg-id header on the first message makes the request idempotent:
    # sent again within the dedup window, it answers with the same offsets
    # and stores nothing (protocol.md, "Publishing exactly once").
    dedup = MSG_ID_HEADER in (messages[0][1] or {})
    # Likewise a deliver-at header (or ?delay=) schedules the request.
    delayed = DELIVER_AT_HEADER in (messages[0][1] or {})
    try:
        published = broker.publish(principal(request), name, batch, dedup=dedup, delayed=delayed)
        durability = await broker.durable(published)
    except Refused as refusal:
        # A full disk is 507, a failing one 503 (the request may succeed
        # later); either way nothing was stored.
        raise refused(refusal) from None
    broker.acknowledged(durability)
    if published.base == NO_OFFSET:
        return json_response(
            {
                "topic": name,
                "count": published.count,
                "deliver_at_ms": int((messages[0][1] or {})[DELIVER_AT_HEADER]),
                "timestamp_us": published.timestamp,
                "durability": durability.name.lower(),
                "scheduled": True,
            }
        )
    answer: dict[str, Any] = {
        "topic": name,
        "base_offset": published.base,
        "last_offset": published.base + published.count - 1,
        "count": published.count,
        "timestamp_us": published.timestamp,
        "durability": durability.name.lower(),
    }
    if single:
        answer["offset"] = published.base
    return json_response(answer)


# -- reading ------------------------------------------------------------------


async def fetched(pending: ReadPending, deadline: float) -> bool:
    """Wait until the batches ``pending`` names are fetched; False if
    ``deadline`` (trio time) comes first."""
    ready = trio.Event()
    pending.notify(ready.set)
    with trio.move_on_at(deadline):
        await ready.wait()
    return ready.is_set()


async def fetch_messages(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    check_query(request, {"from", "limit"})
    require_read(request, params["topic"])
    topic = existing_topic(http, params["topic"])
    log = topic.log
    limit = DEFAULT_FETCH_LIMIT
    if "limit" in request.query:
        limit = parse_int(request.query["limit"], "limit", 1, MAX_FETCH_LIMIT)
    first = log.first_offset
    start = parse_offset(request.query["from"], "from") if "from" in request.query else first
    offset = max(start, first)
    messages: list[dict[str, Any]] = []
    malformed: list[dict[str, int]] = []
    missing: list[dict[str, Any]] = []
    if start < first and start < topic.visible_next:
        missing.append({"first": start, "last": first - 1, "reason": "retention"})
    read = 0
    payload_bytes = 0
    deadline = trio.current_time() + PENDING_WAIT
    # Bounded: every pass moves ``offset`` forward, waits for a fetch (until
    # the deadline), or stops.
    for _ in range(MAX_FETCH_PASSES):
        if len(messages) >= limit or offset >= topic.visible_next or read >= MAX_FETCH_BYTES:
            break
        try:
            batches = log.read(offset, MAX_FETCH_BYTES - read)
        except ReadPending as pending:
            # Still in the object store (cluster mode): not lost; wait for
            # the node's fetch, or answer with what is read so far.
            if await fetched(pending, deadline):
                continue
            break
        except DataLoss as lost:
            # Damaged or missing in the log: say which offsets, go on after.
            last = min(lost.last, topic.visible_next - 1)
            missing.append({"first": lost.first, "last": last, "reason": lost.reason})
            offset = last + 1
            continue
        if not batches:
            break
        moved = False
        for stored in batches:
            if stored.base_offset >= topic.visible_next or len(messages) >= limit:
                break
            read += len(stored.batch)
            try:
                records = decode_batch(stored.batch)
            except MalformedBatch:
                malformed.append({"offset": stored.base_offset, "count": stored.count})
                offset, moved = stored.next_offset, True
                continue
            for i, (payload, headers) in enumerate(records):
                at = stored.base_offset + i
                if at < offset:
                    continue
                if len(messages) >= limit:
                    break
                messages.append(message_json(topic.name, at, stored.timestamp, payload, headers))
                payload_bytes += len(payload)
                offset, moved = at + 1, True
        if not moved:
            break
    topic.messages_out += len(messages)
    topic.bytes_out += payload_bytes
    body: dict[str, Any] = {
        "topic": topic.name,
        "first_offset": first,
        "next_offset": offset,
        "end_offset": topic.visible_next,
        "messages": messages,
    }
    if malformed:
        body["malformed_batches"] = malformed
    if missing:
        body["missing"] = missing
    return json_response(body)
