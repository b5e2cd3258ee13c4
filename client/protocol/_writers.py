"""Events to bytes: one frame per event, with no state checks (the
connection makes those, :mod:`._connection`).

The hot paths skip the event objects: a client's PUBLISH
(:func:`encode_publish`) and the broker's DELIVER / GROUP_DELIVER, whose
header (:func:`deliver_header`) goes in front of one shared batch ``bytes``
so a stored batch serves every subscriber without re-encoding.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._errors import ErrorCode, LocalProtocolError
from ._events import (
    EVENT_TYPES,
    Ack,
    Credit,
    Deliver,
    Error,
    Event,
    GroupDeliver,
    Groups,
    GroupsAction,
    GroupsReply,
    Goodbye,
    Hello,
    Info,
    InfoReply,
    Ping,
    Pong,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    Topics,
    TopicsAction,
    TopicsReply,
    UnsubAck,
    Unsubscribe,
    Welcome,
)
from ._wire import (
    ACK_FIXED,
    CREDIT,
    DELIVER_BODY_FIXED,
    DELIVER_FIXED,
    ERROR_FIXED,
    ERROR_FLAG_FATAL,
    ERROR_FLAG_FIELDS,
    ERROR_MESSAGE_CHARS,
    FRAME_HEADER,
    GROUP_DELIVER_BODY_FIXED,
    GROUP_DELIVER_FIXED,
    INFO_ENTRY,
    INFO_FLAG_AFTER,
    INFO_FLAG_TRUNCATED,
    MAGIC,
    MAX_ACK_RANGES,
    PUBACK,
    PUBLISH_BODY_FIXED,
    PUBLISH_FIXED,
    PUBLISH_FLAG_DEDUP,
    PUBLISH_FLAG_DELAYED,
    PUBLISH_FLAG_NEEDS_RECEIVER,
    RANGE,
    GROUPS_CREATE_START,
    SUBSCRIBE_START,
    U8,
    TOPICS_FIXED,
    U16,
    U32,
    U64,
    FrameType,
)


def _s16(text: str) -> bytes:
    data = text.encode("utf-8")
    _check_str16(data)
    return U16.pack(len(data)) + data


def _str_map(m: Mapping[str, str]) -> bytes:
    return U16.pack(len(m)) + b"".join(_s16(k) + _s16(v) for k, v in m.items())


def _int_map(m: Mapping[str, int]) -> bytes:
    return U16.pack(len(m)) + b"".join(_s16(k) + U64.pack(v) for k, v in m.items())


def frame(ftype: FrameType, body: bytes, flags: int = 0) -> bytes:
    return FRAME_HEADER.pack(len(body), ftype, flags) + body


def _check_str16(data: bytes) -> None:
    if len(data) > 0xFFFF:
        raise LocalProtocolError(ErrorCode.BAD_REQUEST, "string longer than 65535 bytes")


def encode_publish(
    request_id: int,
    topic: str,
    batch: bytes,
    needs_receiver: bool = False,
    dedup: bool = False,
    delayed: bool = False,
) -> bytes:
    """PUBLISH frame; the client's hot path, so it skips the event object."""
    t = topic.encode("utf-8")
    _check_str16(t)
    flags = (
        (PUBLISH_FLAG_NEEDS_RECEIVER if needs_receiver else 0)
        | (PUBLISH_FLAG_DEDUP if dedup else 0)
        | (PUBLISH_FLAG_DELAYED if delayed else 0)
    )
    return b"".join(
        (
            FRAME_HEADER.pack(PUBLISH_BODY_FIXED + len(t) + len(batch), FrameType.PUBLISH, flags),
            PUBLISH_FIXED.pack(request_id),
            U16.pack(len(t)),
            t,
            batch,
        )
    )


def deliver_header(
    sub_id: int, topic_bytes: bytes, base_offset: int, timestamp: int, batch_len: int
) -> bytes:
    """Everything of a DELIVER frame before its batch.

    The broker sends ``deliver_header(...)`` followed by the shared batch
    bytes, so one stored batch serves every subscriber without re-encoding.
    """
    _check_str16(topic_bytes)
    body_len = DELIVER_BODY_FIXED + len(topic_bytes) + batch_len
    return (
        FRAME_HEADER.pack(body_len, FrameType.DELIVER, 0)
        + DELIVER_FIXED.pack(sub_id, base_offset, timestamp)
        + U16.pack(len(topic_bytes))
        + topic_bytes
    )


def group_deliver_header(
    sub_id: int,
    topic_bytes: bytes,
    base_offset: int,
    timestamp: int,
    deliveries: int,
    batch_len: int,
) -> bytes:
    """Everything of a GROUP_DELIVER frame before its batch."""
    _check_str16(topic_bytes)
    body_len = GROUP_DELIVER_BODY_FIXED + len(topic_bytes) + batch_len
    return (
        FRAME_HEADER.pack(body_len, FrameType.GROUP_DELIVER, 0)
        + GROUP_DELIVER_FIXED.pack(sub_id, base_offset, timestamp, min(deliveries, 0xFFFF))
        + U16.pack(len(topic_bytes))
        + topic_bytes
    )


