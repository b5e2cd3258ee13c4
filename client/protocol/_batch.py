"""The batch: encoding messages into it and decoding them out of it.

A batch is ``count u32 | crc u32 | records`` (protocol.md, "Batches"). The
broker only ever calls :func:`check_batch`, which is O(1) plus one
``zlib.crc32``; per-message work (:func:`encode_batch`, :func:`decode_batch`)
happens in clients.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from ._errors import ErrorCode, RemoteProtocolError
from ._wire import BATCH_HEADER, RECORD_HEADER
from ._wire import U16 as _U16

#: Shared, immutable headers of a message published without headers.
EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})

Headers = Mapping[str, str]


def encode_headers(headers: Headers | None) -> bytes:
    if not headers:
        return b""
    parts: list[bytes] = []
    for key, value in headers.items():
        k = key.encode("utf-8")
        v = value.encode("utf-8")
        if not k:
            raise ValueError("header keys must be non-empty")
        if len(k) > 0xFFFF or len(v) > 0xFFFF:
            raise ValueError(f"header {key!r} is longer than 65535 bytes")
        parts.append(_U16.pack(len(k)))
        parts.append(k)
        parts.append(_U16.pack(len(v)))
        parts.append(v)
    block = b"".join(parts)
    if len(block) > 0xFFFF:
        raise ValueError("headers block is longer than 65535 bytes")
    return block


def encode_record(payload: bytes, headers: Headers | None = None) -> bytes:
    """One record; clients cache these to build batches cheaply."""
    block = encode_headers(headers)
    return RECORD_HEADER.pack(len(payload), len(block)) + block + payload


#: The header that names a message's key: a partitioned topic's partition
#: (protocol.md, "Partitioned topics"), a key-ordered group's order.
KEY_HEADER = "key"
#: The header that names a batch for exactly-once publishing (flag DEDUP).
MSG_ID_HEADER = "msg-id"
#: The longest msg-id a server accepts, in bytes.
MAX_MSG_ID_BYTES = 128
#: A msg-id header entry up to its value's length.
_MSG_ID_ENTRY = _U16.pack(len(MSG_ID_HEADER)) + MSG_ID_HEADER.encode("ascii")


def with_msg_id(record: bytes, msg_id: str) -> bytes:
    """``record`` with a ``msg-id`` header added (after its own): how a
    client names the batch this record starts, without re-encoding it."""
    payload_len, headers_len = RECORD_HEADER.unpack_from(record, 0)
    extra = encode_headers({MSG_ID_HEADER: msg_id})
    if headers_len + len(extra) > 0xFFFF:
        raise ValueError("no room for a msg-id header: the headers block would pass 65535 bytes")
    start = RECORD_HEADER.size
    return b"".join(
        (
            RECORD_HEADER.pack(payload_len, headers_len + len(extra)),
            record[start : start + headers_len],
            extra,
            record[start + headers_len :],
        )
    )


def record_headers(record: bytes) -> Headers:
    """One record's headers (an encode_record output, or a piece of
    split_records), without touching its payload. MalformedBatch if they
    do not decode."""
    if len(record) < RECORD_HEADER.size:
        raise MalformedBatch("record shorter than its header")
    _, headers_len = RECORD_HEADER.unpack_from(record, 0)
    if not headers_len:
        return EMPTY_HEADERS
    return _decode_headers(record, RECORD_HEADER.size, RECORD_HEADER.size + headers_len)


#: The header that holds a delayed batch back (flag DELAYED): when to
#: deliver it, in milliseconds since the Unix epoch, as decimal digits.
DELIVER_AT_HEADER = "deliver-at"


def first_headers(batch: bytes) -> Headers:
    """The headers of a batch's first record: O(that record's headers), the
    rest of the batch untouched. MalformedBatch if they do not decode."""
    if len(batch) < BATCH_HEADER.size + RECORD_HEADER.size:
        raise MalformedBatch("batch too short for a record")
    pos = BATCH_HEADER.size
    _, headers_len = RECORD_HEADER.unpack_from(batch, pos)
    pos += RECORD_HEADER.size
    if not headers_len:
        return EMPTY_HEADERS
    return _decode_headers(batch, pos, pos + headers_len)


def first_msg_id(batch: bytes) -> str | None:
    """The ``msg-id`` header of a batch's first record, or None."""
    # What the bundled client sends (with_msg_id on a record without
    # headers): the msg-id the first record's only header, read in place;
    # anything else, or a value that is not UTF-8, decodes every header.
    pos = BATCH_HEADER.size + RECORD_HEADER.size
    if batch.startswith(_MSG_ID_ENTRY, pos):
        headers_len = RECORD_HEADER.unpack_from(batch, BATCH_HEADER.size)[1]
        value_at = pos + len(_MSG_ID_ENTRY) + 2
        end = pos + headers_len
        if value_at <= end <= len(batch) and value_at + _U16.unpack_from(batch, value_at - 2)[0] == end:
            try:
                return str(batch[value_at:end], "utf-8")
            except UnicodeDecodeError:
                pass
    return first_headers(batch).get(MSG_ID_HEADER)


def encode_batch_from_records(records: Sequence[bytes]) -> bytes:
    body = b"".join(records)
    return BATCH_HEADER.pack(len(records), zlib.crc32(body)) + body


