"""Bytes to events: the body decoders, one per frame type, and the helpers
that read a frame in place without a Connection.

Every read past a body's end, every unknown enum value the protocol makes
fatal and every byte left over is RemoteProtocolError(MALFORMED_FRAME).
Values the server refuses without closing (an unknown start kind, ACK kind
or GROUPS action) are carried through as plain ints for it to answer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from ._errors import ErrorCode, RemoteProtocolError
from ._events import (
    Ack,
    AckKind,
    Credit,
    Deliver,
    Durability,
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
    RefKind,
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
)
from ._wire import (
    ACK_FIXED,
    ALLOWED_FLAGS,
    BATCH_HEADER,
    CREDIT,
    DELIVER_FIXED,
    ERROR_FIXED,
    ERROR_FLAG_FATAL,
    ERROR_FLAG_FIELDS,
    FRAME_HEADER,
    GROUP_DELIVER_FIXED,
    HEADER_SIZE,
    INFO_ENTRY,
    INFO_FLAG_AFTER,
    INFO_FLAG_TRUNCATED,
    MAGIC,
    PUBACK,
    PUBLISH_FLAG_DEDUP,
    PUBLISH_FLAG_DELAYED,
    PUBLISH_FLAG_NEEDS_RECEIVER,
    RANGE,
    GROUPS_CREATE_START,
    SUBSCRIBE_START,
    TOPICS_FIXED,
    TYPES_BY_VALUE,
    U8,
    U16,
    U32,
    U64,
    FrameType,
)


class _Body:
    """A cursor over one frame body; every read past the end is malformed."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def _need(self, n: int) -> int:
        start = self.pos
        if start + n > self.end:
            raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "frame body too short")
        self.pos = start + n
        return start

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        return st.unpack_from(self.buf, self._need(st.size))

    def u16(self) -> int:
        value: int = U16.unpack_from(self.buf, self._need(2))[0]
        return value

    def u32(self) -> int:
        value: int = U32.unpack_from(self.buf, self._need(4))[0]
        return value

    def u64(self) -> int:
        value: int = U64.unpack_from(self.buf, self._need(8))[0]
        return value

    def raw(self, n: int) -> bytes:
        start = self._need(n)
        return bytes(self.buf[start : start + n])

    def str16(self) -> str:
        n = self.u16()
        start = self._need(n)
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(
                ErrorCode.MALFORMED_FRAME, "string is not valid UTF-8"
            ) from None

    def str_map(self) -> dict[str, str]:
        return {self.str16(): self.str16() for _ in range(self.u16())}

    def int_map(self) -> dict[str, int]:
        return {self.str16(): self.u64() for _ in range(self.u16())}

    def rest(self) -> bytes:
        start = self.pos
        self.pos = self.end
        return bytes(self.buf[start : self.end])

    def done(self) -> None:
        if self.pos != self.end:
            raise RemoteProtocolError(
                ErrorCode.MALFORMED_FRAME,
                f"{self.end - self.pos} unexpected bytes at the end of the frame",
            )


def _d_hello(b: _Body) -> Hello:
    if b.raw(4) != MAGIC:
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "bad magic in HELLO")
    version = b.u16()
    name = b.str16()
    options = b.str_map()
    return Hello(client_name=name, version=version, options=options)


def _d_welcome(b: _Body) -> Welcome:
    version = b.u16()
    server_version = b.str16()
    server_name = b.str16()
    limits = b.int_map()
    return Welcome(server_version, server_name, limits, version)


def _d_publish(b: _Body, flags: int) -> Publish:
    request_id = b.u64()
    topic = b.str16()
    return Publish(
        request_id,
        topic,
        b.rest(),
        bool(flags & PUBLISH_FLAG_NEEDS_RECEIVER),
        bool(flags & PUBLISH_FLAG_DEDUP),
        bool(flags & PUBLISH_FLAG_DELAYED),
    )


def _d_puback(b: _Body) -> PubAck:
    request_id, base, count, ts, durability = b.unpack(PUBACK)
    try:
        d = Durability(durability)
    except ValueError:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_FRAME, f"unknown durability {durability}"
        ) from None
    return PubAck(request_id, base, count, ts, d)


