"""Durability, end to end: crashes, damaged logs, replay, slow subscribers, fsync.

These tests run the real broker with the durable file log:

- as a subprocess (``pybroker serve``), SIGKILLed in the middle of a
  pipelined publish and restarted on the same data directory, several times;
  every acknowledged message must come back at its acknowledged offset;
- as a subprocess restarted over a segment whose tail was damaged on purpose:
  recovery drops the tail, says so in the log, and serves the valid prefix;
- in process (``broker.testing.running_broker(data_dir=...)``) for replay from
  every start position, before and after a restart, for subscribers that stop
  reading (the outbound queue bound, lagging from the log, credit), and for
  the acknowledgement durability of each fsync policy.

Every wait is bounded (``trio.fail_after``) and every loop bounded in count.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio

import pybroker as client
from pybroker.server.storage.segment import HEADER, HEADER_SIZE, header_crc
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.server.server import Server
from pybroker.server.session import Session
from pybroker.server.testing import running_broker
from pybroker import Durability, Message, PendingAck, PublishAck
from pybroker.protocol import (
    deliver_header,
    encode_batch_from_records,
    encode_record,
)

from helpers.collect import take
from helpers.inproc import session_named
from helpers.procs import BrokerProcess, broker_process
from helpers.raw import RawSubscriber


#: Upper bound for any single wait in these tests (seconds).
TIMEOUT = 20.0


# ---------------------------------------------------------------------------
# Small helpers


def ts_datetime(timestamp_us: int, tz: dt.tzinfo = dt.timezone.utc) -> dt.datetime:
    """An aware datetime for a broker timestamp, exact to the microsecond."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (epoch + dt.timedelta(microseconds=timestamp_us)).astimezone(tz)


def offsets_of(msgs: Sequence[Message]) -> list[int]:
    return [m.offset for m in msgs]


def payloads_of(msgs: Sequence[Message]) -> list[bytes]:
    return [m.payload for m in msgs]


# ---------------------------------------------------------------------------
# 1. SIGKILL in the middle of a pipelined publish, restart, repeat


CRASH_TOPIC = "durability.crash"
#: Per kill cycle: kill once the publisher has this many messages acknowledged.
KILL_AFTER_ACKS = (300, 1500, 60, 3000)
#: Small segments: the kills hit a log of many segments.
CRASH_SEGMENT_BYTES = 16 * 1024
#: Upper bound on messages one cycle may send before the kill must have happened.
MAX_SENDS_PER_CYCLE = 200_000


def crash_payload(cycle: int, i: int) -> bytes:
    return b"cycle-%d-msg-%d" % (cycle, i)


async def publish_until_killed(
    broker: BrokerProcess, url: str, cycle: int, kill_after: int
) -> tuple[list[tuple[bytes, PendingAck]], int]:
    """Pipeline distinct messages to CRASH_TOPIC until the broker is SIGKILLed
    (after ``kill_after`` acks, sends still in flight). Returns every message
    handed to the client with its PendingAck, and how many were unsettled at
    the moment of the kill."""
    sent: list[tuple[bytes, PendingAck]] = []
    unsettled_at_kill = -1
    killed = trio.Event()

    async def killer() -> None:
        nonlocal unsettled_at_kill
        # PUBACKs on one connection come in order: once message number
        # `kill_after` is acknowledged, all before it are too.
        for _ in range(int(TIMEOUT / 0.001)):
            if len(sent) > kill_after and sent[kill_after][1].offset >= 0:
                break
            await trio.sleep(0.001)
        else:
            raise AssertionError(f"cycle {cycle}: {kill_after} acks never came back")
        unsettled_at_kill = sum(1 for _, p in sent if not p.done())
        killed.set()  # before the signal: the publisher may notice at once
        assert await broker.kill() == -signal.SIGKILL

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer)
            try:
                async with client.connect(url, name=f"crash-pub-{cycle}", max_pending=1024) as c:
                    for i in range(MAX_SENDS_PER_CYCLE):
                        payload = crash_payload(cycle, i)
                        sent.append((payload, await c.send(CRASH_TOPIC, payload)))
                        if i % 64 == 63:
                            await trio.sleep(0)  # let acks in and the killer look
                    raise AssertionError(f"cycle {cycle}: the broker was never killed")
            except client.ConnectionClosed:
                pass
            # The connection can only have died because of the kill.
            assert killed.is_set(), f"cycle {cycle}: connection lost before the kill"
    return sent, unsettled_at_kill


