"""Robustness: a real broker fed bad bytes over raw TCP sockets.

Every case opens a raw ``trio.SocketStream`` to a broker on 127.0.0.1, sends
something that breaks protocol.md (or a well-formed request the broker must
refuse) and decodes the broker's answer with the shared codec. For protocol
violations (1xx) the broker must answer one ERROR frame with the right code
and the FATAL flag, then close the connection (EOF). For request errors (2xx)
the connection must stay open and keep working.

While each case runs, a well-behaved client (``client.connect``) with an
active subscription keeps publishing on its own connection and must receive
every one of its messages, in order, without a gap. After each case the
broker must still accept new clients, serve them, and replay what was
published before the bad client arrived.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

import pybroker as client
from pybroker.server.config import Limits
from pybroker.server.server import Server
from pybroker.server.testing import running_broker
from pybroker.protocol import (
    UNLIMITED_CREDIT,
    Connection,
    Deliver,
    Error,
    ErrorCode,
    Event,
    FrameType,
    Goodbye,
    Hello,
    Ping,
    Pong,
    PubAck,
    RefKind,
    RemoteProtocolError,
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

from helpers.brokerlog import broker_log
from helpers.frames import (
    HELLO_FRAME,
    batch_with_count,
    error_body,
    good_batch,
    hello_body,
    publish_body,
    publish_frame,
    raw_frame,
    s16,
    subscribe_body,
    subscribe_frame,
)
from helpers.inproc import wait_sessions
from helpers.raw import (
    RawClient,
    check_raw_healthy,
    expect_fatal,
    expect_request_error,
    raw_client,
)

#: Bound on any single wait for the broker (connect, an answer, EOF).
TIMEOUT = 10.0
#: Bound on one whole case.
CASE_TIMEOUT = 30.0
HANDSHAKE_TIMEOUT = 0.5
MAX_BATCH_MESSAGES = 5
MAX_SUBSCRIPTIONS = 4

HEALTHY_TOPIC = "healthy.stream"
HEALTHY_PATTERN = "healthy.>"
HISTORY_TOPIC = "history.before"
HISTORY = [f"history-{i}".encode() for i in range(12)]

# --------------------------------------------------------------------------
# The well-behaved client running alongside


@asynccontextmanager
async def connected(url: str, name: str) -> AsyncIterator[client.Client]:
    """``client.connect`` that never loses an exception raised in its body.

    (``client.connect`` once swallowed exceptions raised in its body; should
    that come back, a failing assertion inside it must still fail the test.)
    """
    body_error: Exception | None = None
    async with client.connect(url, name=name, connect_timeout=TIMEOUT) as c:
        try:
            yield c
        except Exception as exc:
            body_error = exc
            raise
    if body_error is not None:
        raise body_error


class Healthy:
    """A subscriber that publishes to its own subscription and checks it all."""

    BACKGROUND_MAX = 2000

    def __init__(self, c: client.Client, sub: client.Subscription) -> None:
        self.c = c
        self.sub = sub
        self.sent: list[bytes] = []
        self.received: list[client.Message] = []
        self._changed = trio.Event()
        self._counter = 0
        self._stop = trio.Event()
        self._background_done = trio.Event()

    async def collect(self) -> None:
        async for msg in self.sub:
            self.received.append(msg)
            self._changed.set()

    async def publish_one(self) -> None:
        payload = f"healthy-{self._counter}".encode()
        self._counter += 1
        self.sent.append(payload)
        with trio.fail_after(TIMEOUT):
            ack = await self.c.publish(HEALTHY_TOPIC, payload)
        assert ack.topic == HEALTHY_TOPIC

    async def wait_received(self) -> None:
        with trio.fail_after(TIMEOUT):
            while len(self.received) < len(self.sent):
                self._changed = trio.Event()
                await self._changed.wait()

    async def round_trip(self, n: int) -> None:
        for _ in range(n):
            await self.publish_one()
        await self.wait_received()

    async def background(self) -> None:
        try:
            for _ in range(self.BACKGROUND_MAX):
                if self._stop.is_set():
                    return
                await self.publish_one()
                with trio.move_on_after(0.005):
                    await self._stop.wait()
        finally:
            self._background_done.set()

    async def stop_background(self) -> None:
        self._stop.set()
        with trio.fail_after(TIMEOUT):
            await self._background_done.wait()

    def verify(self) -> None:
        assert [m.payload for m in self.received] == self.sent
        assert all(m.topic == HEALTHY_TOPIC for m in self.received)
        offsets = [m.offset for m in self.received]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
        assert len(self.sent) >= 6


@asynccontextmanager
async def healthy_client(server: Server) -> AsyncIterator[Healthy]:
    """A connected client that keeps publishing to its own subscription."""
    async with connected(server.url, "healthy") as c:
        async with c.subscribe(HEALTHY_PATTERN) as sub:
            healthy = Healthy(c, sub)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(healthy.collect)
                await healthy.round_trip(3)
                nursery.start_soon(healthy.background)
                yield healthy
                await healthy.stop_background()
                await healthy.round_trip(3)
                nursery.cancel_scope.cancel()
            with trio.fail_after(TIMEOUT):
                await c.ping()
            assert not c.closed
    healthy.verify()


async def publish_history(server: Server) -> None:
    async with connected(server.url, "history") as c:
        with trio.fail_after(TIMEOUT):
            acks = await c.publish_many(HISTORY_TOPIC, HISTORY)
    assert [a.offset for a in acks] == list(range(len(HISTORY)))


async def check_still_serving(server: Server) -> None:
    """New clients are served, and the history is still replayable."""
    async with connected(server.url, "after") as c:
        with trio.fail_after(TIMEOUT):
            async with c.subscribe(HISTORY_TOPIC, start="earliest") as sub:
                replayed = [await anext(sub) for _ in range(len(HISTORY))]
            assert [m.payload for m in replayed] == HISTORY
            assert [m.offset for m in replayed] == list(range(len(HISTORY)))

            async with c.subscribe("after.>") as sub:
                acks = await c.publish_many("after.check", [b"one", b"two", b"three"])
                got = [await anext(sub) for _ in range(3)]
            assert [m.payload for m in got] == [b"one", b"two", b"three"]
            assert [m.offset for m in got] == [a.offset for a in acks]
            await c.ping()


# --------------------------------------------------------------------------
# Fatal cases: ERROR 1xx with FATAL, then EOF


@attrs.frozen
class Fatal:
    #: Bytes sent after connecting (after the handshake if ``handshake``).
    data: bytes
    code: ErrorCode
    handshake: bool = True


_PING_BODY = struct.pack(">Q", 7)

FATAL_CASES: dict[str, Fatal] = {
    # -- malformed bodies (100) --
    "ping-body-too-short": Fatal(raw_frame(FrameType.PING, b"\x00" * 4), ErrorCode.MALFORMED_FRAME),
    "ping-trailing-bytes": Fatal(
        raw_frame(FrameType.PING, _PING_BODY + b"xyz"), ErrorCode.MALFORMED_FRAME
    ),
    "goodbye-with-body": Fatal(raw_frame(FrameType.GOODBYE, b"\x00"), ErrorCode.MALFORMED_FRAME),
    "subscribe-trailing-bytes": Fatal(
        raw_frame(FrameType.SUBSCRIBE, subscribe_body(b"a.b") + b"\x00\x01\x02"),
        ErrorCode.MALFORMED_FRAME,
    ),
    "subscribe-body-too-short": Fatal(
        raw_frame(FrameType.SUBSCRIBE, subscribe_body(b"a.b")[:-5]), ErrorCode.MALFORMED_FRAME
    ),
    "publish-only-request-id": Fatal(
        raw_frame(FrameType.PUBLISH, struct.pack(">Q", 1)), ErrorCode.MALFORMED_FRAME
    ),
    "publish-topic-runs-past-body": Fatal(
        raw_frame(FrameType.PUBLISH, struct.pack(">QH", 1, 50) + b"abc"),
        ErrorCode.MALFORMED_FRAME,
    ),
    "publish-invalid-utf8-topic": Fatal(
        raw_frame(FrameType.PUBLISH, publish_body(1, b"bad.\xff\xfe", good_batch())),
        ErrorCode.MALFORMED_FRAME,
    ),
    "subscribe-invalid-utf8-pattern": Fatal(
        raw_frame(FrameType.SUBSCRIBE, subscribe_body(b"\xc3\x28")), ErrorCode.MALFORMED_FRAME
    ),
    "publish-batch-shorter-than-header": Fatal(
        raw_frame(FrameType.PUBLISH, publish_body(1, b"a.b", b"\x00\x00\x00\x01")),
        ErrorCode.MALFORMED_FRAME,
    ),
    "publish-batch-count-zero": Fatal(
        raw_frame(FrameType.PUBLISH, publish_body(1, b"a.b", batch_with_count(0, b""))),
        ErrorCode.MALFORMED_FRAME,
    ),
    "publish-batch-records-too-short": Fatal(
        raw_frame(FrameType.PUBLISH, publish_body(1, b"a.b", batch_with_count(3, b"\x00" * 10))),
        ErrorCode.MALFORMED_FRAME,
    ),
    "client-error-unknown-ref-kind": Fatal(
        raw_frame(FrameType.ERROR, error_body(207, b"what", ref_kind=9)), ErrorCode.MALFORMED_FRAME
    ),
    "client-error-invalid-utf8": Fatal(
        raw_frame(FrameType.ERROR, error_body(207, b"\xff")), ErrorCode.MALFORMED_FRAME
    ),
    # -- the handshake --
    "hello-bad-magic": Fatal(
        raw_frame(FrameType.HELLO, hello_body(magic=b"HTTP")),
        ErrorCode.MALFORMED_FRAME,
        handshake=False,
    ),
    "hello-invalid-utf8-name": Fatal(
        raw_frame(FrameType.HELLO, hello_body(name=b"\xfe\xff")),
        ErrorCode.MALFORMED_FRAME,
        handshake=False,
    ),
    "hello-trailing-bytes": Fatal(
        raw_frame(FrameType.HELLO, hello_body() + b"!"),
        ErrorCode.MALFORMED_FRAME,
        handshake=False,
    ),
    "hello-options-run-past-body": Fatal(
        raw_frame(FrameType.HELLO, hello_body(options=b"\xff\xff" + s16(b"k"))),
        ErrorCode.MALFORMED_FRAME,
        handshake=False,
    ),
    "hello-version-2": Fatal(
        raw_frame(FrameType.HELLO, hello_body(version=2)),
        ErrorCode.UNSUPPORTED_VERSION,
        handshake=False,
    ),
    "hello-version-0": Fatal(
        raw_frame(FrameType.HELLO, hello_body(version=0)),
        ErrorCode.UNSUPPORTED_VERSION,
        handshake=False,
    ),
    "http-request-instead-of-hello": Fatal(
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", ErrorCode.UNKNOWN_FRAME_TYPE, handshake=False
    ),
    "publish-before-hello": Fatal(
        raw_frame(FrameType.PUBLISH, publish_body(1, b"a.b", good_batch())),
        ErrorCode.HANDSHAKE_REQUIRED,
        handshake=False,
    ),
    "subscribe-before-hello": Fatal(
        raw_frame(FrameType.SUBSCRIBE, subscribe_body(b">")),
        ErrorCode.HANDSHAKE_REQUIRED,
        handshake=False,
    ),
    "ping-before-hello": Fatal(
        raw_frame(FrameType.PING, _PING_BODY), ErrorCode.HANDSHAKE_REQUIRED, handshake=False
    ),
    "goodbye-before-hello": Fatal(
        raw_frame(FrameType.GOODBYE, b""), ErrorCode.HANDSHAKE_REQUIRED, handshake=False
    ),
    "second-hello": Fatal(HELLO_FRAME, ErrorCode.UNEXPECTED_FRAME),
    # -- frames the client may not send (105) --
    "deliver-from-client": Fatal(
        raw_frame(
            FrameType.DELIVER,
            struct.pack(">IQQ", 1, 0, 0) + s16(b"a.b") + good_batch(),
        ),
        ErrorCode.UNEXPECTED_FRAME,
    ),
    "welcome-from-client": Fatal(
        raw_frame(FrameType.WELCOME, struct.pack(">H", 1) + s16(b"1") + s16(b"x") + b"\x00\x00"),
        ErrorCode.UNEXPECTED_FRAME,
    ),
    "puback-from-client": Fatal(
        raw_frame(FrameType.PUBACK, struct.pack(">QQIQB", 1, 0, 1, 0, 0)),
        ErrorCode.UNEXPECTED_FRAME,
    ),
    "suback-from-client": Fatal(
        raw_frame(FrameType.SUBACK, struct.pack(">I", 1)), ErrorCode.UNEXPECTED_FRAME
    ),
    "unsuback-from-client": Fatal(
        raw_frame(FrameType.UNSUBACK, struct.pack(">I", 1)), ErrorCode.UNEXPECTED_FRAME
    ),
    # -- unknown frame types (101) --
    "unknown-type-0x77": Fatal(raw_frame(0x77, b"hello"), ErrorCode.UNKNOWN_FRAME_TYPE),
    "unknown-type-0x00": Fatal(raw_frame(0x00, b""), ErrorCode.UNKNOWN_FRAME_TYPE),
    "unknown-type-0xff-before-hello": Fatal(
        raw_frame(0xFF, b"\x00" * 8), ErrorCode.UNKNOWN_FRAME_TYPE, handshake=False
    ),
    # -- reserved flags (100) --
    "ping-reserved-flag": Fatal(
        raw_frame(FrameType.PING, _PING_BODY, flags=0x80), ErrorCode.MALFORMED_FRAME
    ),
    "publish-reserved-flag": Fatal(
        raw_frame(FrameType.PUBLISH, publish_body(1, b"a.b", good_batch()), flags=0x08),
        ErrorCode.MALFORMED_FRAME,
    ),
    "error-reserved-flag": Fatal(
        raw_frame(FrameType.ERROR, error_body(207, b"x"), flags=0x02),
        ErrorCode.MALFORMED_FRAME,
    ),
    "hello-reserved-flag": Fatal(
        raw_frame(FrameType.HELLO, hello_body(), flags=0x01),
        ErrorCode.MALFORMED_FRAME,
        handshake=False,
    ),
    # -- oversized frames (102): the header alone, the body never comes --
    "oversized-publish-header-only": Fatal(
        raw_frame(FrameType.PUBLISH, b"", size=4 * 1024 * 1024 + 1), ErrorCode.FRAME_TOO_LARGE
    ),
    "oversized-u32-max-header-only": Fatal(
        raw_frame(FrameType.PUBLISH, b"", size=0xFFFFFFFF), ErrorCode.FRAME_TOO_LARGE
    ),
    "oversized-hello-before-handshake": Fatal(
        raw_frame(FrameType.HELLO, b"", size=0xFFFFFFFF),
        ErrorCode.FRAME_TOO_LARGE,
        handshake=False,
    ),
}


async def run_fatal(server: Server, case: Fatal) -> None:
    async with raw_client(server) as raw:
        if case.handshake:
            welcome = await raw.handshake()
            if case.code is ErrorCode.FRAME_TOO_LARGE:
                # The cases above are sized against the announced limit.
                assert welcome.limits["max_frame_bytes"] == 4 * 1024 * 1024
        # Deliberately no EOF after the data: the broker must answer on its
        # own (an oversized frame's body never arrives).
        await raw.send(case.data)
        await expect_fatal(raw, case.code)


# --------------------------------------------------------------------------
# Streams that end (or break) in the middle of a frame


@attrs.frozen
class Truncated:
    data: bytes
    handshake: bool = True
    #: True: close abruptly with a TCP reset instead of a clean half-close.
    reset: bool = False


TRUNCATED_CASES: dict[str, Truncated] = {
    "eof-inside-header": Truncated(raw_frame(FrameType.PING, _PING_BODY)[:3]),
    "eof-inside-publish-body": Truncated(
        raw_frame(FrameType.PUBLISH, publish_body(1, b"a.b", good_batch(b"x" * 100)))[:40]
    ),
    "eof-after-header-only": Truncated(raw_frame(FrameType.PING, _PING_BODY)[:6]),
    "eof-inside-hello": Truncated(HELLO_FRAME[:9], handshake=False),
    "eof-inside-hello-header": Truncated(HELLO_FRAME[:2], handshake=False),
    "reset-inside-publish-body": Truncated(
        raw_frame(FrameType.PUBLISH, publish_body(1, b"a.b", good_batch(b"x" * 100)))[:40],
        reset=True,
    ),
    "reset-before-hello": Truncated(HELLO_FRAME[:5], handshake=False, reset=True),
}


async def run_truncated(server: Server, case: Truncated) -> None:
    async with raw_client(server) as raw:
        if case.handshake:
            await raw.handshake()
            # A live subscription, so closing has something to clean up.
            assert await raw.request(encode_event(Subscribe(1, "raw.truncated.>"))) == SubAck(1)
        await raw.send(case.data)
        if case.reset:
            raw.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            await trio.aclose_forcefully(raw.stream)
            return
        await raw.send_eof()
        # The broker may say why (100, "a truncated frame at end of stream")
        # but must then close; it must not wait for the rest or crash.
        event = await raw.next_event()
        if event is not None:
            assert isinstance(event, Error), event
            assert event.code == ErrorCode.MALFORMED_FRAME and event.fatal, event
            assert await raw.next_event() is None


# --------------------------------------------------------------------------
# Random garbage


def garbage(seed: int) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(rng.randint(1, 300))


def codec_verdict(data: bytes) -> ErrorCode:
    """What a server-side codec, before HELLO, says about ``data`` then EOF."""
    conn = Connection(Role.SERVER)
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        conn.events()
    except RemoteProtocolError as exc:
        return exc.code
    raise AssertionError(f"garbage {data!r} decoded cleanly")


GARBAGE_SEEDS = range(40)


async def run_garbage_before_hello(server: Server, seed: int) -> None:
    data = garbage(seed)
    expected = codec_verdict(data)
    async with raw_client(server) as raw:
        await raw.send(data)
        await raw.send_eof()
        await expect_fatal(raw, expected)


async def run_garbage_after_hello(server: Server, seed: int) -> None:
    data = garbage(seed)
    async with raw_client(server) as raw:
        await raw.handshake()
        await raw.send(data)
        await raw.send_eof()
        # Garbage may happen to hold a frame the broker answers (PONG, a
        # request ERROR); what matters is that it ends with a fatal 1xx.
        for _ in range(100):
            event = await raw.next_event()
            assert event is not None, "EOF without a fatal ERROR"
            if isinstance(event, Error) and event.fatal:
                assert 100 <= event.code < 200, event
                break
        else:
            raise AssertionError("no fatal ERROR in 100 frames")
        assert await raw.next_event() is None


def fuzz_frames(seed: int) -> bytes:
    """Well-framed frames of client types with random (often broken) bodies."""
    rng = random.Random(seed)
    types = [
        FrameType.PUBLISH,
        FrameType.SUBSCRIBE,
        FrameType.UNSUBSCRIBE,
        FrameType.CREDIT,
        FrameType.PING,
        FrameType.PONG,
        FrameType.ERROR,
        FrameType.HELLO,
        FrameType.DELIVER,
        FrameType.GOODBYE,
    ]
    frames: list[bytes] = []
    for _ in range(rng.randint(1, 6)):
        ftype = rng.choice(types)
        if ftype is FrameType.PUBLISH and rng.random() < 0.6:
            topic = rng.choice([b"fuzz.topic", b"fuzz", rng.randbytes(rng.randint(0, 6))])
            batch = rng.choice(
                [
                    good_batch(rng.randbytes(rng.randint(0, 20))),
                    rng.randbytes(rng.randint(0, 30)),
                    batch_with_count(rng.randint(0, 8), rng.randbytes(rng.randint(0, 50))),
                ]
            )
            body = publish_body(rng.getrandbits(64), topic, batch)
        elif ftype is FrameType.SUBSCRIBE and rng.random() < 0.6:
            # Keywords in the order the generator draws them (the seeds' frames).
            body = subscribe_body(
                sub_id=rng.getrandbits(32),
                pattern=rng.choice([b"fuzz.>", b"fuzz.*", b"*", rng.randbytes(rng.randint(0, 6))]),
                start=rng.randint(0, 5),
                start_value=rng.getrandbits(64),
                credit=rng.choice([0, 1, UNLIMITED_CREDIT, rng.getrandbits(32)]),
            )
        else:
            body = rng.randbytes(rng.choice([0, 4, 8, 13, rng.randint(0, 64)]))
        frames.append(raw_frame(ftype, body))
    return b"".join(frames)


FUZZ_SEEDS = range(60)


async def run_fuzz_after_hello(server: Server, seed: int) -> None:
    data = fuzz_frames(seed)
    async with raw_client(server) as raw:
        await raw.handshake()
        await raw.send(data)
        await raw.send_eof()
        # Whatever the frames were, the broker answers what it can and then
        # ends the connection properly: a fatal 1xx ERROR, or (if every
        # frame happened to be acceptable) GOODBYE; never a bare close.
        last: Event | None = None
        for _ in range(200):
            event = await raw.next_event()
            if event is None:
                break
            if isinstance(event, Error):
                assert event.code != ErrorCode.INTERNAL_ERROR, event
                assert event.fatal == (event.code < 200), event
            last = event
        else:
            raise AssertionError("more than 200 frames in answer to a few")
        assert isinstance(last, Goodbye) or (isinstance(last, Error) and last.fatal), last


# --------------------------------------------------------------------------
# The handshake timeout


async def run_silent_client(server: Server) -> None:
    async with raw_client(server) as raw:
        # Sends nothing: after handshake_timeout the broker gives up.
        await expect_fatal(raw, ErrorCode.HANDSHAKE_REQUIRED, timeout=HANDSHAKE_TIMEOUT + TIMEOUT)


async def run_partial_hello_then_silence(server: Server) -> None:
    async with raw_client(server) as raw:
        await raw.send(HELLO_FRAME[:8])
        await expect_fatal(raw, ErrorCode.HANDSHAKE_REQUIRED, timeout=HANDSHAKE_TIMEOUT + TIMEOUT)


# --------------------------------------------------------------------------
# Request errors: not fatal, the connection keeps working


BAD_TOPICS: list[bytes] = [
    b"",
    b"bad..topic",
    b".leading",
    b"trailing.",
    b"orders.*",
    b"orders.>",
    b">",
    b"ord*ers",
    b"has space",
    b"tab\there",
    b"ctl\x01char",
    b"del\x7fchar",
    b"x" * 256,
    b".".join([b"t"] * 17),
]

BAD_PATTERNS: list[bytes] = [
    b"",
    b"a..b",
    b"a.>.b",
    b">.a",
    b"ord*",
    b"a.b>",
    b"sp ace",
    b"x" * 256,
    b".".join([b"t"] * 17),
]


async def run_bad_topic(server: Server) -> None:
    async with raw_client(server) as raw:
        await raw.handshake()
        for i, topic in enumerate(BAD_TOPICS, start=100):
            event = await raw.request(publish_frame(i, topic, good_batch(b"x")))
            expect_request_error(event, ErrorCode.BAD_TOPIC, i, RefKind.REQUEST)
        # request_id 0: no PUBACK wanted, but errors are still sent, ref 0.
        event = await raw.request(publish_frame(0, b"bad..topic", good_batch(b"x")))
        assert isinstance(event, Error) and event.code == ErrorCode.BAD_TOPIC, event
        assert event.ref == 0 and not event.fatal, event
        # Nothing was created for the bad topics, and good ones still work.
        for topic in BAD_TOPICS:
            assert topic.decode("utf-8") not in server.broker.router.topics
        await check_raw_healthy(raw, "raw.bad-topic.ok")


async def run_checksum_mismatch(server: Server) -> None:
    topic = "raw.crc"
    async with raw_client(server) as raw:
        await raw.handshake()
        batch = bytearray(good_batch(b"one", b"two"))
        batch[4] ^= 0xFF  # the CRC
        event = await raw.request(publish_frame(7, topic.encode(), bytes(batch)))
        expect_request_error(event, ErrorCode.CHECKSUM_MISMATCH, 7, RefKind.REQUEST)
        corrupt = bytearray(good_batch(b"payload"))
        corrupt[-1] ^= 0x01  # a record byte
        event = await raw.request(publish_frame(8, topic.encode(), bytes(corrupt)))
        expect_request_error(event, ErrorCode.CHECKSUM_MISMATCH, 8, RefKind.REQUEST)
        # Nothing was stored: the first good batch gets offset 0.
        ack = await raw.request(publish_frame(9, topic.encode(), good_batch(b"good")))
        assert isinstance(ack, PubAck) and ack.request_id == 9, ack
        assert ack.base_offset == 0 and ack.count == 1, ack
        await check_raw_healthy(raw, topic)


async def run_batch_limit(server: Server) -> None:
    topic = "raw.batch-limit"
    async with raw_client(server) as raw:
        welcome = await raw.handshake()
        assert welcome.limits["max_batch_messages"] == MAX_BATCH_MESSAGES
        too_many = good_batch(*(b"m%d" % i for i in range(MAX_BATCH_MESSAGES + 1)))
        event = await raw.request(publish_frame(11, topic.encode(), too_many))
        expect_request_error(event, ErrorCode.BATCH_LIMIT, 11, RefKind.REQUEST)
        # 1000 empty records (6 bytes each, well-formed) are refused as well.
        huge = batch_with_count(1000, b"\x00" * 6000)
        event = await raw.request(publish_frame(12, topic.encode(), huge))
        expect_request_error(event, ErrorCode.BATCH_LIMIT, 12, RefKind.REQUEST)
        just_right = good_batch(*(b"m%d" % i for i in range(MAX_BATCH_MESSAGES)))
        ack = await raw.request(publish_frame(13, topic.encode(), just_right))
        assert isinstance(ack, PubAck) and ack.request_id == 13, ack
        assert (ack.base_offset, ack.count) == (0, MAX_BATCH_MESSAGES), ack
        await check_raw_healthy(raw, topic)


async def run_bad_pattern(server: Server) -> None:
    async with raw_client(server) as raw:
        await raw.handshake()
        for i, pattern in enumerate(BAD_PATTERNS, start=1):
            event = await raw.request(subscribe_frame(i, pattern))
            expect_request_error(event, ErrorCode.BAD_PATTERN, i, RefKind.SUBSCRIPTION)
        # The refused sub_ids were never registered: they can be used now.
        assert await raw.request(subscribe_frame(1, b"raw.pattern.>")) == SubAck(1)
        assert await raw.request(encode_event(Unsubscribe(1))) == UnsubAck(1)
        await check_raw_healthy(raw, "raw.pattern.ok")


async def run_duplicate_subscription(server: Server) -> None:
    topic = "raw.duplicate"
    async with raw_client(server) as raw:
        await raw.handshake()
        assert await raw.request(subscribe_frame(5, topic.encode())) == SubAck(5)
        event = await raw.request(subscribe_frame(5, b"raw.other"))
        expect_request_error(event, ErrorCode.DUPLICATE_SUBSCRIPTION, 5, RefKind.SUBSCRIPTION)
        # The first subscription is untouched: it still receives its topic,
        # and only once.
        await raw.send(publish_frame(21, topic.encode(), good_batch(b"dup")))
        events = await raw.events(2)
        assert {type(e) for e in events} == {PubAck, Deliver}, events
        deliver = next(e for e in events if isinstance(e, Deliver))
        assert deliver.sub_id == 5 and deliver.topic == topic
        assert await raw.request(encode_event(Unsubscribe(5))) == UnsubAck(5)
        await check_raw_healthy(raw, topic)


async def run_too_many_subscriptions(server: Server) -> None:
    async with raw_client(server) as raw:
        welcome = await raw.handshake()
        assert welcome.limits["max_subscriptions"] == MAX_SUBSCRIPTIONS
        for sid in range(1, MAX_SUBSCRIPTIONS + 1):
            assert await raw.request(subscribe_frame(sid, b"raw.many.%d" % sid)) == SubAck(sid)
        extra = MAX_SUBSCRIPTIONS + 1
        event = await raw.request(subscribe_frame(extra, b"raw.many.extra"))
        expect_request_error(event, ErrorCode.TOO_MANY_SUBSCRIPTIONS, extra, RefKind.SUBSCRIPTION)
        # Freeing one makes room again.
        assert await raw.request(encode_event(Unsubscribe(1))) == UnsubAck(1)
        assert await raw.request(subscribe_frame(extra, b"raw.many.extra")) == SubAck(extra)
        event = await raw.request(subscribe_frame(extra + 1, b"raw.many.extra"))
        expect_request_error(
            event, ErrorCode.TOO_MANY_SUBSCRIPTIONS, extra + 1, RefKind.SUBSCRIPTION
        )
        for sid in range(2, extra + 1):
            assert await raw.request(encode_event(Unsubscribe(sid))) == UnsubAck(sid)
        await check_raw_healthy(raw, "raw.many.ok")


async def run_unknown_unsubscribe(server: Server) -> None:
    async with raw_client(server) as raw:
        await raw.handshake()
        event = await raw.request(encode_event(Unsubscribe(99)))
        expect_request_error(event, ErrorCode.UNKNOWN_SUBSCRIPTION, 99, RefKind.SUBSCRIPTION)
        assert await raw.request(subscribe_frame(3, b"raw.unsub")) == SubAck(3)
        assert await raw.request(encode_event(Unsubscribe(3))) == UnsubAck(3)
        event = await raw.request(encode_event(Unsubscribe(3)))  # twice
        expect_request_error(event, ErrorCode.UNKNOWN_SUBSCRIPTION, 3, RefKind.SUBSCRIPTION)
        await check_raw_healthy(raw, "raw.unsub")


async def run_bad_request(server: Server) -> None:
    bad: list[tuple[int, bytes]] = [
        (31, subscribe_frame(31, b"raw.bad-request", start=9)),
        (32, subscribe_frame(32, b"raw.bad-request", start=255)),
        (33, subscribe_frame(33, b"raw.bad-request", credit=0)),
        (34, subscribe_frame(34, b"raw.*", start=int(StartKind.OFFSET), value=3)),
        (35, subscribe_frame(35, b"raw.>", start=int(StartKind.OFFSET))),
        (36, subscribe_frame(36, b"raw.bad-request", options=b"\x00\x01" + s16(b"k") + s16(b"v"))),
    ]
    async with raw_client(server) as raw:
        await raw.handshake()
        for sid, frame in bad:
            event = await raw.request(frame)
            expect_request_error(event, ErrorCode.BAD_REQUEST, sid, RefKind.SUBSCRIPTION)
        # None of them was registered.
        for sid, _ in bad:
            event = await raw.request(encode_event(Unsubscribe(sid)))
            expect_request_error(event, ErrorCode.UNKNOWN_SUBSCRIPTION, sid, RefKind.SUBSCRIPTION)
        await check_raw_healthy(raw, "raw.bad-request")


async def run_pipelined_mix(server: Server) -> None:
    """Good and bad requests in one write: every answer, PUBACKs in order."""
    topic = b"raw.pipeline"
    bad_crc = bytearray(good_batch(b"c"))
    bad_crc[4] ^= 0x55
    data = b"".join(
        [
            publish_frame(1, topic, good_batch(b"p1")),
            publish_frame(2, b"bad..topic", good_batch(b"x")),
            publish_frame(3, topic, good_batch(b"p3a", b"p3b")),
            publish_frame(4, topic, bytes(bad_crc)),
            subscribe_frame(5, b"a.>.b"),
            publish_frame(6, topic, good_batch(*(b"z" for _ in range(MAX_BATCH_MESSAGES + 1)))),
            encode_event(Unsubscribe(77)),
            publish_frame(8, topic, good_batch(b"p8")),
            encode_event(Ping(9)),
        ]
    )
    async with raw_client(server) as raw:
        await raw.handshake()
        await raw.send(data)
        events = await raw.events(9)
        acks = [e for e in events if isinstance(e, PubAck)]
        assert [(a.request_id, a.base_offset, a.count) for a in acks] == [
            (1, 0, 1),
            (3, 1, 2),
            (8, 3, 1),
        ]
        errors = {(e.code, e.ref) for e in events if isinstance(e, Error)}
        assert errors == {
            (ErrorCode.BAD_TOPIC, 2),
            (ErrorCode.CHECKSUM_MISMATCH, 4),
            (ErrorCode.BAD_PATTERN, 5),
            (ErrorCode.BATCH_LIMIT, 6),
            (ErrorCode.UNKNOWN_SUBSCRIPTION, 77),
        }
        assert not any(isinstance(e, Error) and e.fatal for e in events)
        assert Pong(9) in events
        await check_raw_healthy(raw, topic.decode())


async def run_credit_edge_cases(server: Server) -> None:
    topic = b"raw.credit"
    async with raw_client(server) as raw:
        await raw.handshake()
        assert await raw.request(subscribe_frame(1, topic, credit=1)) == SubAck(1)
        await raw.send(b"".join(publish_frame(i, topic, good_batch(b"c%d" % i)) for i in (1, 2, 3)))
        events = await raw.events(4)
        assert [e.request_id for e in events if isinstance(e, PubAck)] == [1, 2, 3], events
        delivers = [e for e in events if isinstance(e, Deliver)]
        assert [(d.sub_id, d.base_offset) for d in delivers] == [(1, 0)], events
        # Out of credit: nothing more arrives before the PONG.
        assert await raw.request(encode_event(Ping(1))) == Pong(1)
        # CREDIT for an unknown subscription is ignored, not an error.
        await raw.send(raw_frame(FrameType.CREDIT, struct.pack(">II", 99, 5)))
        assert await raw.request(encode_event(Ping(2))) == Pong(2)
        # Credit far beyond 2**32 in total is capped, never an error.
        grant = raw_frame(FrameType.CREDIT, struct.pack(">II", 1, 0xFFFFFFFF))
        await raw.send(grant * 3)
        delivered = await raw.events(2)
        assert [(d.sub_id, d.base_offset) for d in delivered if isinstance(d, Deliver)] == [
            (1, 1),
            (1, 2),
        ], delivered
        await raw.send(publish_frame(4, topic, good_batch(b"c4")))
        events = await raw.events(2)
        assert {type(e) for e in events} == {PubAck, Deliver}, events
        assert await raw.request(encode_event(Unsubscribe(1))) == UnsubAck(1)
        # CREDIT crossing an UNSUBACK is harmless too.
        await raw.send(grant)
        assert await raw.request(encode_event(Ping(3))) == Pong(3)
        await check_raw_healthy(raw, topic.decode())


async def run_goodbye_then_garbage(server: Server) -> None:
    """Frames after the client's GOODBYE: the broker ends the connection
    (GOODBYE, or ERROR 105 UNEXPECTED_FRAME) and does not crash."""
    async with raw_client(server) as raw:
        await raw.handshake()
        await raw.send(encode_event(Goodbye()) + raw_frame(FrameType.PING, _PING_BODY) + b"junk")
        event = await raw.next_event()
        if isinstance(event, Error):
            assert event.code == ErrorCode.UNEXPECTED_FRAME and event.fatal, event
        else:
            assert event == Goodbye(), event
        assert await raw.next_event() is None


async def run_client_fatal_error(server: Server) -> None:
    """A client's fatal ERROR ends the connection; the broker closes too."""
    async with raw_client(server) as raw:
        await raw.handshake()
        assert await raw.request(subscribe_frame(1, b"raw.client-error")) == SubAck(1)
        await raw.send(raw_frame(FrameType.ERROR, error_body(500, b"client bug"), flags=0x01))
        event = await raw.next_event()
        # It may say GOODBYE; it must not send anything else, then EOF.
        if event is not None:
            assert event == Goodbye(), event
            assert await raw.next_event() is None