def _d_subscribe(b: _Body) -> Subscribe:
    sub_id = b.u32()
    pattern = b.str16()
    start, value, credit = b.unpack(SUBSCRIBE_START)
    options = b.str_map()
    # An unknown start kind is a value the server refuses (BAD_REQUEST, not
    # fatal), so it is carried through as a plain int rather than rejected.
    kind: StartKind | int
    try:
        kind = StartKind(start)
    except ValueError:
        kind = start
    return Subscribe(sub_id, pattern, kind, value, credit, options)  # type: ignore[arg-type]


def _d_deliver(b: _Body) -> Deliver:
    sub_id, base, ts = b.unpack(DELIVER_FIXED)
    topic = b.str16()
    return Deliver(sub_id, topic, base, ts, b.rest())


def _d_error(b: _Body, flags: int) -> Error:
    code, ref_kind, ref = b.unpack(ERROR_FIXED)
    try:
        kind = RefKind(ref_kind)
    except ValueError:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_FRAME, f"unknown ref_kind {ref_kind}"
        ) from None
    message = b.str16()
    fields = b.str_map() if flags & ERROR_FLAG_FIELDS else {}
    return Error(code, message, ref, kind, bool(flags & ERROR_FLAG_FATAL), fields)


def _d_ack(b: _Body) -> Ack:
    sub_id, kind, delay = b.unpack(ACK_FIXED)
    topic = b.str16()
    count = b.u16()
    ranges = tuple((first, last) for first, last in (b.unpack(RANGE) for _ in range(count)))
    # An unknown kind, no ranges or a reversed range is a request the server
    # refuses (BAD_REQUEST, not fatal), so the values are carried through.
    ack_kind: AckKind | int
    try:
        ack_kind = AckKind(kind)
    except ValueError:
        ack_kind = kind
    return Ack(sub_id, ack_kind, topic, ranges, delay)  # type: ignore[arg-type]


def _d_group_deliver(b: _Body) -> GroupDeliver:
    sub_id, base, ts, deliveries = b.unpack(GROUP_DELIVER_FIXED)
    topic = b.str16()
    return GroupDeliver(sub_id, topic, base, ts, deliveries, b.rest())


def _d_groups(b: _Body) -> Groups:
    request_id = b.u64()
    action = b.unpack(U8)[0]
    name = b.str16()
    # An unknown action is refused by the server (BAD_REQUEST, not fatal).
    kind: GroupsAction | int
    try:
        kind = GroupsAction(action)
    except ValueError:
        kind = action
    if kind is not GroupsAction.CREATE:
        return Groups(request_id, kind, name)  # type: ignore[arg-type]
    pattern = b.str16()
    start, value = b.unpack(GROUPS_CREATE_START)
    options = b.str_map()
    # An unknown start kind is refused by the server, as in SUBSCRIBE.
    start_kind: StartKind | int
    try:
        start_kind = StartKind(start)
    except ValueError:
        start_kind = start
    return Groups(request_id, kind, name, pattern, start_kind, value, options)  # type: ignore[arg-type]


def _document(b: _Body) -> str:
    size = b.u32()
    start = b._need(size)
    try:
        return str(b.buf[start : start + size], "utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "document is not UTF-8") from None


def _d_groups_reply(b: _Body) -> GroupsReply:
    request_id = b.u64()
    return GroupsReply(request_id, _document(b))


def _d_topics(b: _Body) -> Topics:
    request_id, action, keep_from = b.unpack(TOPICS_FIXED)
    topic = b.str16()
    # An unknown action is refused by the server (BAD_REQUEST, not fatal).
    kind: TopicsAction | int
    try:
        kind = TopicsAction(action)
    except ValueError:
        kind = action
    if kind is TopicsAction.SET or kind is TopicsAction.CREATE:
        return Topics(request_id, kind, topic, keep_from, b.str_map())
    return Topics(request_id, kind, topic, keep_from)  # type: ignore[arg-type]


def _d_topics_reply(b: _Body) -> TopicsReply:
    request_id = b.u64()
    return TopicsReply(request_id, _document(b))


def _d_info_reply(b: _Body, flags: int) -> InfoReply:
    request_id = b.u64()
    count = b.u32()
    entries = []
    for _ in range(count):
        topic = b.str16()
        first, nxt, size, subs = b.unpack(INFO_ENTRY)
        entries.append(TopicInfo(topic, first, nxt, size, subs))
    return InfoReply(request_id, tuple(entries), bool(flags & INFO_FLAG_TRUNCATED))


def _d_info(b: _Body, flags: int) -> Info:
    request_id, pattern = b.u64(), b.str16()
    if not flags & INFO_FLAG_AFTER:
        return Info(request_id, pattern)
    after = b.str16()
    if not after:
        # One encoding per meaning: "from the first" is the flag unset.
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "INFO flag AFTER with an empty name")
    return Info(request_id, pattern, after)


