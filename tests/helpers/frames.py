"""Frames built by hand, byte for byte from protocol.md, independent of the
codec's encoder (so they can lie: wrong lengths, bad UTF-8, reserved flags).

``whole_publish`` is the one exception: a valid PUBLISH of an exact size,
made with the codec, for tests about sizes rather than encodings.
"""

from __future__ import annotations

import struct
import zlib

from pybroker.protocol import (
    HEADER_SIZE,
    MAGIC,
    UNLIMITED_CREDIT,
    FrameType,
    encode_batch,
    encode_publish,
)

#: A frame header: body length, frame type, flags.
HEADER = struct.Struct(">IBB")
#: A batch header: message count, CRC-32 of the records.
BATCH_HEADER = struct.Struct(">II")


def u8(n: int) -> bytes:
    return bytes([n])


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def s16(raw: bytes) -> bytes:
    """A str16 from raw bytes (which need not be valid UTF-8)."""
    return u16(len(raw)) + raw


def raw_frame(ftype: int, body: bytes, flags: int = 0, size: int | None = None) -> bytes:
    """One frame; ``size`` overrides the header's body length."""
    return HEADER.pack(len(body) if size is None else size, ftype, flags) + body


def hello_body(
    magic: bytes = MAGIC, version: int = 1, name: bytes = b"raw", options: bytes = b"\x00\x00"
) -> bytes:
    return magic + u16(version) + s16(name) + options


def publish_body(request_id: int, topic: bytes, batch: bytes) -> bytes:
    return u64(request_id) + s16(topic) + batch


def subscribe_body(
    pattern: bytes = b"a.*",
    start: int = 0,
    start_value: int = 0,
    credit: int = UNLIMITED_CREDIT,
    *,
    sub_id: int = 1,
    options: bytes = b"\x00\x00",
) -> bytes:
    return u32(sub_id) + s16(pattern) + struct.pack(">BQI", start, start_value, credit) + options


def error_body(code: int = 100, message: bytes = b"", ref_kind: int = 0, ref: int = 0) -> bytes:
    return u16(code) + u8(ref_kind) + u64(ref) + s16(message)


def good_batch(*payloads: bytes) -> bytes:
    return encode_batch(list(payloads) or [b"payload"])


def batch_with_count(count: int, records: bytes) -> bytes:
    """A batch around arbitrary record bytes whose CRC matches them."""
    return BATCH_HEADER.pack(count, zlib.crc32(records)) + records


def publish_frame(request_id: int, topic: bytes, batch: bytes) -> bytes:
    return raw_frame(FrameType.PUBLISH, publish_body(request_id, topic, batch))


def subscribe_frame(
    sub_id: int,
    pattern: bytes,
    start: int = 0,
    value: int = 0,
    credit: int = UNLIMITED_CREDIT,
    options: bytes = b"\x00\x00",
) -> bytes:
    return raw_frame(
        FrameType.SUBSCRIBE, subscribe_body(pattern, start, value, credit, sub_id=sub_id, options=options)
    )


#: A HELLO frame a broker accepts (client name "raw", no options).
HELLO_FRAME = raw_frame(FrameType.HELLO, hello_body())


def whole_publish(frame_bytes: int, request_id: int, topic: str = "large.t") -> bytes:
    """A valid PUBLISH of one message whose body is exactly ``frame_bytes``."""
    overhead = len(encode_publish(request_id, topic, encode_batch([b""]))) - HEADER_SIZE
    frame = encode_publish(request_id, topic, encode_batch([bytes(frame_bytes - overhead)]))
    assert len(frame) == HEADER_SIZE + frame_bytes
    return frame