@pytest.mark.parametrize(
    "fsync, durability",
    [("always", Durability.DISK), ("never", Durability.OS)],
    ids=["fsync-always", "fsync-never"],
)
async def test_sigkill_mid_stream_loses_no_acknowledged_message(
    tmp_path: Path, fsync: str, durability: Durability
) -> None:
    """SIGKILL loses no write the broker made (the page cache survives), so
    whatever the fsync policy, every acknowledged message must come back.
    Small segments make the topic span many, recovered across kills."""
    data_dir = tmp_path / "data"
    acked: dict[int, bytes] = {}  # offset -> payload, every acknowledged message
    durabilities: set[Durability] = set()
    sent_by_cycle: list[list[bytes]] = []
    unsettled_total = 0
    async with broker_process(
        data_dir, tmp_path, "--fsync", fsync, "--segment-bytes", str(CRASH_SEGMENT_BYTES)
    ) as broker:
        for cycle, kill_after in enumerate(KILL_AFTER_ACKS):
            url = await broker.start()
            sent, unsettled = await publish_until_killed(broker, url, cycle, kill_after)
            unsettled_total += max(unsettled, 0)
            sent_by_cycle.append([payload for payload, _ in sent])
            acked_now = 0
            for payload, pending in sent:
                # Every message is settled once the connection is gone:
                # acknowledged, or failed with the connection.
                assert pending.done(), f"{payload!r} neither acked nor failed"
                if pending.offset >= 0:
                    ack = pending.result()
                    assert ack.offset not in acked, (
                        f"offset {ack.offset} acknowledged twice: "
                        f"{acked[ack.offset]!r} and {payload!r}"
                    )
                    acked[ack.offset] = payload
                    durabilities.add(ack.durability)
                    acked_now += 1
                else:
                    assert isinstance(pending.error, client.ConnectionClosed)
            assert acked_now > kill_after, f"cycle {cycle}: only {acked_now} acks"

        # The broker must have been killed with sends still unacknowledged.
        assert unsettled_total > 0, "every kill happened with nothing in flight"
        assert durabilities == {durability}

        # Restart once more: new publishes continue after the recovered log.
        url = await broker.start()
        with trio.fail_after(TIMEOUT):
            async with client.connect(url, name="crash-check") as c:
                sentinel_ack = await c.publish(CRASH_TOPIC, b"sentinel")
                assert sentinel_ack.durability is durability
                end = sentinel_ack.offset
                assert end >= len(acked)
                async with c.subscribe(CRASH_TOPIC, start="earliest", window=10_000) as sub:
                    log = await take(sub, end + 1, timeout=TIMEOUT)
        assert await broker.stop() == 0

    # Offsets are contiguous from 0, the sentinel last.
    assert offsets_of(log) == list(range(end + 1))
    assert log[-1].payload == b"sentinel"
    payloads = payloads_of(log)
    # Nothing appears twice, acknowledged or not.
    assert len(set(payloads)) == len(payloads), "a message is stored twice"
    # Every acknowledged message is at its acknowledged offset.
    missing = {off: p for off, p in acked.items() if payloads[off] != p}
    assert not missing, f"acknowledged messages lost or moved: {sorted(missing.items())[:10]}"

    # Per cycle, what is stored is a prefix of what was sent, in send order,
    # and the cycles follow each other: the log is cycle 0's prefix, then
    # cycle 1's, ... (a kill loses at most a tail of unacknowledged sends).
    acked_payloads = set(acked.values())
    position = 0
    for cycle, cycle_payloads in enumerate(sent_by_cycle):
        stored = 0
        while (
            position < end
            and stored < len(cycle_payloads)
            and payloads[position] == cycle_payloads[stored]
        ):
            stored += 1
            position += 1
        acked_in_cycle = sum(1 for p in cycle_payloads if p in acked_payloads)
        assert stored >= acked_in_cycle, (
            f"cycle {cycle}: {stored} messages stored in send order, "
            f"{acked_in_cycle} acknowledged"
        )
    assert position == end, (
        f"offset {position} holds {payloads[position]!r}, which breaks send order"
    )
    segments = list((data_dir / "topics" / quote(CRASH_TOPIC, safe="")).glob("*.log"))
    assert len(segments) > 2, "the crash log did not span segments"


