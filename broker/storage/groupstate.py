"""Consumer groups' saved state: one append-only journal for the broker.

``state_dir/journal.<generation>`` starts with a checkpoint: a snapshot
record for every group (settings; per topic its cursor and every pending
offset with its delivery count), then a ``C`` record that says the
checkpoint is whole. After it come records appended as the groups work:

- ``D`` delivered: group, topic, first offset, count, delivery count.
  Written before the GROUP_DELIVER is queued (and fsynced first under fsync
  ``always``): a delivery is counted before it is sent, so a crash can only
  over-count.
- ``X`` dead-lettering: group, topic, offset and the dead-letter topic's
  next offset at that moment. Written before the dead letter is published;
  a restart looks for that dead letter from that offset on and settles the
  message if it is there, instead of publishing it again.
- ``S`` a group's snapshot again (its acks included), at most every
  ``persist_interval`` for a group that changed; it replaces what came
  before for that group. A new group starts with one.
- ``R`` a group deleted.

Acks are not journaled one by one: they arrive with the next ``S`` (a lost
ack is a redelivery, which at-least-once allows). Once the file has grown
to several times its last checkpoint, the next generation starts with a
fresh checkpoint, and the old file is deleted once the new one is durable;
on start the newest generation with a whole checkpoint wins. Every record is
framed ``crc32 u32 | length u32 | kind u8 | body`` and reading keeps the
longest valid prefix: a torn tail is a record whose delivery was never
released.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import attrs

from pybroker.protocol import MalformedBatch, decode_batch

from .base import TopicLog
from .errors import DataLoss
from .fileops import FileOps, write_all

_FRAME = struct.Struct("<IIB")
_DELIVERED = struct.Struct("<QIIHH")  # first, count, deliveries, group length, topic length
_DEAD = struct.Struct("<QQHH")  # offset, dead-letter topic offset, group length, topic length
SNAPSHOT, CHECKPOINT, DELIVERED, DEAD_LETTERING, REMOVED = b"S", b"C", b"D", b"X", b"R"
PREFIX = "journal."
#: Snapshot format: 2 adds the dead-letter offset as a third pending item.
FORMAT = 2
#: Bytes of the dead-letter topic read per step while looking for dead letters.
_SCAN_BYTES = 1 << 20


def _frame(kind: bytes, body: bytes) -> bytes:
    return _FRAME.pack(zlib.crc32(body, zlib.crc32(kind)), len(body), kind[0]) + body


def encode_snapshot(doc: dict[str, Any]) -> bytes:
    return _frame(SNAPSHOT, json.dumps(doc, separators=(",", ":")).encode())


def encode_checkpoint(snapshots: Iterable[dict[str, Any]]) -> bytes:
    return b"".join([*map(encode_snapshot, snapshots), _frame(CHECKPOINT, b"")])


def encode_delivered(group: bytes, topic: bytes, first: int, count: int, deliveries: int) -> bytes:
    head = _DELIVERED.pack(first, count, deliveries, len(group), len(topic))
    return _frame(DELIVERED, head + group + topic)


def encode_dead_lettering(group: bytes, topic: bytes, offset: int, dead_letter_from: int) -> bytes:
    head = _DEAD.pack(offset, dead_letter_from, len(group), len(topic))
    return _frame(DEAD_LETTERING, head + group + topic)


def encode_removed(group: bytes) -> bytes:
    return _frame(REMOVED, group)


def read_records(data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """The (kind, body) records of the longest valid prefix, and its length."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos + _FRAME.size <= len(data):
        crc, length, kind_byte = _FRAME.unpack_from(data, pos)
        end = pos + _FRAME.size + length
        kind = bytes((kind_byte,))
        body = data[pos + _FRAME.size : end]
        if end > len(data) or zlib.crc32(body, zlib.crc32(kind)) != crc:
            break
        out.append((kind, body))
        pos = end
    return out, pos


# -- the state a journal describes ------------------------------------------


@attrs.define
class SavedPending:
    deliveries: int
    #: Set while a dead letter for it may have been published: where to look.
    dead_letter_from: int | None = None


@attrs.define
class SavedTopic:
    cursor: int
    pending: dict[int, SavedPending] = attrs.Factory(dict)


