"""The batches topics made visible last, kept in memory for subscribers that
fell behind.

A subscriber whose outbound queue was full reads the topic forward from the
log (protocol.md, "Flow control"). Under a burst that is most subscribers
of a busy topic, each reading back (``pread``) and checksumming the same
batches the broker had in memory moments before. The router hands every
batch it delivers live to the topic's :class:`RecentBatches` too; a
subscriber catching up within that window is served those same ``bytes``
objects (checked against their CRC when they were published), and only one
further behind reads the log.

Memory is bounded for the whole broker, not per topic: one
:class:`RecentCache` counts the bytes of every topic's window and drops the
oldest batch of all when over its limit. Batches are shared with the
outbound queues that hold them anyway.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

from .storage import StoredBatch

#: Bytes of recent batches kept for all topics together.
DEFAULT_RECENT_BYTES = 64 * 1024 * 1024

# (base offset, count, timestamp, batch): a plain tuple, built on the hot
# path; StoredBatch objects are made only when read.
_Entry = tuple[int, int, int, bytes]


class RecentCache:
    """The broker-wide bound on recent batches."""

    __slots__ = ("limit", "bytes", "_order")

    def __init__(self, limit: int = DEFAULT_RECENT_BYTES) -> None:
        self.limit = limit
        self.bytes = 0
        # Every entry kept, oldest first, with the window holding it.
        self._order: deque[tuple[RecentBatches, _Entry]] = deque()

    def topic(self) -> RecentBatches:
        return RecentBatches(self)

    def _added(self, window: RecentBatches, entry: _Entry) -> None:
        self._order.append((window, entry))
        self.bytes += len(entry[3])
        while self.bytes > self.limit and self._order:
            owner, old = self._order.popleft()
            self.bytes -= len(old[3])
            owner._evicted(old)


class RecentBatches:
    """One topic's window: contiguous batches, oldest first."""

    __slots__ = ("_cache", "_entries", "_head", "_bases")

    def __init__(self, cache: RecentCache) -> None:
        self._cache = cache
        self._entries: list[_Entry] = []
        self._bases: list[int] = []
        self._head = 0  # entries before it were evicted

    def add(self, base: int, count: int, timestamp: int, batch: bytes) -> None:
        """A batch made visible; it must follow the last one (else the
        window starts again from it, so it never has a hole)."""
        entries = self._entries
        if len(entries) > self._head:
            last = entries[-1]
            if last[0] + last[1] != base:
                self.clear()
                entries = self._entries
        entry = (base, count, timestamp, batch)
        entries.append(entry)
        self._bases.append(base)
        self._cache._added(self, entry)

    def _evicted(self, entry: _Entry) -> None:
        entries = self._entries
        if self._head < len(entries) and entries[self._head] is entry:
            self._head += 1
            if self._head > 1024 and self._head * 2 > len(entries):
                del entries[: self._head]
                del self._bases[: self._head]
                self._head = 0

    def clear(self) -> None:
        """Forget the window (the topic's log was cut back). Its bytes stay
        counted until the cache evicts them in turn: the bound still holds."""
        self._entries = []
        self._bases = []
        self._head = 0

    def read(self, offset: int, max_bytes: int) -> list[StoredBatch]:
        """Batches from the one holding ``offset`` on, up to about
        ``max_bytes`` (at least one), as ``TopicLog.read`` returns them;
        empty when the window does not hold ``offset``."""
        entries, head = self._entries, self._head
        if head >= len(entries) or offset < entries[head][0]:
            return []
        last = entries[-1]
        if offset >= last[0] + last[1]:
            return []
        i = bisect_right(self._bases, offset, head) - 1
        out: list[StoredBatch] = []
        total = 0
        for j in range(i, len(entries)):
            base, count, timestamp, batch = entries[j]
            if out and total + len(batch) > max_bytes:
                break
            out.append(StoredBatch(base, count, timestamp, batch))
            total += len(batch)
        return out

    def __len__(self) -> int:
        return len(self._entries) - self._head
