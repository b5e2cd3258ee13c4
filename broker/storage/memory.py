"""An in-memory LogStore: bounded per topic by retained bytes.

Used by tests and as the foundation's storage. Old batches are evicted once a
topic holds more than ``max_bytes`` (never the newest batch), which is what
file retention does with whole segments.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

from pybroker.protocol import Durability

from .base import StoredBatch, SyncResult, TopicLog
from .partitions import PartitionCounts, check_partitions

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class MemoryTopicLog:
    needs_sync = False
    durability = Durability.MEMORY

    def __init__(self, name: str, max_bytes: int = DEFAULT_MAX_BYTES, *, start: int = 0) -> None:
        self.name = name
        self.max_bytes = max_bytes
        self._batches: list[StoredBatch] = []
        self._bases: list[int] = []  # parallel to _batches, for bisect
        self._times: list[int] = []
        self._head = 0  # index of the first retained batch
        self._bytes = 0
        #: An empty log's first offset (a cluster node's copy of a topic
        #: starts where it joined the topic, not at 0).
        self._next = start

    @property
    def first_offset(self) -> int:
        if self._head < len(self._batches):
            return self._bases[self._head]
        return self._next

    @property
    def next_offset(self) -> int:
        return self._next

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def last_timestamp(self) -> int:
        return self._times[-1] if len(self._times) > self._head else 0

    def append(self, batch: bytes, count: int, timestamp: int) -> int:
        base = self._next
        if self._times and timestamp < self._times[-1]:
            timestamp = self._times[-1]  # keep the time index sorted
        self._batches.append(StoredBatch(base, count, timestamp, batch))
        self._bases.append(base)
        self._times.append(timestamp)
        self._next = base + count
        self._bytes += len(batch)
        self._evict()
        return base

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._head < len(self._batches) - 1:
            self._bytes -= len(self._batches[self._head].batch)
            self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._batches):
            del self._batches[: self._head]
            del self._bases[: self._head]
            del self._times[: self._head]
            self._head = 0

    def cut(self, offset: int) -> None:
        """Drop every batch at or after ``offset`` (a batch's base, or the
        end): a cluster owner's appends whose commit failed."""
        i = bisect.bisect_left(self._bases, offset, lo=self._head)
        at_base = i < len(self._bases) and self._bases[i] == offset
        if not at_base and not (i == len(self._bases) and offset == self._next):
            raise ValueError(f"{self.name}: {offset} is not a batch boundary")
        for b in self._batches[i:]:
            self._bytes -= len(b.batch)
        del self._batches[i:], self._bases[i:], self._times[i:]
        self._next = offset
        self._head = min(self._head, len(self._batches))

    def skip_to(self, offset: int) -> None:
        """Go on at ``offset`` past a range that will never be here (lost)."""
        if offset > self._next:
            self._next = offset

    def purge(self, keep_from: int) -> int:
        """Drop every batch before the one holding ``keep_from`` (all at or
        past the end); the new first offset."""
        while self._head < len(self._batches) and self._batches[self._head].next_offset <= keep_from:
            self._bytes -= len(self._batches[self._head].batch)
            self._head += 1
        return self.first_offset

    def read(self, offset: int, max_bytes: int) -> list[StoredBatch]:
        if offset >= self._next:
            return []
        i = bisect.bisect_right(self._bases, offset, lo=self._head) - 1
        i = max(i, self._head)
        out: list[StoredBatch] = []
        size = 0
        batches = self._batches
        while i < len(batches):
            b = batches[i]
            if out and size + len(b.batch) > max_bytes:
                break
            out.append(b)
            size += len(b.batch)
            i += 1
        return out

    def offset_at_time(self, timestamp: int) -> int:
        i = bisect.bisect_left(self._times, timestamp, lo=self._head)
        if i < len(self._batches):
            return self._bases[i]
        return self._next


class MemoryStore:
    """Every acknowledgement means "held in memory"; nothing survives a restart."""

    def __init__(self, max_bytes_per_topic: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes_per_topic = max_bytes_per_topic
        self._topics: dict[str, MemoryTopicLog] = {}
        self._partitions = PartitionCounts()

    @property
    def durability(self) -> Durability:
        return Durability.MEMORY

    @property
    def needs_sync(self) -> bool:
        return False

    def topic(self, name: str) -> MemoryTopicLog:
        log = self._topics.get(name)
        if log is None:
            log = self._topics[name] = MemoryTopicLog(name, self.max_bytes_per_topic)
            self._partitions.opened(name)
        return log

    def topic_names(self) -> list[str]:
        return list(self._topics)

    def partition_count(self, name: str) -> int:
        return self._partitions.count(name)

    async def create_topic(self, name: str, partitions: int) -> bool:
        have = self._partitions.count(name) or (1 if name in self._topics else 0)
        if not check_partitions(name, partitions, have):
            return False
        if partitions > 1:
            self._partitions.set(name, partitions)
        return True

    async def delete_topic(self, name: str) -> MemoryTopicLog | None:
        log = self._topics.pop(name, None)
        if log is not None:
            self._partitions.removed(name)
        return log

    async def set_topic(self, name: str, changes: Mapping[str, str]) -> None:
        if name not in self._topics and not self._partitions.count(name):
            raise KeyError(name)
        raise ValueError("the memory store has no per-topic settings (--retention-bytes bounds every topic)")

    async def purge(self, log: TopicLog, keep_from: int) -> int:
        assert isinstance(log, MemoryTopicLog), log
        return log.purge(keep_from)

    async def discard(self, log: TopicLog) -> None:
        return None  # garbage once nothing refers to it

    async def sync(self) -> SyncResult:
        return SyncResult(Durability.MEMORY)

    sync_interval = None
    sync_depth = 1
    #: Memory does not fill up the way a disk does (retention evicts).
    problem = None

    async def probe(self) -> None:
        return None

    async def sync_interval_topics(self) -> None:
        return None

    def enforce_retention(self) -> int:
        return 0  # eviction happens on append, by bytes

    def close(self) -> None:
        self._topics.clear()
