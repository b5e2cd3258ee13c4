"""Reads and tails of one partition on any node, through the index view and
the range cache (docs/cluster.md §7).

``IndexedReader.read`` keeps ``PartitionReader.read``'s contract (and the
single-node ``TopicLog.read``'s): batches from the one holding the offset
on, in order, dense, both CRCs checked, up to about ``max_bytes`` (at least
one batch while the offset is committed), ``DataLoss`` for what cannot be
served, always holding the offset read (a damaged batch loses itself and
the rest of its index entry, not the intact batches before it). But it
asks etcd nothing for offsets inside the index window (the view follows
etcd's watch) and the object store nothing for ranges in the cache; only
readers far behind the window cost etcd reads.

``IndexedReader.tail(offset)`` is an async iterator over the batches from
``offset`` on, waiting for new ones as they are committed (an event from
the index, no polling): each batch once, in offset order, without gaps.
"""

from __future__ import annotations

from collections import deque

from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.errors import DataLoss
from pybroker.server.storage.scan import HEADER, HEADER_SIZE

from .cache import RangeCache
from .index import PartitionIndex
from .objects import NoSuchKey
from .entries import IndexEntry, decode_stored

#: Entries read from etcd at a time for offsets below the window.
DEFAULT_LOOKUP = 64
#: Bound on the entries one read goes through (max_bytes stops it first
#: unless entries are tiny).
MAX_ENTRIES_PER_READ = 4096
DEFAULT_TAIL_BYTES = 1 << 20


