"""Reading frames in place (client/protocol/_readers.py): ``frame_at``,
``deliver_at`` and ``decode_frame``, what a peer that counts rather than
decodes walks its buffer with (the bench's raw subscribers).

Each is fed every prefix of its input (incomplete: None, never a wrong
answer), at offsets inside a larger buffer, and checked against the
Connection's own decoding of the same bytes."""

from __future__ import annotations

import random

import pytest

from pybroker.protocol import (
    HEADER_SIZE,
    Deliver,
    DeliverHead,
    ErrorCode,
    FrameType,
    Ping,
    RemoteProtocolError,
    batch_count,
    decode_frame,
    deliver_at,
    encode_batch,
    encode_event,
    frame_at,
)

from helpers.cases import CASES, Case, encoded
from helpers.frames import raw_frame, u16, u32, u64


DELIVERS = [
    Deliver(1, "a", 0, 0, encode_batch([b"x"])),
    Deliver(2**32 - 1, "ünï.cödé.🎉", 2**64 - 1, 2**64 - 1, encode_batch([b""] * 700)),
    Deliver(7, "t" * 255, 12345, 678, encode_batch([(b"p" * 300, {"k": "v"}), b"q"])),
]


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_decode_frame_matches_the_connection(case: Case) -> None:
    data = encoded(case)
    assert frame_at(data) == (data[4], data[5], len(data))
    assert decode_frame(data) == case.event
    # In the middle of a buffer, from a memoryview too.
    padded = b"\xff" * 5 + data + b"\xee" * 9
    assert frame_at(padded, 5) == (data[4], data[5], 5 + len(data))
    assert decode_frame(padded, 5) == case.event
    assert decode_frame(memoryview(padded), 5) == case.event


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_every_prefix_is_incomplete(case: Case) -> None:
    data = encoded(case)
    for cut in range(len(data)):
        head = frame_at(data[:cut])
        if cut < HEADER_SIZE:
            assert head is None
        else:
            assert head == (data[4], data[5], len(data))
        with pytest.raises(RemoteProtocolError) as info:
            decode_frame(data[:cut])
        assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_decode_frame_refuses_an_unknown_type() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_frame(raw_frame(0x7F, b""))
    assert info.value.code is ErrorCode.UNKNOWN_FRAME_TYPE


def test_decode_frame_refuses_a_malformed_body() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_frame(raw_frame(FrameType.PING, u64(1) + b"!"))
    assert info.value.code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize("event", DELIVERS, ids=lambda e: e.topic[:20])
def test_deliver_at_reads_up_to_the_batch_count(event: Deliver) -> None:
    data = encode_event(event)
    expected = DeliverHead(event.sub_id, event.base_offset, event.timestamp, batch_count(event.batch), len(data))
    needed = HEADER_SIZE + 4 + 8 + 8 + 2 + len(event.topic.encode()) + 4
    for cut in range(len(data) + 1):
        head = deliver_at(data[:cut])
        if cut < needed:
            assert head is None, cut
        else:
            assert head == expected, cut
    # At an offset, with the rest of the batch not arrived.
    before = encode_event(Ping(3))
    buf = before + data[:needed]
    head = deliver_at(buf, len(before))
    assert head == expected._replace(end=len(before) + len(data))
    assert head.end > len(buf)


def test_deliver_at_refuses_other_frames() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        deliver_at(encode_event(Ping(1)) + bytes(40))
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_deliver_at_refuses_a_topic_running_past_the_frame() -> None:
    # The topic length claims more bytes than the body has for a batch.
    body = u32(1) + u64(0) + u64(0) + u16(200) + b"t" * 10 + encode_batch([b"x"])
    with pytest.raises(RemoteProtocolError) as info:
        deliver_at(raw_frame(FrameType.DELIVER, body) + bytes(300))
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_a_stream_counted_in_place_matches_the_decoded_one() -> None:
    """The raw subscriber's walk: frames split anywhere across reads,
    batches skipped unread; the count equals what a full decode gives."""
    rng = random.Random(13)
    frames: list[bytes] = []
    expected: list[tuple[int, int]] = []
    base = 0
    for i in range(200):
        if rng.random() < 0.1:
            frames.append(encode_event(Ping(i)))
            continue
        n = rng.randint(1, 50)
        event = Deliver(1, "t" * rng.randint(1, 40), base, i, encode_batch([b"m" * rng.randint(0, 90)] * n))
        frames.append(encode_event(event))
        expected.append((base, n))
        base += n
    stream = b"".join(frames)
    cuts = sorted(rng.sample(range(1, len(stream)), 300))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]

    counted: list[tuple[int, int]] = []
    pings = 0
    skip, partial = 0, b""
    for data in reads:
        if skip >= len(data):
            skip -= len(data)
            continue
        pos, skip = skip, 0
        if partial:
            data, pos, partial = partial + data[pos:], 0, b""
        while pos < len(data):
            head = frame_at(data, pos)
            if head is None:
                partial = data[pos:]
                break
            ftype, _flags, end = head
            if ftype == FrameType.DELIVER:
                deliver = deliver_at(data, pos)
                if deliver is None:
                    partial = data[pos:]
                    break
                counted.append((deliver.base_offset, deliver.messages))
            else:
                if end > len(data):
                    partial = data[pos:]
                    break
                assert isinstance(decode_frame(data, pos), Ping)
                pings += 1
            if end > len(data):
                skip = end - len(data)
                break
            pos = end
    assert counted == expected
    assert pings == len(frames) - len(expected)
    assert skip == 0 and partial == b""