async def run_client_nonfatal_error(server: Server) -> None:
    """A client's non-fatal ERROR is logged and the connection goes on."""
    async with raw_client(server) as raw:
        await raw.handshake()
        await raw.send(raw_frame(FrameType.ERROR, error_body(208, b"hmm", ref_kind=2, ref=1)))
        assert await raw.request(encode_event(Ping(8))) == Pong(8)
        await check_raw_healthy(raw, "raw.client-error-ok")


REQUEST_CASES: dict[str, Callable[[Server], Awaitable[None]]] = {
    "bad-topic": run_bad_topic,
    "checksum-mismatch": run_checksum_mismatch,
    "batch-limit": run_batch_limit,
    "bad-pattern": run_bad_pattern,
    "duplicate-subscription": run_duplicate_subscription,
    "too-many-subscriptions": run_too_many_subscriptions,
    "unknown-unsubscribe": run_unknown_unsubscribe,
    "bad-request": run_bad_request,
    "pipelined-mix": run_pipelined_mix,
    "credit-edge-cases": run_credit_edge_cases,
    "client-nonfatal-error": run_client_nonfatal_error,
}


# --------------------------------------------------------------------------
# Every case as one callable


def _fatal(case: Fatal) -> Callable[[Server], Awaitable[None]]:
    async def run(server: Server) -> None:
        await run_fatal(server, case)

    return run