# ---------------------------------------------------------------------------
# 2. A damaged tail, recovered by the real CLI


DAMAGED_TOPIC = "durability.damaged"
DAMAGED_MESSAGES = 40


def ghost_batch(base_offset: int) -> bytes:
    """A correctly framed stored batch (header + wire batch) at ``base_offset``."""
    batch = encode_batch_from_records([encode_record(b"ghost-1"), encode_record(b"ghost-2")])
    ts = 1_700_000_000_000_000
    fields = HEADER.pack(base_offset, 2, len(batch), ts, ts, 0)[: HEADER_SIZE - 4]
    return fields + header_crc(fields, batch[:8]).to_bytes(4, "big") + batch


def _garbage(kind: str) -> bytes:
    if kind == "random-bytes":
        return bytes((i * 197 + 13) % 256 for i in range(777))
    if kind == "zeros":
        return bytes(4096)
    if kind == "torn-batch":
        return ghost_batch(DAMAGED_MESSAGES)[:-5]
    if kind == "bad-record-crc":
        whole = bytearray(ghost_batch(DAMAGED_MESSAGES))
        whole[-1] ^= 0xFF
        return bytes(whole)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, segment_bytes",
    [
        ("random-bytes", None),
        ("zeros", None),
        ("torn-batch", None),
        ("bad-record-crc", None),
        ("random-bytes", 1024),
        ("torn-batch", 1024),
    ],
)
async def test_damaged_tail_is_dropped_and_valid_prefix_served(
    tmp_path: Path, kind: str, segment_bytes: int | None
) -> None:
    data_dir = tmp_path / "data"
    payloads = [(b"kept-%d-" % i).ljust(100, b"k") for i in range(DAMAGED_MESSAGES)]
    extra = ("--segment-bytes", str(segment_bytes)) if segment_bytes else ()
    async with broker_process(data_dir, tmp_path, *extra) as broker:
        url = await broker.start()
        with trio.fail_after(TIMEOUT):
            async with client.connect(url, name="damage-pub") as c:
                acks = [await c.publish(DAMAGED_TOPIC, p) for p in payloads[:10]]
                acks += await c.publish_many(DAMAGED_TOPIC, payloads[10:])
        assert [a.offset for a in acks] == list(range(DAMAGED_MESSAGES))
        assert await broker.stop() == 0

        topic_dir = data_dir / "topics" / quote(DAMAGED_TOPIC, safe="")
        segments = sorted(topic_dir.glob("*.log"))
        assert segments, f"no segment under {topic_dir}"
        if segment_bytes:
            assert len(segments) > 1, "small segments did not roll"
        newest = segments[-1]
        good_size = newest.stat().st_size
        garbage = _garbage(kind)
        with open(newest, "ab") as f:
            f.write(garbage)

        url = await broker.start()
        dropped = [r for r in broker.log_records() if "recovery dropped" in str(r.get("event"))]
        assert len(dropped) == 1, broker.log_path.read_text()
        warning = dropped[0]
        assert warning["level"] == "warning"
        assert warning["topic"] == DAMAGED_TOPIC
        assert warning["first_offset"] == DAMAGED_MESSAGES
        assert warning["dropped_bytes"] == len(garbage)
        assert isinstance(warning["reason"], str) and warning["reason"]
        assert newest.stat().st_size == good_size  # the tail is cut off the file

        with trio.fail_after(TIMEOUT):
            async with client.connect(url, name="damage-check") as c:
                async with c.subscribe(DAMAGED_TOPIC, start="earliest") as sub:
                    got = await take(sub, DAMAGED_MESSAGES, timeout=TIMEOUT)
                    assert offsets_of(got) == list(range(DAMAGED_MESSAGES))
                    assert payloads_of(got) == payloads
                    # New messages go right after the valid prefix, and the
                    # dropped tail never shows up.
                    ack = await c.publish(DAMAGED_TOPIC, b"after-recovery")
                    assert ack.offset == DAMAGED_MESSAGES
                    [after] = await take(sub, 1, timeout=TIMEOUT)
                    assert (after.offset, after.payload) == (DAMAGED_MESSAGES, b"after-recovery")
        assert await broker.stop() == 0

        # A second restart finds nothing more to drop.
        await broker.start()
        assert not [r for r in broker.log_records() if "recovery dropped" in str(r.get("event"))]
        assert await broker.stop() == 0


