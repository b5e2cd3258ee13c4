"""The frame reader's DELIVER peek at its exact boundaries
(client/protocol/_readers.py, ``deliver_at``): a body that ends exactly
after the batch's 8-byte header is a DELIVER to count, one byte less is
malformed; the count is read only once all four of its bytes are there.
"""

from __future__ import annotations

import pytest

from pybroker.protocol import ErrorCode, FrameType, HEADER_SIZE, RemoteProtocolError, deliver_at

from helpers.frames import raw_frame, u16, u32, u64


def _deliver(batch: bytes, topic: bytes = b"topic") -> bytes:
    return raw_frame(FrameType.DELIVER, u32(9) + u64(100) + u64(200) + u16(len(topic)) + topic + batch)


def test_a_body_ending_exactly_after_the_batch_header_is_counted() -> None:
    data = _deliver(u32(3) + u32(0))
    head = deliver_at(data)
    assert head is not None
    assert (head.sub_id, head.base_offset, head.timestamp, head.messages, head.end) == (9, 100, 200, 3, len(data))


@pytest.mark.parametrize("short", [1, 4, 8])
def test_a_body_too_short_for_the_batch_header_is_malformed(short: int) -> None:
    data = _deliver((u32(3) + u32(0))[:-short])
    with pytest.raises(RemoteProtocolError) as info:
        deliver_at(data + bytes(16))  # what follows in the buffer is not this frame's
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_the_count_is_read_only_when_all_its_bytes_arrived() -> None:
    data = _deliver(u32(0x01020304) + u32(0) + b"records")
    count_at = HEADER_SIZE + 4 + 8 + 8 + 2 + len(b"topic")
    for cut in range(count_at + 4):
        assert deliver_at(data[:cut]) is None, cut
    head = deliver_at(data[: count_at + 4])
    assert head is not None and head.messages == 0x01020304 and head.end == len(data)
    # From the middle of a buffer.
    head = deliver_at(b"\0" * 3 + data[: count_at + 4], 3)
    assert head is not None and head.end == 3 + len(data)