def _truncated(case: Truncated) -> Callable[[Server], Awaitable[None]]:
    async def run(server: Server) -> None:
        await run_truncated(server, case)

    return run


ALL_CASES: dict[str, Callable[[Server], Awaitable[None]]] = {
    **{f"fatal:{name}": _fatal(case) for name, case in FATAL_CASES.items()},
    **{f"truncated:{name}": _truncated(case) for name, case in TRUNCATED_CASES.items()},
    "closing:goodbye-then-garbage": run_goodbye_then_garbage,
    "closing:client-fatal-error": run_client_fatal_error,
    "timeout:silent": run_silent_client,
    "timeout:partial-hello": run_partial_hello_then_silence,
    **{f"request:{name}": fn for name, fn in REQUEST_CASES.items()},
}


# --------------------------------------------------------------------------
# Tests


def broker_config(tmp_path: Path) -> dict[str, object]:
    return {
        "data_dir": tmp_path / "data",
        "handshake_timeout": HANDSHAKE_TIMEOUT,
        "limits": Limits(max_batch_messages=MAX_BATCH_MESSAGES, max_subscriptions=MAX_SUBSCRIPTIONS),
    }


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_broker(**broker_config(tmp_path)) as s:
        await publish_history(s)
        yield s


async def run_case_beside_healthy_client(
    server: Server, case: Callable[[Server], Awaitable[None]]
) -> None:
    with broker_log():
        await _run_case_beside_healthy_client(server, case)


