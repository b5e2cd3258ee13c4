"""The sans-I/O codec: bytes in, events out; events in, bytes out.

Modelled on h11: :class:`Connection` holds a receive buffer and the handshake
state of both sides, does no I/O, and knows nothing of Trio. The broker and the
client use this one module.

Rules of the state machine (protocol.md, "Handshake", "GOODBYE"):

- Both sides start in AWAIT_HELLO. The client may send only HELLO; the server
  may send only a fatal ERROR (to refuse a connection that never says hello).
- After HELLO: AWAIT_WELCOME. The server may send WELCOME or ERROR; the
  client sends nothing.
- After WELCOME: OPEN. Each side may send the frames of its direction
  (``_SENDS`` below).
- A side that has sent GOODBYE or a fatal ERROR sends nothing more; frames
  received from such a side are UNEXPECTED_FRAME.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .frames import (
    ERROR_FLAG_FATAL,
    ERROR_FLAG_FIELDS,
    INFO_FLAG_TRUNCATED,
    MAX_ACK_RANGES,
    PUBLISH_FLAG_NEEDS_RECEIVER,
    Ack,
    AckKind,
    GroupDeliver,
    Credit,
    Groups,
    GroupsAction,
    GroupsReply,
    Info,
    InfoReply,
    TopicInfo,
    RefKind,
    EVENT_TYPES,
    MAGIC,
    PROTOCOL_VERSION,
    Deliver,
    Durability,
    Error,
    Event,
    FrameType,
    Goodbye,
    Hello,
    Ping,
    Pong,
    PubAck,
    Publish,
    StartKind,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
)

FRAME_HEADER = struct.Struct(">IBB")  # body size, type, flags
HEADER_SIZE = FRAME_HEADER.size
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024
#: Senders cut ERROR messages to this many characters (protocol.md).
ERROR_MESSAGE_CHARS = 1000

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PUBACK = struct.Struct(">QQIQB")
_DELIVER_FIXED = struct.Struct(">IQQ")
_SUBSCRIBE_START = struct.Struct(">BQI")  # start, start_value, credit
_CREDIT = struct.Struct(">II")
_INFO_ENTRY = struct.Struct(">QQQI")  # first, next, retained bytes, subscriptions
_ACK_FIXED = struct.Struct(">IBI")  # sub_id, kind, delay_ms
_RANGE = struct.Struct(">QQ")
_GROUP_DELIVER_FIXED = struct.Struct(">IQQH")  # sub_id, base, timestamp, deliveries
_ERROR_FIXED = struct.Struct(">HBQ")  # code, ref_kind, ref


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_WELCOME = "await-welcome"
    OPEN = "open"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_event`` answers this when no complete frame is buffered yet.
NEED_DATA = _Sentinel("NEED_DATA")
#: ``next_event`` answers this once the peer closed its end (EOF) cleanly.
CLOSED = _Sentinel("CLOSED")

_CLIENT_SENDS = frozenset(
    {
        FrameType.PUBLISH,
        FrameType.SUBSCRIBE,
        FrameType.UNSUBSCRIBE,
        FrameType.CREDIT,
        FrameType.ACK,
        FrameType.INFO,
        FrameType.GROUPS,
        FrameType.PING,
        FrameType.PONG,
        FrameType.ERROR,
        FrameType.GOODBYE,
    }
)
_SERVER_SENDS = frozenset(
    {
        FrameType.PUBACK,
        FrameType.SUBACK,
        FrameType.UNSUBACK,
        FrameType.DELIVER,
        FrameType.GROUP_DELIVER,
        FrameType.INFO_REPLY,
        FrameType.GROUPS_REPLY,
        FrameType.PING,
        FrameType.PONG,
        FrameType.ERROR,
        FrameType.GOODBYE,
    }
)

# (sender, state) -> frame types the sender may send in that state.
_SENDS: dict[tuple[Role, State], frozenset[FrameType]] = {
    (Role.CLIENT, State.AWAIT_HELLO): frozenset({FrameType.HELLO}),
    (Role.SERVER, State.AWAIT_HELLO): frozenset({FrameType.ERROR}),
    (Role.CLIENT, State.AWAIT_WELCOME): frozenset(),
    (Role.SERVER, State.AWAIT_WELCOME): frozenset({FrameType.WELCOME, FrameType.ERROR}),
    (Role.CLIENT, State.OPEN): _CLIENT_SENDS,
    (Role.SERVER, State.OPEN): _SERVER_SENDS,
}

# Frame types that move the shared handshake state forward.
_ADVANCES: dict[FrameType, tuple[State, State]] = {
    FrameType.HELLO: (State.AWAIT_HELLO, State.AWAIT_WELCOME),
    FrameType.WELCOME: (State.AWAIT_WELCOME, State.OPEN),
}


# --------------------------------------------------------------------------
# Body decoding


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
        value: int = _U16.unpack_from(self.buf, self._need(2))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack_from(self.buf, self._need(4))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack_from(self.buf, self._need(8))[0]
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
    return Publish(request_id, topic, b.rest(), bool(flags & PUBLISH_FLAG_NEEDS_RECEIVER))


def _d_puback(b: _Body) -> PubAck:
    request_id, base, count, ts, durability = b.unpack(_PUBACK)
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
    start, value, credit = b.unpack(_SUBSCRIBE_START)
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
    sub_id, base, ts = b.unpack(_DELIVER_FIXED)
    topic = b.str16()
    return Deliver(sub_id, topic, base, ts, b.rest())


def _d_error(b: _Body, flags: int) -> Error:
    code, ref_kind, ref = b.unpack(_ERROR_FIXED)
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
    sub_id, kind, delay = b.unpack(_ACK_FIXED)
    topic = b.str16()
    count = b.u16()
    ranges = tuple((first, last) for first, last in (b.unpack(_RANGE) for _ in range(count)))
    # An unknown kind, no ranges or a reversed range is a request the server
    # refuses (BAD_REQUEST, not fatal), so the values are carried through.
    ack_kind: AckKind | int
    try:
        ack_kind = AckKind(kind)
    except ValueError:
        ack_kind = kind
    return Ack(sub_id, ack_kind, topic, ranges, delay)  # type: ignore[arg-type]


def _d_group_deliver(b: _Body) -> GroupDeliver:
    sub_id, base, ts, deliveries = b.unpack(_GROUP_DELIVER_FIXED)
    topic = b.str16()
    return GroupDeliver(sub_id, topic, base, ts, deliveries, b.rest())


def _d_groups(b: _Body) -> Groups:
    request_id = b.u64()
    action = b.unpack(_U8)[0]
    name = b.str16()
    # An unknown action is refused by the server (BAD_REQUEST, not fatal).
    kind: GroupsAction | int
    try:
        kind = GroupsAction(action)
    except ValueError:
        kind = action
    return Groups(request_id, kind, name)  # type: ignore[arg-type]


def _d_groups_reply(b: _Body) -> GroupsReply:
    request_id = b.u64()
    size = b.u32()
    start = b._need(size)
    try:
        document = str(b.buf[start : start + size], "utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "document is not UTF-8") from None
    return GroupsReply(request_id, document)


def _d_info_reply(b: _Body, flags: int) -> InfoReply:
    request_id = b.u64()
    count = b.u32()
    entries = []
    for _ in range(count):
        topic = b.str16()
        first, nxt, size, subs = b.unpack(_INFO_ENTRY)
        entries.append(TopicInfo(topic, first, nxt, size, subs))
    return InfoReply(request_id, tuple(entries), bool(flags & INFO_FLAG_TRUNCATED))


_DECODERS: dict[FrameType, Callable[[_Body], Event]] = {
    FrameType.HELLO: _d_hello,
    FrameType.WELCOME: _d_welcome,
    FrameType.PUBACK: _d_puback,
    FrameType.SUBSCRIBE: _d_subscribe,
    FrameType.SUBACK: lambda b: SubAck(b.u32(), b.u64()),
    FrameType.UNSUBSCRIBE: lambda b: Unsubscribe(b.u32()),
    FrameType.UNSUBACK: lambda b: UnsubAck(b.u32()),
    FrameType.CREDIT: lambda b: Credit(*b.unpack(_CREDIT)),
    FrameType.DELIVER: _d_deliver,
    FrameType.GROUP_DELIVER: _d_group_deliver,
    FrameType.ACK: _d_ack,
    FrameType.PING: lambda b: Ping(b.u64()),
    FrameType.PONG: lambda b: Pong(b.u64()),
    FrameType.GOODBYE: lambda b: Goodbye(),
    FrameType.INFO: lambda b: Info(b.u64(), b.str16()),
    FrameType.GROUPS: _d_groups,
    FrameType.GROUPS_REPLY: _d_groups_reply,
}

_TYPES_BY_VALUE = {int(t): t for t in FrameType}
# Flag bits defined per frame type; all others must be 0.
_FLAGS = {
    FrameType.ERROR: ERROR_FLAG_FATAL | ERROR_FLAG_FIELDS,
    FrameType.INFO_REPLY: INFO_FLAG_TRUNCATED,
    FrameType.PUBLISH: PUBLISH_FLAG_NEEDS_RECEIVER,
}


def decode_body(ftype: FrameType, flags: int, body: bytes | memoryview) -> Event:
    """Decode one frame body; raises RemoteProtocolError if it is malformed."""
    allowed_flags = _FLAGS.get(ftype, 0)
    if flags & ~allowed_flags:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_FRAME, f"reserved flags {flags:#04x} set on {ftype.name}"
        )
    cursor = _Body(body, 0, len(body))
    if ftype is FrameType.ERROR:
        event: Event = _d_error(cursor, flags)
    elif ftype is FrameType.INFO_REPLY:
        event = _d_info_reply(cursor, flags)
    elif ftype is FrameType.PUBLISH:
        event = _d_publish(cursor, flags)
    else:
        event = _DECODERS[ftype](cursor)
    cursor.done()
    return event


# --------------------------------------------------------------------------
# Encoding


def _s16(text: str) -> bytes:
    data = text.encode("utf-8")
    _check_str16(data)
    return _U16.pack(len(data)) + data


def _str_map(m: Mapping[str, str]) -> bytes:
    return _U16.pack(len(m)) + b"".join(_s16(k) + _s16(v) for k, v in m.items())


def _int_map(m: Mapping[str, int]) -> bytes:
    return _U16.pack(len(m)) + b"".join(_s16(k) + _U64.pack(v) for k, v in m.items())


def frame(ftype: FrameType, body: bytes, flags: int = 0) -> bytes:
    return FRAME_HEADER.pack(len(body), ftype, flags) + body


def _check_str16(data: bytes) -> None:
    if len(data) > 0xFFFF:
        raise LocalProtocolError(ErrorCode.BAD_REQUEST, "string longer than 65535 bytes")


def encode_publish(
    request_id: int, topic: str, batch: bytes, needs_receiver: bool = False
) -> bytes:
    """PUBLISH frame; the client's hot path, so it skips the event object."""
    t = topic.encode("utf-8")
    _check_str16(t)
    flags = PUBLISH_FLAG_NEEDS_RECEIVER if needs_receiver else 0
    return b"".join(
        (
            FRAME_HEADER.pack(8 + 2 + len(t) + len(batch), FrameType.PUBLISH, flags),
            _U64.pack(request_id),
            _U16.pack(len(t)),
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
    body_len = _DELIVER_FIXED.size + 2 + len(topic_bytes) + batch_len
    return (
        FRAME_HEADER.pack(body_len, FrameType.DELIVER, 0)
        + _DELIVER_FIXED.pack(sub_id, base_offset, timestamp)
        + _U16.pack(len(topic_bytes))
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
    body_len = _GROUP_DELIVER_FIXED.size + 2 + len(topic_bytes) + batch_len
    return (
        FRAME_HEADER.pack(body_len, FrameType.GROUP_DELIVER, 0)
        + _GROUP_DELIVER_FIXED.pack(sub_id, base_offset, timestamp, min(deliveries, 0xFFFF))
        + _U16.pack(len(topic_bytes))
        + topic_bytes
    )


def encode_puback(ack: PubAck) -> bytes:
    return FRAME_HEADER.pack(_PUBACK.size, FrameType.PUBACK, 0) + _PUBACK.pack(
        ack.request_id, ack.base_offset, ack.count, ack.timestamp, ack.durability
    )


def encode_event(event: Event) -> bytes:
    """Bytes of one frame, without any state checks (see Connection.send)."""
    if isinstance(event, Publish):
        return encode_publish(event.request_id, event.topic, event.batch, event.needs_receiver)
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
        body = MAGIC + _U16.pack(event.version) + _s16(event.client_name) + _str_map(event.options)
    elif isinstance(event, Welcome):
        body = (
            _U16.pack(event.version)
            + _s16(event.server_version)
            + _s16(event.server_name)
            + _int_map(event.limits)
        )
    elif isinstance(event, Subscribe):
        body = (
            _U32.pack(event.sub_id)
            + _s16(event.pattern)
            + _SUBSCRIBE_START.pack(event.start, event.start_value, event.credit)
            + _str_map(event.options)
        )
    elif isinstance(event, SubAck):
        body = _U32.pack(event.sub_id) + _U64.pack(event.timestamp)
    elif isinstance(event, (Unsubscribe, UnsubAck)):
        body = _U32.pack(event.sub_id)
    elif isinstance(event, Credit):
        body = _CREDIT.pack(event.sub_id, event.messages)
    elif isinstance(event, Ack):
        if len(event.ranges) > MAX_ACK_RANGES:
            raise LocalProtocolError(
                ErrorCode.BAD_REQUEST, f"more than {MAX_ACK_RANGES} ranges in one ACK"
            )
        body = (
            _ACK_FIXED.pack(event.sub_id, event.kind, event.delay_ms)
            + _s16(event.topic)
            + _U16.pack(len(event.ranges))
            + b"".join(_RANGE.pack(first, last) for first, last in event.ranges)
        )
    elif isinstance(event, (Ping, Pong)):
        body = _U64.pack(event.nonce)
    elif isinstance(event, Error):
        body = _ERROR_FIXED.pack(event.code, event.ref_kind, event.ref) + _s16(
            event.message[:ERROR_MESSAGE_CHARS]
        )
        flags = ERROR_FLAG_FATAL if event.fatal else 0
        if event.fields:
            body += _str_map(event.fields)
            flags |= ERROR_FLAG_FIELDS
    elif isinstance(event, Goodbye):
        body = b""
    elif isinstance(event, Groups):
        body = _U64.pack(event.request_id) + _U8.pack(event.action) + _s16(event.name)
    elif isinstance(event, GroupsReply):
        doc = event.document.encode("utf-8")
        body = _U64.pack(event.request_id) + _U32.pack(len(doc)) + doc
    elif isinstance(event, Info):
        body = _U64.pack(event.request_id) + _s16(event.pattern)
    elif isinstance(event, InfoReply):
        body = (
            _U64.pack(event.request_id)
            + _U32.pack(len(event.topics))
            + b"".join(
                _s16(t.topic)
                + _INFO_ENTRY.pack(t.first_offset, t.next_offset, t.retained_bytes, t.subscriptions)
                for t in event.topics
            )
        )
        flags = INFO_FLAG_TRUNCATED if event.truncated else 0
    else:  # pragma: no cover - the Event union is closed
        raise TypeError(f"not a frame event: {event!r}")
    return frame(EVENT_TYPES[type(event)], body, flags)


# --------------------------------------------------------------------------
# The connection state machine


class Connection:
    """One side of a pybroker connection, with no I/O.

    ``receive_data(bytes)`` buffers what arrived (``b""`` means end of
    stream); ``next_event()`` returns the next complete event, ``NEED_DATA``
    or ``CLOSED``; ``send(event)`` checks the event is legal now and returns
    its bytes. Protocol violations raise RemoteProtocolError (the peer's fault)
    or LocalProtocolError (ours), each with the code for the ERROR frame.
    """

    def __init__(self, role: Role, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.our_role = role
        self.their_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        #: The largest body we accept; a client raises it to whatever the
        #: server announces once WELCOME arrives, if it likes.
        self.max_frame_bytes = max_frame_bytes
        self.state = State.AWAIT_HELLO
        self.we_finished = False  # we sent GOODBYE or a fatal ERROR
        self.they_finished = False  # they did
        self.peer_hello: Hello | None = None
        self.peer_welcome: Welcome | None = None
        # The receive buffer: bytes received and not yet decoded start at
        # _pos. Between reads it holds the incomplete frame alone (see
        # _keep_incomplete), so a large frame's memory goes once it is
        # decoded, not at the next read.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._eof = False
        self._broken: RemoteProtocolError | None = None

    # -- receiving --------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof and data:
            raise RuntimeError("received data after end of stream")
        if not data:
            self._eof = True
            return
        buf = self._buf
        if self._pos == len(buf):
            # Nothing pending, the usual case: decode from the caller's
            # bytes as they are, without copying them.
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        if type(buf) is not bytearray or self._pos:
            # A frame in progress: gather it in a bytearray of its own, so
            # appending stays linear and no decoded bytes are kept with it.
            with memoryview(buf) as view:
                buf = bytearray(view[self._pos :])
            self._pos = 0
        buf += data
        self._buf = buf

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf) - self._pos

    @property
    def frame_remaining(self) -> int:
        """Bytes still to arrive before the first buffered frame is whole.

        0 when nothing is buffered or a whole frame is; while the header
        itself is incomplete, what the header lacks. (The broker sizes its
        reads by it: broker/framebudget.py.)
        """
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            return HEADER_SIZE - avail if avail else 0
        size: int = _U32.unpack_from(buf, pos)[0]
        return max(0, HEADER_SIZE + size - avail)

    def discard_received(self) -> int:
        """Drop every byte received and not yet decoded; return how many.

        For an owner that stops reading (its connection is ending): a
        half-sent frame's memory is freed now, not whenever this object is
        collected.
        """
        dropped = len(self._buf) - self._pos
        self._buf = b""
        self._pos = 0
        return dropped

    def _keep_incomplete(self) -> None:
        """Drop the decoded bytes in front of an incomplete frame (or all
        of them): what stays buffered between reads is that frame alone."""
        buf, pos = self._buf, self._pos
        if pos == len(buf):
            self._buf = b""
        else:
            with memoryview(buf) as view:
                self._buf = bytearray(view[pos:])
        self._pos = 0

    def next_event(self) -> Event | _Sentinel:
        if self._broken is not None:
            raise self._broken.with_traceback(None)
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            # A broken stream stays broken: the framing is lost.
            self._broken = exc
            raise

    def _next_event(self) -> Event | _Sentinel:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            if self._eof:
                if avail:
                    raise RemoteProtocolError(
                        ErrorCode.MALFORMED_FRAME, "stream ended inside a frame header"
                    )
                return CLOSED
            if pos:
                self._keep_incomplete()
            return NEED_DATA
        size, type_value, flags = FRAME_HEADER.unpack_from(buf, pos)
        ftype = _TYPES_BY_VALUE.get(type_value)
        if ftype is None:
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {type_value:#04x}"
            )
        if size > self.max_frame_bytes:
            raise RemoteProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"{ftype.name} frame of {size} bytes, limit {self.max_frame_bytes}",
            )
        self._check_receive(ftype)
        if avail < HEADER_SIZE + size:
            if self._eof:
                raise RemoteProtocolError(
                    ErrorCode.MALFORMED_FRAME, f"stream ended inside a {ftype.name} frame"
                )
            if pos:
                self._keep_incomplete()
            return NEED_DATA
        start = pos + HEADER_SIZE
        end = start + size
        self._pos = end
        view = memoryview(buf)
        body = view[start:end]
        try:
            event = decode_body(ftype, flags, body)
        finally:
            # Release both exports even when decoding raised: a traceback
            # holding the slice would otherwise pin the buffer (BufferError
            # on the next receive_data).
            body.release()
            view.release()
        self._after(ftype, event, sender=self.their_role)
        return event

    def events(self) -> list[Event]:
        """Every complete event buffered now (the session's per-read batch)."""
        out: list[Event] = []
        while True:
            event = self.next_event()
            if isinstance(event, _Sentinel):
                return out
            out.append(event)

    def _check_receive(self, ftype: FrameType) -> None:
        if self.they_finished:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_FRAME, f"{ftype.name} after the peer finished"
            )
        if ftype in _SENDS[(self.their_role, self.state)]:
            return
        if self.our_role is Role.SERVER and self.state is State.AWAIT_HELLO:
            raise RemoteProtocolError(
                ErrorCode.HANDSHAKE_REQUIRED, f"{ftype.name} before HELLO"
            )
        raise RemoteProtocolError(
            ErrorCode.UNEXPECTED_FRAME,
            f"{ftype.name} from the {self.their_role.value} in state {self.state.value}",
        )

    def _after(self, ftype: FrameType, event: Event, sender: Role) -> None:
        advance = _ADVANCES.get(ftype)
        if advance is not None and self.state is advance[0]:
            self.state = advance[1]
            if isinstance(event, Hello) and sender is self.their_role:
                self.peer_hello = event
                if event.version != PROTOCOL_VERSION:
                    raise RemoteProtocolError(
                        ErrorCode.UNSUPPORTED_VERSION,
                        f"protocol version {event.version}, this side speaks {PROTOCOL_VERSION}",
                    )
            elif isinstance(event, Welcome) and sender is self.their_role:
                self.peer_welcome = event
                if event.version != PROTOCOL_VERSION:
                    raise RemoteProtocolError(
                        ErrorCode.UNSUPPORTED_VERSION,
                        f"server chose protocol version {event.version}, "
                        f"this side speaks {PROTOCOL_VERSION}",
                    )
        finished = isinstance(event, Goodbye) or (isinstance(event, Error) and event.fatal)
        if finished:
            if sender is self.our_role:
                self.we_finished = True
            else:
                self.they_finished = True

    # -- sending ----------------------------------------------------------

    def send(self, event: Event) -> bytes:
        ftype = EVENT_TYPES[type(event)]
        if self.we_finished:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_FRAME, f"cannot send {ftype.name} after finishing"
            )
        if ftype not in _SENDS[(self.our_role, self.state)]:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_FRAME,
                f"{self.our_role.value} may not send {ftype.name} in state {self.state.value}",
            )
        try:
            data = encode_event(event)
        except (struct.error, UnicodeEncodeError, ValueError) as exc:
            # Out-of-range integers, unencodable strings: our bug, not a frame.
            raise LocalProtocolError(
                ErrorCode.BAD_REQUEST, f"cannot encode {ftype.name}: {exc}"
            ) from exc
        self._after(ftype, event, sender=self.our_role)
        return data

    def send_failed(self) -> None:
        """Tell the codec the transport is gone: nothing more may be sent."""
        self.we_finished = True
