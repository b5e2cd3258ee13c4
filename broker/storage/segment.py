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

Faults, and what the segment promises under them:

- An append that fails or writes short is rolled back (the file cut back to
  the last complete batch) before anything else can be appended; if even the
  rollback fails the segment is ``broken`` and refuses appends until a
  repair succeeds. Nothing past :attr:`size` is ever read or appended after.
- A failed fsync is never retried and then trusted: the caller rolls the
  segment back to the state of its last successful sync
  (:meth:`rollback_to_synced`).
- Every batch read from disk is checked against both CRCs before it is
  returned. Damage found while reading is remembered (and marked on disk,
  so the next start scans this segment); the reader gets :class:`DataLoss`
  for the offsets it cost and every later read goes past it.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import attrs

from .base import StoredBatch
from .errors import DataLoss, StorageError
from .fileops import REAL, FileOps, write_all
from .scan import ENVELOPE, HEADER, HEADER_SIZE, find_next_batch, header_crc, header_ok, records_ok

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "INDEX_ENTRY",
    "INDEX_INTERVAL",
    "TIME_ENTRY",
    "Damage",
    "ScanStop",
    "Segment",
    "SyncMark",
    "header_crc",
    "segment_name",
]

INDEX_ENTRY = struct.Struct(">II")
TIME_ENTRY = struct.Struct(">QI")
INDEX_INTERVAL = 4096
#: A stored header without its CRC (the fields the CRC covers).
_FIELDS = struct.Struct(HEADER.format[:-1])
assert _FIELDS.size == HEADER_SIZE - 4
#: Batches one append_many writes at most: two buffers each, within the
#: writev limit (IOV_MAX, 1024 on Linux).
MAX_WRITE_BATCHES = 512
SCAN_CHUNK = 1 << 20
#: Bytes read per pread when serving reads (more when one batch is larger).
READ_CHUNK = 64 * 1024
DAMAGED_SUFFIX = ".damaged"


def segment_name(base_offset: int, suffix: str) -> str:
    return f"{base_offset:020d}{suffix}"


@attrs.frozen
class Damage:
    """Bytes of a segment that hold no readable batch, found while reading."""

    position: int  # first damaged byte
    resume: int  # where the next intact batch starts (or the segment's end)
    first_offset: int  # first offset lost
    last_offset: int  # last offset lost, inclusive


@attrs.frozen
class ScanStop:
    """Where a full scan of a segment stopped before the end of its file."""

    position: int  # end of the valid prefix
    next_offset: int  # the offset the first invalid batch should have had
    file_size: int
    reason: str


@attrs.frozen
class SyncMark:
    """The in-memory state of a segment at a moment (its last good sync)."""

    size: int
    next_offset: int
    first_timestamp: int
    last_timestamp: int
    batches: int
    index_entries: int
    since_index: int


