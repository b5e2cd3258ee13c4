"""Where delayed batches wait: one append-only file per time bucket.

A batch published with flag DELAYED (protocol.md, "Delayed delivery") is not
a message of its topic yet: it is written to the bucket that covers its due
time (``bucket = due_ms - due_ms % width_ms``), and becomes a message of its
topic when the schedule releases it. Nothing of a bucket is held in memory
before the bucket's time comes (broker/delays/schedule.py), so millions of
scheduled batches cost a file each bucket, not memory each batch.

A bucket file is a sequence of records, each ``u32 body_len | u32 crc |
body`` (crc: ``zlib.crc32`` of the body); the body is either

- an entry: ``u8 1 | u64 due_ms | u8 flags | u16 topic_len | topic | batch``
  (flags bit 0: release with DEDUP), its position in the file its name; or
- a release note: ``u8 2 | u32 n | n x u64 position``: those entries are
  stored in their topics (durably, as their topics promise), so a restart
  does not release them again.

A damaged record (a flipped byte, in its body or its header) is skipped:
reading goes on at the next intact record found after it, so one bad byte
costs that record, not the rest of the bucket. Only where no intact record
follows is it a torn tail (a write cut short by a crash, never
acknowledged: appends are acknowledged after the fsync that covers them),
which recovery cuts off.

Two backends with one interface: files under the data directory
(``--storage file``), or bytes in memory (``--storage memory``: lost with
the process, like everything else in that mode).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import attrs

from ..storage.fileops import REAL, FileOps, fsync_dir, write_all

RECORD_HEAD = struct.Struct(">II")
ENTRY_HEAD = struct.Struct(">BQBH")
NOTE_HEAD = struct.Struct(">BI")
POSITION = struct.Struct(">Q")
KIND_ENTRY = 1
KIND_RELEASED = 2
FLAG_DEDUP = 0x01
#: A bucket file's name: its bucket (due time in ms, width-aligned), 16 digits.
SUFFIX = ".delayed"


@attrs.frozen
class Entry:
    """One delayed batch as stored: its place (bucket, position) and what to
    publish when it is due."""

    bucket: int
    position: int
    due_ms: int
    topic: str
    batch: bytes
    dedup: bool


def encode_entry(due_ms: int, topic: str, batch: bytes, dedup: bool) -> bytes:
    t = topic.encode("utf-8")
    body = ENTRY_HEAD.pack(KIND_ENTRY, due_ms, FLAG_DEDUP if dedup else 0, len(t)) + t + batch
    return RECORD_HEAD.pack(len(body), zlib.crc32(body)) + body


def encode_released(positions: Sequence[int]) -> bytes:
    body = NOTE_HEAD.pack(KIND_RELEASED, len(positions)) + b"".join(POSITION.pack(p) for p in positions)
    return RECORD_HEAD.pack(len(body), zlib.crc32(body)) + body


@attrs.define
class Scan:
    """What one bucket holds: its entries not yet released, in file order;
    where its intact records end (``end`` < the file's size: a torn tail);
    and how many damaged records were skipped."""

    entries: list[Entry]
    end: int
    damaged: int = 0


def _body_at(data: bytes, pos: int) -> bytes | None:
    """The body of the intact record (complete, CRC matching) at ``pos``."""
    if pos + RECORD_HEAD.size > len(data):
        return None
    length, crc = RECORD_HEAD.unpack_from(data, pos)
    start = pos + RECORD_HEAD.size
    if length < 1 or start + length > len(data):
        return None
    body = data[start : start + length]
    return body if zlib.crc32(body) == crc else None


def _next_intact(data: bytes, pos: int) -> int | None:
    """Where the next intact record after a damaged one starts, or None
    (a torn tail). Most positions fail on the length alone, before any CRC."""
    for candidate in range(pos, len(data) - RECORD_HEAD.size + 1):
        if _body_at(data, candidate) is not None:
            return candidate
    return None


def scan(bucket: int, data: bytes) -> Scan:
    """Read a bucket's records, skipping damaged ones; stop at a torn tail."""
    entries: dict[int, Entry] = {}
    damaged = 0
    pos = 0
    while pos + RECORD_HEAD.size <= len(data):
        body = _body_at(data, pos)
        if body is None or not _apply(bucket, pos, body, entries):
            following = _next_intact(data, pos + 1)
            if following is None:
                break
            damaged += 1
            pos = following
            continue
        pos += RECORD_HEAD.size + len(body)
    return Scan(list(entries.values()), pos, damaged)


def _apply(bucket: int, pos: int, body: bytes, entries: dict[int, Entry]) -> bool:
    """Take one intact record into ``entries``; False if it is not one
    this version writes (treated as damaged)."""
    length = len(body)
    kind = body[0]
    if kind == KIND_ENTRY and length >= ENTRY_HEAD.size:
        _, due_ms, flags, topic_len = ENTRY_HEAD.unpack_from(body, 0)
        topic_end = ENTRY_HEAD.size + topic_len
        if topic_end > length:
            return False
        topic = body[ENTRY_HEAD.size : topic_end].decode("utf-8", "replace")
        entries[pos] = Entry(bucket, pos, due_ms, topic, body[topic_end:], bool(flags & FLAG_DEDUP))
        return True
    if kind == KIND_RELEASED and length >= NOTE_HEAD.size:
        _, n = NOTE_HEAD.unpack_from(body, 0)
        if NOTE_HEAD.size + n * POSITION.size != length:
            return False
        for i in range(n):
            (done,) = POSITION.unpack_from(body, NOTE_HEAD.size + i * POSITION.size)
            entries.pop(done, None)
        return True
    return False


class Buckets(Protocol):
    """The bucket store's interface (files, or memory)."""

    durable: bool

    def keys(self) -> list[int]: ...

    def append(self, bucket: int, record: bytes) -> int:
        """Add a record; its position. OSError when the write fails."""

    def read(self, bucket: int) -> bytes: ...

    def truncate(self, bucket: int, size: int) -> None: ...

    def remove(self, bucket: int) -> None: ...

    def sync(self, buckets: Sequence[int]) -> None:
        """fsync these buckets (and the directory): blocking, run it in a thread."""

    def size(self, bucket: int) -> int: ...


class FileBuckets:
    """Bucket files under ``directory``; appends go to the OS at once (each
    through its own short-lived descriptor: buckets are many and written
    seldom compared with topics), fsyncs when :meth:`sync` is called."""

    durable = True

    def __init__(self, directory: Path, ops: FileOps = REAL) -> None:
        self.directory = directory
        self.ops = ops
        directory.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[int, int] = {}
        #: Buckets created since the directory was last fsynced.
        self._new = False

    def _path(self, bucket: int) -> str:
        return os.path.join(self.directory, f"{bucket:016d}{SUFFIX}")

    def keys(self) -> list[int]:
        found = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(SUFFIX) and name[: -len(SUFFIX)].isdigit():
                bucket = int(name[: -len(SUFFIX)])
                found.append(bucket)
                self._sizes[bucket] = entry.stat().st_size
        return sorted(found)

    def size(self, bucket: int) -> int:
        return self._sizes.get(bucket, 0)

    def append(self, bucket: int, record: bytes) -> int:
        known = self._sizes.get(bucket)
        fd = self.ops.open(self._path(bucket), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            position = known if known is not None else os.fstat(fd).st_size
            self._new = self._new or known is None
            try:
                write_all(self.ops, fd, record)
            except OSError:
                # A short write may have left part of the record: cut it off
                # so that the next record starts where this one should have.
                try:
                    self.ops.ftruncate(fd, position)
                except OSError:
                    pass
                raise
        finally:
            self.ops.close(fd)
        self._sizes[bucket] = position + len(record)
        return position

    def read(self, bucket: int) -> bytes:
        try:
            with open(self._path(bucket), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def truncate(self, bucket: int, size: int) -> None:
        fd = self.ops.open(self._path(bucket), os.O_WRONLY)
        try:
            self.ops.ftruncate(fd, size)
            self.ops.fsync(fd)
        finally:
            self.ops.close(fd)
        self._sizes[bucket] = size

    def remove(self, bucket: int) -> None:
        self._sizes.pop(bucket, None)
        try:
            os.unlink(self._path(bucket))
        except FileNotFoundError:
            pass
        fsync_dir(self.directory, self.ops)

    def sync(self, buckets: Sequence[int]) -> None:
        for bucket in buckets:
            try:
                fd = self.ops.open(self._path(bucket), os.O_WRONLY)
            except FileNotFoundError:
                continue  # released and removed meanwhile
            try:
                self.ops.fdatasync(fd)
            finally:
                self.ops.close(fd)
        if self._new:
            self._new = False
            fsync_dir(self.directory, self.ops)


class MemoryBuckets:
    """Buckets as bytes in memory (the memory store's schedule)."""

    durable = False

    def __init__(self) -> None:
        self._data: dict[int, bytearray] = {}

    def keys(self) -> list[int]:
        return sorted(self._data)

    def size(self, bucket: int) -> int:
        return len(self._data.get(bucket, b""))

    def append(self, bucket: int, record: bytes) -> int:
        data = self._data.setdefault(bucket, bytearray())
        position = len(data)
        data += record
        return position

    def read(self, bucket: int) -> bytes:
        return bytes(self._data.get(bucket, b""))

    def truncate(self, bucket: int, size: int) -> None:
        del self._data[bucket][size:]

    def remove(self, bucket: int) -> None:
        self._data.pop(bucket, None)

    def sync(self, buckets: Sequence[int]) -> None:
        pass


def iter_entries(buckets: Buckets, bucket: int) -> Iterator[Entry]:
    """A bucket's unreleased entries (tests and tools)."""
    yield from scan(bucket, buckets.read(bucket)).entries
