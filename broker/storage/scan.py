"""Checking stored batches, and finding the next good one after damage.

Pure functions over bytes and file descriptors: no state, no trio. The
segment uses them on every read from disk, recovery on every segment it
does not trust.

Stored batch layout (see :mod:`.segment`):

    base_offset u64 | count u32 | length u32 | first_ts u64 | last_ts u64 | crc u32
    batch bytes (``length`` of them: count u32 | records crc u32 | records)
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterable

from pybroker.protocol import BATCH_HEADER as WIRE_BATCH_HEADER

from .fileops import FileOps

HEADER = struct.Struct(">QIIQQI")
HEADER_SIZE = HEADER.size  # 36
ENVELOPE = WIRE_BATCH_HEADER.size  # 8: the wire batch's count and records CRC
#: No stored batch is larger than this (a frame is at most 2^31 bytes).
MAX_LENGTH = 1 << 31
#: Bytes read at a time when searching for the next good batch.
SEARCH_CHUNK = 8 << 20
#: Candidates checked (both CRCs) in one search at most. Random bytes yield
#: about one candidate per 4 GiB, but a payload repeating every 1, 2, 4, 7,
#: 14 or 28 bytes yields one at nearly every position; past this budget the
#: search gives up (the caller sets the rest aside rather than hang).
MAX_CANDIDATES = 100_000

# A stored header repeats the batch's message count in the wire envelope 36
# bytes later (count at +8, the envelope's count at +36), and a stored count
# is never 0. The regex engine tests that at every position in C, so finding
# candidates in a damaged region costs tens of nanoseconds a byte; only the
# candidates (about one in 2^32 positions of random bytes) are checked in
# Python, by both CRCs.
_CANDIDATE = re.compile(rb"(?=[\s\S]{8}(?!\x00\x00\x00\x00)([\s\S]{4})[\s\S]{24}\1)")


def header_crc(fields: bytes | memoryview, batch_envelope: bytes | memoryview) -> int:
    return zlib.crc32(batch_envelope, zlib.crc32(fields))


def header_ok(data: bytes | memoryview, pos: int) -> bool:
    """The 36-byte header at ``pos`` and the 8-byte envelope after it agree
    with the header CRC and with each other (``data`` holds all 44 bytes)."""
    view = memoryview(data)
    _base, count, length, _first, _last, crc = HEADER.unpack_from(view, pos)
    if count == 0 or length < ENVELOPE or length > MAX_LENGTH:
        return False
    envelope = view[pos + HEADER_SIZE : pos + HEADER_SIZE + ENVELOPE]
    if header_crc(view[pos : pos + HEADER_SIZE - 4], envelope) != crc:
        return False
    wire_count, _records_crc = WIRE_BATCH_HEADER.unpack_from(envelope)
    return bool(wire_count == count)


def records_ok(data: bytes | memoryview, pos: int, length: int) -> bool:
    """The records of the batch whose header is at ``pos`` match their CRC
    (``data`` holds the whole stored batch; its header was checked)."""
    view = memoryview(data)
    start = pos + HEADER_SIZE
    _count, records_crc = WIRE_BATCH_HEADER.unpack_from(view, start)
    return bool(zlib.crc32(view[start + ENVELOPE : start + length]) == records_crc)


def batch_ok(data: bytes | memoryview, pos: int) -> bool:
    """Header and records of the batch at ``pos`` are intact and complete in ``data``."""
    if len(data) - pos < HEADER_SIZE + ENVELOPE or not header_ok(data, pos):
        return False
    length = HEADER.unpack_from(data, pos)[2]
    return pos + HEADER_SIZE + length <= len(data) and records_ok(data, pos, length)


def find_next_batch(
    ops: FileOps,
    fd: int,
    start: int,
    end: int,
    min_base: int,
    hints: Iterable[int] = (),
) -> tuple[int, int] | None:
    """The first position in ``[start, end)`` of the file where a complete,
    intact batch with base offset >= ``min_base`` starts, and its base; None
    if there is none.

    ``hints`` are positions that may hold batches (the sparse index): the
    first hint that checks out bounds the byte-by-byte search, so damage in
    a large segment with a good index costs one index interval to search.
    """
    limit = end
    found: tuple[int, int] | None = None
    for pos in sorted(h for h in hints if start <= h < end):
        checked = _check_at(ops, fd, pos, end, min_base)
        if checked is not None:
            found, limit = (pos, checked), pos
            break
    # Search [start, limit) for an earlier good batch than the hint.
    pos = start
    overlap = HEADER_SIZE + ENVELOPE - 1
    budget = MAX_CANDIDATES
    while pos < limit:
        chunk = ops.pread(fd, min(SEARCH_CHUNK, end - pos), pos)
        if len(chunk) < HEADER_SIZE + ENVELOPE:
            break
        # A match needs 40 bytes after its position: the last ``overlap``
        # positions of a chunk are examined again at the start of the next.
        for match in _CANDIDATE.finditer(chunk, 0, min(len(chunk), limit - pos + overlap)):
            at = pos + match.start()
            if at >= limit:
                break
            budget -= 1
            if budget < 0:
                return found
            if not header_ok(chunk, match.start()):
                continue  # the regex guarantees all 44 bytes are in the chunk
            checked = _check_at(ops, fd, at, end, min_base)
            if checked is not None:
                return at, checked
        examined = len(chunk) - overlap
        if pos + examined >= limit or pos + len(chunk) >= end:
            break
        pos += examined
    return found


def _check_at(ops: FileOps, fd: int, pos: int, end: int, min_base: int) -> int | None:
    """The base offset of an intact batch at ``pos`` ending by ``end``, or None."""
    head = ops.pread(fd, HEADER_SIZE + ENVELOPE, pos)
    if len(head) < HEADER_SIZE + ENVELOPE or not header_ok(head, 0):
        return None
    base, _count, length, _first, _last, _crc = HEADER.unpack_from(head, 0)
    if base < min_base or pos + HEADER_SIZE + length > end:
        return None
    data = ops.pread(fd, HEADER_SIZE + length, pos)
    if len(data) < HEADER_SIZE + length or not records_ok(data, 0, length):
        return None
    return int(base)