class Segment:
    def __init__(
        self,
        directory: Path,
        base_offset: int,
        *,
        topic: str = "",
        ops: FileOps = REAL,
        on_damage: Callable[[Segment, Damage], None] | None = None,
    ) -> None:
        self.directory = directory
        self.base_offset = base_offset
        self.topic = topic
        self.ops = ops
        self.on_damage = on_damage
        self.path = directory / segment_name(base_offset, ".log")
        self.index_path = directory / segment_name(base_offset, ".index")
        self.time_path = directory / segment_name(base_offset, ".timeindex")
        self.damaged_path = directory / segment_name(base_offset, DAMAGED_SUFFIX)
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
        #: A rollback failed: the files may hold bytes past ``size``.
        self.broken = False
        self._synced = self._mark()
        #: Damage found by reads, by position.
        self._damage: dict[int, Damage] = {}

    # -- opening ----------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        base_offset: int,
        *,
        topic: str = "",
        ops: FileOps = REAL,
        on_damage: Callable[[Segment, Damage], None] | None = None,
    ) -> Segment:
        """A new, empty segment; nothing is left behind if that fails."""
        seg = cls(directory, base_offset, topic=topic, ops=ops, on_damage=on_damage)
        try:
            seg.open_files(truncate_indexes=True)
        except OSError as exc:
            seg.close()
            for path in (seg.path, seg.index_path, seg.time_path):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass
            raise StorageError.from_os(exc, f"creating segment {seg.path.name}", seg.topic) from exc
        return seg

    def open_files(self, *, truncate_indexes: bool) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
        self._fd = self.ops.open(self.path, flags, 0o644)
        idx_flags = flags | (os.O_TRUNC if truncate_indexes else 0)
        self._index_fd = self.ops.open(self.index_path, idx_flags, 0o644)
        self._time_fd = self.ops.open(self.time_path, idx_flags, 0o644)
        self._synced = self._mark()

    def load_indexes(self) -> bool:
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
            if (positions and (pos <= positions[-1] or rel <= offsets[-1] - self.base_offset)) or pos >= size:
                return False
            offsets.append(self.base_offset + rel)
            positions.append(pos)
        if positions[0] != 0 or offsets[0] != self.base_offset:
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
        try:
            with open(self.path, "rb") as f:
                pos = positions[-1]
                f.seek(pos)
                tail = f.read()
        except OSError:
            return False
        end = self._walk(tail, pos, expected=offsets[-1])
        if end is None or end[0] != size:
            return False
        self.size = size
        self._idx_offsets, self._idx_positions = offsets, positions
        self._time_stamps, self._time_offsets = stamps, toffs
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
        need = HEADER_SIZE + ENVELOPE
        try:
            with open(self.path, "rb") as f:
                for offset, pos, stamp in zip(offsets, positions, stamps):
                    f.seek(pos)
                    head = f.read(need)
                    if len(head) < need or not header_ok(head, 0):
                        return False
                    base, _count, _length, first, _last, _crc = HEADER.unpack_from(head)
                    if base != offset or first != stamp:
                        return False
        except OSError:
            return False
        return True

    @staticmethod
    def _walk(data: bytes, start_pos: int, expected: int) -> tuple[int, int, int, int] | None:
        """Walk batch headers in ``data`` (file bytes from ``start_pos``);
        return (end position, next offset, last timestamp, batches) or None
        if any header is inconsistent. Records are checked when read."""
        pos = 0
        last_ts = 0
        n = 0
        while pos < len(data):
            if len(data) - pos < HEADER_SIZE + ENVELOPE or not header_ok(data, pos):
                return None
            base, count, length, _first, last, _crc = HEADER.unpack_from(data, pos)
            if base != expected or pos + HEADER_SIZE + length > len(data):
                return None
            expected = base + count
            last_ts = last
            pos += HEADER_SIZE + length
            n += 1
        return start_pos + pos, expected, last_ts, n

    def scan(self) -> ScanStop | None:
        """Check every batch from the start of the file, rebuilding the
        in-memory state and indexes for the valid prefix; say where and why
        it stopped if that is before the end of the file. Changes no file."""
        self._idx_offsets, self._idx_positions = [], []
        self._time_stamps, self._time_offsets = [], []
        self._since_index = INDEX_INTERVAL
        self.batches = 0
        self.first_timestamp = self.last_timestamp = 0
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
                if len(buf) - rel < HEADER_SIZE + ENVELOPE:
                    f.seek(pos)
                    buf, buf_pos, rel = f.read(SCAN_CHUNK), pos, 0
                    if len(buf) < HEADER_SIZE + ENVELOPE:
                        if buf:
                            reason = "torn batch header at the end"
                        break
                if not header_ok(buf, rel):
                    reason = "batch header checksum mismatch"
                    break
                base, count, length, first, last, _crc = HEADER.unpack_from(buf, rel)
                if base != expected:
                    reason = f"batch header does not follow (base {base}, expected {expected})"
                    break
                if len(buf) - rel < HEADER_SIZE + length:
                    f.seek(pos)
                    buf, buf_pos, rel = f.read(max(SCAN_CHUNK, HEADER_SIZE + length)), pos, 0
                    if len(buf) < HEADER_SIZE + length:
                        reason = "torn batch at the end"
                        break
                if not records_ok(buf, rel, length):
                    reason = "checksum mismatch"
                    break
                self._note_batch(pos, base, count, first, last, HEADER_SIZE + length)
                expected = base + count
                pos += HEADER_SIZE + length
        self.size = pos
        self.next_offset = expected
        if pos < file_size:
            return ScanStop(pos, expected, file_size, reason or "invalid data")
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

    def write_indexes(self) -> None:
        """Write the in-memory indexes into freshly truncated index files."""
        idx = b"".join(
            INDEX_ENTRY.pack(o - self.base_offset, p)
            for o, p in zip(self._idx_offsets, self._idx_positions)
        )
        tim = b"".join(
            TIME_ENTRY.pack(t, o - self.base_offset)
            for t, o in zip(self._time_stamps, self._time_offsets)
        )
        write_all(self.ops, self._index_fd, idx)
        write_all(self.ops, self._time_fd, tim)
        self._synced = self._mark()

    # -- appending --------------------------------------------------------

    def append(self, batch: bytes, count: int, timestamp: int) -> None:
        """Store one checked batch, or raise StorageError having stored none of it."""
        if self.broken:
            self.repair()
        base = self.next_offset
        fields = HEADER.pack(base, count, len(batch), timestamp, timestamp, 0)[: HEADER_SIZE - 4]
        crc = header_crc(fields, batch[:ENVELOPE])
        header = fields + crc.to_bytes(4, "big")
        pos = self.size
        total = HEADER_SIZE + len(batch)
        indexed = self._since_index >= INDEX_INTERVAL
        ops = self.ops
        try:
            written = ops.writev(self._fd, (header, batch))
            if written != total:
                raise OSError(28, f"short write ({written} of {total} bytes)")  # ENOSPC
            if indexed:
                write_all(ops, self._index_fd, INDEX_ENTRY.pack(base - self.base_offset, pos))
                write_all(ops, self._time_fd, TIME_ENTRY.pack(timestamp, base - self.base_offset))
        except OSError as exc:
            self._cut_files(pos, len(self._idx_offsets))
            raise StorageError.from_os(exc, f"appending to {self.path.name}", self.topic) from exc
        self.size = pos + total
        self.dirty = True
        self._note_batch(pos, base, count, timestamp, timestamp, total)

    def append_many(
        self, batches: list[bytes], counts: list[int], start: int, timestamp: int, segment_bytes: int
    ) -> int:
        """Store ``batches[start:]`` (checked, ``counts`` messages each) with
        one ``writev``, as many as this segment takes: the first always,
        each next one while the segment is under ``segment_bytes`` before
        it (where :meth:`FileTopicLog.append` would roll), at most
        MAX_WRITE_BATCHES. Returns how many it stored; raises StorageError
        having stored none of them. The file, the indexes and the state are
        what as many :meth:`append` calls would leave."""
        if self.broken:
            self.repair()
        pos = size = self.size
        base = next_offset = self.next_offset
        since = self._since_index
        rel = self.base_offset
        pack = _FIELDS.pack
        crc32 = zlib.crc32  # header_crc, inlined: this loop runs per batch
        iov: list[bytes] = []
        append = iov.append
        index: list[tuple[int, int]] = []  # (offset, position) of each indexed batch
        stop = min(len(batches), start + MAX_WRITE_BATCHES)
        i = start
        while i < stop and (i == start or size < segment_bytes):
            batch = batches[i]
            count = counts[i]
            length = len(batch)
            fields = pack(next_offset, count, length, timestamp, timestamp)
            append(fields + crc32(batch[:ENVELOPE], crc32(fields)).to_bytes(4, "big"))
            append(batch)
            if since >= INDEX_INTERVAL:
                index.append((next_offset, size))
                since = 0
            total = HEADER_SIZE + length
            since += total
            size += total
            next_offset += count
            i += 1
        ops = self.ops
        try:
            written = ops.writev(self._fd, iov)
            if written != size - pos:
                raise OSError(28, f"short write ({written} of {size - pos} bytes)")  # ENOSPC
            if index:
                write_all(ops, self._index_fd, b"".join(INDEX_ENTRY.pack(o - rel, p) for o, p in index))
                write_all(ops, self._time_fd, b"".join(TIME_ENTRY.pack(timestamp, o - rel) for o, _ in index))
        except OSError as exc:
            self._cut_files(pos, len(self._idx_offsets))
            raise StorageError.from_os(exc, f"appending to {self.path.name}", self.topic) from exc
        stored = i - start
        if not self.batches:
            self.first_timestamp = timestamp
        self.last_timestamp = timestamp
        self.batches += stored
        self.next_offset = next_offset
        self._since_index = since
        for offset, at in index:
            self._idx_offsets.append(offset)
            self._idx_positions.append(at)
            self._time_stamps.append(timestamp)
            self._time_offsets.append(offset)
        self.size = size
        self.dirty = True
        return stored

    def _cut_files(self, size: int, index_entries: int) -> None:
        """Cut the log and index files back to ``size`` bytes and
        ``index_entries`` entries; on failure the segment is broken."""
        try:
            self.ops.ftruncate(self._fd, size)
            self.ops.ftruncate(self._index_fd, index_entries * INDEX_ENTRY.size)
            self.ops.ftruncate(self._time_fd, index_entries * TIME_ENTRY.size)
        except OSError:
            self.broken = True

    def repair(self) -> None:
        """Cut off whatever a failed append or rollback left past ``size``."""
        self.broken = False
        self._cut_files(self.size, len(self._idx_offsets))
        if self.broken:
            raise StorageError(
                f"storage error: {self.path.name} cannot be cut back to its last batch",
                full=False,
                topic=self.topic,
            )

    # -- syncing ----------------------------------------------------------

    def _mark(self) -> SyncMark:
        return SyncMark(
            self.size,
            self.next_offset,
            self.first_timestamp,
            self.last_timestamp,
            self.batches,
            len(self._idx_offsets),
            self._since_index,
        )

    def sync_mark(self) -> SyncMark:
        """What a sync that starts now will cover (call on the event loop)."""
        return self._mark()

    def fsync(self) -> None:
        """Make appended batches durable (called from a worker thread)."""
        self.ops.fdatasync(self._fd)

    def synced(self, mark: SyncMark) -> None:
        """The sync that started at ``mark`` succeeded."""
        self._synced = mark
        if mark.size == self.size:
            self.dirty = False

    @property
    def synced_next_offset(self) -> int:
        return self._synced.next_offset

    def rollback_to_synced(self) -> None:
        """After a failed fsync: forget everything appended since the last
        good sync (the kernel may have dropped those pages), in memory and on
        disk, and make the cut durable. Raises StorageError (the segment is
        then broken) if the files cannot be cut back."""
        m = self._synced
        self.size, self.next_offset = m.size, m.next_offset
        self.first_timestamp, self.last_timestamp = m.first_timestamp, m.last_timestamp
        self.batches, self._since_index = m.batches, m.since_index
        del self._idx_offsets[m.index_entries :], self._idx_positions[m.index_entries :]
        del self._time_stamps[m.index_entries :], self._time_offsets[m.index_entries :]
        self._damage = {p: d for p, d in self._damage.items() if p < m.size}
        self.dirty = False
        self._cut_files(m.size, m.index_entries)
        if not self.broken:
            try:
                self.ops.fdatasync(self._fd)
            except OSError:
                self.broken = True
        if self.broken:
            raise StorageError(
                f"storage error: {self.path.name} cannot be rolled back after a failed fsync",
                full=False,
                topic=self.topic,
            )

    # -- reading ----------------------------------------------------------

    def read(self, offset: int, max_bytes: int) -> list[StoredBatch]:
        """Intact batches from the one containing ``offset``, up to about
        ``max_bytes`` (at least one while ``offset`` < ``next_offset``).
        Raises DataLoss if the batch holding ``offset`` is damaged."""
        if offset >= self.next_offset:
            return []
        i = bisect.bisect_right(self._idx_offsets, offset) - 1
        if i >= 0:
            pos, expected = self._idx_positions[i], self._idx_offsets[i]
        else:
            pos, expected = 0, self.base_offset
        out: list[StoredBatch] = []
        total = 0
        chunk = max(READ_CHUNK, min(max_bytes, 8 << 20))
        size = self.size
        ops = self.ops
        # Every pass either hands out a batch, steps over damage, records
        # new damage at ``pos`` (the next pass steps over or raises) or
        # reads a larger piece: it cannot spin.
        while pos < size:
            damage = self._damage.get(pos)
            if damage is not None:
                if out:
                    return out
                if offset <= damage.last_offset:
                    raise DataLoss(self.topic, max(offset, damage.first_offset), damage.last_offset, "damaged")
                pos, expected = damage.resume, damage.last_offset + 1
                continue
            if size - pos < HEADER_SIZE + ENVELOPE:
                self._found_damage(pos, expected, None)
                continue
            data = ops.pread(self._fd, min(chunk, size - pos), pos)
            rel = 0
            while len(data) - rel >= HEADER_SIZE + ENVELOPE:
                if pos in self._damage:
                    break
                base, count, length, first, _last, _crc = HEADER.unpack_from(data, rel)
                if base != expected or not header_ok(data, rel) or pos + HEADER_SIZE + length > size:
                    self._found_damage(pos, expected, None)
                    break
                end = rel + HEADER_SIZE + length
                if end > len(data):
                    if rel:
                        break  # read again from this batch
                    data = ops.pread(self._fd, HEADER_SIZE + length, pos)
                    if len(data) < HEADER_SIZE + length:
                        self._found_damage(pos, expected, None)
                        break
                    end = HEADER_SIZE + length
                if not records_ok(data, rel, length):
                    # The header is intact, so its length can be trusted.
                    self._found_damage(pos, expected, (pos + HEADER_SIZE + length, base + count))
                    break
                if base + count > offset:
                    if out and total + length > max_bytes:
                        return out
                    out.append(StoredBatch(base, count, first, data[rel + HEADER_SIZE : end]))
                    total += length
                expected = base + count
                pos += end - rel
                rel = end
        return out

    def _found_damage(self, pos: int, expected: int, resume: tuple[int, int] | None) -> None:
        """Remember damage at ``pos`` (where offset ``expected`` should start).
        ``resume`` is (position, offset) of what follows when known; else
        search for the next intact batch, using the index as hints."""
        if resume is None:
            found = find_next_batch(
                self.ops, self._fd, pos + 1, self.size, expected, self._idx_positions
            )
            resume = found if found is not None else (self.size, self.next_offset)
        damage = Damage(pos, resume[0], expected, resume[1] - 1)
        self._damage[pos] = damage
        try:
            # The next start scans this segment and sets the damage aside.
            self.damaged_path.touch()
        except OSError:
            pass
        if self.on_damage is not None:
            self.on_damage(self, damage)

    def offset_at_time(self, timestamp: int) -> int | None:
        """First offset in this segment with a timestamp >= ``timestamp``."""
        if self.batches == 0 or self.last_timestamp < timestamp:
            return None
        # The time index is sparse: start at the last entry before the time
        # and read forward (at most one index interval plus one batch).
        i = bisect.bisect_left(self._time_stamps, timestamp) - 1
        offset = self._time_offsets[i] if i >= 0 else self.base_offset
        for _ in range(self.batches + len(self._damage) + 1):
            if offset >= self.next_offset:
                break
            try:
                batches = self.read(offset, 2 * INDEX_INTERVAL)
            except DataLoss as lost:
                offset = lost.last + 1
                continue
            if not batches:
                break
            for stored in batches:
                if stored.timestamp >= timestamp:
                    return stored.base_offset
            offset = batches[-1].next_offset
        return None

    # -- housekeeping -----------------------------------------------------

    def close(self) -> None:
        for fd in (self._fd, self._index_fd, self._time_fd):
            if fd >= 0:
                try:
                    self.ops.close(fd)
                except OSError:
                    pass
        self._fd = self._index_fd = self._time_fd = -1

    def delete(self) -> None:
        self.close()
        for path in (self.path, self.index_path, self.time_path, self.damaged_path):
            path.unlink(missing_ok=True)

