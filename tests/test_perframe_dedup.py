"""PUBLISH frames with flags DEDUP and NEEDS_RECEIVER in the one-pass path
(issue 17): the client library sets DEDUP on every batch by default, so
those frames take Broker.publish_run's shared checks and one write per
topic, not Broker.publish one at a time.

Exactly once must hold as protocol.md, "Publishing exactly once" says: a
msg-id the topic remembers is answered with the original's place and stored
nothing, also when the original is in the same read and not yet stored;
the same id with another count, and a DEDUP frame without a usable id, are
BAD_REQUEST in their place. Every test here makes Broker.publish raise, so
a frame that fell back to it would fail the test.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pybroker.protocol import (
    PUBLISH_FLAG_DEDUP,
    PUBLISH_FLAG_NEEDS_RECEIVER,
    Durability,
    Error,
    ErrorCode,
    PubAck,
    encode_batch_from_records,
    encode_record,
    with_msg_id,
)
from pybroker.server.config import Config, Limits
from pybroker.server.core import Broker, Published, Refused
from pybroker.server.principal import Principal
from pybroker.server.server import run_broker

from helpers.faults import FaultyOps
from helpers.frames import FrameType, good_batch, publish_body, raw_frame
from helpers.logs import open_store
from helpers.raw import RawSubscriber, raw_client

TIMEOUT = 15.0
FIXED_US = 1_765_000_000_000_000
Frame = tuple[int, str, bytes, int]


def _named(msg_id: str, *payloads: bytes) -> bytes:
    records = [encode_record(p) for p in payloads]
    records[0] = with_msg_id(records[0], msg_id)
    return encode_batch_from_records(records)


def _flagged_frame(request_id: int, topic: bytes, batch: bytes, flags: int) -> bytes:
    return raw_frame(FrameType.PUBLISH, publish_body(request_id, topic, batch), flags)


def _no_publish(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a DEDUP or NEEDS_RECEIVER frame went through Broker.publish")


def _core(data_dir: Path, *, fsync: str) -> Broker:
    store = open_store(data_dir, FaultyOps(), fsync=fsync, segment_bytes=1024)
    broker = Broker(Config(data_dir=data_dir, limits=Limits(max_batch_messages=5)), store=store)
    broker.recover()
    return broker


def _outcome(result: Published | Refused) -> tuple[Any, ...]:
    if isinstance(result, Refused):
        return ("refused", result.code)
    return ("published", result.request_id, result.base, result.count, result.duplicate)


def test_duplicates_within_one_run_are_stored_once(tmp_path: Path) -> None:
    frames: list[Frame] = [
        (1, "d.t", _named("a", b"first"), PUBLISH_FLAG_DEDUP),
        (2, "d.t", good_batch(b"plain"), 0),
        (3, "d.t", _named("a", b"first"), PUBLISH_FLAG_DEDUP),  # resent within the read
        (4, "d.t", _named("b", b"second", b"2b"), PUBLISH_FLAG_DEDUP),
        (5, "d.t", _named("a", b"x", b"y"), PUBLISH_FLAG_DEDUP),  # same id, other count
        (6, "d.t", good_batch(b"no id"), PUBLISH_FLAG_DEDUP),
        (7, "d.t", _named("b", b"second", b"2b"), PUBLISH_FLAG_DEDUP),
        (8, "d.t", good_batch(b"nobody"), PUBLISH_FLAG_NEEDS_RECEIVER),
        (9, "d.t", _named("c", b"third"), PUBLISH_FLAG_DEDUP),
    ]
    broker = _core(tmp_path, fsync="always")
    try:
        with mock.patch.object(Broker, "publish", _no_publish):
            results, error = broker.publish_run(Principal(), frames)
        assert error is None
        assert [_outcome(r) for r in results] == [
            ("published", 1, 0, 1, False),
            ("published", 2, 1, 1, False),
            ("published", 3, 0, 1, True),
            ("published", 4, 2, 2, False),
            ("refused", ErrorCode.BAD_REQUEST),
            ("refused", ErrorCode.BAD_REQUEST),
            ("published", 7, 2, 2, True),
            ("refused", ErrorCode.NO_RECEIVERS),
            ("published", 9, 4, 1, False),
        ]
        topic = broker.router.topics["d.t"]
        assert topic.log.next_offset == 5  # a, plain, b (2), c: nothing twice
        assert broker.dedup.duplicates == 2
        # A duplicate waits for the original's fsync: the same held batch.
        assert results[2].held is results[0].held is not None  # type: ignore[union-attr]
        # The next read knows them too.
        with mock.patch.object(Broker, "publish", _no_publish):
            again, _ = broker.publish_run(Principal(), [(10, "d.t", _named("c", b"third"), PUBLISH_FLAG_DEDUP)])
        assert [_outcome(r) for r in again] == [("published", 10, 4, 1, True)]
        assert topic.log.next_offset == 5
    finally:
        broker.close()


@settings(max_examples=40, deadline=None)
@given(
    picks=st.lists(
        st.tuples(st.sampled_from(["x.a", "x.b", "_inbox.z.q"]), st.sampled_from("abcd"), st.integers(1, 2),
                  st.sampled_from([PUBLISH_FLAG_DEDUP, 0, PUBLISH_FLAG_DEDUP | PUBLISH_FLAG_NEEDS_RECEIVER])),
        max_size=40,
    ),
    fsync=st.sampled_from(["never", "always"]),
)
def test_a_run_with_flags_answers_what_publish_answers_frame_by_frame(
    picks: list[tuple[str, str, int, int]], fsync: str
) -> None:
    """Random DEDUP frames from a small pool of ids (so duplicates within a
    run, across topics and with other counts are common): the same answers
    and the same stored offsets as Broker.publish one frame at a time."""
    frames: list[Frame] = [
        (i, topic, _named(msg_id, *[b"m"] * n), flags)
        for i, (topic, msg_id, n, flags) in enumerate(picks, start=1)
    ]
    who = Principal()
    with mock.patch.object(time, "time_ns", lambda: FIXED_US * 1000):
        with tempfile.TemporaryDirectory() as one, tempfile.TemporaryDirectory() as two:
            ours, theirs = _core(Path(one), fsync=fsync), _core(Path(two), fsync=fsync)
            try:
                expected = []
                for request_id, topic, batch, flags in frames:
                    try:
                        published = theirs.publish(
                            who, topic, batch,
                            needs_receiver=bool(flags & PUBLISH_FLAG_NEEDS_RECEIVER),
                            dedup=bool(flags & PUBLISH_FLAG_DEDUP),
                        )
                    except Refused as refused:
                        expected.append(_outcome(refused))
                        continue
                    published.request_id = request_id
                    expected.append(_outcome(published))
                with mock.patch.object(Broker, "publish", _no_publish):
                    results, error = ours.publish_run(who, frames)
                assert error is None
                got = [_outcome(r) for r in results]
                # A reply to an inbox nobody holds is acknowledged and dropped:
                # its offset means nothing (each publish() makes a throwaway
                # topic, a run one for its consecutive frames).
                for i, (_, topic, _, _) in enumerate(frames):
                    if topic.startswith("_inbox.") and got[i][0] == "published":
                        got[i] = got[i][:2] + got[i][3:]
                        expected[i] = expected[i][:2] + expected[i][3:]
                assert got == expected
                for name in ("x.a", "x.b"):
                    mine, other = ours.router.topics.get(name), theirs.router.topics.get(name)
                    assert (mine is None) == (other is None)
                    if mine is not None and other is not None:
                        assert mine.log.next_offset == other.log.next_offset
                assert ours.dedup.duplicates == theirs.dedup.duplicates
            finally:
                ours.close()
                theirs.close()


@pytest.mark.trio
async def test_a_read_with_a_resent_dedup_frame_is_answered_with_the_original_over_the_wire(tmp_path: Path) -> None:
    """One socket read (one send), fsync always: the resent frame's PUBACK
    carries the original's offset, after the original's fsync, and a
    subscriber gets the batch once."""
    store = open_store(tmp_path, fsync="always")
    async with run_broker(Config(), store=store, host="127.0.0.1", port=0, http_port=0, data_dir=tmp_path) as server:
        sub = await RawSubscriber.open(server.url, "sub", "w.>", 1 << 30)
        try:
            with mock.patch.object(Broker, "publish", _no_publish):
                async with raw_client(server, handshake="pub") as raw:
                    wire = [
                        _flagged_frame(1, b"w.a", _named("m1", b"one"), PUBLISH_FLAG_DEDUP),
                        _flagged_frame(2, b"w.a", _named("m2", b"two"), PUBLISH_FLAG_DEDUP),
                        _flagged_frame(3, b"w.a", _named("m1", b"one"), PUBLISH_FLAG_DEDUP),
                        _flagged_frame(4, b"w.a", good_batch(b"no id"), PUBLISH_FLAG_DEDUP),
                        _flagged_frame(5, b"w.a", _named("m3", b"three"), PUBLISH_FLAG_DEDUP),
                        _flagged_frame(6, b"w.a", _named("m2", b"two"), PUBLISH_FLAG_DEDUP),
                    ]
                    await raw.send(b"".join(wire))
                    events = await raw.events(6)
            acks = {e.request_id: e for e in events if isinstance(e, PubAck)}
            errors = [e for e in events if isinstance(e, Error)]
            assert [getattr(e, "request_id", None) or getattr(e, "ref", None) for e in events] == [1, 2, 3, 4, 5, 6]
            assert [(i, acks[i].base_offset) for i in sorted(acks)] == [(1, 0), (2, 1), (3, 0), (5, 2), (6, 1)]
            assert {a.durability for a in acks.values()} == {Durability.DISK}
            assert [(e.code, e.fatal) for e in errors] == [(ErrorCode.BAD_REQUEST, False)]
            with trio.fail_after(TIMEOUT):
                await sub.read_messages(3)
            assert sorted(sub.messages) == [(0, b"one"), (1, b"two"), (2, b"three")]
            assert server.broker.router.topics["w.a"].log.next_offset == 3
        finally:
            await sub.aclose()


def test_a_first_dedup_frame_sees_a_named_plain_batch_before_it_in_the_run(tmp_path: Path) -> None:
    """The topic's ids are read back from its log at its first DEDUP
    publish, and that read sees every stored batch that has a msg-id: a
    plain batch earlier in the same run is stored first, as publish() one
    frame at a time would have, so the DEDUP frame is its duplicate."""
    broker = _core(tmp_path, fsync="never")
    try:
        with mock.patch.object(Broker, "publish", _no_publish):
            results, _ = broker.publish_run(
                Principal(),
                [(1, "p.t", _named("k", b"v"), 0), (2, "p.t", _named("k", b"v"), PUBLISH_FLAG_DEDUP)],
            )
        assert [_outcome(r) for r in results] == [("published", 1, 0, 1, False), ("published", 2, 0, 1, True)]
        assert broker.router.topics["p.t"].log.next_offset == 1
    finally:
        broker.close()


@settings(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(st.sampled_from(["msg-id", "a", "msg-i", "msg-idd"]), st.text(max_size=8), max_size=3),
    msg_id=st.one_of(st.none(), st.text(max_size=20)),
    cut=st.integers(0, 80),
    flip=st.one_of(st.none(), st.integers(0, 60)),
)
def test_first_msg_id_reads_in_place_what_decoding_every_header_reads(
    headers: dict[str, str], msg_id: str | None, cut: int, flip: int | None
) -> None:
    """first_msg_id reads the bundled client's msg-id in place: the same
    answer (or the same MalformedBatch) as decoding every header, for any
    headers, cut or damaged anywhere."""
    from pybroker.protocol import MalformedBatch, encode_record, first_headers, first_msg_id

    record = encode_record(b"payload", headers or None)
    if msg_id is not None:
        record = with_msg_id(record, msg_id)
    batch = bytearray(encode_batch_from_records([record]))
    if flip is not None and flip < len(batch):
        batch[flip] ^= 0x80
    data = bytes(batch[: len(batch) - cut] if cut < len(batch) else batch)

    def outcome(fn: Any) -> Any:
        try:
            return ("ok", fn(data))
        except MalformedBatch:
            return ("malformed",)

    assert outcome(first_msg_id) == outcome(lambda b: first_headers(b).get("msg-id"))