# ---------------------------------------------------------------------------
# 3. Replay with the file log, before and after a restart


REPLAY_TOPIC = "replay.orders"
OTHER_TOPIC = "replay.other"
SINGLES = 8
BATCHED = 12


@pytest.mark.parametrize(
    "segment_bytes", [64 * 1024 * 1024, 1024], ids=["one-segment", "small-segments"]
)
async def test_replay_from_every_start_position(tmp_path: Path, segment_bytes: int) -> None:
    settings = SettingsResolver(TopicSettings(segment_bytes=segment_bytes))
    single_payloads = [(b"single-%d-" % i).ljust(200, b".") for i in range(SINGLES)]
    batch_payloads = [(b"batched-%d-" % i).ljust(200, b".") for i in range(BATCHED)]
    expected = single_payloads + batch_payloads

    async with running_broker(data_dir=tmp_path, topic_settings=settings) as server:
        with trio.fail_after(TIMEOUT):
            async with client.connect(server.url, name="replay") as c:
                # Default start is "new": subscribed before anything exists.
                async with c.subscribe(REPLAY_TOPIC) as live:
                    singles: list[PublishAck] = []
                    for p in single_payloads:
                        singles.append(await c.publish(REPLAY_TOPIC, p))
                        await trio.sleep(0.002)  # distinct batch timestamps
                    batched = await c.publish_many(REPLAY_TOPIC, batch_payloads)
                    await c.publish_many(OTHER_TOPIC, [b"other-0", b"other-1"])
                    got_live = await take(live, SINGLES + BATCHED, timeout=TIMEOUT)
                acks = singles + batched
                assert [a.offset for a in acks] == list(range(SINGLES + BATCHED))
                assert offsets_of(got_live) == list(range(SINGLES + BATCHED))
                assert payloads_of(got_live) == expected

                # Preconditions: the singles have distinct timestamps, the
                # publish_many went out as one stored batch.
                stamps = [a.timestamp_us for a in singles]
                assert stamps == sorted(set(stamps))
                assert len({a.timestamp_us for a in batched}) == 1
                inside = batched[5].offset
                log = server.broker.router.topics[REPLAY_TOPIC].log
                [first_read, *_] = log.read(inside, 1 << 20)
                assert first_read.base_offset == batched[0].offset
                assert first_read.count == BATCHED

                await check_replay(c, acks, expected, got_live)
                # "new" skips everything stored.
                async with c.subscribe(REPLAY_TOPIC) as new:
                    marker = await c.publish(REPLAY_TOPIC, b"marker-1")
                    [m] = await take(new, 1, timeout=TIMEOUT)
                    assert (m.offset, m.payload) == (marker.offset, b"marker-1")
                # A time after every stored message: only what comes next.
                after_all = ts_datetime(marker.timestamp_us + 1)
                async with c.subscribe(REPLAY_TOPIC, start=after_all) as later:
                    marker2 = await c.publish(REPLAY_TOPIC, b"marker-2")
                    [m] = await take(later, 1, timeout=TIMEOUT)
                    assert (m.offset, m.payload) == (marker2.offset, b"marker-2")
                async with c.subscribe(REPLAY_TOPIC, start="earliest") as sub:
                    before_restart = await take(sub, marker2.offset + 1, timeout=TIMEOUT)

    if segment_bytes == 1024:
        segments = list((tmp_path / "topics" / REPLAY_TOPIC).glob("*.log"))
        assert len(segments) > 2, "small segments did not roll"

    # Restart on the same data directory: everything is replayable, with the
    # same offsets, payloads and timestamps; new offsets continue.
    async with running_broker(data_dir=tmp_path, topic_settings=settings) as server:
        with trio.fail_after(TIMEOUT):
            async with client.connect(server.url, name="replay-2") as c:
                async with c.subscribe(REPLAY_TOPIC, start="earliest") as sub:
                    after_restart = await take(sub, len(before_restart), timeout=TIMEOUT)
                    assert [(m.offset, m.payload, m.timestamp_us) for m in after_restart] == [
                        (m.offset, m.payload, m.timestamp_us) for m in before_restart
                    ]
                    await check_replay(c, acks, expected, got_live)
                    async with c.subscribe(REPLAY_TOPIC) as new:
                        ack = await c.publish(REPLAY_TOPIC, b"after-restart")
                        assert ack.offset == len(before_restart)
                        assert ack.timestamp_us >= before_restart[-1].timestamp_us
                        [m] = await take(new, 1, timeout=TIMEOUT)
                        assert (m.offset, m.payload) == (ack.offset, b"after-restart")
                    [m] = await take(sub, 1, timeout=TIMEOUT)  # the earliest reader goes on live
                    assert (m.offset, m.payload) == (ack.offset, b"after-restart")
                # A wildcard from the earliest: both topics, each in order.
                async with c.subscribe("replay.>", start="earliest") as wild:
                    got = await take(wild, len(before_restart) + 1 + 2, timeout=TIMEOUT)
                by_topic: dict[str, list[tuple[int, bytes]]] = {}
                for m in got:
                    by_topic.setdefault(m.topic, []).append((m.offset, m.payload))
                assert by_topic[OTHER_TOPIC] == [(0, b"other-0"), (1, b"other-1")]
                assert [o for o, _ in by_topic[REPLAY_TOPIC]] == list(range(ack.offset + 1))


