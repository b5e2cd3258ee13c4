"""Every limit of protocol.md's "Limits" table, one test each, named for it.

Each test runs a broker with the limit set low, shows that a request just
inside it is served and that the next one gets the documented answer (an
ERROR with its code, fatal or not, or backpressure), and that the broker
goes on serving. Raw connections (tests/helpers/raw.py) show
the wire behaviour; the client library is checked where it has its own part
(answering PINGs, its publish window, refusing oversized messages).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.server.config import Limits
from pybroker.server.http.metrics import render
from pybroker.server.storage import FileStore
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.server.server import Server
from pybroker.server.session import Session
from pybroker.server.testing import running_broker
from pybroker.protocol import (
    MSG_ID_ROOM,
    Error,
    ErrorCode,
    FrameType,
    Ping,
    Pong,
    PubAck,
    RefKind,
    SubAck,
    Unsubscribe,
    UnsubAck,
    encode_event,
)

from helpers.frames import HELLO_FRAME, good_batch, publish_frame, raw_frame, subscribe_frame
from helpers.inproc import wait_sessions, wait_until
from helpers.procs import serve
from helpers.raw import check_raw_healthy, expect_fatal, expect_request_error, raw_client


#: Bound on any single wait for the broker.
TIMEOUT = 10.0
#: The overhead of one message in a PUBLISH body besides its topic, payload
#: and headers: request_id 8, topic length 2, batch count and CRC 8, record
#: payload_len 4 and headers_len 2 (protocol.md, "Limits").
PUBLISH_OVERHEAD = 24


def only_session(server: Server) -> Session:
    assert len(server.sessions) == 1, server.sessions
    return next(iter(server.sessions))


# -- max_frame_bytes and the payload it allows ---------------------------------


async def test_max_frame_bytes() -> None:
    limit = 64 * 1024
    async with running_broker(limits=Limits(max_frame_bytes=limit)) as server:
        async with raw_client(server) as raw:
            welcome = await raw.handshake()
            assert welcome.limits["max_frame_bytes"] == limit
            # Exactly at the limit: a PUBLISH body of `limit` bytes is served.
            topic = b"frames.big"
            payload = b"p" * (limit - PUBLISH_OVERHEAD - len(topic))
            frame = publish_frame(1, topic, good_batch(payload))
            assert len(frame) == 6 + limit
            ack = await raw.request(frame)
            assert isinstance(ack, PubAck) and ack.request_id == 1, ack
            # One byte more: FRAME_TOO_LARGE as soon as the header is in,
            # without waiting for a body that never comes.
            await raw.send(raw_frame(FrameType.PUBLISH, b"", size=limit + 1))
            await expect_fatal(raw, ErrorCode.FRAME_TOO_LARGE)
        async with raw_client(server) as raw:
            await raw.handshake()
            await check_raw_healthy(raw, "frames.after")


async def test_max_payload_bytes_refused_by_the_client_before_sending() -> None:
    limit = 16 * 1024
    topic = "payload.max"
    headers = {"k": "v"}
    headers_block = 2 + 1 + 2 + 1
    # An idempotent client (the default) keeps room to name each batch.
    largest = limit - PUBLISH_OVERHEAD - len(topic) - headers_block - MSG_ID_ROOM
    async with running_broker(limits=Limits(max_frame_bytes=limit)) as server:
        async with pybroker.connect(server.url) as c:
            ack = await c.publish(topic, b"x" * largest, headers)
            assert ack.offset == 0
            with pytest.raises(pybroker.MessageTooLarge) as info:
                await c.publish(topic, b"x" * (largest + 1), headers)
            message = str(info.value)
            assert f"{largest + 1} payload bytes" in message and f"room for {largest}" in message
            with pytest.raises(pybroker.MessageTooLarge):
                c.publish_nowait(topic, b"x" * limit)
            with pytest.raises(pybroker.MessageTooLarge):
                await c.request("payload.request", b"x" * limit, timeout=TIMEOUT)
            # Nothing was sent: the connection is fine, the log holds one message.
            await c.ping()
            assert not c.closed
            assert server.broker.router.topics[topic].log.next_offset == 1
            assert "payload.request" not in server.broker.router.topics


# -- batches, topics, subscriptions (request errors, not fatal) --------------------


async def test_max_batch_messages() -> None:
    async with running_broker(limits=Limits(max_batch_messages=3)) as server:
        async with raw_client(server) as raw:
            welcome = await raw.handshake()
            assert welcome.limits["max_batch_messages"] == 3
            ack = await raw.request(publish_frame(1, b"batch.t", good_batch(b"a", b"b", b"c")))
            assert isinstance(ack, PubAck) and ack.count == 3, ack
            refused = await raw.request(
                publish_frame(2, b"batch.t", good_batch(b"a", b"b", b"c", b"d"))
            )
            expect_request_error(refused, ErrorCode.BATCH_LIMIT, 2, RefKind.REQUEST)
            assert server.broker.router.topics["batch.t"].log.next_offset == 3
            await check_raw_healthy(raw, "batch.after")


async def test_max_topic_bytes() -> None:
    async with running_broker(limits=Limits(max_topic_bytes=20)) as server:
        async with raw_client(server) as raw:
            welcome = await raw.handshake()
            assert welcome.limits["max_topic_bytes"] == 20
            at_limit = b"t" * 10 + b"." + b"u" * 9
            ack = await raw.request(publish_frame(1, at_limit, good_batch(b"ok")))
            assert isinstance(ack, PubAck), ack
            refused = await raw.request(publish_frame(2, at_limit + b"v", good_batch(b"no")))
            expect_request_error(refused, ErrorCode.BAD_TOPIC, 2, RefKind.REQUEST)
            assert await raw.request(subscribe_frame(1, at_limit)) == SubAck(1)
            refused = await raw.request(subscribe_frame(2, b"t" * 10 + b".>" + b"x" * 9))
            expect_request_error(refused, ErrorCode.BAD_PATTERN, 2, RefKind.SUBSCRIPTION)
            await check_raw_healthy(raw, "after")


async def test_max_topic_depth() -> None:
    async with running_broker(limits=Limits(max_topic_depth=3)) as server:
        async with raw_client(server) as raw:
            welcome = await raw.handshake()
            assert welcome.limits["max_topic_depth"] == 3
            ack = await raw.request(publish_frame(1, b"a.b.c", good_batch(b"ok")))
            assert isinstance(ack, PubAck), ack
            refused = await raw.request(publish_frame(2, b"a.b.c.d", good_batch(b"no")))
            expect_request_error(refused, ErrorCode.BAD_TOPIC, 2, RefKind.REQUEST)
            assert await raw.request(subscribe_frame(1, b"a.*.>")) == SubAck(1)
            refused = await raw.request(subscribe_frame(2, b"a.*.c.>"))
            expect_request_error(refused, ErrorCode.BAD_PATTERN, 2, RefKind.SUBSCRIPTION)
            await check_raw_healthy(raw, "depth.after")
        # The client library checks the announced depth before sending.
        async with pybroker.connect(server.url) as c:
            with pytest.raises(ValueError):
                await c.publish("a.b.c.d", b"no")
            await c.ping()


async def test_max_subscriptions() -> None:
    async with running_broker(limits=Limits(max_subscriptions=3)) as server:
        async with raw_client(server) as raw:
            welcome = await raw.handshake()
            assert welcome.limits["max_subscriptions"] == 3
            for sid in (1, 2, 3):
                assert await raw.request(subscribe_frame(sid, f"subs.{sid}".encode())) == SubAck(sid)
            refused = await raw.request(subscribe_frame(4, b"subs.4"))
            expect_request_error(refused, ErrorCode.TOO_MANY_SUBSCRIPTIONS, 4, RefKind.SUBSCRIPTION)
            # One fewer active: room again.
            assert await raw.request(encode_event(Unsubscribe(2))) == UnsubAck(2)
            assert await raw.request(subscribe_frame(4, b"subs.4")) == SubAck(4)
            refused = await raw.request(subscribe_frame(5, b"subs.5"))
            expect_request_error(refused, ErrorCode.TOO_MANY_SUBSCRIPTIONS, 5, RefKind.SUBSCRIPTION)
            assert await raw.request(encode_event(Unsubscribe(4))) == UnsubAck(4)
            await check_raw_healthy(raw, "subs.after", sub_id=900)


# -- connections ---------------------------------------------------------------


async def test_max_connections() -> None:
    async with running_broker(max_connections=3) as server:
        async with pybroker.connect(server.url) as c1, pybroker.connect(server.url) as c2:
            async with raw_client(server) as third:
                await third.handshake()
                await wait_sessions(server, 3)
                # A fourth connection: ERROR 108, fatal, before it sends anything.
                async with raw_client(server) as refused:
                    await expect_fatal(refused, ErrorCode.TOO_MANY_CONNECTIONS)
                # The client library reports it as the broker's refusal.
                with pytest.raises(pybroker.BrokerError) as info:
                    async with pybroker.connect(server.url, connect_timeout=TIMEOUT):
                        raise AssertionError("connected beyond max_connections")
                assert info.value.code == ErrorCode.TOO_MANY_CONNECTIONS
                assert server.connections_refused == 2
                # Those inside the limit are unaffected.
                await c1.ping()
                await c2.publish("conn.t", b"still here")
            # One left: the next one is served.
            await wait_sessions(server, 2)
            async with raw_client(server) as fourth:
                await fourth.handshake()
                await check_raw_healthy(fourth, "conn.after")
        assert server.connections_refused == 2
        assert server.http is not None
        assert 'pybroker_connections_refused_total{transport="tcp"} 2' in render(server.http)


async def test_max_connections_flood_costs_a_bounded_amount() -> None:
    """Many refused connections at once: each is answered or closed at once,
    none waits, and none becomes a session."""
    flood = 300
    async with running_broker(max_connections=1) as server:
        async with raw_client(server) as inside:
            await inside.handshake()
            answers: list[Error | None] = []

            async def knock() -> None:
                async with raw_client(server) as raw:
                    try:
                        event = await raw.next_event()
                    except trio.BrokenResourceError:
                        event = None  # closed without a word (over MAX_REFUSING)
                    assert event is None or isinstance(event, Error), event
                    answers.append(event)

            with trio.fail_after(TIMEOUT * 2):
                async with trio.open_nursery() as nursery:
                    for _ in range(flood):
                        nursery.start_soon(knock)
            assert len(answers) == flood
            assert all(a is None or a.code == ErrorCode.TOO_MANY_CONNECTIONS for a in answers)
            assert any(a is not None for a in answers)
            assert server.connections_refused == flood
            assert len(server.sessions) == 1
            await wait_until(lambda: server._refusing == 0)
            await check_raw_healthy(inside, "flood.after")


# -- timeouts --------------------------------------------------------------------


async def test_handshake_timeout() -> None:
    async with running_broker(handshake_timeout=0.5) as server:
        async with raw_client(server) as silent:
            error = await expect_fatal(silent, ErrorCode.HANDSHAKE_REQUIRED)
            assert "HELLO" in error.message
        async with raw_client(server) as partial:
            await partial.send(HELLO_FRAME[:5])
            await expect_fatal(partial, ErrorCode.HANDSHAKE_REQUIRED)
        async with raw_client(server) as prompt:
            await prompt.handshake()
            await trio.sleep(1.0)
            await check_raw_healthy(prompt, "handshake.after")


async def test_idle_timeout_pings_then_closes_a_silent_client() -> None:
    idle = 0.3
    async with running_broker(idle_timeout=idle) as server:
        async with raw_client(server) as raw:
            await raw.handshake()
            ping = await raw.next_event()
            assert isinstance(ping, Ping), ping
            # It does not answer: ERROR 107, fatal, then EOF.
            error = await expect_fatal(raw, ErrorCode.IDLE_TIMEOUT)
            assert "PONG" in error.message
        await wait_sessions(server, 0)


async def test_idle_timeout_spares_clients_that_answer() -> None:
    idle = 0.4
    async with running_broker(idle_timeout=idle) as server:
        async with raw_client(server) as raw:
            await raw.handshake()
            # Answer every PING for several idle periods: never closed.
            pings = 0
            with trio.move_on_after(idle * 6):
                while True:
                    event = await raw.next_event()
                    assert isinstance(event, Ping), event
                    pings += 1
                    await raw.send(encode_event(Pong(event.nonce)))
            assert pings >= 2
            await check_raw_healthy(raw, "idle.raw")
        # The client library answers PINGs by itself, however idle the
        # application is.
        async with pybroker.connect(server.url) as c:
            async with c.subscribe("idle.>") as sub:
                await trio.sleep(idle * 5)
                assert not c.closed
                await c.publish("idle.t", b"awake")
                with trio.fail_after(TIMEOUT):
                    msg = await anext(sub)
                assert msg.payload == b"awake"


async def test_idle_timeout_counts_frames_not_bytes() -> None:
    """A client that drips a frame byte by byte never completes one: idle."""
    idle = 0.3
    async with running_broker(idle_timeout=idle) as server:
        async with raw_client(server) as raw:
            await raw.handshake()
            frame = encode_event(Ping(1))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.drip, frame, 0.1)
                event = await raw.next_event()
                assert isinstance(event, Ping), event
                await expect_fatal(raw, ErrorCode.IDLE_TIMEOUT)
                nursery.cancel_scope.cancel()
            assert raw.dripped < len(frame)


# -- max_inflight_publishes: backpressure, not an error ------------------------------


@pytest.fixture
def stuck_disk(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """fsync does not return until the event is set (a very slow disk)."""
    gate = trio.Event()
    real_sync = FileStore.sync

    async def gated_sync(self: FileStore) -> pybroker.Durability:
        await gate.wait()
        return await real_sync(self)

    monkeypatch.setattr(FileStore, "sync", gated_sync)
    return gate


def durable_broker(tmp_path: Path, inflight: int) -> AbstractAsyncContextManager[Server]:
    # fsync always (PUBACKs wait for it) except for "fast.>" topics.
    settings = SettingsResolver.from_specs(TopicSettings(fsync="always"), ["fast.>:fsync=never"])
    return running_broker(
        data_dir=tmp_path / "data",
        topic_settings=settings,
        limits=Limits(max_inflight_publishes=inflight),
    )


async def test_max_inflight_publishes(tmp_path: Path, stuck_disk: trio.Event) -> None:
    limit = 4
    total = 40
    async with durable_broker(tmp_path, limit) as server:
        async with raw_client(server) as raw:
            welcome = await raw.handshake()
            assert welcome.limits["max_inflight_publishes"] == limit
            session = only_session(server)
            # All 40 PUBLISH frames in one write; their PUBACKs wait for fsync.
            await raw.send(
                b"".join(publish_frame(i, b"slow.t", good_batch(b"m%d" % i)) for i in range(1, total + 1))
            )
            log = lambda: server.broker.router.topics["slow.t"].log  # noqa: E731
            await wait_until(lambda: "slow.t" in server.broker.router.topics and log().next_offset == limit)
            await wait_until(lambda: session.reading_paused)
            await trio.sleep(0.3)
            # The broker read no further: at most `limit` unanswered.
            assert log().next_offset == limit
            assert session.acks.unacked == limit
            # Other connections are not held up.
            async with pybroker.connect(server.url) as other:
                ack = await other.publish("fast.t", b"not waiting")
                assert ack.offset == 0
            # The disk comes back: every PUBLISH is read, stored, answered in order.
            stuck_disk.set()
            acks = await raw.events(total)
            assert [a.request_id for a in acks if isinstance(a, PubAck)] == list(range(1, total + 1))
            assert [a.base_offset for a in acks if isinstance(a, PubAck)] == list(range(total))
            assert log().next_offset == total
            assert not session.reading_paused
            await check_raw_healthy(raw, "inflight.after")


async def test_max_inflight_publishes_is_the_client_window(
    tmp_path: Path, stuck_disk: trio.Event
) -> None:
    """The client library keeps its PUBLISH frames in flight under the limit."""
    limit = 2
    topics = [f"slow.t{i}" for i in range(30)]
    async with durable_broker(tmp_path, limit) as server:
        async with pybroker.connect(server.url, max_inflight_batches=8) as c:
            assert c._max_inflight_batches == limit
            pending = [c.publish_nowait(t, b"m") for t in topics]
            await wait_until(lambda: len(c._inflight) == limit)
            await trio.sleep(0.2)
            assert len(c._inflight) == limit  # one frame per topic, but only two out
            assert c._unsent_count == len(topics) - limit
            assert sum(t in server.broker.router.topics for t in topics) == limit
            stuck_disk.set()
            with trio.fail_after(TIMEOUT):
                acks = [await p.wait() for p in pending]
            assert [a.topic for a in acks] == topics
            assert all(a.offset == 0 for a in acks)


async def test_concurrent_senders_share_the_pending_window() -> None:
    """Regression: with the pipeline full, a second task waiting in send()
    replaced the first one's wake-up event, and the first waited forever."""
    async with running_broker() as server:
        async with pybroker.connect(server.url, max_pending=1) as c:
            done: list[int] = []

            async def sender(i: int) -> None:
                for j in range(20):
                    await c.send("senders.t", b"%d-%d" % (i, j))
                done.append(i)

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for i in range(3):
                        nursery.start_soon(sender, i)
                await c.flush()
            assert sorted(done) == [0, 1, 2]
            assert server.broker.router.topics["senders.t"].log.next_offset == 60


