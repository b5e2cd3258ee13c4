"""Every PUBLISH frame of a socket read in one pass (issue 17): the codec's
fast PUBLISH decode (Connection.next_publishes), the core's run of frames
(Broker.publish_run), one write per topic per read (FileTopicLog.append_many)
and one hold sequence per read.

What must not change is checked against the frame-at-a-time path: the same
events from the same bytes, the same answers (PUBACKs with the same offsets,
refusals with the same codes, in PUBLISH order) and the same bytes in the
segment and index files; storage faults refuse exactly the batches that
were not stored.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pybroker.protocol import (
    DELIVER_AT_HEADER,
    NEED_DATA,
    PUBLISH_FLAG_DEDUP,
    PUBLISH_FLAG_DELAYED,
    PUBLISH_FLAG_NEEDS_RECEIVER,
    Connection,
    Durability,
    Error,
    ErrorCode,
    Hello,
    Ping,
    Pong,
    PubAck,
    Publish,
    RemoteProtocolError,
    Role,
    State,
    Welcome,
    encode_batch,
    encode_batch_from_records,
    encode_record,
    with_msg_id,
)
from pybroker.server.config import Config, Limits
from pybroker.server.core import Broker, Published, Refused
from pybroker.server.principal import Principal
from pybroker.server.server import run_broker
from pybroker.server.storage.file import FileStore
from pybroker.server.storage.segment import INDEX_INTERVAL, MAX_WRITE_BATCHES

from helpers.faults import FaultyOps
from helpers.frames import (
    HELLO_FRAME,
    batch_with_count,
    good_batch,
    publish_body,
    publish_frame,
    raw_frame,
    u64,
)
from helpers.logs import open_store
from helpers.raw import RawSubscriber, raw_client

TIMEOUT = 15.0
Frame = tuple[int, str, bytes, int]


# -- the codec: next_publishes gives what next_event gives ----------------------


def _open_server_conn(max_frame_bytes: int) -> Connection:
    conn = Connection(Role.SERVER, max_frame_bytes=max_frame_bytes)
    conn.receive_data(HELLO_FRAME)
    assert isinstance(conn.next_event(), Hello)
    conn.send(Welcome("t", "t", {}))
    assert conn.state is State.OPEN
    return conn


def _item(event: Any) -> Any:
    if isinstance(event, Publish):
        flags = (
            (PUBLISH_FLAG_NEEDS_RECEIVER if event.needs_receiver else 0)
            | (PUBLISH_FLAG_DEDUP if event.dedup else 0)
            | (PUBLISH_FLAG_DELAYED if event.delayed else 0)
        )
        return ("publish", event.request_id, event.topic, event.batch, flags)
    return event


def _decode_all(chunks: list[bytes], fast: bool, limits: Iterator[int], max_frame_bytes: int) -> list[Any]:
    """Everything a server-side Connection makes of ``chunks``, one event at
    a time or with next_publishes first; a protocol error ends the list."""
    conn = _open_server_conn(max_frame_bytes)
    out: list[Any] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            try:
                if fast:
                    run = conn.next_publishes(next(limits))
                    if run:
                        out.extend(("publish", *frame) for frame in run)
                        for frame in run:
                            assert type(frame[2]) is bytes
                        continue
                event = conn.next_event()
            except RemoteProtocolError as exc:
                out.append(("error", exc.code))
                return out
            if event is NEED_DATA:
                break
            out.append(_item(event))
            if not isinstance(event, (Publish, Ping)):
                return out  # CLOSED
    return out


_TOPICS = [b"t", b"a.b", "ü.é".encode(), b"\xff\xfe", b"", b"x" * 40]


@st.composite
def _frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["publish"] * 6 + ["flags", "ping", "short", "large", "reserved", "unknown"]))
    rid = draw(st.integers(0, 2**64 - 1))
    topic = draw(st.sampled_from(_TOPICS))
    batch = draw(st.binary(max_size=60))
    if kind == "publish":
        return raw_frame(0x10, publish_body(rid, topic, batch))
    if kind == "flags":
        return raw_frame(0x10, publish_body(rid, topic, batch), flags=draw(st.integers(1, 7)))
    if kind == "ping":
        return raw_frame(0x40, u64(rid))
    if kind == "short":
        # A body too short for its topic, or for a request id at all.
        body = publish_body(rid, topic, b"")
        return raw_frame(0x10, body[: draw(st.integers(0, len(body) - 1))])
    if kind == "large":
        return raw_frame(0x10, publish_body(rid, topic, bytes(300)))  # over max_frame_bytes below
    if kind == "reserved":
        return raw_frame(0x10, publish_body(rid, topic, batch), flags=0x08)
    return raw_frame(0x7F, b"")


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(_frame(), max_size=12),
    cuts=st.lists(st.integers(0, 2000), max_size=4),
    limits=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    truncate=st.integers(0, 30),
)
def test_next_publishes_decodes_what_next_event_decodes(
    frames: list[bytes], cuts: list[int], limits: list[int], truncate: int
) -> None:
    """Any stream, cut anywhere, ending anywhere (even inside a frame):
    the same PUBLISHes with the same fields, the same other events, the
    same error at the same place."""
    data = b"".join(frames)
    data = data[: max(0, len(data) - truncate)]
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]

    def cycle() -> Iterator[int]:
        while True:
            yield from limits

    slow = _decode_all(chunks, fast=False, limits=cycle(), max_frame_bytes=200)
    fast = _decode_all(chunks, fast=True, limits=cycle(), max_frame_bytes=200)
    assert fast == slow


def test_next_publishes_stops_at_the_limit_and_leaves_the_rest() -> None:
    conn = _open_server_conn(1024)
    frames = [publish_frame(i, b"t", good_batch(b"m%d" % i)) for i in range(1, 8)]
    conn.receive_data(b"".join(frames) + raw_frame(0x40, u64(9)) + frames[0][:10])
    assert [f[0] for f in conn.next_publishes(3)] == [1, 2, 3]
    assert [f[0] for f in conn.next_publishes(100)] == [4, 5, 6, 7]
    assert conn.next_publishes(100) == []  # a PING next: next_event's
    assert conn.next_event() == Ping(9)
    assert conn.next_publishes(100) == []  # incomplete
    assert conn.next_event() is NEED_DATA
    assert conn.buffered_bytes == 10


def test_next_publishes_gives_nothing_before_the_handshake() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(publish_frame(1, b"t", good_batch()))
    assert conn.next_publishes(10) == []
    with pytest.raises(RemoteProtocolError) as raised:
        conn.next_event()
    assert raised.value.code is ErrorCode.HANDSHAKE_REQUIRED


# -- the core: publish_run answers what publish answers, stores the same bytes --


FIXED_US = 1_765_000_000_000_000


def _delayed(due_ms: int) -> bytes:
    return encode_batch([(b"later", {DELIVER_AT_HEADER: str(due_ms)})])


def _named(msg_id: str, payload: bytes) -> bytes:
    return encode_batch_from_records([with_msg_id(encode_record(payload), msg_id)])


def _frame_kinds() -> dict[str, Frame]:
    bad_crc = bytearray(good_batch(b"bad crc"))
    bad_crc[-1] ^= 0xFF
    return {
        "a": (0, "run.a", good_batch(b"a" * 150), 0),
        "a-small": (0, "run.a", good_batch(b"s"), 0),
        "a-many": (0, "run.a", good_batch(*[b"m"] * 3), 0),
        "b": (0, "run.b", good_batch(b"b" * 90), 0),
        "no-ack": (0, "run.a", good_batch(b"z" * 20), 0),
        "bad-topic": (0, "run..a", good_batch(b"x"), 0),
        "denied": (0, "secret.a", good_batch(b"x"), 0),
        "bad-crc": (0, "run.a", bytes(bad_crc), 0),
        "too-many": (0, "run.a", good_batch(*[b"m"] * 9), 0),
        "dedup": (0, "run.a", _named("one", b"named"), PUBLISH_FLAG_DEDUP),
        "dedup-b": (0, "run.b", _named("two", b"named b"), PUBLISH_FLAG_DEDUP),
        "no-receiver": (0, "run.a", good_batch(b"r"), PUBLISH_FLAG_NEEDS_RECEIVER),
        "delayed": (0, "run.a", _delayed(FIXED_US // 1000 + 60_000), PUBLISH_FLAG_DELAYED),
        "due": (0, "run.a", _delayed(FIXED_US // 1000 - 1), PUBLISH_FLAG_DELAYED),
        "malformed": (0, "run.a", batch_with_count(0, b""), 0),
    }


def _core(data_dir: Path, ops: FaultyOps | None = None, *, fsync: str = "never", segment_bytes: int = 1024) -> Broker:
    store = open_store(data_dir, ops or FaultyOps(), fsync=fsync, segment_bytes=segment_bytes)
    broker = Broker(Config(data_dir=data_dir, limits=Limits(max_batch_messages=5)), store=store)
    broker.recover()
    return broker


def _principal() -> Principal:
    who = Principal()
    who.may_publish = lambda topic: not topic.startswith("secret.")
    return who


def _outcome(result: Published | Refused) -> tuple[Any, ...]:
    if isinstance(result, Refused):
        return ("refused", result.code)
    held = result.held
    return (
        "published",
        result.request_id,
        result.base,
        result.count,
        result.timestamp,
        result.durability,
        result.duplicate,
        None if held is None else (held.base, held.count),
    )


def _one_at_a_time(broker: Broker, who: Principal, frames: list[Frame]) -> tuple[list[Any], Any]:
    """What the session did before: core.publish per frame."""
    out: list[Any] = []
    for request_id, topic, batch, flags in frames:
        try:
            published = broker.publish(
                who,
                topic,
                batch,
                needs_receiver=bool(flags & PUBLISH_FLAG_NEEDS_RECEIVER),
                dedup=bool(flags & PUBLISH_FLAG_DEDUP),
                delayed=bool(flags & PUBLISH_FLAG_DELAYED),
            )
        except Refused as refused:
            out.append(_outcome(refused))
            continue
        except RemoteProtocolError as exc:
            return out, exc.code
        published.request_id = request_id
        out.append(_outcome(published))
    return out, None


def _files(data_dir: Path) -> dict[str, bytes]:
    topics = data_dir / "topics"
    return {
        str(p.relative_to(topics)): p.read_bytes()
        for p in sorted(topics.rglob("*"))
        if p.is_file() and p.suffix in (".log", ".index", ".timeindex")
    }


@contextmanager
def _two_cores(fsync: str) -> Iterator[tuple[Broker, Broker, Path, Path]]:
    with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
        a, b = Path(one), Path(two)
        ours, theirs = _core(a, fsync=fsync), _core(b, fsync=fsync)
        try:
            yield ours, theirs, a, b
        finally:
            ours.close()
            theirs.close()


@settings(max_examples=40, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(sorted(_frame_kinds())), max_size=40),
    fsync=st.sampled_from(["never", "always"]),
)
def test_a_run_answers_and_stores_what_frames_one_at_a_time_do(kinds: list[str], fsync: str) -> None:
    catalogue = _frame_kinds()
    frames = []
    for i, kind in enumerate(kinds, start=1):
        _, topic, batch, flags = catalogue[kind]
        frames.append((0 if kind == "no-ack" else i, topic, batch, flags))
    who = _principal()
    # Both brokers stamp every batch with the same time: their files compare.
    with mock.patch.object(time, "time_ns", lambda: FIXED_US * 1000):
        with _two_cores(fsync) as (ours, theirs, ours_dir, theirs_dir):
            results, error = ours.publish_run(who, frames)
            got = [_outcome(r) for r in results]
            expected, expected_error = _one_at_a_time(theirs, who, frames)
            assert got == expected
            assert (error.code if error is not None else None) == expected_error
            assert _files(ours_dir) == _files(theirs_dir)
            for name in ("run.a", "run.b"):
                mine, other = ours.router.topics.get(name), theirs.router.topics.get(name)
                assert (mine is None) == (other is None)
                if mine is not None and other is not None:
                    assert mine.log.next_offset == other.log.next_offset
                    assert [(h.base, h.count) for h in mine.held] == [(h.base, h.count) for h in other.held]
                    assert (mine.messages_in, mine.bytes_in) == (other.messages_in, other.bytes_in)


def test_a_run_to_one_topic_is_one_write_and_one_hold_sequence(tmp_path: Path) -> None:
    ops = FaultyOps()
    broker = _core(tmp_path, ops, fsync="always", segment_bytes=1 << 20)
    try:
        frames = [(i, "one.t", good_batch(b"m%d" % i), 0) for i in range(1, 101)]
        broker.publish_run(Principal(), frames[:1])  # creates the topic
        writes, seq = ops.calls["writev"], broker.router.held_seq
        results, error = broker.publish_run(Principal(), frames[1:])
        assert error is None
        assert [r.base for r in results if isinstance(r, Published)] == list(range(1, 100))
        assert ops.calls["writev"] == writes + 1
        assert broker.router.held_seq == seq + 1
        assert {r.held.seq for r in results if isinstance(r, Published) and r.held} == {seq + 1}
        # Topics in turn: a write per run of frames to one topic.
        mixed = [(i, "one.t" if (i // 10) % 2 else "two.t", good_batch(b"x"), 0) for i in range(200, 240)]
        writes = ops.calls["writev"]
        broker.publish_run(Principal(), mixed)
        assert ops.calls["writev"] == writes + 4  # 4 runs
    finally:
        broker.close()


def test_append_many_leaves_the_files_append_leaves(tmp_path: Path) -> None:
    """Rolls, index entries and more batches than one writev takes."""
    rng = random.Random(17)
    batches = [good_batch(bytes(rng.randrange(1, 700))) for _ in range(MAX_WRITE_BATCHES + 300)]
    counts = [1] * len(batches)
    segment_bytes = 40 * 1024
    assert sum(map(len, batches)) > 2 * segment_bytes and segment_bytes > INDEX_INTERVAL
    one, many = FaultyOps(), FaultyOps()
    single = open_store(tmp_path / "single", one, segment_bytes=segment_bytes)
    grouped = open_store(tmp_path / "grouped", many, segment_bytes=segment_bytes)
    try:
        log = single.topic("t")
        for batch in batches:
            log.append(batch, 1, FIXED_US)
        glog = grouped.topic("t")
        done = 0
        while done < len(batches):
            done += glog.append_many(batches, counts, done, FIXED_US)
        assert glog.next_offset == log.next_offset == len(batches)
        assert len(glog.segments) == len(log.segments) > 2
        assert many.calls["writev"] < len(batches) // 50
        for a, b in zip(log.segments, glog.segments):
            assert (a.base_offset, a.size, a.batches) == (b.base_offset, b.size, b.batches)
            assert (a._idx_offsets, a._idx_positions) == (b._idx_offsets, b._idx_positions)
            assert (a._time_stamps, a._time_offsets) == (b._time_stamps, b._time_offsets)
            assert a._since_index == b._since_index
    finally:
        single.close()
        grouped.close()
    assert _files(tmp_path / "single") == _files(tmp_path / "grouped")
    # Read back after a restart, every batch intact.
    reopened = FileStore(tmp_path / "grouped")
    try:
        assert reopened.findings == []
        got = []
        offset = 0
        while offset < len(batches):
            for stored in reopened.topic("t").read(offset, 1 << 20):
                got.append(stored.batch)
                offset = stored.next_offset
        assert got == batches
    finally:
        reopened.close()


def test_a_write_that_fails_mid_run_refuses_exactly_what_it_did_not_store(tmp_path: Path) -> None:
    """A run across a segment roll is two writes; the second writes short
    (the disk fills): the first write's batches are stored and published,
    the rest refused STORAGE_FULL, in order, and nothing torn stays."""
    ops = FaultyOps()
    broker = _core(tmp_path, ops, segment_bytes=2048)
    try:
        frames = [(i, "fill.t", good_batch(b"p" * 200), 0) for i in range(1, 21)]
        broker.publish_run(Principal(), frames[:1])
        ops.short_next("writev", after=1)
        results, error = broker.publish_run(Principal(), frames[1:])
        assert error is None
        stored = [r for r in results if isinstance(r, Published)]
        refused = [r for r in results if isinstance(r, Refused)]
        assert stored and refused
        assert results == stored + refused  # stored first, then refused: in order
        assert [r.base for r in stored] == list(range(1, 1 + len(stored)))
        assert {r.code for r in refused} == {ErrorCode.STORAGE_FULL}
        log = broker.router.topics["fill.t"].log
        assert log.next_offset == 1 + len(stored)
        # Each refused frame was tried (and counted) as before: one by one.
        assert broker.store.storage_errors["full"] == len(refused)
        ops.free()
        results, _ = broker.publish_run(Principal(), frames[:3])
        assert [r.base for r in results if isinstance(r, Published)] == [log.next_offset - 3 + i for i in range(3)]
    finally:
        broker.close()
    reopened = FileStore(tmp_path)
    try:
        assert reopened.findings == []
        assert reopened.topic("fill.t").next_offset == 1 + len(stored) + 3
    finally:
        reopened.close()


def test_a_malformed_batch_ends_the_run_after_storing_what_came_before(tmp_path: Path) -> None:
    broker = _core(tmp_path)
    try:
        frames = [(i, "m.t", good_batch(b"%d" % i), 0) for i in range(1, 6)]
        frames.append((6, "m.t", batch_with_count(0, b""), 0))
        frames.append((7, "m.t", good_batch(b"7"), 0))
        results, error = broker.publish_run(Principal(), frames)
        assert error is not None and error.code is ErrorCode.MALFORMED_FRAME
        assert [r.request_id for r in results if isinstance(r, Published)] == [1, 2, 3, 4, 5]
        assert broker.router.topics["m.t"].log.next_offset == 5
    finally:
        broker.close()


# -- over the wire: what a peer sees ---------------------------------------------


@pytest.mark.trio
async def test_a_read_of_mixed_frames_is_answered_in_publish_order(tmp_path: Path) -> None:
    store = open_store(tmp_path, fsync="always")
    async with run_broker(
        Config(), store=store, host="127.0.0.1", port=0, http_port=0, data_dir=tmp_path,
        limits=Limits(max_batch_messages=5),
    ) as server:
        sub = await RawSubscriber.open(server.url, "sub", "w.>", 1 << 30)
        try:
            async with raw_client(server, handshake="pub") as raw:
                bad_crc = bytearray(good_batch(b"c"))
                bad_crc[-1] ^= 1
                wire = [
                    publish_frame(1, b"w.a", good_batch(b"1")),
                    publish_frame(2, b"w.a", good_batch(b"2")),
                    publish_frame(3, b"w..a", good_batch(b"3")),
                    publish_frame(4, b"w.a", bytes(bad_crc)),
                    publish_frame(0, b"w.a", good_batch(b"no answer")),
                    publish_frame(5, b"w.b", good_batch(b"5")),
                    raw_frame(0x40, u64(77)),
                    publish_frame(6, b"w.a", good_batch(*[b"x"] * 6)),
                    publish_frame(7, b"w.a", good_batch(b"7a", b"7b")),
                ]
                await raw.send(b"".join(wire))
                events = await raw.events(8)
                kinds = [
                    (type(e).__name__, getattr(e, "request_id", None) or getattr(e, "ref", None) or getattr(e, "nonce", None))
                    for e in events
                ]
                assert kinds == [
                    ("PubAck", 1), ("PubAck", 2), ("Error", 3), ("Error", 4), ("PubAck", 5),
                    ("Pong", 77), ("Error", 6), ("PubAck", 7),
                ]
                acks = [e for e in events if isinstance(e, PubAck)]
                assert [(a.base_offset, a.count) for a in acks] == [(0, 1), (1, 1), (0, 1), (3, 2)]
                assert {a.durability for a in acks} == {Durability.DISK}
                codes = [e.code for e in events if isinstance(e, Error)]
                assert codes == [ErrorCode.BAD_TOPIC, ErrorCode.CHECKSUM_MISMATCH, ErrorCode.BATCH_LIMIT]
                assert isinstance(events[5], Pong)
            with trio.fail_after(TIMEOUT):
                await sub.read_messages(6)
            # Per topic, in order; the unanswered one (request 0) at w.a 2.
            assert sorted(sub.messages) == [(0, b"1"), (0, b"5"), (1, b"2"), (2, b"no answer"), (3, b"7a"), (4, b"7b")]
        finally:
            await sub.aclose()


@pytest.mark.trio
async def test_a_malformed_batch_mid_read_answers_what_came_before_then_closes(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    async with run_broker(Config(), store=store, host="127.0.0.1", port=0, http_port=0, data_dir=tmp_path) as server:
        async with raw_client(server, handshake="pub") as raw:
            wire = [publish_frame(i, b"mal.t", good_batch(b"%d" % i)) for i in range(1, 6)]
            wire.append(publish_frame(6, b"mal.t", batch_with_count(0, b"")))
            wire += [publish_frame(i, b"mal.t", good_batch(b"%d" % i)) for i in range(7, 10)]
            await raw.send(b"".join(wire))
            events = await raw.events(6)
            assert [e.request_id for e in events[:5]] == [1, 2, 3, 4, 5]  # type: ignore[union-attr]
            assert isinstance(events[5], Error) and events[5].fatal
            assert events[5].code == ErrorCode.MALFORMED_FRAME
            assert await raw.next_event() is None
        assert server.broker.router.topics["mal.t"].log.next_offset == 5


@pytest.mark.trio
@pytest.mark.parametrize("fault", ["full", "short-write", "eio-once"])
async def test_a_storage_fault_during_a_read_refuses_exactly_what_was_not_stored(tmp_path: Path, fault: str) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with run_broker(Config(), store=store, host="127.0.0.1", port=0, http_port=0, data_dir=tmp_path) as server:
        async with raw_client(server, handshake="pub") as raw:
            await raw.send(publish_frame(1, b"f.t", good_batch(b"first")))
            assert isinstance(await raw.next_event(), PubAck)
            log = store.topic("f.t")
            size = log.segments[-1].size
            if fault == "full":
                ops.fill()
            elif fault == "short-write":
                ops.short_next("writev")
            else:
                ops.fail_next("writev", errno.EIO)
            await raw.send(b"".join(publish_frame(i, b"f.t", good_batch(b"m%d" % i)) for i in range(2, 22)))
            events = await raw.events(20)
            assert [getattr(e, "request_id", None) or getattr(e, "ref", None) for e in events] == list(range(2, 22))
            if fault == "eio-once":
                # The failed write stored nothing and counts as the failed
                # append of its first batch, refused as publish() frame by
                # frame would have; the rest were appended one by one.
                assert isinstance(events[0], Error) and events[0].code == ErrorCode.STORAGE_ERROR
                assert all(isinstance(e, PubAck) for e in events[1:])
                assert [e.base_offset for e in events[1:]] == list(range(1, 20))  # type: ignore[union-attr]
            else:
                assert {(type(e), e.code) for e in events} == {(Error, ErrorCode.STORAGE_FULL)}  # type: ignore[union-attr]
                assert log.next_offset == 1
                assert log.segments[-1].size == size
                assert os.path.getsize(log.segments[-1].path) == size  # nothing torn left
                assert store.storage_errors["full"] == 20  # refused one by one, as before
                ops.free()
                await raw.send(b"".join(publish_frame(i, b"f.t", good_batch(b"m%d" % i)) for i in range(22, 27)))
                events = await raw.events(5)
                assert [e.base_offset for e in events] == list(range(1, 6))  # type: ignore[union-attr]
    reopened = FileStore(tmp_path)
    try:
        assert reopened.findings == []
    finally:
        reopened.close()


@pytest.mark.trio
async def test_a_failed_fsync_refuses_every_frame_of_the_read_it_covered(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops, fsync="always")
    async with run_broker(Config(), store=store, host="127.0.0.1", port=0, http_port=0, data_dir=tmp_path) as server:
        sub = await RawSubscriber.open(server.url, "sub", "s.t", 1 << 30)
        try:
            async with raw_client(server, handshake="pub") as raw:
                await raw.send(publish_frame(1, b"s.t", good_batch(b"kept")))
                assert isinstance(await raw.next_event(), PubAck)
                ops.fail_next("fdatasync", errno.EIO)
                await raw.send(b"".join(publish_frame(i, b"s.t", good_batch(b"doomed")) for i in range(2, 32)))
                events = await raw.events(30)
                assert [getattr(e, "request_id", None) or getattr(e, "ref", None) for e in events] == list(range(2, 32))
                refused = [e for e in events if isinstance(e, Error)]
                assert refused and all(e.code == ErrorCode.STORAGE_ERROR for e in refused)
                acked = [e for e in events if isinstance(e, PubAck)]
                # A read the failed round did not cover (if the frames came
                # in two) was stored after the cut, at the offsets that follow.
                assert [a.base_offset for a in acked] == list(range(1, 1 + len(acked)))
                await raw.send(publish_frame(99, b"s.t", good_batch(b"after")))
                after = await raw.next_event()
                assert isinstance(after, PubAck) and after.base_offset == 1 + len(acked)
            with trio.fail_after(TIMEOUT):
                await sub.read_messages(2 + len(acked))
            assert [p for _, p in sub.messages] == [b"kept"] + [b"doomed"] * len(acked) + [b"after"]
        finally:
            await sub.aclose()


def test_the_bench_publishers_frames_are_the_codecs() -> None:
    """`pybroker bench`'s fast publisher packs PUBLISH frames from a
    template and reads PUBACKs in place: byte for byte the codec's."""
    from pybroker.protocol import encode_puback, encode_publish
    from pybroker.server.bench.worker import PUBACK_FRAME, PUBLISH_PREFIX, publish_frame_tail

    for request_id, topic, batch in [(1, "t", good_batch(b"x")), (2**64 - 1, "ü.é", good_batch(*[b"y" * 300] * 3))]:
        body, topic_len, tail = publish_frame_tail(topic, batch)
        assert PUBLISH_PREFIX.pack(body, 0x10, 0, request_id, topic_len) + tail == encode_publish(request_id, topic, batch)
    ack = PubAck(7, 2**40, 3, FIXED_US, Durability.OS)
    assert PUBACK_FRAME.unpack(encode_puback(ack))[3:] == (7, 2**40, 3, FIXED_US, int(Durability.OS))
