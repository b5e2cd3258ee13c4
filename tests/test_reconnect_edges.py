"""Edge cases of reconnecting, found by a review of the first version
(commit 1204073). Each docstring tells the failure that version had and
the test guards against: races with the resume, stale positions, frames too
large to resume in, cancelled calls, acks made while away, closing during an
outage, a malformed batch's credit and how errors reach the caller."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import anyio
from anyio.abc import ByteStream

import pybroker
import pybroker.connection as client_connection
from pybroker.server.config import Limits
from pybroker.server.server import Server
from pybroker import Message, Reconnect
from pybroker.protocol import PubAck, Publish, encode_record

from helpers.anybroker import trio_only
from helpers.collect import Collector
from helpers.frames import batch_with_count
from helpers.inproc import wait_until
from helpers.raw import raw_client
from helpers.restarts import FAST, batch, free_port, publish_all, publish_one_batch, serve_until


#: Every test here runs under Trio and under asyncio.
pytestmark = pytest.mark.anyio

WAIT = 5.0


class _Broker:
    """A broker that can be stopped and started again on the same port."""

    def __init__(self, nursery: anyio.abc.TaskGroup, **config: Any) -> None:
        self._nursery = nursery
        self._config = config
        self._config.setdefault("port", free_port())
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self.server: Server | None = None

    @property
    def url(self) -> str:
        return f"pybroker://127.0.0.1:{self._config['port']}"

    async def start(self) -> Server:
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        self.server = await self._nursery.start(
            partial(serve_until, self._stop, stopped=self._stopped, **self._config)
        )
        return self.server

    async def stop(self) -> None:
        assert self.server is not None
        self._stop.set()
        await self._stopped.wait()

    def subscription_count(self) -> int:
        assert self.server is not None
        return sum(len(s.subs) for s in self.server.sessions)


class _Gate:
    """Holds the send of a reconnect's resume frames (the SUBSCRIBEs and
    resent PUBLISHes: the first ``send`` after the handshake's) until
    released: a slow network, a TLS record, a large resume."""

    def __init__(self) -> None:
        #: The next stream opened (the reconnect) is gated.
        self.armed = False
        self.entered = anyio.Event()
        self.release = anyio.Event()


class _GatedStream(ByteStream):
    def __init__(self, inner: ByteStream, gate: _Gate | None) -> None:
        self._inner = inner
        self._gate = gate
        self._sends = 0

    async def send(self, item: bytes) -> None:
        self._sends += 1
        if self._gate is not None and self._sends == 2:  # 1: HELLO, 2: resume frames
            self._gate.entered.set()
            await self._gate.release.wait()
        await self._inner.send(item)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._inner.receive(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> _Gate:
    """Once armed, the next connection opened is gated (its resume send waits)."""
    g = _Gate()
    real = client_connection.open_stream

    async def gated_open_stream(*args: Any, **kwargs: Any) -> ByteStream:
        stream = await real(*args, **kwargs)
        armed, g.armed = g.armed, False
        return _GatedStream(stream, g if armed else None)

    monkeypatch.setattr(client_connection, "open_stream", gated_open_stream)
    return g


# ---------------------------------------------------------------------------
# 1. Backpressure: several senders blocked on max_pending


async def test_every_sender_blocked_on_max_pending_fails_when_the_client_gives_up() -> None:
    """Two tasks wait in send() for room during an outage; the client gives
    up. Both must fail with ConnectionClosed. Each waiter replaces
    ``Client._room`` with a fresh Event, so only the last one is ever set:
    the first waiter sleeps forever, even after the client closed."""
    policy = Reconnect(max_attempts=3, initial_delay=0.05, max_delay=0.05, jitter=0)
    failed: list[int] = []
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=policy, max_pending=1) as c:
            await broker.stop()
            await wait_until(lambda: not c.connected, WAIT)
            c.publish_nowait("bp.t", b"fills max_pending")

            async def sender(i: int) -> None:
                with pytest.raises(pybroker.ConnectionClosed):
                    await c.send("bp.t", b"x")
                failed.append(i)

            with anyio.move_on_after(WAIT):
                async with anyio.create_task_group() as senders:
                    senders.start_soon(sender, 1)
                    await anyio.sleep(0.01)
                    senders.start_soon(sender, 2)
                    await wait_until(lambda: c.closed, WAIT)
                    await wait_until(lambda: len(failed) == 2, timeout=WAIT)
            assert c.closed
    assert sorted(failed) == [1, 2], f"only sender(s) {failed} woke up; the other hangs forever"


# ---------------------------------------------------------------------------
# 2. The window between building the resume frames and _connected.set()


async def test_subscribe_while_the_resume_is_being_sent_completes(gate: _Gate) -> None:
    """subscribe() called after _resume_frames() was built but before
    _connected is set: it skips sending (not connected) and relies on the
    resume, which was already built without it. Its SUBSCRIBE is never sent
    and subscribe() waits forever."""
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=FAST) as c:
            await c.subscribe("old.>", Collector())
            await broker.stop()
            gate.armed = True
            await broker.start()
            with anyio.fail_after(WAIT):
                await gate.entered.wait()
            subscribed = anyio.Event()

            async def late_subscriber() -> None:
                with anyio.move_on_after(WAIT):
                    await c.subscribe("late.t", Collector())
                    subscribed.set()

            nursery.start_soon(late_subscriber)
            await anyio.sleep(0.05)
            gate.release.set()
            await wait_until(lambda: c.connected, WAIT)
            with anyio.move_on_after(WAIT):
                await subscribed.wait()
            assert subscribed.is_set(), "subscribe() during the resume send never returns"
            nursery.cancel_scope.cancel()


async def test_credit_granted_while_the_resume_is_being_sent_is_not_lost(
    gate: _Gate, tmp_path: Any
) -> None:
    """A subscription (window 10) holds a full window unconsumed when the
    broker restarts; its resume SUBSCRIBE carries credit 1 (window - pending).
    The application consumes those 10 while the resume frames are being
    sent: the CREDIT for them is dropped (not connected yet) and _consumed
    reset, yet the resume already went out with credit 1. The broker's
    credit is now 1 for good and the subscription stalls after one more
    message."""
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery, data_dir=tmp_path / "data")
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=FAST) as c:
            async with c.subscribe("cr.t", window=10) as sub:
                await publish_all(broker.url, "cr.t", batch("first", 10))
                await wait_until(lambda: sub.statistics().pending_messages == 10, WAIT)
                await broker.stop()
                gate.armed = True
                await broker.start()
                with anyio.fail_after(WAIT):
                    await gate.entered.wait()
                got = []
                with anyio.fail_after(WAIT):
                    async for msg in sub:  # the whole buffered window
                        got.append(msg.payload)
                        if len(got) == 10:
                            break
                with anyio.move_on_after(0.05):
                    await sub.__anext__()  # ends the batch: its credit is granted
                gate.release.set()
                await wait_until(lambda: c.connected, WAIT)
                for p in batch("after", 20):  # one batch each
                    await publish_all(broker.url, "cr.t", [p])
                with anyio.move_on_after(WAIT):
                    async for msg in sub:
                        got.append(msg.payload)
                        if len(got) == 30:
                            break
                assert got == batch("first", 10) + batch("after", 20), (
                    f"stalled after {len(got) - 10} of 20 new messages"
                )
            nursery.cancel_scope.cancel()


async def test_unsubscribe_while_the_resume_is_being_sent_leaves_nothing_on_the_broker(
    gate: _Gate,
) -> None:
    """unsubscribe() in the same window drops the subscription locally only
    (not connected), but its SUBSCRIBE is in the resume frames being sent:
    the broker keeps a subscription nobody will ever unsubscribe."""
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=FAST) as c:
            sub = await c.subscribe("zombie.>")
            await broker.stop()
            gate.armed = True
            await broker.start()
            with anyio.fail_after(WAIT):
                await gate.entered.wait()
                # The resume (with this subscription's SUBSCRIBE) is on its
                # way: the UNSUBSCRIBE follows it on the same connection.
                async with anyio.create_task_group() as inner:
                    inner.start_soon(sub.unsubscribe)
                    await anyio.wait_all_tasks_blocked()
                    gate.release.set()
                await wait_until(lambda: c.connected, WAIT)
                await c.ping()  # the resume has been read
            assert broker.subscription_count() == 0, "a zombie subscription stays on the broker"
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# 3. A broker that lost the topic's tail (memory storage restarted)


async def test_new_batch_straddling_a_stale_position_is_delivered_whole() -> None:
    """Memory storage: the subscriber had offsets 0..4 (position 5) when the
    broker restarted empty. The first new batch (10 messages, offsets 0..9)
    straddles the stale position and Subscription._push drops 0..4 as
    'already had' -- but they are new messages. (The comment there says a
    restarted memory broker's messages are delivered; only a batch wholly
    below the position is.) A position is always a batch boundary of
    what was received, so a straddling batch can only come from a log that
    is not the one the position was taken from."""
    got = Collector()
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=FAST) as c:
            await c.subscribe("mem.t", got)
            await publish_all(broker.url, "mem.t", batch("old", 5))
            await got.wait_for({"mem.t": 5}, timeout=WAIT)
            await broker.stop()
            await broker.start()
            await wait_until(lambda: c.connected, WAIT)
            await c.ping()
            await publish_all(broker.url, "mem.t", batch("new", 10))  # one batch
            with anyio.move_on_after(2):
                await got.wait_for({"mem.t": 15}, timeout=2)
            assert got.payloads("mem.t") == batch("old", 5) + batch("new", 10)
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# 4. The resume SUBSCRIBE grows with every topic ever received from


async def test_wildcard_subscription_over_many_topics_resumes() -> None:
    """A wildcard subscription received from 150 topics with long names. Its
    resume SUBSCRIBE carries one resume:<topic> option per topic ever seen
    (never pruned) and here exceeds the broker's max_frame_bytes (32 KiB):
    the broker closes the connection with a non-retryable error and the
    client gives up for good, although nothing is wrong but the frame size.
    (The option count is also a u16: 65,536 topics cannot be encoded at all,
    and every attempt fails locally until the client gives up.)"""
    limits = Limits(max_frame_bytes=32 * 1024)
    topics = [f"many.{i:03d}." + "x" * 230 for i in range(150)]
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery, limits=limits)
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=FAST) as c:
            sub = await c.subscribe("many.>")
            async with pybroker.connect(broker.url) as pub:
                for t in topics:
                    await pub.publish(t, b"x")
            await wait_until(lambda: sub.statistics().pending_messages == len(topics), WAIT)
            await broker.stop()
            await broker.start()
            with anyio.move_on_after(WAIT):
                while not (c.connected and c.reconnects == 1) and not c.closed:
                    await anyio.sleep(0.01)
            assert not c.closed, f"the client gave up: {c._closed}"
            await publish_all(broker.url, topics[0], [b"y"])
            with anyio.fail_after(WAIT):
                async for msg in sub:
                    if msg.payload == b"y":
                        break
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# 5. Cancelled subscribe()/request() while reconnecting


async def test_request_timing_out_while_reconnecting_leaves_no_subscription() -> None:
    """request() during an outage times out (its timeout covers creating the
    reply inbox, which waits for the reconnect). The cancelled subscribe()
    leaves its Subscription in Client._subs with its waiter: it is resumed
    on the reconnect and stays on the broker (and in the client) forever,
    with no callback task and no reference; each such request adds one."""
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=FAST) as c:
            await broker.stop()
            await wait_until(lambda: not c.connected, WAIT)
            for _ in range(3):
                with pytest.raises(pybroker.Timeout):
                    await c.request("svc.echo", b"?", timeout=0.1)
            await broker.start()
            await wait_until(lambda: c.connected, WAIT)
            await c.ping()
            assert broker.subscription_count() == 0, (
                f"{broker.subscription_count()} orphaned inbox subscriptions resumed on the broker"
            )
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# 6. Group acknowledgements made while reconnecting


async def test_group_ack_made_while_reconnecting_is_not_redelivered(tmp_path: Any) -> None:
    """A member holds a job; the broker restarts; the application acks it
    during the outage. The ACK is queued and sent after the rejoin, but
    from the new member, and groups.settle ignores acks for offsets not
    pending on that member (the job went back to 'ready' when the old
    member left): the acknowledged job is delivered again."""
    jobs: list[Message] = []
    arrived = anyio.Event()
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery, data_dir=tmp_path / "data")
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=FAST) as c:
            sub = await c.subscribe("jobs", group="workers", ack_wait=30)

            async def reader() -> None:
                async for msg in sub:
                    jobs.append(msg)
                    arrived.set()

            nursery.start_soon(reader)
            await publish_all(broker.url, "jobs", [b"job-1"])
            with anyio.fail_after(WAIT):
                await arrived.wait()
            await broker.stop()
            await wait_until(lambda: not c.connected, WAIT)
            await jobs[0].ack()  # acknowledged while away
            await broker.start()
            await wait_until(lambda: c.connected, WAIT)
            await anyio.sleep(0.5)
            assert [m.payload for m in jobs] == [b"job-1"], "an acknowledged job came back"
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# 7. Leaving `async with connect()` during an outage


async def test_leaving_during_an_outage_waits_close_timeout_for_queued_publishes() -> None:
    """connect() promises to wait up to close_timeout for queued publishes on
    a normal exit. During an outage aclose() sets _closing_by_us, and
    _reconnect stops at its next backoff tick and fails every queued publish
    with 'gave up reconnecting after N attempts', though the broker is back
    well within close_timeout."""
    pendings: list[pybroker.PendingAck] = []
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()

        async def restart_soon() -> None:
            await anyio.sleep(0.5)
            await broker.start()

        async with pybroker.connect(broker.url, reconnect=FAST, close_timeout=5) as c:
            await broker.stop()
            await wait_until(lambda: not c.connected, WAIT)
            pendings = [c.publish_nowait("leave.t", p) for p in batch("q", 5)]
            nursery.start_soon(restart_soon)
        errors = [p.error for p in pendings if p.error is not None]
        assert not errors, f"queued publishes failed on exit: {errors[0]!r}"
        assert all(p.done() for p in pendings)
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# 8. Credit spent on a malformed batch is never given back


@trio_only  # a raw client on the wire (helpers.raw runs on Trio)
async def test_malformed_batch_does_not_stall_the_subscription() -> None:
    """A publisher stores a batch whose CRC matches but whose records do not
    tile it (protocol.md: reported, then 'goes on with the next one'). The
    broker spends 10 credit on it; Client._on_deliver skips it without
    Subscription._account, so that credit never comes back (nor is its
    position recorded). With window=10 the subscription stalls for good."""
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()
        async with pybroker.connect(broker.url) as c:
            async with c.subscribe("bad.t", window=10) as sub:
                body = encode_record(b"") * 10 + b"junk"
                async with raw_client(broker.url, handshake="raw", timeout=WAIT) as raw:
                    await raw.send_event(Publish(1, "bad.t", batch_with_count(10, body)))
                    assert isinstance(await raw.next_event(), PubAck)
                await wait_until(lambda: sub.statistics().malformed_batches == 1, WAIT)
                await publish_all(broker.url, "bad.t", batch("good", 3))
                got = []
                with anyio.move_on_after(2):
                    async for msg in sub:
                        got.append(msg.payload)
                        if len(got) == 3:
                            break
                assert got == batch("good", 3), "the subscription stalled after a malformed batch"
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# 9. Giving up with several callback subscriptions


async def test_giving_up_raises_connection_closed_not_an_exception_group() -> None:
    """When the client gives up, every callback subscription's task raises
    ConnectionClosed into the client's nursery; connect() unwraps only a
    lone exception, so with two callback subscriptions the caller gets a
    BaseExceptionGroup of two ConnectionClosed instead of ConnectionClosed."""
    policy = Reconnect(max_attempts=2, initial_delay=0.02, max_delay=0.02)
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()
        with anyio.fail_after(WAIT):
            try:
                async with pybroker.connect(broker.url, reconnect=policy) as c:
                    await c.subscribe("cb.a", Collector())
                    await c.subscribe("cb.b", Collector())
                    await broker.stop()
                    await anyio.sleep_forever()
            except BaseException as exc:  # noqa: BLE001 - the type is the point
                raised: BaseException = exc
        assert isinstance(raised, pybroker.ConnectionClosed), f"got {raised!r}"
        nursery.cancel_scope.cancel()


@trio_only  # a raw client on the wire (helpers.raw runs on Trio)
async def test_messages_published_to_a_reset_topic_while_away_are_delivered() -> None:
    """Memory storage: the subscriber had offsets 0..4 of mem.t (position 5)
    when the broker restarted empty. While it is away, 3 messages go to
    mem.t (offsets 0..2). It resumes with resume:mem.t=5, which is past the
    topic's end, so the broker starts 'with the next message published'
    (session._on_subscribe) and the 3 are never delivered, with no
    DATA_LOST either: a silent gap."""
    got = Collector()
    async with anyio.create_task_group() as nursery:
        broker = _Broker(nursery)
        await broker.start()
        async with pybroker.connect(broker.url, reconnect=FAST) as c:
            await c.subscribe("mem.t", got)
            await publish_all(broker.url, "mem.t", batch("old", 5))
            await got.wait_for({"mem.t": 5}, timeout=WAIT)
            await broker.stop()
            await wait_until(lambda: not c.connected, WAIT)
            # Keep the subscriber away while the new broker takes messages.
            hold = anyio.Event()
            real = client_connection.open_stream

            async def held_open_stream(*args: Any, **kwargs: Any) -> ByteStream:
                await hold.wait()
                return await real(*args, **kwargs)

            client_connection.open_stream = held_open_stream  # type: ignore[assignment]
            try:
                await broker.start()
                with anyio.fail_after(WAIT):
                    for p in batch("away", 3):
                        # Raw: pybroker.connect would wait on the hold too.
                        await publish_one_batch(broker.url, "mem.t", [p])
            finally:
                client_connection.open_stream = real  # type: ignore[assignment]
                hold.set()
            await wait_until(lambda: c.connected, WAIT)
            with anyio.move_on_after(2):
                await got.wait_for({"mem.t": 8}, timeout=2)
            assert got.payloads("mem.t") == batch("old", 5) + batch("away", 3)
            nursery.cancel_scope.cancel()