@attrs.define
class SavedGroup:
    """A group's snapshot (settings as the group wrote them) with the
    records that followed it applied."""

    doc: dict[str, Any]
    topics: dict[str, SavedTopic]

    @classmethod
    def from_snapshot(cls, doc: dict[str, Any]) -> SavedGroup:
        topics = {}
        for name, state in doc["topics"].items():
            pending = {}
            for item in state["pending"]:
                dead = int(item[2]) if len(item) > 2 else None
                pending[int(item[0])] = SavedPending(int(item[1]), dead)
            topics[str(name)] = SavedTopic(int(state["cursor"]), pending)
        return cls(doc, topics)

    def delivered(self, topic: str, first: int, count: int, deliveries: int) -> None:
        """Apply a ``D`` record. Records are newer than the snapshot, so an
        offset at or past the cursor was handed out for the first time, one
        below it that is pending was delivered again, and one below it that
        is not pending was settled before the snapshot (a settled message is
        never delivered again): nothing to do."""
        saved = self.topics.get(topic)
        if saved is None:  # a topic the group began reading after the snapshot
            saved = self.topics[topic] = SavedTopic(first)
        for offset in range(first, first + count):
            p = saved.pending.get(offset)
            if offset >= saved.cursor:
                saved.pending[offset] = SavedPending(deliveries)
            elif p is not None:
                p.deliveries = max(p.deliveries, deliveries)
        saved.cursor = max(saved.cursor, first + count)

    def dead_lettering(self, topic: str, offset: int, dead_letter_from: int) -> None:
        """Apply an ``X`` record: the dead letter may have been published."""
        saved = self.topics.get(topic)
        p = saved.pending.get(offset) if saved is not None else None
        if p is not None and p.dead_letter_from is None:
            p.dead_letter_from = dead_letter_from


@attrs.define
class SavedState:
    """What start-up found in the state directory."""

    groups: dict[str, SavedGroup] = attrs.Factory(dict)
    #: Files to delete once a new checkpoint is durable.
    superseded: list[Path] = attrs.Factory(list)
    #: What could not be read, for the log (files left in place).
    problems: list[str] = attrs.Factory(list)
    #: The highest generation present: the next one is above it.
    generation: int = 0
    #: Bytes after the last valid record of the file used (a torn tail).
    dropped_bytes: int = 0


def replay(records: list[tuple[bytes, bytes]], problems: list[str]) -> dict[str, SavedGroup]:
    """Every group a journal's records describe (ValueError without a whole
    checkpoint). A group whose snapshot does not parse is left out and named
    in ``problems``; its later records are then ignored."""
    groups: dict[str, SavedGroup] = {}
    whole = False
    for kind, body in records:
        if not whole and kind not in (SNAPSHOT, CHECKPOINT):
            raise ValueError("the journal does not start with a whole checkpoint")
        if kind == SNAPSHOT:
            doc = json.loads(body)
            name = str(doc.get("name")) if isinstance(doc, dict) else "?"
            groups.pop(name, None)
            try:
                if int(doc.get("version", 0)) > FORMAT:
                    raise ValueError(f"snapshot format {doc['version']} is newer than this broker's")
                groups[name] = SavedGroup.from_snapshot(doc)
            except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
                problems.append(f"group {name!r}: {exc!r}")
        elif kind == CHECKPOINT:
            whole = True
        elif kind == DELIVERED:
            first, count, deliveries, n, m = _DELIVERED.unpack_from(body)
            group, topic = _names(body, _DELIVERED.size, n, m)
            if group in groups:
                groups[group].delivered(topic, first, count, deliveries)
        elif kind == DEAD_LETTERING:
            offset, dead_from, n, m = _DEAD.unpack_from(body)
            group, topic = _names(body, _DEAD.size, n, m)
            if group in groups:
                groups[group].dead_lettering(topic, offset, dead_from)
        elif kind == REMOVED:
            groups.pop(body.decode(), None)
        else:
            raise ValueError(f"unknown record kind {kind!r}")
    if not whole:
        raise ValueError("the journal does not start with a whole checkpoint")
    return groups


def _names(body: bytes, at: int, n: int, m: int) -> tuple[str, str]:
    return body[at : at + n].decode(), body[at + n : at + n + m].decode()


def journal_path(state_dir: Path, generation: int) -> Path:
    return state_dir / f"{PREFIX}{generation}"


