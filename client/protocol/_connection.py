"""The sans-I/O connection: bytes in, events out; events in, bytes out.

Modelled on h11: :class:`Connection` holds a receive buffer and the handshake
state of both sides, does no I/O, and knows nothing of Trio. The broker and
the client use this one class. It applies the transition tables of
:mod:`._state`, decodes with :mod:`._readers` and encodes with
:mod:`._writers`.
"""

from __future__ import annotations

import struct

from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._events import EVENT_TYPES, Error, Event, Goodbye, Hello, Welcome
from ._readers import decode_body, _publishes_at
from ._state import ADVANCES, SENDS, Role, State
from ._wire import (
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_HEADER,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    TYPES_BY_VALUE,
    U32,
    FrameType,
)
from ._writers import encode_event


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_event`` answers this when no complete frame is buffered yet.
NEED_DATA = _Sentinel("NEED_DATA")
#: ``next_event`` answers this once the peer closed its end (EOF) cleanly.
CLOSED = _Sentinel("CLOSED")


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
        size: int = U32.unpack_from(buf, pos)[0]
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
        ftype = TYPES_BY_VALUE.get(type_value)
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

    def next_publishes(self, limit: int) -> list[tuple[int, str, bytes, int]]:
        """The complete PUBLISH frames at the front of the buffer, at most
        ``limit``, decoded in one pass: ``(request_id, topic, batch, flags)``
        each, the fields ``next_event`` would give as Publish events (the
        broker's per-read fast path). Stops at the first frame that is
        anything else, incomplete or malformed: ``next_event`` takes it from
        there and says what it is. Empty while PUBLISH may not arrive."""
        out: list[tuple[int, str, bytes, int]] = []
        if (
            self._broken is None
            and not self.they_finished
            and FrameType.PUBLISH in SENDS[(self.their_role, self.state)]
        ):
            self._pos = _publishes_at(self._buf, self._pos, self.max_frame_bytes, limit, out)
        return out

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
        if ftype in SENDS[(self.their_role, self.state)]:
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
        advance = ADVANCES.get(ftype)
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
        if ftype not in SENDS[(self.our_role, self.state)]:
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