async def _run_case_beside_healthy_client(
    server: Server, case: Callable[[Server], Awaitable[None]]
) -> None:
    async with healthy_client(server) as healthy:
        await wait_sessions(server, 1)
        with trio.fail_after(CASE_TIMEOUT):
            await case(server)
        # The bad connection is gone on the broker's side too.
        await wait_sessions(server, 1)
        await healthy.round_trip(2)
    await check_still_serving(server)
    await wait_sessions(server, 0)


@pytest.mark.parametrize("name", list(ALL_CASES))
async def test_bad_input(server: Server, name: str) -> None:
    await run_case_beside_healthy_client(server, ALL_CASES[name])


@pytest.mark.parametrize("seed", list(GARBAGE_SEEDS))
async def test_random_garbage_before_hello(server: Server, seed: int) -> None:
    async def case(s: Server) -> None:
        await run_garbage_before_hello(s, seed)

    await run_case_beside_healthy_client(server, case)


@pytest.mark.parametrize("seed", list(FUZZ_SEEDS))
async def test_fuzzed_frames_after_hello(server: Server, seed: int) -> None:
    async def case(s: Server) -> None:
        await run_fuzz_after_hello(s, seed)

    await run_case_beside_healthy_client(server, case)


@pytest.mark.parametrize("seed", list(GARBAGE_SEEDS))
async def test_random_garbage_after_hello(server: Server, seed: int) -> None:
    async def case(s: Server) -> None:
        await run_garbage_after_hello(s, seed)

    await run_case_beside_healthy_client(server, case)