def encode_puback(ack: PubAck) -> bytes:
    return FRAME_HEADER.pack(PUBACK.size, FrameType.PUBACK, 0) + PUBACK.pack(
        ack.request_id, ack.base_offset, ack.count, ack.timestamp, ack.durability
    )


def encode_event(event: Event) -> bytes:
    """Bytes of one frame, without any state checks (see Connection.send)."""
    if isinstance(event, Publish):
        return encode_publish(
            event.request_id, event.topic, event.batch, event.needs_receiver, event.dedup, event.delayed
        )
    if isinstance(event, Deliver):
        t = event.topic.encode("utf-8")
        return (
            deliver_header(event.sub_id, t, event.base_offset, event.timestamp, len(event.batch))
            + event.batch
        )
    if isinstance(event, PubAck):
        return encode_puback(event)
    if isinstance(event, GroupDeliver):
        t = event.topic.encode("utf-8")
        return (
            group_deliver_header(
                event.sub_id, t, event.base_offset, event.timestamp, event.deliveries, len(event.batch)
            )
            + event.batch
        )
    flags = 0
    if isinstance(event, Hello):
        body = MAGIC + U16.pack(event.version) + _s16(event.client_name) + _str_map(event.options)
    elif isinstance(event, Welcome):
        body = (
            U16.pack(event.version)
            + _s16(event.server_version)
            + _s16(event.server_name)
            + _int_map(event.limits)
        )
    elif isinstance(event, Subscribe):
        body = (
            U32.pack(event.sub_id)
            + _s16(event.pattern)
            + SUBSCRIBE_START.pack(event.start, event.start_value, event.credit)
            + _str_map(event.options)
        )
    elif isinstance(event, SubAck):
        body = U32.pack(event.sub_id) + U64.pack(event.timestamp)
    elif isinstance(event, (Unsubscribe, UnsubAck)):
        body = U32.pack(event.sub_id)
    elif isinstance(event, Credit):
        body = CREDIT.pack(event.sub_id, event.messages)
    elif isinstance(event, Ack):
        if len(event.ranges) > MAX_ACK_RANGES:
            raise LocalProtocolError(
                ErrorCode.BAD_REQUEST, f"more than {MAX_ACK_RANGES} ranges in one ACK"
            )
        body = (
            ACK_FIXED.pack(event.sub_id, event.kind, event.delay_ms)
            + _s16(event.topic)
            + U16.pack(len(event.ranges))
            + b"".join(RANGE.pack(first, last) for first, last in event.ranges)
        )
    elif isinstance(event, (Ping, Pong)):
        body = U64.pack(event.nonce)
    elif isinstance(event, Error):
        body = ERROR_FIXED.pack(event.code, event.ref_kind, event.ref) + _s16(
            event.message[:ERROR_MESSAGE_CHARS]
        )
        flags = ERROR_FLAG_FATAL if event.fatal else 0
        if event.fields:
            body += _str_map(event.fields)
            flags |= ERROR_FLAG_FIELDS
    elif isinstance(event, Goodbye):
        body = b""
    elif isinstance(event, Groups):
        body = U64.pack(event.request_id) + U8.pack(event.action) + _s16(event.name)
        if event.action == GroupsAction.CREATE:
            body += (
                _s16(event.pattern)
                + GROUPS_CREATE_START.pack(event.start, event.start_value)
                + _str_map(event.options)
            )
    elif isinstance(event, GroupsReply | TopicsReply):
        doc = event.document.encode("utf-8")
        body = U64.pack(event.request_id) + U32.pack(len(doc)) + doc
    elif isinstance(event, Topics):
        body = TOPICS_FIXED.pack(event.request_id, event.action, event.keep_from) + _s16(event.topic)
        if event.action == TopicsAction.SET or event.action == TopicsAction.CREATE:
            body += _str_map(event.settings)
    elif isinstance(event, Info):
        body = U64.pack(event.request_id) + _s16(event.pattern)
        if event.after:
            body += _s16(event.after)
            flags = INFO_FLAG_AFTER
    elif isinstance(event, InfoReply):
        body = (
            U64.pack(event.request_id)
            + U32.pack(len(event.topics))
            + b"".join(
                _s16(t.topic)
                + INFO_ENTRY.pack(t.first_offset, t.next_offset, t.retained_bytes, t.subscriptions)
                for t in event.topics
            )
        )
        flags = INFO_FLAG_TRUNCATED if event.truncated else 0
    else:  # pragma: no cover - the Event union is closed
        raise TypeError(f"not a frame event: {event!r}")
    return frame(EVENT_TYPES[type(event)], body, flags)