_DECODERS: dict[FrameType, Callable[[_Body], Event]] = {
    FrameType.HELLO: _d_hello,
    FrameType.WELCOME: _d_welcome,
    FrameType.PUBACK: _d_puback,
    FrameType.SUBSCRIBE: _d_subscribe,
    FrameType.SUBACK: lambda b: SubAck(b.u32(), b.u64()),
    FrameType.UNSUBSCRIBE: lambda b: Unsubscribe(b.u32()),
    FrameType.UNSUBACK: lambda b: UnsubAck(b.u32()),
    FrameType.CREDIT: lambda b: Credit(*b.unpack(CREDIT)),
    FrameType.DELIVER: _d_deliver,
    FrameType.GROUP_DELIVER: _d_group_deliver,
    FrameType.ACK: _d_ack,
    FrameType.PING: lambda b: Ping(b.u64()),
    FrameType.PONG: lambda b: Pong(b.u64()),
    FrameType.GOODBYE: lambda b: Goodbye(),
    FrameType.GROUPS: _d_groups,
    FrameType.GROUPS_REPLY: _d_groups_reply,
    FrameType.TOPICS: _d_topics,
    FrameType.TOPICS_REPLY: _d_topics_reply,
}


def decode_body(ftype: FrameType, flags: int, body: bytes | memoryview) -> Event:
    """Decode one frame body; raises RemoteProtocolError if it is malformed."""
    allowed_flags = ALLOWED_FLAGS.get(ftype, 0)
    if flags & ~allowed_flags:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_FRAME, f"reserved flags {flags:#04x} set on {ftype.name}"
        )
    cursor = _Body(body, 0, len(body))
    if ftype is FrameType.ERROR:
        event: Event = _d_error(cursor, flags)
    elif ftype is FrameType.INFO_REPLY:
        event = _d_info_reply(cursor, flags)
    elif ftype is FrameType.INFO:
        event = _d_info(cursor, flags)
    elif ftype is FrameType.PUBLISH:
        event = _d_publish(cursor, flags)
    else:
        event = _DECODERS[ftype](cursor)
    cursor.done()
    return event


# --------------------------------------------------------------------------
# Reading frames in place: for a peer that counts rather than decodes (the
# bench's raw subscribers), walking frames in its own buffer and skipping
# batches it never looks into. No state checks: a Connection does those.


class DeliverHead(NamedTuple):
    """What a DELIVER frame says before its batch's records."""

    sub_id: int
    base_offset: int
    timestamp: int
    #: Messages in the batch (its count field; the records are not read).
    messages: int
    #: Index just past the frame in the buffer it was read from.
    end: int


# A DELIVER up to its topic: frame header, fixed fields, topic length, in
# one unpack (the raw subscribers call deliver_at once per frame).
_DELIVER_PREFIX = struct.Struct(">" + FRAME_HEADER.format[1:] + DELIVER_FIXED.format[1:] + "H")
_DELIVER = int(FrameType.DELIVER)
_new_tuple = tuple.__new__


def frame_at(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int, int] | None:
    """The header of the frame starting at ``buf[pos]``: ``(type, flags, end)``.

    ``end`` is the index just past the frame's body, beyond ``len(buf)``
    while the body is still arriving. ``type`` is the raw byte (unknown ones
    are the caller's to refuse). None while the header itself is incomplete.
    """
    if len(buf) - pos < HEADER_SIZE:
        return None
    size, ftype, flags = FRAME_HEADER.unpack_from(buf, pos)
    return ftype, flags, pos + HEADER_SIZE + size