async def test_oversized_frame_answered_without_waiting_for_body(server: Server) -> None:
    """FRAME_TOO_LARGE arrives while the body is still being 'sent'."""
    async with raw_client(server) as raw:
        await raw.handshake()
        limit = 4 * 1024 * 1024
        await raw.send(raw_frame(FrameType.PUBLISH, b"", size=limit + 1) + b"\x00" * 1000)
        # The rest of the body never comes; the stream stays open.
        await expect_fatal(raw, ErrorCode.FRAME_TOO_LARGE)
    async with raw_client(server) as raw:
        await raw.handshake()
        # Exactly at the limit is allowed: the broker waits for that body
        # (a PING of that size is then malformed, but only once it is complete).
        await raw.send(raw_frame(FrameType.PING, b"", size=limit))
        with trio.move_on_after(0.3):
            early = await raw.next_event()
            raise AssertionError(f"answered before the body arrived: {early!r}")
        await raw.send(b"\x00" * limit)
        await expect_fatal(raw, ErrorCode.MALFORMED_FRAME)


async def test_handshake_timeout_spares_a_client_that_said_hello(server: Server) -> None:
    async with raw_client(server) as raw:
        await raw.handshake()
        await trio.sleep(HANDSHAKE_TIMEOUT * 3)
        assert await raw.request(encode_event(Ping(5))) == Pong(5)
        await check_raw_healthy(raw, "raw.slow")