def read_state_dir(state_dir: Path) -> SavedState:
    """The newest journal with a whole checkpoint, or, where there is no
    journal yet, the ``<quoted name>.json`` snapshots earlier versions kept."""
    state = SavedState()
    journals: list[tuple[int, Path]] = []
    legacy: list[Path] = []
    for path in state_dir.iterdir():
        suffix = path.name[len(PREFIX) :]
        if path.name.startswith(PREFIX) and suffix.isdigit():
            journals.append((int(suffix), path))
        elif path.suffix == ".json":
            legacy.append(path)
    state.generation = max((g for g, _ in journals), default=0)
    for _, path in sorted(journals, reverse=True):  # newest first
        try:
            data = path.read_bytes()
            records, valid = read_records(data)
            state.groups = replay(records, state.problems)
        except (OSError, ValueError, struct.error) as exc:
            # A checkpoint cut short (the older file is still there) or damage.
            state.problems.append(f"{path.name}: {exc!r}")
            continue
        state.dropped_bytes = len(data) - valid
        # Older generations, and newer ones that did not read, are superseded.
        state.superseded = [p for _, p in journals] + legacy
        return state
    if journals:
        return state  # none readable: everything left in place, and reported
    for path in legacy:
        try:
            doc = json.loads(path.read_bytes())
            state.groups[unquote(path.stem)] = SavedGroup.from_snapshot(doc)
            state.superseded.append(path)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            state.problems.append(f"{path.name}: {exc!r}")
    return state


def find_dead_letters(
    log: TopicLog, group: str, wanted: set[tuple[str, int]], start: int
) -> set[tuple[str, int]]:
    """Which (topic, offset) of ``wanted`` have a dead letter from ``group``
    in ``log`` at or after offset ``start`` (the headers protocol.md, "Dead
    letters", names). Reads forward until all are found or the log ends."""
    found: set[tuple[str, int]] = set()
    offset = max(start, log.first_offset)
    end = log.next_offset
    while offset < end and len(found) < len(wanted):
        try:
            batches = log.read(offset, _SCAN_BYTES)
        except DataLoss as lost:
            # A dead letter in there cannot be read by anyone: as if absent
            # (the message is dead-lettered again, readably).
            offset = max(offset + 1, lost.last + 1)
            continue
        if not batches or batches[-1].next_offset <= offset:
            break  # nothing more (or nothing new): every pass must advance
        for stored in batches:
            try:
                messages = decode_batch(stored.batch)
            except MalformedBatch:
                continue  # a group never publishes one of those
            for i, (_, headers) in enumerate(messages):
                if stored.base_offset + i < start or headers.get("x-group") != group:
                    continue
                try:
                    key = (headers["x-original-topic"], int(headers["x-original-offset"]))
                except (KeyError, ValueError):
                    continue
                if key in wanted:
                    found.add(key)
        offset = batches[-1].next_offset
    return found


# -- the open journal -------------------------------------------------------


class Journal:
    """The current journal file, appended to from the Trio thread (one
    write, to the page cache: it survives kill -9 once it returns) and
    fsynced by the group manager's writer task in a worker thread. File
    calls go through ``ops`` (broker/storage/fileops.py) so tests can fail them."""

    __slots__ = ("path", "generation", "fd", "ops", "size", "checkpoint_size", "unsynced", "new")

    def __init__(self, path: Path, generation: int, fd: int, ops: FileOps) -> None:
        self.path = path
        self.generation = generation
        self.fd = fd
        self.ops = ops
        self.size = 0
        self.checkpoint_size = 0
        self.unsynced = True  # written since the last fsync
        self.new = True  # its directory entry is not known to be durable

    @classmethod
    def create(cls, state_dir: Path, generation: int, checkpoint: bytes, ops: FileOps) -> Journal:
        """A new generation starting with ``checkpoint``; nothing is left
        behind if that cannot be written."""
        path = journal_path(state_dir, generation)
        fd = ops.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        journal = cls(path, generation, fd, ops)
        try:
            journal.write(checkpoint)
        except OSError:
            journal.discard()
            raise
        journal.checkpoint_size = len(checkpoint)
        return journal

    def write(self, data: bytes) -> None:
        """One write; a short one is an error (ENOSPC), and then this file
        must not be appended to again: a torn record ends what replay reads."""
        write_all(self.ops, self.fd, data)
        self.size += len(data)
        self.unsynced = True

    def fsync(self) -> None:
        # Appends: the data and the size that finds it, as the log's segments.
        self.ops.fdatasync(self.fd)

    def close(self) -> None:
        self.ops.close(self.fd)

    def discard(self) -> None:
        """Close and delete (a generation replaced, or one that failed)."""
        try:
            self.close()
        finally:
            self.path.unlink(missing_ok=True)