async def check_replay(
    c: client.Client, acks: list[PublishAck], expected: list[bytes], stored: list[Message]
) -> None:
    """Replay REPLAY_TOPIC's first SINGLES + BATCHED messages from each kind
    of start position (earliest, offsets, times) and check what comes."""
    n = len(expected)

    async def replay(start: str | int | dt.datetime, first: int) -> None:
        async with c.subscribe(REPLAY_TOPIC, start=start) as sub:
            got = await take(sub, n - first, timeout=TIMEOUT)
        assert offsets_of(got) == list(range(first, n)), f"start={start!r}"
        assert payloads_of(got) == expected[first:], f"start={start!r}"
        assert [m.timestamp_us for m in got] == [a.timestamp_us for a in acks[first:]]

    await replay("earliest", 0)
    await replay(0, 0)
    await replay(3, 3)  # a single-message batch
    inside = acks[SINGLES + 5].offset
    await replay(inside, inside)  # inside the publish_many batch
    await replay(n - 1, n - 1)  # its last message
    # Times: a message's own time starts at it; the batch's time at its
    # first message; a time between two batches at the later one.
    await replay(stored[3].datetime, 3)
    await replay(ts_datetime(acks[3].timestamp_us, dt.timezone(dt.timedelta(hours=-7))), 3)
    await replay(ts_datetime(acks[3].timestamp_us - 1), 3)
    await replay(ts_datetime(acks[2].timestamp_us + 1), 3)
    await replay(ts_datetime(acks[SINGLES + 7].timestamp_us), SINGLES)
    await replay(ts_datetime(acks[0].timestamp_us - 10_000_000), 0)


# ---------------------------------------------------------------------------
# 4. Slow subscribers: the outbound queue bound, lagging from the log, credit


SLOW_TOPIC = "durability.slow"
SLOW_MESSAGES = 20_000
SLOW_PAYLOAD_BYTES = 512
QUEUE_BOUND = 64 * 1024
#: The publisher's pipeline depth, which caps its batches (and so "one
#: batch" in the queue bound) at this many messages: about 33 KB.
SLOW_MAX_PENDING = 64


def slow_payload(i: int) -> bytes:
    return (b"slow-%08d-" % i).ljust(SLOW_PAYLOAD_BYTES, b"s")


def largest_delivery(server: Server, topic: str) -> tuple[int, int]:
    """(bytes of the largest DELIVER frame, messages of the largest batch)
    the topic's stored batches make."""
    log = server.broker.router.topics[topic].log
    header = len(deliver_header(1, topic.encode(), 0, 0, 0))
    largest_bytes = largest_count = 0
    offset = log.first_offset
    for _ in range(SLOW_MESSAGES + 2):
        if offset >= log.next_offset:
            break
        batches = log.read(offset, 1 << 20)
        for b in batches:
            largest_bytes = max(largest_bytes, header + len(b.batch))
            largest_count = max(largest_count, b.count)
        offset = batches[-1].next_offset
    return largest_bytes, largest_count


