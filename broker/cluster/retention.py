"""Retention in cluster mode: a partition's owner cuts its oldest index
entries (docs/cluster.md §13, "Retention as built").

The single-node store deletes whole old segments past a topic's
``retention_bytes`` or ``retention_seconds``, never the active one. In a
cluster the index entry plays the segment's part (with index compaction
an old entry covers up to 64 MiB), and the newest entry is never cut:

- **bytes**: the oldest entries go while the partition holds more than
  ``retention_bytes`` (entry sizes summed from the newest);
- **age**: an entry goes once the entry after it began before now minus
  ``retention_seconds`` (every message of it was stored by then; the
  entry's own last time is not in the index, so one entry more may stay
  than the single node would keep).

One fenced transaction per cut: compare the owner's epoch, delete the
index keys below the first entry kept (one range delete). The objects go
with the janitor (§9) once unreferenced and old; readers below the new
first entry get DATA_LOST (retention), as on a single node.

Bounded: a cut looks at most ``SCAN_LIMIT`` entries (the age rule cuts
what it saw and goes on at the next pass; the bytes rule cuts nothing
when the newest ``SCAN_LIMIT`` entries hold less than the limit).
"""

from __future__ import annotations

import attrs

from pybroker.server.storage.settings import TopicSettings

from .etcd import Compare, Delete, Etcd, KeyValue, prefix_end
from .keys import ClusterKeys
from .entries import IndexEntry

SCAN_LIMIT = 4096
PAGE = 512


@attrs.frozen
class Retention:
    max_bytes: int | None = None
    max_age: float | None = None

    @classmethod
    def of(cls, settings: TopicSettings) -> Retention:
        return cls(settings.retention_bytes, settings.retention_seconds)

    @property
    def active(self) -> bool:
        return self.max_bytes is not None or self.max_age is not None


@attrs.frozen
class Cut:
    #: Index entries deleted, and the partition's first offset after the cut.
    entries: int
    first: int


async def _bytes_boundary(etcd: Etcd, prefix: bytes, max_bytes: int) -> bytes | None:
    """The key of the oldest entry the bytes rule keeps (keys below it go),
    or None when it cuts nothing."""
    total, newer, seen = 0, None, 0
    end = prefix_end(prefix)
    while seen < SCAN_LIMIT:
        page = await etcd.range(prefix, end, limit=PAGE, descending=True)
        for i, kv in enumerate(page.kvs):
            seen += 1
            try:
                total += IndexEntry.from_key(prefix, kv.key, kv.value).size
            except ValueError:
                pass  # a damaged entry: its bytes are not known; it goes by position
            if total > max_bytes:
                # This one and everything older go; the newest always stays.
                if newer is not None:
                    return newer
                return kv.key if i + 1 < len(page.kvs) or page.more else None
            newer = kv.key
        if not page.more or not page.kvs:
            return None
        end = page.kvs[-1].key
    return None


async def _age_boundary(etcd: Etcd, prefix: bytes, cutoff_us: int) -> bytes | None:
    """The key of the oldest entry the age rule keeps (the first whose next
    entry began after ``cutoff_us``, or the newest), or None when that is
    the oldest entry."""
    first: bytes | None = None
    kept: bytes | None = None  # the entry before the one looked at
    start, end, seen = prefix, prefix_end(prefix), 0
    while seen < SCAN_LIMIT:
        page = await etcd.range(start, end, limit=PAGE)
        for kv in page.kvs:
            seen += 1
            if kept is not None and _began(prefix, kv) > cutoff_us:
                return kept if kept != first else None
            first = first or kv.key
            kept = kv.key
        if not page.more or not page.kvs:
            break
        start = page.kvs[-1].key + b"\0"
    # The newest entry (it always stays), or the last one this bounded scan saw.
    return kept if kept != first else None


def _began(prefix: bytes, kv: KeyValue) -> int:
    """An entry's first batch's time (µs); a damaged entry counts as new."""
    try:
        return IndexEntry.from_key(prefix, kv.key, kv.value).timestamp
    except ValueError:
        return 1 << 62


async def cut(
    etcd: Etcd, keys: ClusterKeys, topic: str, partition: int, epoch: int, retention: Retention, now_us: int
) -> Cut | None:
    """Cut what ``retention`` no longer keeps of the partition, fenced on
    the owner's ``epoch``; None when nothing goes or the epoch is no
    longer the partition's (then nothing was deleted)."""
    prefix = keys.index_prefix(topic, partition)
    boundaries = []
    if retention.max_bytes is not None:
        boundaries.append(await _bytes_boundary(etcd, prefix, retention.max_bytes))
    if retention.max_age is not None:
        boundaries.append(await _age_boundary(etcd, prefix, now_us - int(retention.max_age * 1_000_000)))
    found = [b for b in boundaries if b is not None]
    if not found:
        return None
    boundary = max(found)
    result = await etcd.txn(
        [Compare.create_revision(keys.own(topic, partition), "==", epoch)], [Delete(prefix, range_end=boundary)]
    )
    if not result.succeeded:
        return None
    deleted = result.responses[0] if result.responses else 0
    return Cut(deleted if isinstance(deleted, int) else 0, int(boundary[len(prefix) :]))