# -- the CLI -------------------------------------------------------------------


def test_serve_flags_set_every_limit() -> None:
    from pybroker.server.cli import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "--max-connections", "7",
            "--max-frame-bytes", "65536",
            "--max-batch-messages", "9",
            "--max-topic-bytes", "40",
            "--max-topic-depth", "4",
            "--max-subscriptions", "5",
            "--max-inflight-publishes", "6",
            "--outbound-queue-bytes", "100000",
            "--handshake-timeout", "2.5",
            "--idle-timeout", "0",
        ]
    )
    assert (args.max_connections, args.max_frame_bytes, args.max_batch_messages) == (7, 65536, 9)
    assert (args.max_topic_bytes, args.max_topic_depth, args.max_subscriptions) == (40, 4, 5)
    assert (args.max_inflight_publishes, args.outbound_queue_bytes) == (6, 100000)
    assert (args.handshake_timeout, args.idle_timeout) == (2.5, 0.0)
    for bad in (["--max-connections", "0"], ["--handshake-timeout", "0"], ["--idle-timeout", "-1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *bad])


def test_limits_below_one_are_refused() -> None:
    from pybroker.server.config import Config

    for bad in (
        {"max_inflight_publishes": 0},
        {"max_frame_bytes": 0},
        {"max_subscriptions": 0},
        {"max_topic_bytes": 0x10000},
    ):
        with pytest.raises(ValueError):
            Limits(**bad)
    for bad_config in ({"max_connections": 0}, {"handshake_timeout": 0}, {"idle_timeout": -1}):
        with pytest.raises(ValueError):
            Config(**bad_config)  # type: ignore[arg-type]


async def test_serve_flags_reach_the_broker(tmp_path: Path) -> None:
    """`pybroker serve` with limit flags announces them in WELCOME."""
    async with serve(
        tmp_path, "--max-frame-bytes", "65536", "--max-inflight-publishes", "6", "--max-subscriptions", "5"
    ) as broker:
        async with pybroker.connect(broker.url) as c:
            assert c.server is not None
            limits = c.server.limits
            assert limits["max_frame_bytes"] == 65536
            assert limits["max_inflight_publishes"] == 6
            assert limits["max_subscriptions"] == 5
            with pytest.raises(pybroker.MessageTooLarge):
                await c.publish("cli.t", b"x" * 65536)


# -- the client's keepalive: noticing a broker that vanished ----------------------


async def test_client_keepalive_notices_a_silent_broker() -> None:
    """A 'broker' that says WELCOME and then nothing, ever (a dead host)."""
    from pybroker.protocol import NEED_DATA, Connection, Hello, Role, Welcome

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def silent_broker() -> None:
        stream = await listeners[0].accept()
        conn = Connection(Role.SERVER)
        while not isinstance(event := conn.next_event(), Hello):
            assert event is NEED_DATA, event
            conn.receive_data(await stream.receive_some(65536))
        await stream.send_all(conn.send(Welcome("0", "silent", {})))
        try:
            while await stream.receive_some(65536):
                pass  # reads everything, answers nothing
        except trio.BrokenResourceError:
            pass
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(silent_broker)
        with trio.fail_after(TIMEOUT):
            async with pybroker.connect(f"pybroker://127.0.0.1:{port}", keepalive=0.2) as c:
                with pytest.raises(pybroker.ConnectionClosed, match="no answer from the broker"):
                    await c.ping()
                assert c.closed
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()


async def test_client_keepalive_keeps_a_live_connection() -> None:
    async with running_broker(idle_timeout=0) as server:
        async with pybroker.connect(server.url, keepalive=0.4) as c:
            await trio.sleep(2.0)  # five keepalive periods of application silence
            assert not c.closed
            ack = await c.publish("keepalive.t", b"fine")
            assert ack.offset == 0
    with pytest.raises(ValueError):
        async with pybroker.connect(server.url, keepalive=0):
            pass
