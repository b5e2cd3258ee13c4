"""The codec's receive buffer: what a connection keeps of the bytes it was
given, and the two questions the broker asks of it (``frame_remaining``,
``discard_received``). Memory is measured with tracemalloc: between reads
the buffer holds the incomplete frame alone, so a large frame's memory goes
once it is decoded (issue 12)."""

from __future__ import annotations

import tracemalloc

from pybroker.protocol import (
    HEADER_SIZE,
    NEED_DATA,
    Connection,
    Hello,
    Role,
    Welcome,
    encode_event,
)

from helpers.frames import whole_publish


MIB = 1024 * 1024
#: Reads of this size, as the broker's.
CHUNK = 256 * 1024


def server_conn() -> Connection:
    """A server-side codec past its handshake."""
    conn = Connection(Role.SERVER)
    conn.receive_data(encode_event(Hello("buffer")))
    assert isinstance(conn.next_event(), Hello)
    conn.send(Welcome("0", "test", {}))
    return conn


def request_ids(conn: Connection) -> list[int]:
    return [e.request_id for e in conn.events()]  # type: ignore[union-attr]


def test_frame_remaining_and_discard() -> None:
    conn = server_conn()
    frame = whole_publish(100_000, 5)
    assert conn.frame_remaining == 0
    conn.receive_data(frame[:3])
    assert conn.frame_remaining == HEADER_SIZE - 3
    assert conn.next_event() is NEED_DATA
    conn.receive_data(frame[3:70_000])
    assert conn.frame_remaining == len(frame) - 70_000
    assert conn.next_event() is NEED_DATA
    assert conn.discard_received() == 70_000
    assert conn.buffered_bytes == 0 and conn.frame_remaining == 0
    # A whole frame then part of the next, in one piece.
    conn.receive_data(frame + frame[:10])
    assert conn.frame_remaining == 0
    assert request_ids(conn) == [5]
    assert conn.buffered_bytes == 10
    assert conn.frame_remaining == len(frame) - 10
    conn.receive_data(frame[10:])
    assert request_ids(conn) == [5]
    assert conn.buffered_bytes == 0


def test_received_bytes_are_not_shared_with_the_caller() -> None:
    """``bytes`` are kept as they are (immutable); a bytearray the caller
    may reuse is copied."""
    conn = server_conn()
    frame = whole_publish(1_000, 9)
    data = bytearray(frame)
    conn.receive_data(data)
    data[:] = b"\xff" * len(data)
    assert request_ids(conn) == [9]
    # Split around the header and the end, as bytes, bytearray, memoryview.
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, len(frame) - 1):
        for kind in (bytes, bytearray, memoryview):
            conn.receive_data(kind(frame[:cut]))
            assert conn.next_event() is NEED_DATA
            rest = bytearray(frame[cut:] + frame)
            conn.receive_data(kind(rest))
            rest[:] = b"\xff" * len(rest)
            assert request_ids(conn) == [9, 9]
            assert conn.buffered_bytes == 0


def test_several_pieces_before_decoding() -> None:
    """receive_data may be called many times before next_event."""
    conn = server_conn()
    frames = whole_publish(50_000, 1) + whole_publish(100, 2) + whole_publish(300_000, 3)
    for i in range(0, len(frames), 7_777):
        conn.receive_data(frames[i : i + 7_777])
    assert request_ids(conn) == [1, 2, 3]
    assert conn.buffered_bytes == 0


def traced() -> int:
    return tracemalloc.get_traced_memory()[0]


def test_a_decoded_frame_leaves_only_the_next_ones_start() -> None:
    conn = server_conn()
    frame = whole_publish(2 * MIB, 3)
    chunks = [frame[i : i + CHUNK] for i in range(0, len(frame), CHUNK)]
    tail = frame[:10]
    tracemalloc.start()
    try:
        before = traced()
        for chunk in chunks:
            conn.receive_data(chunk)
        conn.receive_data(tail)  # the next frame begins in the same read
        assert traced() - before > 2 * MIB  # the frame is buffered
        assert request_ids(conn) == [3]  # decoded (and dropped)
        assert conn.buffered_bytes == 10
        assert traced() - before < 64 * 1024
    finally:
        tracemalloc.stop()


def test_discarding_frees_a_half_received_frame() -> None:
    conn = server_conn()
    frame = whole_publish(2 * MIB, 4)
    chunks = [frame[i : i + CHUNK] for i in range(0, MIB, CHUNK)]
    tracemalloc.start()
    try:
        before = traced()
        for chunk in chunks:
            conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA
        assert traced() - before >= MIB
        assert conn.discard_received() == MIB
        assert traced() - before < 64 * 1024
    finally:
        tracemalloc.stop()