def deliver_at(buf: bytes | bytearray | memoryview, pos: int = 0) -> DeliverHead | None:
    """The DELIVER frame starting at ``buf[pos]``, read up to its batch's
    count and no further: None while those bytes have not all arrived.

    Raises RemoteProtocolError(MALFORMED_FRAME) when the frame there is not
    a DELIVER or its topic leaves no room for a batch header.
    """
    avail = len(buf) - pos
    if avail < _DELIVER_PREFIX.size:
        return None
    size, ftype, _flags, sub_id, base, timestamp, topic_len = _DELIVER_PREFIX.unpack_from(buf, pos)
    if ftype != _DELIVER:
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, f"frame type {ftype:#04x} is not DELIVER")
    batch_at = _DELIVER_PREFIX.size + topic_len
    if batch_at + BATCH_HEADER.size > HEADER_SIZE + size:
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "DELIVER too short for its batch")
    if avail < batch_at + U32.size:
        return None
    count: int = U32.unpack_from(buf, pos + batch_at)[0]
    # tuple.__new__ skips the NamedTuple's Python-level __new__: half the
    # cost, once per frame.
    return _new_tuple(DeliverHead, (sub_id, base, timestamp, count, pos + HEADER_SIZE + size))


# A PUBLISH up to its topic: frame header, request_id, topic length, in one
# unpack (the broker reads every PUBLISH of a socket read with _publishes_at).
_PUBLISH_PREFIX = struct.Struct(">" + FRAME_HEADER.format[1:] + "QH")
_PUBLISH = int(FrameType.PUBLISH)
_PUBLISH_FLAGS = ALLOWED_FLAGS[FrameType.PUBLISH]
#: request_id and topic length: the least a PUBLISH body holds.
_PUBLISH_FIXED = _PUBLISH_PREFIX.size - HEADER_SIZE


def _publishes_at(
    buf: bytes | bytearray,
    pos: int,
    max_frame_bytes: int,
    limit: int,
    out: list[tuple[int, str, bytes, int]],
) -> int:
    """Decode the complete PUBLISH frames from ``buf[pos]`` on, at most
    ``limit`` of them, into ``out`` as ``(request_id, topic, batch, flags)``;
    return the index just past the last one.

    What ``decode_body`` makes of each such frame (a Publish with these
    fields), without an event object or a cursor per frame: one unpack for
    the header, the request id and the topic's length. It stops, leaving
    the frame for the full decoder (which raises the error it is), at
    anything else: another frame type, a frame not yet complete, one over
    ``max_frame_bytes``, reserved flags, a body too short for its topic, a
    topic that is not UTF-8. No state checks: the Connection makes those.
    """
    end_of_data = len(buf)
    unpack = _PUBLISH_PREFIX.unpack_from
    prefix = _PUBLISH_PREFIX.size
    view = None if type(buf) is bytes else memoryview(buf)
    try:
        while limit > 0 and end_of_data - pos >= prefix:
            size, ftype, flags, request_id, topic_len = unpack(buf, pos)
            end = pos + HEADER_SIZE + size
            if (
                ftype != _PUBLISH
                or size > max_frame_bytes
                or end > end_of_data
                or flags & ~_PUBLISH_FLAGS
                or _PUBLISH_FIXED + topic_len > size
            ):
                break
            start = pos + prefix
            batch_at = start + topic_len
            try:
                topic = str(buf[start:batch_at], "utf-8")
            except UnicodeDecodeError:
                break
            # bytes(b) of a bytes object is that object: one copy either way.
            batch = bytes(buf[batch_at:end] if view is None else view[batch_at:end])
            out.append((request_id, topic, batch, flags))
            pos = end
            limit -= 1
    finally:
        if view is not None:
            view.release()
    return pos


def decode_frame(buf: bytes | bytearray | memoryview, pos: int = 0) -> Event:
    """Decode the whole frame starting at ``buf[pos]`` (see :func:`frame_at`
    for where it ends); RemoteProtocolError if it is malformed, unknown or
    incomplete."""
    head = frame_at(buf, pos)
    if head is None or head[2] > len(buf):
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "incomplete frame")
    type_value, flags, end = head
    ftype = TYPES_BY_VALUE.get(type_value)
    if ftype is None:
        raise RemoteProtocolError(
            ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {type_value:#04x}"
        )
    with memoryview(buf) as view:
        with view[pos + HEADER_SIZE : end] as body:
            return decode_body(ftype, flags, body)
