"""The data layout of cluster mode (docs/cluster.md §3, §5): batches in a
data object use the single-node log's stored format, and an index entry
in etcd names one partition's byte range of an object.

A commit round's object may hold several partitions' runs of batches, one
after another; each partition's entry names its own range.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.errors import DataLoss
from pybroker.server.storage.scan import ENVELOPE, HEADER, HEADER_SIZE, batch_ok, header_crc


def encode_stored(base_offset: int, count: int, timestamp: int, batch: bytes) -> bytes:
    """One batch in the single-node log's stored format (storage/scan.py):
    a 36-byte header whose CRC covers it and the batch's envelope, then the
    batch (which carries its records' CRC)."""
    fields = HEADER.pack(base_offset, count, len(batch), timestamp, timestamp, 0)[: HEADER_SIZE - 4]
    return fields + header_crc(fields, batch[:ENVELOPE]).to_bytes(4, "big") + batch


def decode_stored(data: bytes, first: int, count: int, topic: str) -> list[StoredBatch]:
    """The batches of one index entry's bytes, which must hold intact
    batches with dense offsets ``first`` to ``first + count`` exactly;
    DataLoss (damaged) for anything else: no damaged byte is handed out."""
    out: list[StoredBatch] = []
    pos, expected = 0, first
    while pos < len(data):
        if not batch_ok(data, pos):
            raise DataLoss(topic, expected, first + count - 1, "damaged")
        base, n, length, first_ts, _last, _crc = HEADER.unpack_from(data, pos)
        if base != expected or base + n > first + count:
            raise DataLoss(topic, expected, first + count - 1, "damaged")
        out.append(StoredBatch(base, n, first_ts, data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]))
        pos += HEADER_SIZE + length
        expected = base + n
    if expected != first + count:
        raise DataLoss(topic, expected, first + count - 1, "damaged")
    return out


@attrs.frozen
class IndexEntry:
    """``idx/{t}/{p}/{first:020d}``: messages ``first..first+count-1`` are
    bytes ``[start, start+size)`` of ``object``; ``timestamp`` is the first
    batch's (µs). ``level`` is 0 for a commit round's entry and one more
    than its parts' for an entry index compaction merged (compaction.py);
    it is written only when it is not 0."""

    first: int
    object: str
    start: int
    size: int
    count: int
    timestamp: int
    level: int = 0

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "o": self.object, "b": self.start, "n": self.size, "c": self.count, "ts": self.timestamp,
        }  # fmt: skip
        if self.level:
            fields["l"] = self.level
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_key(cls, prefix: bytes, key: bytes, value: bytes) -> IndexEntry:
        """The entry at ``key`` (``prefix`` + its first offset); ValueError
        when the key holds no offset or the value is not an entry."""
        try:
            first = int(key[len(prefix) :])
        except ValueError:
            raise ValueError(f"index key {key!r:.200} is not an offset") from None
        return cls.decode(first, value)

    @classmethod
    def decode(cls, first: int, value: bytes) -> IndexEntry:
        """Raises ValueError when the value is not an entry."""
        try:
            raw = json.loads(value)
            entry = cls(
                first, str(raw["o"]), int(raw["b"]), int(raw["n"]), int(raw["c"]), int(raw["ts"]), int(raw.get("l", 0))
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"index entry {first} is not one: {value!r:.200}") from exc
        if entry.start < 0 or entry.size <= 0 or entry.count <= 0 or entry.level < 0:
            raise ValueError(f"index entry {first} is out of range: {value!r:.200}")
        return entry

