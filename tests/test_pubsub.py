"""End-to-end publish/subscribe against a real broker on 127.0.0.1, port 0.

Every test talks TCP to a broker started by the ``pybroker_server`` fixture or
``helpers.anybroker.serving`` and uses only the client library's public
API (plus, where a precondition needs checking, the broker's log interface).
Every wait is bounded with ``anyio.fail_after`` so that a bug fails a test
instead of hanging the suite.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import pybroker
from pybroker.server.config import Limits
from pybroker.server.server import Server
from pybroker import (
    BrokerError,
    Client,
    ConnectionClosed,
    ErrorCode,
    Message,
    PendingAck,
    PublishAck,
    Subscription,
)
from pybroker.protocol import MSG_ID_ROOM

from helpers.anybroker import pybroker_server, serving, trio_only  # noqa: F401 (a fixture)
from helpers.collect import Collector, take, take_until

#: Every test here runs under Trio and under asyncio (brokers started with
#: ``serving``, which under asyncio runs the Trio broker in a thread).
pytestmark = pytest.mark.anyio


#: Upper bound, in seconds, on any single wait in these tests.
TIMEOUT = 10.0
#: How long "nothing more arrives" checks wait.
QUIET = 0.2

UTC = dt.timezone.utc
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------
# Helpers


async def drain_closed(sub: Subscription, limit: int = 100_000) -> list[Message]:
    """Everything still buffered in a subscription that has ended."""
    out: list[Message] = []
    with anyio.fail_after(TIMEOUT):
        async for msg in sub:
            out.append(msg)
            assert len(out) < limit
    return out


async def settle(*clients: Client) -> None:
    """A round trip on each connection, then a short pause.

    A PONG is queued behind everything the broker queued before it for that
    connection, so live deliveries caused by already-acknowledged publishes
    have arrived once ``ping`` returns; the pause covers log catch-up.
    """
    with anyio.fail_after(TIMEOUT):
        for c in clients:
            await c.ping()
    await anyio.sleep(QUIET)
    with anyio.fail_after(TIMEOUT):
        for c in clients:
            await c.ping()


def by_topic(messages: Iterable[Message]) -> dict[str, list[Message]]:
    grouped: dict[str, list[Message]] = defaultdict(list)
    for msg in messages:
        grouped[msg.topic].append(msg)
    return dict(grouped)


def assert_contiguous(messages: Sequence[Message], first: int = 0) -> None:
    offsets = [m.offset for m in messages]
    assert offsets == list(range(first, first + len(messages))), offsets[:50]


def us_to_datetime(timestamp_us: int) -> dt.datetime:
    """Exact conversion (no float rounding) of broker microseconds."""
    return EPOCH + dt.timedelta(microseconds=timestamp_us)


def datetime_to_us(when: dt.datetime) -> int:
    return (when - EPOCH) // dt.timedelta(microseconds=1)


@asynccontextmanager
async def connections(url: str, n: int) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(pybroker.connect(url, name=f"sub-{i}"))
            for i in range(n)
        ]
        yield clients


async def wait_clock_past(timestamp_us: int) -> None:
    """Wait (bounded) until the wall clock is past ``timestamp_us``."""
    with anyio.fail_after(TIMEOUT):
        while time.time_ns() // 1000 <= timestamp_us:
            await anyio.sleep(0.002)


# --------------------------------------------------------------------------
# 1. Basics


async def test_publish_returns_offsets_per_topic(
    pybroker_server: Server, pybroker_client: Client
) -> None:
    c = pybroker_client
    start = time.time()
    acks: dict[str, list[PublishAck]] = defaultdict(list)
    with anyio.fail_after(TIMEOUT):
        for i in range(12):
            topic = ("basic.a", "basic.b", "basic.c.d")[i % 3]
            acks[topic].append(await c.publish(topic, b"m%d" % i))
        pending = await c.send("basic.a", b"sent")
        sent_ack = await pending.wait()
        many = await c.publish_many("basic.b", [b"x", (b"y", {"h": "1"}), b"z"])
    end = time.time()

    for topic, topic_acks in acks.items():
        assert [a.offset for a in topic_acks] == [0, 1, 2, 3]
        assert all(a.topic == topic for a in topic_acks)
    assert sent_ack.topic == "basic.a" and sent_ack.offset == 4
    assert pending.done() and pending.result() == sent_ack
    assert [a.offset for a in many] == [4, 5, 6]
    assert all(a.topic == "basic.b" for a in many)
    every = [a for topic_acks in acks.values() for a in topic_acks] + [sent_ack, *many]
    for a in every:
        assert a.durability == pybroker_server.broker.store.durability
        assert start - 5 <= a.timestamp <= end + 5
    # One publisher awaiting each ack: timestamps never go backwards per topic.
    for topic_acks in acks.values():
        stamps = [a.timestamp_us for a in topic_acks]
        assert stamps == sorted(stamps)


async def test_subscriber_receives_payload_headers_topic_offset_timestamp(
    pybroker_server: Server,
) -> None:
    url = pybroker_server.url
    async with pybroker.connect(url) as sub_c, pybroker.connect(url) as pub_c:
        async with sub_c.subscribe("fields.>") as sub:
            before = time.time()
            sent: dict[tuple[str, int], tuple[bytes, dict[str, str], PublishAck]] = {}
            with anyio.fail_after(TIMEOUT):
                for i in range(30):
                    topic = f"fields.t{i % 3}"
                    payload = b"payload %d " % i + bytes(range(256)) * (i % 4)
                    headers = {"i": str(i), "kind": "t\u00e9st", "empty": ""} if i % 2 else {}
                    ack = await pub_c.publish(topic, payload, headers=headers or None)
                    sent[(topic, ack.offset)] = (payload, headers, ack)
            after = time.time()
            msgs = await take(sub, 30)

    assert len(msgs) == 30
    for topic, topic_msgs in by_topic(msgs).items():
        assert_contiguous(topic_msgs)
        stamps = [m.timestamp_us for m in topic_msgs]
        assert stamps == sorted(stamps), "timestamps went backwards within a topic"
        for m in topic_msgs:
            payload, headers, ack = sent[(topic, m.offset)]
            assert m.topic == topic
            assert m.payload == payload
            assert dict(m.headers) == headers
            assert m.timestamp_us == ack.timestamp_us
            assert before - 5 <= m.timestamp <= after + 5
            assert m.datetime.tzinfo is not None
            assert abs((m.datetime - us_to_datetime(m.timestamp_us)).total_seconds()) < 1e-5


async def test_sync_and_async_callbacks(pybroker_server: Server) -> None:
    url = pybroker_server.url
    sync_got, async_got = Collector(), Collector()
    async with pybroker.connect(url) as sub_c, pybroker.connect(url) as pub_c:
        with anyio.fail_after(TIMEOUT):
            sync_sub = await sub_c.subscribe("cb.topic", sync_got.sync_callback)
            async_sub = await sub_c.subscribe("cb.*", async_got.async_callback)
            for i in range(50):
                await pub_c.send("cb.topic", b"%d" % i, {"n": str(i)})
            await pub_c.flush()
        await sync_got.wait_for(50)
        await async_got.wait_for(50)
        await settle(pub_c, sub_c)
        assert sync_sub.statistics().delivered_messages == 50
        assert async_sub.statistics().delivered_messages == 50

    for got in (sync_got, async_got):
        assert len(got.messages) == 50
        assert_contiguous(got.messages)
        assert [m.payload for m in got.messages] == [b"%d" % i for i in range(50)]
        assert [m.headers["n"] for m in got.messages] == [str(i) for i in range(50)]


async def test_async_with_subscribe_and_async_for(pybroker_client: Client) -> None:
    c = pybroker_client
    received: list[Message] = []
    with anyio.fail_after(TIMEOUT):
        async with c.subscribe("iter.x") as sub:
            assert sub.pattern == "iter.x"
            await c.publish_many("iter.x", [b"%d" % i for i in range(10)])
            async for msg in sub:
                received.append(msg)
                if len(received) == 10:
                    break
        # Leaving the block unsubscribed: iteration has ended.
        assert await drain_closed(sub) == []
    assert_contiguous(received)
    assert [m.payload for m in received] == [b"%d" % i for i in range(10)]


async def test_unsubscribe_stops_delivery(pybroker_server: Server) -> None:
    url = pybroker_server.url
    cb_got = Collector()
    async with pybroker.connect(url) as sub_c, pybroker.connect(url) as pub_c:
        with anyio.fail_after(TIMEOUT):
            iter_sub = await sub_c.subscribe("unsub.t")
            cb_sub = await sub_c.subscribe("unsub.t", cb_got.sync_callback)
            witness = await sub_c.subscribe("unsub.t")  # stays subscribed
            await pub_c.publish("unsub.t", b"before")
        assert [m.payload for m in await take(iter_sub, 1)] == [b"before"]
        await cb_got.wait_for(1)

        with anyio.fail_after(TIMEOUT):
            await iter_sub.unsubscribe()
            await cb_sub.unsubscribe()
            await pub_c.publish("unsub.t", b"after")
        # The witness on the same connection got "after": had the others still
        # been subscribed, their copies would have arrived before it.
        assert [m.payload for m in await take(witness, 2)] == [b"before", b"after"]
        await settle(pub_c, sub_c)

        assert await drain_closed(iter_sub) == []
        assert [m.payload for m in cb_got.messages] == [b"before"]
        assert iter_sub.statistics().delivered_messages == 1
        assert witness.statistics().pending_messages == 0


# --------------------------------------------------------------------------
# 2. Wildcards

WILDCARD_TOPICS = [
    "w",
    "w.a",
    "w.b",
    "w.a.x",
    "w.a.y",
    "w.b.x",
    "w.a.b",
    "w.a.b.x",
    "other",
    "other.a.x",
]

WILDCARD_EXPECTED: dict[str, set[str]] = {
    "w": {"w"},
    "w.a": {"w.a"},
    "w.*": {"w.a", "w.b"},
    "w.>": {"w.a", "w.b", "w.a.x", "w.a.y", "w.b.x", "w.a.b", "w.a.b.x"},
    "w.*.x": {"w.a.x", "w.b.x"},
    "w.a.>": {"w.a.x", "w.a.y", "w.a.b", "w.a.b.x"},
    "*": {"w", "other"},
    "*.a.>": {"w.a.x", "w.a.y", "w.a.b", "w.a.b.x", "other.a.x"},
    "*.*.x": {"w.a.x", "w.b.x", "other.a.x"},
    ">": set(WILDCARD_TOPICS),
    "nothing.>": set(),
}


async def test_wildcards_match_topics_created_later(pybroker_server: Server) -> None:
    url = pybroker_server.url
    async with pybroker.connect(url) as sub_c, pybroker.connect(url) as pub_c:
        # Fresh broker: no topic exists when these subscriptions are made.
        subs: dict[str, Subscription] = {}
        with anyio.fail_after(TIMEOUT):
            for pattern in WILDCARD_EXPECTED:
                subs[pattern] = await sub_c.subscribe(pattern)
            for topic in WILDCARD_TOPICS:
                await pub_c.publish(topic, topic.encode())

        for pattern, expected in WILDCARD_EXPECTED.items():
            got = await take(subs[pattern], len(expected))
            assert {m.topic for m in got} == expected, pattern
            assert all(m.payload == m.topic.encode() and m.offset == 0 for m in got)

        # Nothing that does not match arrives later either.
        await settle(pub_c, sub_c)
        for pattern, sub in subs.items():
            assert sub.statistics().pending_messages == 0, pattern

        # Subscriptions made now that the topics exist (start "new") see the
        # next round, again only for matching topics.
        late = {p: await sub_c.subscribe(p) for p in ("w.*", "*.a.>", "w")}
        with anyio.fail_after(TIMEOUT):
            for topic in WILDCARD_TOPICS:
                await pub_c.publish(topic, b"second " + topic.encode())
        for pattern, sub in late.items():
            expected = WILDCARD_EXPECTED[pattern]
            got = await take(sub, len(expected))
            assert {m.topic for m in got} == expected, pattern
            assert all(m.offset == 1 and m.payload.startswith(b"second ") for m in got)
        await settle(pub_c, sub_c)
        for sub in late.values():
            assert sub.statistics().pending_messages == 0


# --------------------------------------------------------------------------
# 3. Fan-out


async def test_fan_out_ten_subscribers(pybroker_server: Server) -> None:
    url = pybroker_server.url
    topics = [f"fan.t{i}" for i in range(4)]
    per_topic = 600
    total = per_topic * len(topics)
    iter_patterns = ["fan.>", "fan.*", ">", "fan.>", "fan.*", ">"]
    callback_patterns = ["fan.>", "fan.*", ">", "fan.>"]
    expected: dict[str, dict[int, bytes]] = defaultdict(dict)

    async with connections(url, 10) as subscribers, pybroker.connect(url) as pub_c:
        iter_subs: list[Subscription] = []
        collectors: list[Collector] = []
        cb_subs: list[Subscription] = []
        with anyio.fail_after(TIMEOUT):
            for c, pattern in zip(subscribers[:6], iter_patterns):
                iter_subs.append(await c.subscribe(pattern))
            for i, (c, pattern) in enumerate(zip(subscribers[6:], callback_patterns)):
                got = Collector()
                collectors.append(got)
                cb = got.sync_callback if i % 2 else got.async_callback
                cb_subs.append(await c.subscribe(pattern, cb))

        results: list[list[Message]] = [[] for _ in iter_subs]

        async def consume(i: int) -> None:
            results[i] = await take(iter_subs[i], total, timeout=3 * TIMEOUT)

        async def publish() -> None:
            for round_ in range(per_topic // 100):
                for t, topic in enumerate(topics):
                    payloads = [b"%s:%d:%d" % (topic.encode(), round_, k) for k in range(100)]
                    if (round_ + t) % 2:
                        acks = await pub_c.publish_many(topic, payloads)
                    else:
                        pendings = [await pub_c.send(topic, p) for p in payloads]
                        acks = [await p.wait() for p in pendings]
                    for ack, payload in zip(acks, payloads):
                        expected[topic][ack.offset] = payload

        with anyio.fail_after(3 * TIMEOUT):
            async with anyio.create_task_group() as nursery:
                for i in range(len(iter_subs)):
                    nursery.start_soon(consume, i)
                nursery.start_soon(publish)
            for got in collectors:
                await got.wait_for(total, timeout=3 * TIMEOUT)

        await settle(pub_c, *subscribers)
        all_received = results + [got.messages for got in collectors]
        for sub in iter_subs + cb_subs:
            assert sub.statistics().pending_messages == 0

    for topic in topics:
        assert sorted(expected[topic]) == list(range(per_topic))
    for received in all_received:
        assert len(received) == total  # exactly once: no duplicates, nothing extra
        grouped = by_topic(received)
        assert sorted(grouped) == topics
        for topic, msgs in grouped.items():
            assert_contiguous(msgs)
            assert [m.payload for m in msgs] == [expected[topic][o] for o in range(per_topic)]


# --------------------------------------------------------------------------
# 4. Ordering with concurrent publishers


async def test_per_topic_order_with_concurrent_publishers(pybroker_server: Server) -> None:
    url = pybroker_server.url
    topics = ["ord.a", "ord.b", "ord.c"]
    per_task_topic = 150
    modes = ["publish", "send", "many", "publish", "send", "many"]
    total = len(modes) * len(topics) * per_task_topic
    acks: dict[tuple[int, str], list[PublishAck]] = defaultdict(list)

    async with pybroker.connect(url) as sub_c, pybroker.connect(url) as shared, AsyncExitStack() as stack:
        own = [await stack.enter_async_context(pybroker.connect(url)) for _ in range(3)]
        pub_clients = [shared, shared, shared, *own]
        sub = await sub_c.subscribe("ord.>")
        received: list[Message] = []

        async def publisher(task: int, c: Client, mode: str) -> None:
            def payload(topic: str, i: int) -> bytes:
                return b"%d:%s:%d" % (task, topic.encode(), i)

            for chunk_start in range(0, per_task_topic, 10):
                chunk = range(chunk_start, chunk_start + 10)
                for topic in topics:
                    if mode == "publish":
                        for i in chunk:
                            ack = await c.publish(topic, payload(topic, i), {"task": str(task)})
                            acks[(task, topic)].append(ack)
                    elif mode == "send":
                        pendings = [
                            await c.send(topic, payload(topic, i), {"task": str(task)})
                            for i in chunk
                        ]
                        await anyio.lowlevel.checkpoint()
                        acks[(task, topic)].extend([await p.wait() for p in pendings])
                    else:
                        acks[(task, topic)].extend(
                            await c.publish_many(
                                topic, [(payload(topic, i), {"task": str(task)}) for i in chunk]
                            )
                        )

        async def consume() -> None:
            received.extend(await take(sub, total, timeout=3 * TIMEOUT))

        with anyio.fail_after(3 * TIMEOUT):
            async with anyio.create_task_group() as nursery:
                nursery.start_soon(consume)
                for task, (c, mode) in enumerate(zip(pub_clients, modes)):
                    nursery.start_soon(publisher, task, c, mode)
        await settle(sub_c, shared)
        assert sub.statistics().pending_messages == 0

    assert len(received) == total
    grouped = by_topic(received)
    for topic in topics:
        msgs = grouped[topic]
        assert_contiguous(msgs)
        by_offset = {m.offset: m for m in msgs}
        for task in range(len(modes)):
            task_acks = acks[(task, topic)]
            offsets = [a.offset for a in task_acks]
            assert len(offsets) == per_task_topic
            assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
            for i, a in enumerate(task_acks):
                m = by_offset[a.offset]
                assert m.payload == b"%d:%s:%d" % (task, topic.encode(), i)
                assert m.headers["task"] == str(task)
                assert m.timestamp_us == a.timestamp_us
            # The subscriber sees each publisher's messages in its order.
            seq = [int(m.payload.split(b":")[2]) for m in msgs if m.headers["task"] == str(task)]
            assert seq == list(range(per_task_topic))


# --------------------------------------------------------------------------
# 5. Replay start positions


async def test_start_earliest_then_live(pybroker_server: Server) -> None:
    url = pybroker_server.url
    async with pybroker.connect(url) as c, pybroker.connect(url) as pub_c:
        with anyio.fail_after(TIMEOUT):
            await pub_c.publish_many("rp.e.a", [b"a%d" % i for i in range(7)])
            for i in range(3):
                await pub_c.publish("rp.e.b", b"b%d" % i)
        async with c.subscribe("rp.e.a", start="earliest") as exact, c.subscribe(
            "rp.e.>", start="earliest"
        ) as wild:
            first = await take(exact, 7)
            assert [m.payload for m in first] == [b"a%d" % i for i in range(7)]
            assert_contiguous(first)
            wild_first = by_topic(await take(wild, 10))
            assert [m.payload for m in wild_first["rp.e.a"]] == [b"a%d" % i for i in range(7)]
            assert [m.payload for m in wild_first["rp.e.b"]] == [b"b%d" % i for i in range(3)]

            # Replay hands over to live delivery without gap or duplicate,
            # and a topic created after the SUBSCRIBE starts at its offset 0.
            with anyio.fail_after(TIMEOUT):
                await pub_c.publish_many("rp.e.a", [b"a%d" % i for i in range(7, 12)])
                await pub_c.publish("rp.e.new", b"n0")
            more = await take(exact, 5)
            assert_contiguous(more, first=7)
            wild_more = by_topic(await take(wild, 6))
            assert_contiguous(wild_more["rp.e.a"], first=7)
            assert [(m.offset, m.payload) for m in wild_more["rp.e.new"]] == [(0, b"n0")]
            await settle(c, pub_c)
            assert exact.statistics().pending_messages == 0
            assert wild.statistics().pending_messages == 0


async def test_start_offset_inside_batch(pybroker_server: Server) -> None:
    url = pybroker_server.url
    async with pybroker.connect(url) as c:
        with anyio.fail_after(TIMEOUT):
            first = await c.publish_many("rp.o", [b"a%d" % i for i in range(10)])
            second = await c.publish_many("rp.o", [b"b%d" % i for i in range(10)])
        assert [a.offset for a in first + second] == list(range(20))
        # Precondition: the broker stored two batches of 10 (offsets 0-9, 10-19),
        # so starting at 5 or 13 begins inside a stored batch.
        stored = pybroker_server.broker.store.topic("rp.o").read(0, 1 << 30)
        assert [(b.base_offset, b.count) for b in stored] == [(0, 10), (10, 10)]
        payloads = [b"a%d" % i for i in range(10)] + [b"b%d" % i for i in range(10)]

        for start in (0, 5, 9, 10, 13, 19):
            async with c.subscribe("rp.o", start=start) as sub:
                got = await take(sub, 20 - start)
                assert_contiguous(got, first=start)
                assert [m.payload for m in got] == payloads[start:]
                await settle(c)
                assert sub.statistics().pending_messages == 0

        # start == next offset: only what is published afterwards.
        async with c.subscribe("rp.o", start=20) as sub:
            with anyio.fail_after(TIMEOUT):
                await c.publish_many("rp.o", [b"c0", b"c1"])
            got = await take(sub, 2)
            assert [(m.offset, m.payload) for m in got] == [(20, b"c0"), (21, b"c1")]


@pytest.mark.parametrize(
    ("batch", "start", "window"),
    [(100, 90, 10), (10_000, 9_990, 4096)],
    ids=["window-10", "default-window"],
)
async def test_start_offset_inside_batch_with_small_window(
    pybroker_server: Server, batch: int, start: int, window: int
) -> None:
    """A start offset inside a stored batch larger than the window: the
    messages before the start are skipped by the client, and delivery must go
    on past that batch (later batches, then live messages)."""
    url = pybroker_server.url
    async with pybroker.connect(url) as c, pybroker.connect(url) as pub_c:
        with anyio.fail_after(TIMEOUT):
            await pub_c.publish_many("rp.w", [b"%d" % i for i in range(batch)])
            for i in range(batch, batch + 20):
                await pub_c.publish("rp.w", b"%d" % i)
        stored = pybroker_server.broker.store.topic("rp.w").read(0, 1 << 30)
        assert (stored[0].base_offset, stored[0].count) == (0, batch)

        async with c.subscribe("rp.w", start=start, window=window) as sub:
            got = await take(sub, batch + 20 - start)
            assert_contiguous(got, first=start)
            assert [m.payload for m in got] == [b"%d" % i for i in range(start, batch + 20)]
            with anyio.fail_after(TIMEOUT):
                await pub_c.publish("rp.w", b"live")
            assert [m.payload for m in await take(sub, 1)] == [b"live"]


async def test_start_offset_ahead_of_topic_with_small_window(pybroker_server: Server) -> None:
    """A start offset the topic has not reached yet: the messages before it
    are skipped (by the client) and delivery starts at the requested offset."""
    url = pybroker_server.url
    async with pybroker.connect(url) as c, pybroker.connect(url) as pub_c:
        with anyio.fail_after(TIMEOUT):
            for i in range(5):
                await pub_c.publish("rp.f", b"%d" % i)
        async with c.subscribe("rp.f", start=15, window=4) as sub:
            with anyio.fail_after(TIMEOUT):
                for i in range(5, 25):
                    await pub_c.publish("rp.f", b"%d" % i)
            got = await take(sub, 10)
            assert_contiguous(got, first=15)
            assert [m.payload for m in got] == [b"%d" % i for i in range(15, 25)]


async def test_start_datetime(pybroker_server: Server) -> None:
    url = pybroker_server.url
    async with pybroker.connect(url) as c:
        with anyio.fail_after(TIMEOUT):
            batch_a = await c.publish_many("rp.t", [b"a0", b"a1", b"a2"])
            await wait_clock_past(batch_a[-1].timestamp_us)
            batch_b = await c.publish_many("rp.t", [b"b0", b"b1"])
            await wait_clock_past(batch_b[-1].timestamp_us)
            batch_c = await c.publish_many("rp.t", [b"c0"])
        t_a, t_b, t_c = batch_a[0].timestamp_us, batch_b[0].timestamp_us, batch_c[0].timestamp_us
        assert t_a < t_b < t_c
        all_payloads = [b"a0", b"a1", b"a2", b"b0", b"b1", b"c0"]

        cases = [
            (us_to_datetime(t_a - 1_000_000), 0),  # before everything
            (us_to_datetime(t_a), 0),  # exactly at batch A
            (us_to_datetime(t_a + 1), 3),  # just after A: first at or after is B
            (us_to_datetime(t_b), 3),
            (us_to_datetime(t_b + 1), 5),
            (us_to_datetime(t_c).astimezone(dt.timezone(dt.timedelta(hours=5))), 5),
        ]
        for when, first in cases:
            async with c.subscribe("rp.t", start=when) as sub:
                got = await take(sub, 6 - first)
                assert [m.payload for m in got] == all_payloads[first:], (when, first)
                assert_contiguous(got, first=first)
                assert all(m.timestamp_us >= datetime_to_us(when) for m in got)
                await settle(c)
                assert sub.statistics().pending_messages == 0

        # A time after every message: only later publishes, also via a pattern.
        async with c.subscribe("rp.*", start=us_to_datetime(t_c + 1)) as sub:
            await settle(c)
            assert sub.statistics().pending_messages == 0
            with anyio.fail_after(TIMEOUT):
                await c.publish("rp.t", b"d0")
            got = await take(sub, 1)
            assert [(m.offset, m.payload) for m in got] == [(6, b"d0")]


async def test_start_datetime_in_the_future(pybroker_server: Server) -> None:
    """protocol.md: start 3 begins at each topic's first message whose
    timestamp is at or after start_value, so messages published before a
    future start time are not yielded."""
    async with pybroker.connect(pybroker_server.url) as c:
        future = dt.datetime.now(UTC) + dt.timedelta(hours=1)
        async with c.subscribe("fut.t", start=future) as exact, c.subscribe(
            "fut.*", start=future
        ) as wild:
            with anyio.fail_after(TIMEOUT):
                ack = await c.publish("fut.t", b"too early")
            assert us_to_datetime(ack.timestamp_us) < future
            await settle(c)
            assert exact.statistics().pending_messages == 0
            assert wild.statistics().pending_messages == 0


async def test_default_start_is_new(pybroker_server: Server) -> None:
    url = pybroker_server.url
    async with pybroker.connect(url) as c, pybroker.connect(url) as pub_c:
        with anyio.fail_after(TIMEOUT):
            await pub_c.publish_many("rp.n", [b"old0", b"old1", b"old2"])
        async with c.subscribe("rp.n") as exact, c.subscribe("rp.>") as wild:
            await settle(c)
            assert exact.statistics().pending_messages == 0
            assert wild.statistics().pending_messages == 0
            with anyio.fail_after(TIMEOUT):
                for i in range(3):
                    await pub_c.publish("rp.n", b"new%d" % i)
            for sub in (exact, wild):
                got = await take(sub, 3)
                assert [(m.offset, m.payload) for m in got] == [
                    (3, b"new0"),
                    (4, b"new1"),
                    (5, b"new2"),
                ]


@pytest.mark.parametrize("pattern", ["rp.*", "rp.>", ">", "*.x"])
async def test_offset_start_with_wildcard_is_bad_request(
    pybroker_client: Client, pattern: str
) -> None:
    c = pybroker_client
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(BrokerError) as info:
            await c.subscribe(pattern, start=3)
        assert info.value.code == 207
        assert info.value.error_code is ErrorCode.BAD_REQUEST

        with pytest.raises(BrokerError) as info:
            async with c.subscribe(pattern, start=0):
                pass  # pragma: no cover
        assert info.value.code == 207

        # Not fatal: the connection goes on working.
        async with c.subscribe(pattern, start="earliest") as sub:
            ack = await c.publish("rp.x", b"still here")
            assert ack.offset == 0
            got = await take(sub, 1)
            assert got[0].payload == b"still here"


# --------------------------------------------------------------------------
# 6. Flow control and slow subscribers


async def test_slow_subscriber_does_not_hold_up_others(pybroker_server: Server) -> None:
    url = pybroker_server.url
    n = 5000
    chunk = 50
    window = 10
    async with pybroker.connect(url, name="slow") as slow_c, pybroker.connect(
        url, name="fast"
    ) as fast_c, pybroker.connect(url, name="pub") as pub_c:
        slow = await slow_c.subscribe("fc.t", window=window)
        same_conn_fast = await slow_c.subscribe("fc.t")
        fast = await fast_c.subscribe("fc.*")
        fast_got: list[Message] = []
        same_got: list[Message] = []

        async def consume(sub: Subscription, out: list[Message]) -> None:
            out.extend(await take(sub, n))

        with anyio.fail_after(2 * TIMEOUT):
            async with anyio.create_task_group() as nursery:
                nursery.start_soon(consume, fast, fast_got)
                nursery.start_soon(consume, same_conn_fast, same_got)
                for start in range(0, n, chunk):
                    await pub_c.publish_many(
                        "fc.t", [b"%d" % i for i in range(start, min(n, start + chunk))]
                    )

        # Everyone else got everything while the slow one did not iterate.
        for got in (fast_got, same_got):
            assert_contiguous(got)
            assert [m.payload for m in got] == [b"%d" % i for i in range(n)]

        # The slow subscription buffers at most its window plus one batch.
        await settle(slow_c)
        stats = slow.statistics()
        assert stats.delivered_messages == 0
        assert 0 < stats.pending_messages <= window + chunk

        slow_got = await take(slow, n)
        assert_contiguous(slow_got)
        assert [m.payload for m in slow_got] == [b"%d" % i for i in range(n)]
        await settle(slow_c)
        assert slow.statistics().pending_messages == 0
        assert slow.statistics().lost_messages == 0


@pytest.mark.parametrize("storage", ["memory", "file"])
async def test_tiny_outbound_queue_still_delivers_everything_in_order(
    tmp_path: Path, storage: str
) -> None:
    topics = ["oq.a", "oq.b", "oq.c"]
    per_topic = 1000
    total = per_topic * len(topics)
    store: dict[str, Any] = {"data_dir": tmp_path / "data"} if storage == "file" else {}
    async with serving(outbound_queue_bytes=4096, **store) as server:
        url = server.url
        async with connections(url, 3) as subscribers, pybroker.connect(url) as pub_c:
            subs = [await c.subscribe("oq.>") for c in subscribers]
            subs.append(await subscribers[0].subscribe("oq.b", window=16))
            subs.append(await pub_c.subscribe("oq.*"))  # on the publisher's connection
            slow_cb = Collector()
            await subscribers[1].subscribe("oq.>", slow_cb.async_callback, window=7)
            expected_counts = [total, total, total, per_topic, total]
            results: list[list[Message]] = [[] for _ in subs]
            payloads = {t: [t.encode() + b":%d:" % i + b"x" * 200 for i in range(per_topic)] for t in topics}

            async def consume(i: int) -> None:
                results[i] = await take(subs[i], expected_counts[i], timeout=3 * TIMEOUT)

            async def publish(topic: str) -> None:
                items = payloads[topic]
                for start in range(0, per_topic, 100):
                    if start % 200:
                        await pub_c.publish_many(topic, items[start : start + 100])
                    else:
                        for item in items[start : start + 100]:
                            await pub_c.send(topic, item)
                        await pub_c.flush()

            with anyio.fail_after(3 * TIMEOUT):
                async with anyio.create_task_group() as nursery:
                    for i in range(len(subs)):
                        nursery.start_soon(consume, i)
                    for topic in topics:
                        nursery.start_soon(publish, topic)
                await slow_cb.wait_for(total, timeout=3 * TIMEOUT)
            await settle(pub_c, *subscribers)
            for sub in subs:
                assert sub.statistics().pending_messages == 0

    for received, count in zip(results + [slow_cb.messages], expected_counts + [total]):
        assert len(received) == count
        for topic, msgs in by_topic(received).items():
            assert_contiguous(msgs)
            assert [m.payload for m in msgs] == payloads[topic]


async def test_lagging_subscriber_is_told_about_lost_messages() -> None:
    n = 400
    window = 10
    async with serving(memory_retention_bytes=2048) as server:
        url = server.url
        async with pybroker.connect(url) as sub_c, pybroker.connect(url) as pub_c:
            lagging = await sub_c.subscribe("lost.t", window=window)
            keeping_up = await sub_c.subscribe("lost.t")
            up_got: list[Message] = []

            async def keep_up() -> None:
                up_got.extend(await take(keeping_up, n))

            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as nursery:
                    nursery.start_soon(keep_up)
                    for i in range(n):  # one batch per message
                        await pub_c.publish("lost.t", b"%04d" % i + b"." * 100)
            assert_contiguous(up_got)

            log = server.broker.store.topic("lost.t")
            first_retained = log.first_offset
            # Precondition: retention removed messages the lagging one never got.
            assert window < first_retained < n

            got = await take_until(lagging, lambda m: m.offset == n - 1, limit=n)
            stats = lagging.statistics()

        offsets = [m.offset for m in got]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
        assert all(m.payload.startswith(b"%04d" % m.offset) for m in got)
        assert offsets[-1] == n - 1
        # It was told about the gap, and the gap accounts for every missing message.
        assert stats.lost_messages > 0
        assert stats.lost_messages + len(got) == n
        missing = sorted(set(range(n)) - set(offsets))
        assert len(missing) == stats.lost_messages
        assert missing == list(range(missing[0], missing[-1] + 1))  # one contiguous gap
        assert missing[-1] < first_retained


async def test_start_offset_below_retention_starts_at_first_retained() -> None:
    async with serving(memory_retention_bytes=1024) as server:
        async with pybroker.connect(server.url) as c:
            with anyio.fail_after(TIMEOUT):
                for i in range(100):
                    await c.publish("ret.t", b"%03d" % i + b"-" * 60)
            first = server.broker.store.topic("ret.t").first_offset
            assert 0 < first < 100
            for start in (0, "earliest"):
                async with c.subscribe("ret.t", start=start) as sub:
                    got = await take(sub, 100 - first)
                    assert_contiguous(got, first=first)
                    assert got[-1].offset == 99


@pytest.mark.parametrize("window", [1, 2, 7, 100])
async def test_any_window_delivers_everything_in_order(pybroker_server: Server, window: int) -> None:
    url = pybroker_server.url
    sizes = [1, 3, 17, 50, 1, 2, 120, 5]
    payloads = [b"%d" % i for i in range(sum(sizes) * 2)]
    async with pybroker.connect(url) as sub_c, pybroker.connect(url) as pub_c:
        sub = await sub_c.subscribe("win.t", window=window)
        got: list[Message] = []

        async def consume() -> None:
            with anyio.fail_after(TIMEOUT):
                async for msg in sub:
                    got.append(msg)
                    if len(got) % 3 == 0:
                        await anyio.sleep(0)  # a consumer that yields now and then
                    if len(got) == len(payloads):
                        break

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as nursery:
                nursery.start_soon(consume)
                pos = 0
                for size in sizes * 2:
                    await pub_c.publish_many("win.t", payloads[pos : pos + size])
                    pos += size
        assert_contiguous(got)
        assert [m.payload for m in got] == payloads
        await settle(sub_c)
        assert sub.statistics().pending_messages == 0


async def test_large_messages_with_tiny_outbound_queue() -> None:
    sizes = [150_000, 1, 70_000, 300_000, 5_000, 1_000_000, 2]
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes * 3)]
    async with serving(outbound_queue_bytes=4096) as server:
        async with connections(server.url, 3) as subscribers, pybroker.connect(server.url) as pub_c:
            subs = [await c.subscribe("big.>", window=2) for c in subscribers]
            results: list[list[Message]] = [[] for _ in subs]

            async def consume(i: int) -> None:
                results[i] = await take(subs[i], len(payloads))

            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as nursery:
                    for i in range(len(subs)):
                        nursery.start_soon(consume, i)
                    for payload in payloads:
                        await pub_c.send("big.t", payload)
                    await pub_c.flush()
    for got in results:
        assert_contiguous(got)
        assert [m.payload for m in got] == payloads


async def test_client_splits_batches_to_the_servers_limits() -> None:
    max_frame = 16 * 1024
    limits = Limits(max_batch_messages=10, max_frame_bytes=max_frame)
    async with serving(limits=limits) as server:
        async with pybroker.connect(server.url) as sub_c, pybroker.connect(server.url) as pub_c:
            sub = await sub_c.subscribe("split.t", start="earliest")
            small = [b"s%d" % i for i in range(95)]
            large = [bytes([i]) * 1000 for i in range(100)]
            with anyio.fail_after(TIMEOUT):
                acks = await pub_c.publish_many("split.t", small)
                acks += await pub_c.publish_many("split.t", large)
                nowait = [pub_c.publish_nowait("split.t", b"n%d" % i) for i in range(35)]
                await pub_c.flush()
            assert [a.offset for a in acks] == list(range(195))
            assert [p.result().offset for p in nowait] == list(range(195, 230))
            got = await take(sub, 230)
            assert [m.payload for m in got] == small + large + [b"n%d" % i for i in range(35)]
            assert_contiguous(got)
            with pytest.raises(ValueError):
                await pub_c.publish("split.t", b"x" * max_frame)

        stored = server.broker.store.topic("split.t").read(0, 1 << 30)
        assert sum(b.count for b in stored) == 230
        assert all(1 <= b.count <= 10 for b in stored)
        assert all(len(b.batch) < max_frame for b in stored)


def largest_payload(max_frame_bytes: int, topic: str, idempotent: bool) -> int:
    """The payload size (no headers) whose PUBLISH body is max_frame_bytes:
    request_id u64 + topic str16 + batch header (count, crc) + record header,
    less the room an idempotent client keeps for naming the batch."""
    return max_frame_bytes - (8 + 2 + len(topic.encode()) + 8 + 6) - (MSG_ID_ROOM if idempotent else 0)


@pytest.mark.parametrize("idempotent", [True, False], ids=["exactly-once", "at-least-once"])
@pytest.mark.parametrize(
    ("server_max_frame", "size"),
    [
        (None, "largest"),  # default 4 MiB limit, the largest message one may publish
        (8 * 1024 * 1024, 5 * 1024 * 1024),  # a server configured for larger frames
    ],
    ids=["default-limit-largest-message", "8MiB-limit-5MiB-message"],
)
async def test_any_publishable_message_can_be_delivered(
    server_max_frame: int | None, size: int | str, idempotent: bool
) -> None:
    """Whatever the client lets one publish and the broker acknowledges must
    reach a subscriber that uses the same client library."""
    overrides: dict[str, Any] = {}
    if server_max_frame is not None:
        overrides["limits"] = Limits(max_frame_bytes=server_max_frame)
    async with serving(**overrides) as server:
        async with pybroker.connect(server.url) as sub_c, pybroker.connect(server.url, idempotent=idempotent) as pub_c:
            assert pub_c.server is not None
            max_frame = pub_c.server.limits["max_frame_bytes"]
            n = largest_payload(max_frame, "huge.t", idempotent) if size == "largest" else int(size)
            payload = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
            # One byte more does not fit: this really is the largest message.
            if size == "largest":
                with pytest.raises(ValueError):
                    pub_c.publish_nowait("huge.t", payload + b"!")
            sub = await sub_c.subscribe("huge.t")
            with anyio.fail_after(TIMEOUT):
                ack = await pub_c.publish("huge.t", payload)
            assert ack.offset == 0
            got = await take(sub, 1)
            assert len(got) == 1 and got[0].payload == payload


async def test_publish_nowait_raises_would_block_when_pipeline_is_full(
    pybroker_server: Server,
) -> None:
    with anyio.fail_after(TIMEOUT):
        async with pybroker.connect(pybroker_server.url, max_pending=10) as c:
            pendings = [c.publish_nowait("wb.t", b"%d" % i) for i in range(10)]
            with pytest.raises(pybroker.WouldBlock):
                c.publish_nowait("wb.t", b"too many")
            # send() waits for room instead of failing.
            eleventh = await c.send("wb.t", b"10")
            await c.flush()
            assert [p.result().offset for p in pendings + [eleventh]] == list(range(11))
            more = c.publish_nowait("wb.t", b"11")
        assert more.result().offset == 11


async def test_start_datetime_with_pattern_per_topic(pybroker_server: Server) -> None:
    async with pybroker.connect(pybroker_server.url) as c:
        with anyio.fail_after(TIMEOUT):
            early = await c.publish_many("dtp.a", [b"a0", b"a1"])
            early += await c.publish_many("dtp.b", [b"b0"])
            last_early = max(a.timestamp_us for a in early)
            await wait_clock_past(last_early)
            await c.publish("dtp.b", b"b1")
            await c.publish_many("dtp.a", [b"a2", b"a3"])
            later = await c.publish("dtp.c", b"c0")
        assert later.timestamp_us > last_early
        # Everything published after the clock passed the first batch; per
        # topic that is a different offset (a2 is offset 2, b1 offset 1).
        when = us_to_datetime(last_early + 1)
        async with c.subscribe("dtp.*", start=when) as sub:
            got = by_topic(await take(sub, 4))
            await settle(c)
            assert sub.statistics().pending_messages == 0
        assert [(m.offset, m.payload) for m in got["dtp.a"]] == [(2, b"a2"), (3, b"a3")]
        assert [(m.offset, m.payload) for m in got["dtp.b"]] == [(1, b"b1")]
        assert [(m.offset, m.payload) for m in got["dtp.c"]] == [(0, b"c0")]


# --------------------------------------------------------------------------
# 7. Errors surfaced to the client

BAD_TOPICS = [
    "",
    "a..b",
    ".a",
    "a.",
    "a.*",
    "a.>",
    ">",
    "ord*",
    "a b",
    "a\tb",
    "a\x7fb",
    "x" * 256,
    ".".join(["t"] * 17),
]

BAD_PATTERNS = [
    "",
    "a..b",
    "ord*",
    "a.>.b",
    ">.a",
    "a.b>",
    "**",
    "a b",
    "x" * 256,
    ".".join(["t"] * 17),
]


@pytest.mark.parametrize("topic", BAD_TOPICS)
async def test_invalid_topic_raises_value_error(pybroker_client: Client, topic: str) -> None:
    c = pybroker_client
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(ValueError):
            await c.publish(topic, b"x")
        with pytest.raises(ValueError):
            c.publish_nowait(topic, b"x")
        with pytest.raises(ValueError):
            await c.send(topic, b"x")
        with pytest.raises(ValueError):
            await c.publish_many(topic, [b"x"])
        # The connection is unaffected.
        assert (await c.publish("valid.topic", b"ok")).offset >= 0


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
async def test_invalid_pattern_raises_value_error(pybroker_client: Client, pattern: str) -> None:
    c = pybroker_client
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(ValueError):
            await c.subscribe(pattern)
        with pytest.raises(ValueError):
            async with c.subscribe(pattern):
                pass  # pragma: no cover
        async with c.subscribe("valid.>") as sub:
            await c.publish("valid.x", b"ok")
            assert [m.payload for m in await take(sub, 1)] == [b"ok"]


async def test_invalid_subscribe_arguments(pybroker_client: Client) -> None:
    c = pybroker_client
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(ValueError):
            await c.subscribe("a", start=-1)
        with pytest.raises(ValueError):
            await c.subscribe("a", start=dt.datetime(2024, 1, 1))  # naive
        with pytest.raises(ValueError):
            await c.subscribe("a", start="latest")
        with pytest.raises(ValueError):
            await c.subscribe("a", window=0)


async def test_server_limits_are_enforced() -> None:
    limits = Limits(max_topic_depth=3, max_subscriptions=2)
    async with serving(limits=limits) as server:
        async with pybroker.connect(server.url) as c:
            with anyio.fail_after(TIMEOUT):
                # The client checks against the limits the server announced.
                with pytest.raises(ValueError):
                    await c.publish("a.b.c.d", b"x")
                with pytest.raises(ValueError):
                    await c.subscribe("a.b.c.>")
                s1 = await c.subscribe("a.b.c")
                await c.subscribe("a.>")
                with pytest.raises(BrokerError) as info:
                    await c.subscribe("x")
                assert info.value.code == ErrorCode.TOO_MANY_SUBSCRIPTIONS
                await s1.unsubscribe()
                s3 = await c.subscribe("x")
                await c.publish("x", b"ok")
                assert [m.payload for m in await take(s3, 1)] == [b"ok"]


async def test_use_after_close_raises_connection_closed(pybroker_server: Server) -> None:
    with anyio.fail_after(TIMEOUT):
        async with pybroker.connect(pybroker_server.url) as c:
            sub = await c.subscribe("closed.t")
            await c.publish("closed.t", b"x")
        assert c.closed
        with pytest.raises(ConnectionClosed):
            await c.publish("closed.t", b"y")
        with pytest.raises(ConnectionClosed):
            c.publish_nowait("closed.t", b"y")
        with pytest.raises(ConnectionClosed):
            await c.send("closed.t", b"y")
        with pytest.raises(ConnectionClosed):
            await c.publish_many("closed.t", [b"y"])
        with pytest.raises(ConnectionClosed):
            await c.subscribe("closed.t")
        with pytest.raises(ConnectionClosed):
            await c.ping()
        await c.flush()  # nothing pending: returns
        # A subscription of a closed client ends (its buffer can still be read).
        rest = await drain_closed(sub)
        assert [m.payload for m in rest] in ([], [b"x"])


@trio_only  # shuts the broker down from the test's own event loop
async def test_server_shutdown_fails_waiters_instead_of_hanging() -> None:
    async with serving(shutdown_grace=2.0) as server:
        url = server.url
        async with pybroker.connect(url) as sub_c, pybroker.connect(url, max_pending=500) as pub_c:
            idle = await sub_c.subscribe("idle.>")
            busy = await sub_c.subscribe("shut.>")
            outcomes: dict[str, BaseException | None] = {}
            pendings: list[PendingAck] = []
            half_way = anyio.Event()
            first_seen = anyio.Event()

            async def iterate(name: str, sub: Subscription) -> None:
                try:
                    async for _ in sub:
                        first_seen.set()
                    outcomes[name] = None
                except BaseException as exc:
                    outcomes[name] = exc
                    if not isinstance(exc, ConnectionClosed):
                        raise

            async def blast() -> None:
                try:
                    for i in range(1_000_000):
                        pendings.append(await pub_c.send("shut.t", b"%d" % i))
                        if i == 5000:
                            half_way.set()
                    outcomes["blast"] = None
                except ConnectionClosed as exc:
                    outcomes["blast"] = exc

            with anyio.fail_after(TIMEOUT):
                async with anyio.create_task_group() as nursery:
                    nursery.start_soon(iterate, "idle", idle)
                    nursery.start_soon(iterate, "busy", busy)
                    nursery.start_soon(blast)
                    await first_seen.wait()
                    await half_way.wait()
                    server.shutdown()
                # Every pending publish settled: acknowledged or failed.
                results: list[PublishAck | BaseException] = []
                for p in pendings:
                    try:
                        results.append(await p.wait())
                    except ConnectionClosed as exc:
                        results.append(exc)
                await server.wait_stopped()

            assert isinstance(outcomes["idle"], ConnectionClosed)
            assert isinstance(outcomes["busy"], ConnectionClosed)
            assert isinstance(outcomes["blast"], ConnectionClosed)
            assert sub_c.closed and pub_c.closed
            acked = [r for r in results if isinstance(r, PublishAck)]
            # At the 5001st send at most max_pending (500) were unacknowledged.
            assert len(acked) >= 4500
            # PUBACKs are in order: the acknowledged ones are a prefix.
            assert all(isinstance(r, PublishAck) for r in results[: len(acked)])
            assert [a.offset for a in acked] == list(range(len(acked)))
            with anyio.fail_after(TIMEOUT):
                with pytest.raises(ConnectionClosed):
                    await pub_c.publish("shut.t", b"late")
                with pytest.raises(ConnectionClosed):
                    await sub_c.subscribe("shut.>")


# --------------------------------------------------------------------------
# 8. Closing flushes


@pytest.mark.parametrize(
    ("linger", "max_inflight_batches"), [(0.0, 8), (0.0, 1), (0.01, 2)]
)
async def test_close_flushes_publish_nowait(
    pybroker_server: Server, linger: float, max_inflight_batches: int
) -> None:
    url = pybroker_server.url
    n = 6000
    topics = ["flush.a", "flush.b", "flush.c"]
    with anyio.fail_after(TIMEOUT):
        async with pybroker.connect(
            url, linger=linger, max_inflight_batches=max_inflight_batches
        ) as c:
            pendings = [
                (topics[i % 3], i, c.publish_nowait(topics[i % 3], b"%d" % i)) for i in range(n)
            ]
            assert not all(p.done() for _, _, p in pendings)
        # Exiting the block normally waited for every acknowledgement.
        assert all(p.done() for _, _, p in pendings)
        offsets: dict[str, list[int]] = defaultdict(list)
        for topic, _, p in pendings:
            ack = p.result()
            assert ack.topic == topic
            offsets[topic].append(ack.offset)
        for topic in topics:
            assert offsets[topic] == list(range(n // 3))

        # And the broker really has them, in order.
        async with pybroker.connect(url) as reader:
            for topic in topics:
                async with reader.subscribe(topic, start="earliest") as sub:
                    got = await take(sub, n // 3)
                    assert_contiguous(got)
                    assert [m.payload for m in got] == [
                        b"%d" % i for t, i, _ in pendings if t == topic
                    ]
