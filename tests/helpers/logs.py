"""The file log opened, read and damaged directly, without a broker: a
store on a data directory, a walk over a whole topic log as a subscriber
reads it, the batches in a segment file, a flipped byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.errors import DataLoss
from pybroker.server.storage.file import FileStore, FileTopicLog
from pybroker.server.storage.fileops import REAL, FileOps
from pybroker.server.storage.segment import HEADER, HEADER_SIZE
from pybroker.server.storage.settings import SettingsResolver, TopicSettings


def open_store(data_dir: Path, ops: FileOps = REAL, **settings: Any) -> FileStore:
    """A FileStore on ``data_dir`` whose topics all get ``settings``; its
    file calls go through ``ops`` (the real ones by default)."""
    return FileStore(data_dir, SettingsResolver(TopicSettings(**settings)), ops=ops)


def walk(log: FileTopicLog, max_bytes: int = 4096) -> tuple[list[StoredBatch], list[tuple[int, int, str]]]:
    """Read the whole log as a subscriber would, ``max_bytes`` at a time,
    stepping over holes and damage: the batches served and the (first,
    last, reason) of each loss."""
    batches: list[StoredBatch] = []
    losses: list[tuple[int, int, str]] = []
    offset = log.first_offset
    for _ in range(10_000):
        if offset >= log.next_offset:
            return batches, losses
        try:
            got = log.read(offset, max_bytes)
        except DataLoss as lost:
            assert lost.first == offset <= lost.last
            losses.append((lost.first, lost.last, lost.reason))
            offset = lost.last + 1
            continue
        assert got and got[0].base_offset <= offset < got[0].next_offset
        batches.extend(got)
        offset = got[-1].next_offset
    raise AssertionError("the walk did not end")


class BatchAt(NamedTuple):
    """Where a batch sits in a segment file."""

    pos: int
    base: int
    #: Messages in it (not ``count``: that would hide ``tuple.count``).
    messages: int
    #: The batch's wire length (what follows its header).
    length: int

    @property
    def stored(self) -> int:
        """Bytes it takes in the file, header included."""
        return HEADER_SIZE + self.length


def batches_in(path: Path) -> list[BatchAt]:
    """Each batch in an undamaged segment file, in order."""
    data = path.read_bytes()
    out: list[BatchAt] = []
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        base, count, length, _first, _last, _crc = HEADER.unpack_from(data, pos)
        if pos + HEADER_SIZE + length > len(data):
            break
        out.append(BatchAt(pos, base, count, length))
        pos += HEADER_SIZE + length
    assert pos == len(data), "helper expects an undamaged file"
    return out


def flip_byte(path: Path, position: int, mask: int = 0x5A) -> None:
    """XOR the byte at ``position`` of the file with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(position)
        old = f.read(1)
        f.seek(position)
        f.write(bytes([old[0] ^ mask]))