async def _publish_slow(url: str) -> None:
    async with client.connect(url, name="slow-pub", max_pending=SLOW_MAX_PENDING) as pub:
        pendings = []
        for i in range(SLOW_MESSAGES):
            pendings.append(await pub.send(SLOW_TOPIC, slow_payload(i)))
            if i % 256 == 255:
                await trio.sleep(0)
        await pub.flush()
        assert [p.result().offset for p in pendings] == list(range(SLOW_MESSAGES))


async def _full_reader(
    url: str, name: str, into: list[tuple[int, bytes]], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """A subscriber that keeps reading: every message, in order."""
    async with client.connect(url, name=name) as c:
        async with c.subscribe(SLOW_TOPIC, window=1000) as sub:
            task_status.started()
            async for msg in sub:
                into.append((msg.offset, msg.payload))
                if len(into) >= SLOW_MESSAGES:
                    break


class Sampler:
    """Samples a session's outbound queue (and anything else) while the test
    runs; the samples are taken between tasks, where invariants must hold."""

    def __init__(self, session: Session, extra: Callable[[], None] | None = None) -> None:
        self.session = session
        self.extra = extra
        self.out_bytes: list[int] = []
        self.lagging_samples = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        for _ in range(1_000_000):
            self.out_bytes.append(self.session.outbox.queued_bytes)
            if self.session.outbox.lagging:
                self.lagging_samples += 1
            if self.extra is not None:
                self.extra()
            await trio.sleep(0.0005)


async def _run_with_stalled_subscriber(
    server: Server, stalled_name: str, extra: Callable[[], None] | None = None
) -> Sampler:
    """Publish SLOW_MESSAGES while two other connections read everything and
    the connection named ``stalled_name`` does not; sample its session."""
    sampler = Sampler(session_named(server, stalled_name), extra)
    got: list[list[tuple[int, bytes]]] = [[], []]
    with trio.fail_after(TIMEOUT * 2):
        async with trio.open_nursery() as nursery:
            await nursery.start(sampler.run)
            async with trio.open_nursery() as readers:
                for i, into in enumerate(got):
                    await readers.start(_full_reader, server.url, f"reader-{i}", into)
                await _publish_slow(server.url)
            # Keep sampling a little while the stalled subscriber stays stalled.
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    expected = [(i, slow_payload(i)) for i in range(SLOW_MESSAGES)]
    for into in got:
        assert into == expected
    return sampler


async def _resume_and_check(c: client.Client, sub: client.Subscription) -> None:
    """The stalled subscriber reads again: everything, in order, once."""
    got = await take(sub, SLOW_MESSAGES, timeout=TIMEOUT * 2)
    assert offsets_of(got) == list(range(SLOW_MESSAGES))
    bad = [m.offset for m in got if m.payload != slow_payload(m.offset)]
    assert not bad, f"wrong payloads at offsets {bad[:10]}"
    # Nothing is delivered twice: the next message is a new one.
    ack = await c.publish(SLOW_TOPIC, b"sentinel")
    [m] = await take(sub, 1, timeout=TIMEOUT)
    assert (m.offset, m.payload) == (ack.offset, b"sentinel") == (SLOW_MESSAGES, b"sentinel")


async def test_stalled_subscriber_large_window(tmp_path: Path) -> None:
    """A library subscriber with a huge window that the application stops
    iterating. The client's reader keeps draining the socket into the
    subscription's buffer (bounded by the window), so the server side lags
    only when that reader falls behind; the queue bound must hold either way,
    and nothing is lost or repeated when the application reads again. (The
    test below makes the server lag for certain with a peer that really
    stops reading its socket.)"""
    async with running_broker(data_dir=tmp_path, outbound_queue_bytes=QUEUE_BOUND) as server:
        async with client.connect(server.url, name="stalled") as c:
            async with c.subscribe(SLOW_TOPIC, window=1_000_000) as stalled:
                sampler = await _run_with_stalled_subscriber(server, "stalled")
                largest_bytes, _ = largest_delivery(server, SLOW_TOPIC)
                worst = max(sampler.out_bytes)
                assert worst <= QUEUE_BOUND + largest_bytes, (
                    f"outbound queue reached {worst} bytes; bound {QUEUE_BOUND} "
                    f"+ one batch {largest_bytes}"
                )
                with trio.fail_after(TIMEOUT):
                    await _resume_and_check(c, stalled)


async def test_stalled_subscriber_small_window_credit_holds_server_back(tmp_path: Path) -> None:
    window = 100
    pending_samples: list[int] = []
    async with running_broker(data_dir=tmp_path, outbound_queue_bytes=QUEUE_BOUND) as server:
        async with client.connect(server.url, name="stalled-small") as c:
            async with c.subscribe(SLOW_TOPIC, window=window) as stalled:
                sampler = await _run_with_stalled_subscriber(
                    server,
                    "stalled-small",
                    lambda: pending_samples.append(stalled.statistics().pending_messages),
                )
                largest_bytes, largest_count = largest_delivery(server, SLOW_TOPIC)
                session = session_named(server, "stalled-small")
                [server_sub] = session.subs.values()
                # Credit, not the queue, holds the server back: it is spent,
                # the topic waits in the log, nothing more was sent.
                assert server_sub.credit <= 0
                assert server.broker.router.topics[SLOW_TOPIC] in server_sub.lag
                assert stalled.statistics().pending_messages < SLOW_MESSAGES
                assert max(pending_samples) <= window + largest_count
                assert max(sampler.out_bytes) <= QUEUE_BOUND + largest_bytes
                with trio.fail_after(TIMEOUT * 2):
                    await _resume_and_check(c, stalled)


async def test_subscriber_not_reading_its_socket_lags_from_log_and_catches_up(
    tmp_path: Path,
) -> None:
    async with running_broker(data_dir=tmp_path, outbound_queue_bytes=QUEUE_BOUND) as server:
        with trio.fail_after(TIMEOUT):
            raw = await RawSubscriber.open(server.url, "raw-stalled", SLOW_TOPIC, 1_000_000)
        try:
            sampler = await _run_with_stalled_subscriber(server, "raw-stalled")
            largest_bytes, _ = largest_delivery(server, SLOW_TOPIC)
            # The connection filled up: the server stopped queueing and the
            # subscription went to the log.
            assert sampler.lagging_samples > 0
            session = session_named(server, "raw-stalled")
            assert session.outbox.lagging
            worst = max(sampler.out_bytes)
            assert worst <= QUEUE_BOUND + largest_bytes, (
                f"outbound queue reached {worst} bytes; bound {QUEUE_BOUND} "
                f"+ one batch {largest_bytes}"
            )
            with trio.fail_after(TIMEOUT * 2):
                await raw.read_messages(SLOW_MESSAGES)
                assert raw.messages == [(i, slow_payload(i)) for i in range(SLOW_MESSAGES)]
                assert not session.outbox.lagging  # caught up: live again
                async with client.connect(server.url, name="sentinel-pub") as pub:
                    ack = await pub.publish(SLOW_TOPIC, b"sentinel")
                await raw.read_messages(SLOW_MESSAGES + 1)
                assert raw.messages[SLOW_MESSAGES:] == [(ack.offset, b"sentinel")]
                assert ack.offset == SLOW_MESSAGES
        finally:
            await raw.aclose()


# ---------------------------------------------------------------------------
# 5. fsync policies: what an acknowledgement promises


@pytest.mark.parametrize(
    "mode, expected",
    [("always", Durability.DISK), ("interval", Durability.OS), ("never", Durability.OS)],
    ids=["always", "interval", "never"],
)
async def test_fsync_policy_sets_ack_durability(
    tmp_path: Path, mode: str, expected: Durability
) -> None:
    settings = SettingsResolver(TopicSettings(fsync=mode, fsync_interval_ms=20))  # type: ignore[arg-type]
    topic = f"fsync.{mode}"
    payloads = [b"%s-%d" % (mode.encode(), i) for i in range(50)]
    async with running_broker(data_dir=tmp_path, topic_settings=settings) as server:
        with trio.fail_after(TIMEOUT):
            async with client.connect(server.url, name="fsync") as c:
                async with c.subscribe(topic) as live:
                    first = await c.publish(topic, payloads[0])
                    rest = await c.publish_many(topic, payloads[1:])
                    acks = [first, *rest]
                    assert [a.offset for a in acks] == list(range(50))
                    assert {a.durability for a in acks} == {expected}
                    got = await take(live, 50, timeout=TIMEOUT)
                    assert payloads_of(got) == payloads
    # Stored whatever the policy: a restart replays it all.
    async with running_broker(data_dir=tmp_path, topic_settings=settings) as server:
        with trio.fail_after(TIMEOUT):
            async with client.connect(server.url, name="fsync-2") as c:
                async with c.subscribe(topic, start="earliest") as sub:
                    assert payloads_of(await take(sub, 50, timeout=TIMEOUT)) == payloads
                assert (await c.publish(topic, b"more")).durability is expected


@pytest.mark.parametrize(
    "default, specs, topics",
    [
        (
            "always",
            ["metrics.>:fsync=never", "logs.*:fsync=interval,fsync_interval_ms=50"],
            {
                "orders.created": Durability.DISK,
                "metrics.cpu.host1": Durability.OS,
                "logs.app": Durability.OS,
                "logs.app.debug": Durability.DISK,  # logs.* is one token only
            },
        ),
        (
            "never",
            ["critical.>:fsync=always", ">:fsync=interval"],
            {
                "critical.payments": Durability.DISK,
                "anything": Durability.OS,
                "a.b.c": Durability.OS,
            },
        ),
    ],
    ids=["default-always", "default-never"],
)
async def test_per_topic_fsync_policies(
    tmp_path: Path, default: str, specs: list[str], topics: dict[str, Durability]
) -> None:
    settings = SettingsResolver.from_specs(TopicSettings(fsync=default), specs)  # type: ignore[arg-type]
    rounds = 30
    async with running_broker(data_dir=tmp_path, topic_settings=settings) as server:
        with trio.fail_after(TIMEOUT):
            async with client.connect(server.url, name="per-topic") as c:
                async with c.subscribe(">") as everything:
                    # Interleaved on one connection: acks come in order, and
                    # each says what its own topic's policy promises.
                    pendings: list[tuple[str, int, PendingAck]] = []
                    for r in range(rounds):
                        for name in topics:
                            pendings.append((name, r, await c.send(name, b"%s:%d" % (name.encode(), r))))
                        if r % 5 == 4:
                            await trio.sleep(0)
                    await c.flush()
                    for name, r, p in pendings:
                        ack = p.result()
                        assert ack.offset == r, (name, r, ack)
                        assert ack.durability is topics[name], (name, ack.durability)
                    got = await take(everything, rounds * len(topics), timeout=TIMEOUT)
        per_topic: dict[str, list[int]] = {}
        for m in got:
            per_topic.setdefault(m.topic, []).append(m.offset)
        assert per_topic == {name: list(range(rounds)) for name in topics}


async def test_disk_ack_means_segment_and_its_directory_entries_are_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DISK acknowledgement must survive a power loss, not only a crash:
    the segment file's data is fsynced, and so is every directory that
    gained an entry on the way to it (the new topic's directory holding the
    new segment file, and ``topics/`` holding the topic directory); otherwise
    the file itself can vanish with everything in it. Checked by recording
    the inode of every fsync/fdatasync the process makes."""
    synced: set[tuple[int, int]] = set()
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def note(fd: Any) -> None:
        st = os.fstat(fd if isinstance(fd, int) else fd.fileno())
        synced.add((st.st_dev, st.st_ino))

    def spy_fsync(fd: Any) -> None:
        real_fsync(fd)
        note(fd)

    def spy_fdatasync(fd: Any) -> None:
        real_fdatasync(fd)
        note(fd)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "fdatasync", spy_fdatasync)

    def inode(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_dev, st.st_ino

    data_dir = tmp_path / "data"
    topic = "fresh.topic"
    async with running_broker(data_dir=data_dir) as server:
        with trio.fail_after(TIMEOUT):
            async with client.connect(server.url, name="dir-sync") as c:
                ack = await c.publish(topic, b"first message of a new topic")
                assert ack.durability is Durability.DISK
                # Right at the acknowledgement, before anything else happens:
                at_ack = set(synced)
    topic_dir = data_dir / "topics" / quote(topic, safe="")
    [segment] = sorted(topic_dir.glob("*.log"))
    assert inode(segment) in at_ack, "the segment's data was not synced before the DISK ack"
    assert inode(data_dir / "topics") in at_ack, "topics/ (new topic entry) not synced"
    assert inode(topic_dir) in at_ack, (
        f"the new topic directory {topic_dir.name}/ (holding the entry of "
        f"{segment.name}) was not fsynced before the DISK ack"
    )
