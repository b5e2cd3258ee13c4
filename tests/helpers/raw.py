"""Raw protocol peers: TCP connections to a broker that send whatever bytes
a test likes and read the broker's frames through the client-side codec.

Frames from the broker go through ``Connection(Role.CLIENT)``, so a frame
the broker may not send in the current state (anything after its fatal
ERROR, for instance) fails the test. ``send_event`` goes through the codec
too (advancing its handshake state); ``send`` writes raw bytes behind the
codec's back.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

import pybroker
from pybroker.server.server import Server
from pybroker.protocol import (
    CLOSED,
    NEED_DATA,
    Connection,
    Deliver,
    Error,
    ErrorCode,
    Event,
    Goodbye,
    Hello,
    Ping,
    Pong,
    PubAck,
    Publish,
    RefKind,
    Role,
    StartKind,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
    decode_batch,
    encode_event,
)

from .frames import good_batch

#: Default bound on any single wait for the broker (connect, an answer, EOF).
TIMEOUT = 10.0


class RawClient:
    """A TCP connection that sends whatever bytes a test likes.

    ``timeout`` bounds each send and each wait for a frame. With
    ``reset_is_eof`` a connection reset reads as the end of the stream (the
    fuzzers: a reset may follow the broker's fatal ERROR when unread input
    was left behind); without it a reset fails the test.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        timeout: float = TIMEOUT,
        reset_is_eof: bool = False,
        receive_bytes: int = 65536,
    ) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT)
        self.timeout = timeout
        self.reset_is_eof = reset_is_eof
        self.receive_bytes = receive_bytes
        self.welcome: Welcome | None = None
        #: Frames ``expect`` passed over; ``next_event`` hands them out first.
        self.backlog: list[Event] = []
        #: Bytes ``drip`` has sent.
        self.dripped = 0

    async def send(self, data: bytes) -> None:
        with trio.fail_after(self.timeout):
            await self.stream.send_all(data)

    async def drip(self, data: bytes, pause: float) -> None:
        """Send ``data`` a byte at a time, ``pause`` seconds apart (a peer too
        slow ever to finish a frame), until all is sent or the broker closed
        the connection; ``dripped`` counts the bytes that went out."""
        try:
            for i in range(len(data)):
                await self.send(data[i : i + 1])
                self.dripped += 1
                await trio.sleep(pause)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def send_event(self, event: Event) -> None:
        await self.send(self.conn.send(event))

    async def send_eof(self) -> None:
        with trio.fail_after(self.timeout):
            await self.stream.send_eof()

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The broker's next frame, or None at EOF."""
        if self.backlog:
            return self.backlog.pop(0)
        with trio.fail_after(self.timeout if timeout is None else timeout):
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    try:
                        data = await self.stream.receive_some(self.receive_bytes)
                    except trio.BrokenResourceError:
                        if not self.reset_is_eof:
                            raise
                        data = b""  # a reset after the broker's close
                    self.conn.receive_data(data)
                    continue
                if event is CLOSED:
                    return None
                assert not isinstance(event, type(NEED_DATA)), event
                return event  # type: ignore[return-value]

    async def events(self, n: int) -> list[Event]:
        out: list[Event] = []
        for _ in range(n):
            event = await self.next_event()
            assert event is not None, f"EOF after {out!r}, expected {n} frames"
            out.append(event)
        return out

    async def expect(self, kind: type[Any], timeout: float | None = None) -> Any:
        """The next event of ``kind``; others are kept for later."""
        skipped: list[Event] = []
        try:
            for _ in range(1000):
                event = await self.next_event(timeout)
                assert event is not None, "the broker closed the connection"
                if isinstance(event, kind):
                    return event
                skipped.append(event)
            raise AssertionError(f"no {kind.__name__} in 1000 frames")
        finally:
            self.backlog[:0] = skipped

    async def handshake(self, name: str = "raw-test", options: Mapping[str, str] | None = None) -> Welcome:
        await self.send_event(Hello(client_name=name, options=dict(options or {})))
        welcome = await self.next_event()
        assert isinstance(welcome, Welcome), welcome
        self.welcome = welcome
        return welcome

    async def request(self, data: bytes) -> Event:
        await self.send(data)
        event = await self.next_event()
        assert event is not None, "the broker closed the connection"
        return event

    async def ping(self, nonce: int) -> None:
        """PING through the codec; its PONG comes next (other frames are kept)."""
        await self.send_event(Ping(nonce))
        assert await self.expect(Pong) == Pong(nonce)


def address(target: Server | str | int) -> tuple[str, int]:
    """(host, port) of an in-process broker, a ``pybroker://`` URL or a port on 127.0.0.1."""
    if isinstance(target, Server):
        return "127.0.0.1", target.port
    if isinstance(target, str):
        return pybroker.parse_url(target)
    return "127.0.0.1", target