async def test_everything_at_once_then_still_serving(tmp_path: Path) -> None:
    """Every case at the same time against one broker, then new clients."""
    with broker_log():
        await _everything_at_once(tmp_path)


async def _everything_at_once(tmp_path: Path) -> None:
    async with running_broker(**broker_config(tmp_path)) as server:
        await publish_history(server)
        async with healthy_client(server) as healthy:
            with trio.fail_after(CASE_TIMEOUT * 2):
                async with trio.open_nursery() as nursery:
                    for case in ALL_CASES.values():
                        nursery.start_soon(case, server)
                    for seed in GARBAGE_SEEDS:
                        nursery.start_soon(run_garbage_before_hello, server, seed)
                        nursery.start_soon(run_garbage_after_hello, server, seed)
                    for seed in FUZZ_SEEDS:
                        nursery.start_soon(run_fuzz_after_hello, server, seed)
            await wait_sessions(server, 1)
            await healthy.round_trip(5)
        # New clients after all of it.
        for _ in range(3):
            await check_still_serving(server)
        await wait_sessions(server, 0)
        assert server.connections_total > len(ALL_CASES)


async def test_frames_split_into_single_bytes(server: Server) -> None:
    """Framing survives any split: every byte in its own segment."""
    with broker_log():
        async with healthy_client(server):
            async with raw_client(server) as raw:
                raw.stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
                data = (
                    raw.conn.send(Hello(client_name="one-byte-at-a-time"))
                    + subscribe_frame(1, b"raw.split")
                    + publish_frame(2, b"raw.split", good_batch(b"split", b"bytes"))
                )
                for i in range(len(data)):
                    await raw.send(data[i : i + 1])
                    await trio.sleep(0.001 if i % 16 == 0 else 0)
                events = await raw.events(4)
                assert isinstance(events[0], Welcome), events
                raw.welcome = events[0]
                assert events[1] == SubAck(1), events
                assert {type(e) for e in events[2:]} == {PubAck, Deliver}, events
                deliver = next(e for e in events if isinstance(e, Deliver))
                assert [p for p, _ in decode_batch(deliver.batch)] == [b"split", b"bytes"]
                await check_raw_healthy(raw, "raw.split-after")
        await check_still_serving(server)