def encode_batch(
    messages: Iterable[bytes | tuple[bytes, Headers | None]],
) -> bytes:
    """Encode payloads (or ``(payload, headers)`` pairs) into one batch."""
    records = []
    for item in messages:
        if isinstance(item, tuple):
            records.append(encode_record(bytes(item[0]), item[1]))
        else:
            records.append(encode_record(bytes(item)))
    if not records:
        raise ValueError("a batch holds at least one message")
    return encode_batch_from_records(records)


def batch_count(batch: bytes | memoryview) -> int:
    return int.from_bytes(batch[0:4], "big")


#: Record bytes up to which check_batch copies them to checksum them.
_COPY_TO_CRC = 2048


def check_batch(batch: bytes | memoryview) -> tuple[int, bool]:
    """Check a batch's envelope: return ``(count, crc_ok)``.

    Raises RemoteProtocolError(MALFORMED_FRAME) when the envelope cannot be
    a batch at all (too short, zero messages, fewer record bytes than the
    count allows). A CRC mismatch is returned rather than raised, because the
    broker answers it without closing the connection.
    """
    if len(batch) < BATCH_HEADER.size:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_FRAME, "batch shorter than its 8-byte header"
        )
    count, crc = BATCH_HEADER.unpack_from(batch, 0)
    if count == 0:
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "batch with 0 messages")
    records_len = len(batch) - BATCH_HEADER.size
    if records_len < RECORD_HEADER.size * count:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_FRAME,
            f"batch of {count} messages has only {records_len} record bytes",
        )
    # A small batch's records are copied faster than viewed (the broker's
    # one-message publishes); a large one is viewed, not copied.
    records = batch[BATCH_HEADER.size :] if records_len <= _COPY_TO_CRC else memoryview(batch)[BATCH_HEADER.size :]
    return count, zlib.crc32(records) == crc


def split_records(batch: bytes) -> list[bytes]:
    """The raw records of a batch, each re-encodable as a batch of its own.

    Used where one message must travel alone (a group's redelivery, a dead
    letter); never on the hot path. The broker stores batches without parsing
    their records, so a stored batch may not split: that is MalformedBatch,
    like every other verdict on records."""
    count = batch_count(batch)
    pos = BATCH_HEADER.size
    out: list[bytes] = []
    for _ in range(count):
        if pos + RECORD_HEADER.size > len(batch):
            raise MalformedBatch(f"{count} records announced, the batch ends after {len(out)}")
        payload_len, headers_len = RECORD_HEADER.unpack_from(batch, pos)
        end = pos + RECORD_HEADER.size + headers_len + payload_len
        if end > len(batch):
            raise MalformedBatch("record runs past the batch")
        out.append(batch[pos:end])
        pos = end
    return out


class MalformedBatch(ValueError):
    """A batch whose CRC matched but whose records do not parse.

    The publisher produced it; the subscriber reports it for that batch and
    goes on (protocol.md, "Batches")."""


def decode_batch(batch: bytes) -> list[tuple[bytes, Headers]]:
    """Decode every record of a batch into ``(payload, headers)`` pairs."""
    payloads, headers = decode_batch_columns(batch)
    return list(zip(payloads, headers))


def decode_batch_columns(batch: bytes) -> tuple[list[bytes], list[Headers]]:
    """Decode every record of a batch into a list of payloads and a list of
    their headers (the same checks as :func:`decode_batch`).

    A subscriber's hot path: no pair per message, so nothing per message for
    the garbage collector to track and promote before the messages are made
    (headers-less records share one EMPTY_HEADERS)."""
    if len(batch) < BATCH_HEADER.size:
        raise MalformedBatch("batch shorter than its header")
    count, crc = BATCH_HEADER.unpack_from(batch, 0)
    end = len(batch)
    pos = BATCH_HEADER.size
    payloads: list[bytes] = []
    all_headers: list[Headers] = []
    add_payload = payloads.append
    add_headers = all_headers.append
    unpack_record = RECORD_HEADER.unpack_from
    rec_size = RECORD_HEADER.size
    try:
        for _ in range(count):
            payload_len, headers_len = unpack_record(batch, pos)
            pos += rec_size
            if headers_len:
                add_headers(_decode_headers(batch, pos, pos + headers_len))
                pos += headers_len
            else:
                add_headers(EMPTY_HEADERS)
            stop = pos + payload_len
            if stop > end:
                raise MalformedBatch("record payload runs past the batch")
            add_payload(batch[pos:stop])
            pos = stop
    except struct.error as exc:
        raise MalformedBatch(f"record header runs past the batch: {exc}") from None
    if pos != end:
        raise MalformedBatch(f"{end - pos} bytes after the last of {count} records")
    return payloads, all_headers


def _decode_headers(buf: bytes, pos: int, end: int) -> dict[str, str]:
    if end > len(buf):
        raise MalformedBatch("headers run past the batch")
    headers: dict[str, str] = {}
    try:
        while pos < end:
            (klen,) = _U16.unpack_from(buf, pos)
            pos += 2
            key = buf[pos : pos + klen].decode("utf-8")
            pos += klen
            (vlen,) = _U16.unpack_from(buf, pos)
            pos += 2
            value = buf[pos : pos + vlen].decode("utf-8")
            pos += vlen
            if not key or pos > end:
                raise MalformedBatch("bad header entry")
            headers[key] = value
    except (struct.error, UnicodeDecodeError) as exc:
        raise MalformedBatch(f"bad headers: {exc}") from None
    return headers
