"""One segment of a topic log: a file of stored batches plus its indexes.

File layout (``{base_offset:020d}.log``), batches back to back:

    base_offset u64 | count u32 | length u32 | first_ts u64 | last_ts u64 | crc u32
    batch bytes (``length`` of them: the wire batch, count | crc | records)

The header ``crc`` is CRC-32 over the 32 header bytes before it and the
batch's own 8-byte envelope (count and records CRC); together with the
records CRC inside the batch it covers every byte, and appending costs no
second pass over the records (the broker already checked their CRC).

Indexes are sparse (an entry per ``INDEX_INTERVAL`` bytes of log) and
rebuildable: ``.index`` holds (relative offset u32, position u32) and
``.timeindex`` (timestamp u64, relative offset u32). They are not fsynced; on
start, one that does not match its segment is rebuilt by a scan.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from pathlib import Path

import attrs

from client.protocol.batch import BATCH_HEADER as WIRE_BATCH_HEADER

from .base import StoredBatch

HEADER = struct.Struct(">QIIQQI")
HEADER_SIZE = HEADER.size  # 36
INDEX_ENTRY = struct.Struct(">II")
TIME_ENTRY = struct.Struct(">QI")
INDEX_INTERVAL = 4096
SCAN_CHUNK = 1 << 20


def header_crc(fields: bytes | memoryview, batch_envelope: bytes | memoryview) -> int:
    return zlib.crc32(batch_envelope, zlib.crc32(fields))


def segment_name(base_offset: int, suffix: str) -> str:
    return f"{base_offset:020d}{suffix}"


@attrs.frozen
class Truncation:
    """What recovery cut off the end of a segment."""

    segment: Path
    position: int
    dropped_bytes: int
    first_dropped_offset: int
    reason: str


class Segment:
    def __init__(self, directory: Path, base_offset: int) -> None:
        self.directory = directory
        self.base_offset = base_offset
        self.path = directory / segment_name(base_offset, ".log")
        self.index_path = directory / segment_name(base_offset, ".index")
        self.time_path = directory / segment_name(base_offset, ".timeindex")
        self.size = 0
        self.next_offset = base_offset
        self.first_timestamp = 0
        self.last_timestamp = 0
        self.batches = 0
        # Sparse indexes in memory, mirrored in their files.
        self._idx_offsets: list[int] = []
        self._idx_positions: list[int] = []
        self._time_stamps: list[int] = []
        self._time_offsets: list[int] = []
        self._since_index = INDEX_INTERVAL  # so the first batch is indexed
        self._fd = -1
        self._index_fd = -1
        self._time_fd = -1
        self.dirty = False  # appended since the last sync

    # -- opening ----------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, base_offset: int) -> Segment:
        seg = cls(directory, base_offset)
        seg._open_files(truncate_indexes=True)
        return seg

    @classmethod
    def recover(cls, directory: Path, base_offset: int, *, full_scan: bool) -> tuple[Segment, Truncation | None]:
        """Open an existing segment.

        With ``full_scan`` (the newest segment, written when the broker last
        stopped) every batch is checked. Otherwise the indexes are used if
        every entry points at a valid batch header and the file ends where the
        last indexed batches end, and rebuilt by a full scan if not. Either
        scan truncates the file at the first invalid batch, so nothing past
        the valid prefix can ever be read or appended after.
        """
        seg = cls(directory, base_offset)
        truncation = None
        if full_scan or not seg._load_indexes():
            truncation = seg._scan(truncate=True)
            seg._open_files(truncate_indexes=True)
            seg._write_indexes()
        else:
            seg._open_files(truncate_indexes=False)
        return seg, truncation

    def _open_files(self, *, truncate_indexes: bool) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        self._fd = os.open(self.path, flags, 0o644)
        idx_flags = flags | (os.O_TRUNC if truncate_indexes else 0)
        self._index_fd = os.open(self.index_path, idx_flags, 0o644)
        self._time_fd = os.open(self.time_path, idx_flags, 0o644)

    def _load_indexes(self) -> bool:
        """Load both index files; False if missing or not matching the log."""
        try:
            size = self.path.stat().st_size
            index = self.index_path.read_bytes()
            times = self.time_path.read_bytes()
        except FileNotFoundError:
            return False
        if not index or len(index) % INDEX_ENTRY.size or len(times) % TIME_ENTRY.size:
            return False
        offsets: list[int] = []
        positions: list[int] = []
        for rel, pos in INDEX_ENTRY.iter_unpack(index):
            if (positions and pos <= positions[-1]) or pos >= size:
                return False
            offsets.append(self.base_offset + rel)
            positions.append(pos)
        if positions[0] != 0:
            return False
        stamps = []
        toffs = []
        for ts, rel in TIME_ENTRY.iter_unpack(times):
            stamps.append(ts)
            toffs.append(self.base_offset + rel)
        # Both indexes get their entries for the same batches, in time order.
        if toffs != offsets or any(a > b for a, b in zip(stamps, stamps[1:])):
            return False
        if not self._entries_match(offsets, positions, stamps):
            return False
        # The last indexed batch must be a valid batch whose end we can find;
        # walk from it to the end of the file to learn next_offset.
        self.size = size
        self._idx_offsets, self._idx_positions = offsets, positions
        self._time_stamps, self._time_offsets = stamps, toffs
        try:
            with open(self.path, "rb") as f:
                pos = positions[-1]
                f.seek(pos)
                tail = f.read()
        except OSError:
            return False
        end = self._walk(tail, pos, expected=offsets[-1], verify=False)
        if end is None or end[0] != size:
            return False
        self.next_offset, self.last_timestamp = end[1], end[2]
        self.first_timestamp = stamps[0]
        # Only "is it empty" matters after opening; the exact count would
        # need a full walk of the segment.
        self.batches = len(offsets) + end[3]
        self._since_index = end[0] - positions[-1]
        return True

    def _entries_match(self, offsets: list[int], positions: list[int], stamps: list[int]) -> bool:
        """Every index entry points at a valid batch header with that base
        offset and timestamp (one small read per entry, every 4 KiB)."""
        need = HEADER_SIZE + WIRE_BATCH_HEADER.size
        try:
            with open(self.path, "rb") as f:
                for offset, pos, stamp in zip(offsets, positions, stamps):
                    f.seek(pos)
                    head = f.read(need)
                    if len(head) < need:
                        return False
                    base, _count, _length, first, _last, crc = HEADER.unpack_from(head)
                    if base != offset or first != stamp:
                        return False
                    if header_crc(head[: HEADER_SIZE - 4], head[HEADER_SIZE:]) != crc:
                        return False
        except OSError:
            return False
        return True

    def _walk(
        self, data: bytes, start_pos: int, expected: int, verify: bool
    ) -> tuple[int, int, int, int] | None:
        """Walk batches in ``data`` (file bytes from ``start_pos``); return
        (end position, next offset, last timestamp, batches) or None if any
        header is inconsistent."""
        pos = 0
        last_ts = 0
        n = 0
        while pos < len(data):
            if len(data) - pos < HEADER_SIZE:
                return None
            base, count, length, _first, last, crc = HEADER.unpack_from(data, pos)
            if base != expected or length < WIRE_BATCH_HEADER.size or pos + HEADER_SIZE + length > len(data):
                return None
            if verify and not self._batch_ok(data, pos, count, length, crc):
                return None
            expected = base + count
            last_ts = last
            pos += HEADER_SIZE + length
            n += 1
        return start_pos + pos, expected, last_ts, n

    @staticmethod
    def _batch_ok(data: bytes | memoryview, pos: int, count: int, length: int, crc: int) -> bool:
        view = memoryview(data)
        start = pos + HEADER_SIZE
        envelope = view[start : start + WIRE_BATCH_HEADER.size]
        if header_crc(view[pos : pos + HEADER_SIZE - 4], envelope) != crc:
            return False
        wire_count, records_crc = WIRE_BATCH_HEADER.unpack_from(envelope)
        if wire_count != count or count == 0:
            return False
        records = view[start + WIRE_BATCH_HEADER.size : start + length]
        return bool(zlib.crc32(records) == records_crc)

    def _scan(self, *, truncate: bool) -> Truncation | None:
        """Rebuild everything from the log file, checking every batch; cut
        the file at the first invalid batch when ``truncate``."""
        self._idx_offsets, self._idx_positions = [], []
        self._time_stamps, self._time_offsets = [], []
        self._since_index = INDEX_INTERVAL
        self.batches = 0
        expected = self.base_offset
        pos = 0
        reason = ""
        try:
            file_size = self.path.stat().st_size
        except FileNotFoundError:
            file_size = 0
        with open(self.path, "a+b") as f:
            f.seek(0)
            buf = b""
            buf_pos = 0  # file position of buf[0]
            while True:
                rel = pos - buf_pos
                if len(buf) - rel < HEADER_SIZE:
                    f.seek(pos)
                    buf, buf_pos, rel = f.read(SCAN_CHUNK), pos, 0
                    if len(buf) < HEADER_SIZE:
                        if buf:
                            reason = "torn batch header at the end"
                        break
                base, count, length, first, last, crc = HEADER.unpack_from(buf, rel)
                if base != expected or length < WIRE_BATCH_HEADER.size or length > (1 << 31):
                    reason = f"batch header does not fit (base {base}, expected {expected}, length {length})"
                    break
                if len(buf) - rel < HEADER_SIZE + length:
                    f.seek(pos)
                    buf, buf_pos, rel = f.read(max(SCAN_CHUNK, HEADER_SIZE + length)), pos, 0
                    if len(buf) < HEADER_SIZE + length:
                        reason = "torn batch at the end"
                        break
                if not self._batch_ok(buf, rel, count, length, crc):
                    reason = "checksum mismatch"
                    break
                self._note_batch(pos, base, count, first, last, HEADER_SIZE + length)
                expected = base + count
                pos += HEADER_SIZE + length
            self.size = pos
            self.next_offset = expected
            if pos < file_size:
                if truncate:
                    f.truncate(pos)
                    f.flush()
                    os.fsync(f.fileno())
                return Truncation(self.path, pos, file_size - pos, expected, reason or "invalid data")
        return None

    def _note_batch(self, pos: int, base: int, count: int, first: int, last: int, size: int) -> bool:
        """Update in-memory state for a batch at ``pos``; True if it got index entries."""
        if self.batches == 0:
            self.first_timestamp = first
        self.last_timestamp = last
        self.batches += 1
        self.next_offset = base + count
        indexed = self._since_index >= INDEX_INTERVAL
        if indexed:
            self._idx_offsets.append(base)
            self._idx_positions.append(pos)
            self._time_stamps.append(first)
            self._time_offsets.append(base)
            self._since_index = 0
        self._since_index += size
        return indexed

    def _write_indexes(self) -> None:
        idx = b"".join(
            INDEX_ENTRY.pack(o - self.base_offset, p)
            for o, p in zip(self._idx_offsets, self._idx_positions)
        )
        tim = b"".join(
            TIME_ENTRY.pack(t, o - self.base_offset)
            for t, o in zip(self._time_stamps, self._time_offsets)
        )
        os.write(self._index_fd, idx)
        os.write(self._time_fd, tim)

    # -- appending --------------------------------------------------------

    def append(self, batch: bytes, count: int, timestamp: int) -> None:
        base = self.next_offset
        fields = HEADER.pack(base, count, len(batch), timestamp, timestamp, 0)[: HEADER_SIZE - 4]
        crc = header_crc(fields, batch[: WIRE_BATCH_HEADER.size])
        header = fields + crc.to_bytes(4, "big")
        pos = self.size
        written = os.writev(self._fd, (header, batch))
        if written != HEADER_SIZE + len(batch):  # pragma: no cover - disk full etc.
            raise OSError(f"short write to {self.path}: {written} bytes")
        self.size += written
        self.dirty = True
        if self._note_batch(pos, base, count, timestamp, timestamp, written):
            os.write(self._index_fd, INDEX_ENTRY.pack(base - self.base_offset, pos))
            os.write(self._time_fd, TIME_ENTRY.pack(timestamp, base - self.base_offset))

    # -- reading ----------------------------------------------------------

    def read(self, offset: int, max_bytes: int) -> list[StoredBatch]:
        """Batches from the one containing ``offset``, up to about max_bytes
        (at least one if any)."""
        if offset >= self.next_offset:
            return []
        i = bisect.bisect_right(self._idx_offsets, offset) - 1
        pos = self._idx_positions[i] if i >= 0 else 0
        out: list[StoredBatch] = []
        total = 0
        chunk = max(64 * 1024, min(max_bytes, 8 << 20))
        while pos < self.size:
            # Never parse past the valid end, whatever the file holds there.
            data = os.pread(self._fd, min(chunk, self.size - pos), pos)
            rel = 0
            progressed = False
            while len(data) - rel >= HEADER_SIZE:
                base, count, length, first, _last, _crc = HEADER.unpack_from(data, rel)
                end = rel + HEADER_SIZE + length
                if end > len(data):
                    if not progressed and pos + HEADER_SIZE + length <= self.size:
                        # One batch larger than the chunk: read exactly it.
                        data = os.pread(self._fd, HEADER_SIZE + length, pos)
                        rel = 0
                        end = HEADER_SIZE + length
                    else:
                        break
                if base + count > offset:
                    if out and total + length > max_bytes:
                        return out
                    out.append(StoredBatch(base, count, first, data[rel + HEADER_SIZE : end]))
                    total += length
                pos += end - rel
                rel = end
                progressed = True
            if not progressed:  # pragma: no cover - a short read at the end
                break
        return out

    def offset_at_time(self, timestamp: int) -> int | None:
        """First offset in this segment with a timestamp >= ``timestamp``."""
        if self.batches == 0 or self.last_timestamp < timestamp:
            return None
        # The time index is sparse: start at the last entry before the time
        # and read forward (at most one index interval plus one batch).
        i = bisect.bisect_left(self._time_stamps, timestamp) - 1
        offset = self._time_offsets[i] if i >= 0 else self.base_offset
        while offset < self.next_offset:
            batches = self.read(offset, 2 * INDEX_INTERVAL)
            if not batches:
                break
            for stored in batches:
                if stored.timestamp >= timestamp:
                    return stored.base_offset
            offset = batches[-1].next_offset
        return None

    # -- housekeeping -----------------------------------------------------

    def fsync(self) -> None:
        """Make appended batches durable (called from a worker thread)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        for fd in (self._fd, self._index_fd, self._time_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._index_fd = self._time_fd = -1

    def delete(self) -> None:
        self.close()
        for path in (self.path, self.index_path, self.time_path):
            path.unlink(missing_ok=True)