async def test_subscriber_that_stops_reading(tmp_path: Path) -> None:
    """A subscriber that never reads must not hold up anyone else, and gets
    every message, in order, once it reads again."""
    total = 6000
    payload = b"b" * 1000
    with broker_log():
        async with running_broker(
            data_dir=tmp_path / "data", outbound_queue_bytes=64 * 1024
        ) as server:
            await publish_history(server)
            async with healthy_client(server) as healthy:
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                with trio.fail_after(TIMEOUT):
                    await sock.connect(("127.0.0.1", server.port))
                raw = RawClient(trio.SocketStream(sock))
                try:
                    await raw.handshake()
                    assert await raw.request(subscribe_frame(1, b"bulk.>")) == SubAck(1)
                    # It stops reading now. Others publish, one message per
                    # batch (so its queue bound is reached), and are served.
                    async with raw_client(server) as publisher:
                        await publisher.handshake()
                        frame = publish_frame(0, b"bulk.data", good_batch(payload))
                        for _ in range(total // 500):
                            await publisher.send(frame * 500)
                        assert await publisher.request(encode_event(Ping(1))) == Pong(1)
                        last = await publisher.request(publish_frame(1, b"bulk.last", good_batch(b"x")))
                        assert isinstance(last, PubAck), last
                        await check_raw_healthy(publisher, "bulk-publisher.check")
                    assert server.broker.router.topics["bulk.data"].log.next_offset == total
                    await healthy.round_trip(5)
                    # Now it reads: everything arrives, in order, no gap.
                    expected = 0
                    seen_last = 0
                    with trio.fail_after(TIMEOUT * 3):
                        while expected < total:
                            event = await raw.next_event()
                            assert isinstance(event, Deliver), event
                            if event.topic == "bulk.last":
                                seen_last += 1
                                continue
                            assert event.sub_id == 1 and event.topic == "bulk.data"
                            assert event.base_offset == expected, (event.base_offset, expected)
                            records = decode_batch(event.batch)
                            assert all(p == payload for p, _ in records)
                            expected += len(records)
                    assert expected == total
                    await raw.send(encode_event(Ping(1)))
                    for _ in range(2):
                        event = await raw.next_event()
                        if event == Pong(1):
                            break
                        assert isinstance(event, Deliver) and event.topic == "bulk.last", event
                        seen_last += 1
                    else:
                        raise AssertionError("no PONG")
                    assert seen_last == 1
                    await check_raw_healthy(raw, "after-bulk.check", sub_id=2)
                finally:
                    await trio.aclose_forcefully(raw.stream)
            await check_still_serving(server)