class IndexedReader:
    """Reads one partition through ``index`` (kept up to date by its own
    ``run``) and ``cache`` (shared by the node's partitions)."""

    def __init__(self, index: PartitionIndex, cache: RangeCache, *, lookup: int = DEFAULT_LOOKUP) -> None:
        self.index = index
        self.cache = cache
        self.lookup = lookup
        self.name = index.name

    @property
    def next_offset(self) -> int:
        return self.index.next_offset

    async def read(self, offset: int, max_bytes: int = 1 << 20) -> list[StoredBatch]:
        """Batches from the one holding ``offset`` on (from the first entry
        when ``offset`` is below it), up to about ``max_bytes``; empty at or
        past the end. DataLoss when the batch holding ``offset`` cannot be
        served (a hole in the index, a missing object, damaged bytes); a
        loss further on ends the read before it, and the next read, from
        there, reports it (PartitionReader raises at once: the batches
        before the loss are good and are returned here)."""
        await self.index.wait_loaded()
        out: list[StoredBatch] = []
        size = 0
        pos = offset
        older: deque[IndexEntry] = deque()  # from etcd, for offsets below the window
        for _ in range(MAX_ENTRIES_PER_READ):
            if pos >= self.index.next_offset or (out and size >= max_bytes):
                break
            entry = self.index.entry_for(pos)
            if entry is None:
                entry, below_first = await self._older(pos, older)
                if entry is None:
                    break  # nothing indexed from pos up to next_offset: all cut by retention
                if entry.first > pos:
                    if out:
                        break  # a hole: the next read, from pos, reports it
                    if not below_first:
                        raise DataLoss(self.name, pos, entry.first - 1, "missing")
                    pos = entry.first  # below the first entry (retention): read from there
            try:
                entry, (good, lost) = await self._entry_batches(entry, pos)
            except DataLoss:
                if out:
                    break  # what was read is good; the next read, from pos, reports the loss
                raise
            batches = [b for b in good if b.next_offset > pos]
            if lost is not None and not batches:
                # pos is in the damaged part of the entry (the intact batches
                # before it, if any, were handed out by an earlier read).
                if out:
                    break
                raise DataLoss(lost.topic, max(lost.first, pos), lost.last, lost.reason)
            if out and (not batches or batches[0].base_offset != pos):
                break  # entries that do not meet (the index changed meanwhile): read again from pos
            out.extend(batches)
            size += sum(len(b.batch) for b in batches)
            if lost is not None:
                break  # the intact batches before the damage; the next read, from there, reports it
            pos = entry.first + entry.count
        return out

    async def _older(self, pos: int, older: deque[IndexEntry]) -> tuple[IndexEntry | None, bool]:
        """For an offset below the window: the entry holding ``pos`` (or the
        next one after it) from etcd, None if etcd has none; and whether
        ``pos`` is below the partition's first entry."""
        while older and older[0].first + older[0].count <= pos:
            older.popleft()
        below_first = False
        if not older:
            try:
                entries, below_first = await self.index.lookup(pos, self.lookup)
            except ValueError:
                raise DataLoss(self.name, pos, pos, "damaged") from None
            older.extend(e for e in entries if e.first + e.count > pos)
        return (older[0] if older else None), below_first

    async def _entry_batches(
        self, entry: IndexEntry, pos: int
    ) -> tuple[IndexEntry, tuple[list[StoredBatch], DataLoss | None]]:
        """``_batches(entry)``; but when its object is gone, the entry that
        holds ``pos`` now, read from etcd: index compaction may have
        replaced the one this reader held, and the janitor may delete a
        replaced entry's object at once (compaction.py). Missing only if
        etcd still names that object, or nothing, for ``pos``."""
        try:
            return entry, await self._batches(entry)
        except DataLoss as lost:
            if lost.reason != "missing":
                raise
            try:
                entries, _ = await self.index.lookup(pos, 1)
            except ValueError:
                raise DataLoss(self.name, pos, pos, "damaged") from None
            fresh = entries[0] if entries else None
            if fresh is None or fresh.object == entry.object or not fresh.first <= pos < fresh.first + fresh.count:
                raise
            return fresh, await self._batches(fresh)

    async def _batches(self, entry: IndexEntry) -> tuple[list[StoredBatch], DataLoss | None]:
        """The entry's batches; or, when a batch in it is damaged, the intact
        ones before it and the loss from there to the entry's end. DataLoss
        when none is intact."""
        last = entry.first + entry.count - 1
        try:
            data = await self.cache.get(entry.object, entry.start, entry.size)
        except NoSuchKey:
            raise DataLoss(self.name, entry.first, last, "missing") from None
        if len(data) != entry.size:
            raise DataLoss(self.name, entry.first, last, "damaged")
        try:
            return decode_stored(data, entry.first, entry.count, self.name), None
        except DataLoss as lost:
            # Damaged in the store or on the way: not served, and not kept
            # either, so a later read fetches it again.
            self.cache.discard(entry.object, entry.start, entry.size)
            if lost.first <= entry.first:
                raise
            # The batches before the damage checked (decode_stored reads in
            # order): they are served, checked again on their own.
            pos, expected = 0, entry.first
            while expected < lost.first:
                base, n, length = HEADER.unpack_from(data, pos)[:3]
                pos += HEADER_SIZE + length
                expected = base + n
            return decode_stored(data[:pos], entry.first, lost.first - entry.first, self.name), lost

    def tail(self, offset: int, *, max_bytes: int = DEFAULT_TAIL_BYTES) -> Tail:
        """The batches from the one holding ``offset`` on, as they are
        committed: an async iterator that never ends by itself."""
        return Tail(self, offset, max_bytes)


class Tail:
    """Batches of one partition from an offset on, each once, in offset
    order. ``position`` is the offset the next batch starts at (the first
    one may start before the offset asked for: the batch holding it).
    Raises DataLoss for batches that cannot be served (to go on past them,
    set ``position`` to the error's ``last + 1``), and ObjectStoreError or
    EtcdError (etcd only for offsets below the index window) when a store
    fails: nothing was consumed then, and the next call tries again."""

    def __init__(self, reader: IndexedReader, offset: int, max_bytes: int) -> None:
        self.reader = reader
        self.position = offset
        self.max_bytes = max_bytes
        self._buffer: deque[StoredBatch] = deque()

    def __aiter__(self) -> Tail:
        return self

    async def __anext__(self) -> StoredBatch:
        if not self._buffer:
            index = self.reader.index
            await index.wait_beyond(self.position)
            end = index.next_offset
            batches = await self.reader.read(self.position, self.max_bytes)
            if not batches:
                # Everything from position to the end was cut by retention:
                # go on from there, and wait for what comes next.
                self.position = max(self.position, end)
                await index.wait_beyond(self.position)
                batches = await self.reader.read(self.position, self.max_bytes)
                if not batches:
                    raise DataLoss(self.reader.name, self.position, index.next_offset - 1, "missing")
            self._buffer.extend(batches)
        batch = self._buffer.popleft()
        self.position = batch.next_offset
        return batch