@asynccontextmanager
async def raw_client(
    target: Server | str | int,
    *,
    handshake: str | None = None,
    timeout: float = TIMEOUT,
    reset_is_eof: bool = False,
) -> AsyncIterator[RawClient]:
    """A RawClient connected to ``target``, closed on exit; with
    ``handshake``, past a HELLO with that client name and its WELCOME."""
    host, port = address(target)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
    try:
        raw = RawClient(stream, timeout=timeout, reset_is_eof=reset_is_eof)
        if handshake is not None:
            await raw.handshake(handshake)
        yield raw
    finally:
        await trio.aclose_forcefully(stream)


async def expect_fatal(raw: RawClient, code: ErrorCode, timeout: float | None = None) -> Error:
    """The next frame is ERROR ``code`` with FATAL, and then the stream ends."""
    event = await raw.next_event(timeout)
    assert isinstance(event, Error), f"expected ERROR {code.name}, got {event!r}"
    assert event.code == code, f"expected {code.name} ({int(code)}), got {event!r}"
    assert event.fatal, f"{code.name} must carry the FATAL flag: {event!r}"
    assert event.ref_kind is RefKind.NONE and event.ref == 0, event
    assert await raw.next_event() is None, "the broker must close after a fatal ERROR"
    return event


def expect_request_error(event: Event | None, code: ErrorCode, ref: int, ref_kind: RefKind) -> Error:
    assert isinstance(event, Error), f"expected ERROR {code.name}, got {event!r}"
    assert event.code == code, f"expected {code.name} ({int(code)}), got {event!r}"
    assert not event.fatal, f"{code.name} must not be fatal: {event!r}"
    assert event.ref == ref, event
    assert event.ref_kind is ref_kind, event
    assert event.message, "an ERROR should say what was wrong"
    return event


def client_publish(request_id: int, topic: str, *payloads: bytes) -> Publish:
    return Publish(request_id, topic, good_batch(*payloads))


async def check_raw_healthy(raw: RawClient, topic: str, sub_id: int = 900) -> None:
    """The raw connection still works: PING, SUBSCRIBE, PUBLISH, DELIVER."""
    assert await raw.request(encode_event(Ping(4242))) == Pong(4242)
    assert await raw.request(encode_event(Subscribe(sub_id, topic))) == SubAck(sub_id)
    await raw.send(encode_event(client_publish(991, topic, b"still-alive")))
    events = await raw.events(2)
    acks = [e for e in events if isinstance(e, PubAck)]
    delivers = [e for e in events if isinstance(e, Deliver)]
    assert len(acks) == 1 and len(delivers) == 1, events
    assert acks[0].request_id == 991 and acks[0].count == 1
    assert delivers[0].sub_id == sub_id and delivers[0].topic == topic
    assert delivers[0].base_offset == acks[0].base_offset
    assert [p for p, _ in decode_batch(delivers[0].batch)] == [b"still-alive"]
    assert await raw.request(encode_event(Unsubscribe(sub_id))) == UnsubAck(sub_id)
    # A clean close: GOODBYE is answered with GOODBYE, then EOF.
    assert await raw.request(encode_event(Goodbye())) == Goodbye()
    assert await raw.next_event() is None


class RawSubscriber(RawClient):
    """A subscriber speaking the protocol over a bare socket, so that it can
    really stop reading the connection (the client library never does).

    Its waits have no bound of their own: the test bounds them (reading
    tens of thousands of messages it had let pile up takes a while)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream, timeout=math.inf, receive_bytes=256 * 1024)
        self.messages: list[tuple[int, bytes]] = []

    @classmethod
    async def open(cls, url: str, name: str, pattern: str, credit: int) -> RawSubscriber:
        host, port = pybroker.parse_url(url)
        stream = await trio.open_tcp_stream(host, port)
        # A small receive buffer: the connection fills quickly once we stop.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        raw = cls(stream)
        await raw.handshake(name)
        await raw.send_event(Subscribe(1, pattern, StartKind.NEW, 0, credit))
        assert await raw.next_event() == SubAck(1)
        return raw

    async def read_messages(self, n: int) -> None:
        for _ in range(n + 1):
            if len(self.messages) >= n:
                return
            event = await self.next_event()
            assert event is not None, "the broker closed the connection"
            assert isinstance(event, Deliver), event
            for i, (payload, _) in enumerate(decode_batch(event.batch)):
                self.messages.append((event.base_offset + i, payload))

    async def aclose(self) -> None:
        try:
            with trio.move_on_after(5):
                await self.send_event(Goodbye())
                for _ in range(100_000):
                    event = await self.next_event()
                    assert event is not None, "the broker closed the connection"
                    if isinstance(event, Goodbye):
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, AssertionError):
            pass
        await trio.aclose_forcefully(self.stream)
