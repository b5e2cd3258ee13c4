"""Index compaction: the owner merges runs of old index entries into one
larger object and one entry (docs/cluster.md §13).

Every commit round adds one ``idx/{t}/{p}/{first}`` key; at a few hundred
rounds a second a busy partition would add millions of keys a day, and
etcd refuses writes once its 2 GiB quota is full. So the partition's owner
keeps the index small:

- the newest ``keep`` entries are never touched (the nodes' copies and
  tails read there);
- older entries form **runs**: consecutive, dense, of one ``level`` (0 for
  a round's entry, one more for each merge), at most ``fan_in`` entries
  and ``max_object_bytes`` bytes. A run of ``fan_in`` entries, or one of
  two or more that the size bound closed, is merged: its byte ranges are
  read, every batch checked (both CRCs, dense offsets), and written as one
  object with a conditional PUT; then ONE etcd transaction puts the merged
  entry at the run's first key and deletes the others, comparing the
  owner's epoch, every entry's mod revision and the new object's tombstone
  (so a former owner, a concurrent change or a janitor that already
  condemned the object makes it change nothing). Offsets and bytes do not
  change: the merged object is the entries' bytes end to end.
- Merged entries merge again a level up, so a byte is rewritten about
  log_fan_in(rounds) times and the index holds about ``keep`` + (fan_in - 1)
  per level entries.

What it cannot change: an acknowledgement (it acknowledges nothing), an
offset, or a byte a reader gets. An entry whose bytes do not check is left
as it is (readers report it lost, exactly as before) and breaks runs. The
objects it supersedes are unreferenced at once; the janitor deletes them
(§9), and a reader that held the old entry and finds its object gone reads
the index again (tail.py). A crash between the PUT and the transaction
leaves an orphan for the janitor.

Bounded: entries read per pass (``SCAN_LIMIT``), one merge at a time per
node (a limiter the node's owners share; a merge holds at most
``max_object_bytes`` of parts and their join), passes in a row while
each merges something (``MAX_PASSES``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import anyio
import attrs

from pybroker.server.storage.errors import DataLoss

from ..logs import get_logger
from .cache import RangeCache
from .etcd import Compare, Delete, EtcdError, KeyValue, Op, Put, prefix_end
from .objects import NoSuchKey, ObjectStoreError
from .entries import IndexEntry, decode_stored
from .partition import PartitionOwner
from .retention import Cut, Retention, cut

#: docs/cluster.md §13: entries kept as they are, entries per merge, and
#: the largest merged object (a merge holds its parts and their join).
DEFAULT_KEEP = 256
DEFAULT_FAN_IN = 100
DEFAULT_MAX_OBJECT_BYTES = 64 << 20
#: A merge's transaction compares every entry plus the epoch and the
#: tombstone; etcd refuses more than 128 operations (--max-txn-ops).
MAX_FAN_IN = 120
#: Index entries one pass reads (a page at a time).
SCAN_LIMIT = 4096
PAGE = 512
#: Passes in a row while each merges something (then it waits for rounds).
MAX_PASSES = 64
#: Entries whose bytes did not check, remembered so runs go around them.
MAX_BAD = 1024
DEFAULT_RETENTION_EVERY = 30.0
#: Backoff after a pass failed (etcd or the object store): doubles up to MAX.
RETRY_MIN = 0.5
RETRY_MAX = 30.0


@attrs.frozen
class CompactionSettings:
    keep: int = DEFAULT_KEEP
    fan_in: int = DEFAULT_FAN_IN
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    #: Seconds between retention cuts of a partition that has a retention
    #: limit (retention.py), besides one after every ``fan_in`` rounds.
    retention_every: float = DEFAULT_RETENTION_EVERY

    def __attrs_post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError("index compaction keeps at least the newest entry")
        if not 2 <= self.fan_in <= MAX_FAN_IN:
            raise ValueError(f"index compaction merges 2 to {MAX_FAN_IN} entries at a time, not {self.fan_in}")
        if self.max_object_bytes < 1:
            raise ValueError("max_object_bytes must be positive")


@attrs.define
class CompactionStats:
    passes: int = 0
    #: Merges committed, the entries they replaced and the bytes they wrote.
    merges: int = 0
    entries_merged: int = 0
    bytes_written: int = 0
    #: Merges etcd refused (the epoch or an entry changed) or whose
    #: outcome is unknown, and entries left out because their bytes did not check.
    refused: int = 0
    unknown: int = 0
    damaged: int = 0
    #: Index entries retention cut (retention.py).
    retention_cut: int = 0


@attrs.frozen
class _Held:
    """An index entry as read, with its key's mod revision (compared by the merge)."""

    entry: IndexEntry
    key: bytes
    mod_revision: int


def plan(
    entries: Sequence[_Held], fan_in: int, max_bytes: int, bad: frozenset[int] = frozenset()
) -> tuple[list[list[_Held]], int | None]:
    """The runs to merge among ``entries`` (in offset order), and the first
    offset a later pass must look at again (None: all of them): the start
    of the first run that may still grow. Entries before it are merged now
    or were closed by the size bound, and are not looked at again."""
    runs: list[list[_Held]] = []
    floor: int | None = None
    run: list[_Held] = []
    size = 0

    def close(by_size: bool) -> None:
        nonlocal floor
        if len(run) == fan_in or (by_size and len(run) >= 2):
            runs.append(list(run))
        if floor is None and run and not by_size:
            # A partial run may grow; a full one's merged entry joins the next level's run.
            floor = run[0].entry.first

    for held in entries:
        entry = held.entry
        if entry.first in bad:
            close(False)
            run, size = [], 0
            continue
        if run:
            last = run[-1].entry
            if entry.first != last.first + last.count or entry.level != run[0].entry.level:
                close(False)
                run, size = [], 0
            elif size + entry.size > max_bytes:
                close(True)
                run, size = [], 0
        run.append(held)
        size += entry.size
        if len(run) == fan_in:
            close(False)
            run, size = [], 0
    if run:
        close(False)
    return runs, floor


class IndexCompactor:
    """Compacts the index of the partition ``owner`` owns, while it owns it
    (``run`` in the owner's task group; ``compact`` is one pass)."""

    def __init__(
        self,
        owner: PartitionOwner,
        settings: CompactionSettings | None = None,
        *,
        limiter: anyio.CapacityLimiter | None = None,
        retention: Retention | Callable[[], Retention] | None = None,
        cache: RangeCache | None = None,
    ) -> None:
        self.owner = owner
        #: The node's read cache: the newest rounds a merge reads are
        #: usually there (the owner put them there), else they are fetched.
        self.cache = cache
        self.settings = settings or CompactionSettings()
        #: The partition's retention limits (cut before each compaction
        #: pass): fixed, or asked for at each pass (they may change while
        #: the cluster runs: TOPICS set).
        self._retention = retention
        self.limiter = limiter or anyio.CapacityLimiter(1)
        self.stats = CompactionStats()
        self.name = f"{owner.topic}[{owner.partition}]"
        self._keys = owner.keys
        self._prefix = owner.keys.index_prefix(owner.topic, owner.partition)
        #: The first key a pass reads from (see ``plan``); a new owner starts at the first entry.
        self._floor = self._prefix
        self._bad: dict[int, None] = {}
        self._log = get_logger(component="cluster-compaction", topic=owner.topic, partition=owner.partition)

    async def run(self) -> None:
        """A pass at once, then after every ``fan_in`` rounds the owner
        commits (and every ``retention_every`` seconds when the partition
        has a retention limit), until cancelled (the owner's task group
        ends it). Each pass cuts what retention no longer keeps first."""
        pause = RETRY_MIN
        fan_in = self.settings.fan_in
        next_pass = self.owner.commits  # one at once
        every = self.settings.retention_every if self._retention is not None else math.inf
        while True:
            with anyio.move_on_after(every):
                await self.owner.wait_commits(next_pass)
            # The next at the next multiple of fan_in, counted before this
            # pass reads the index: rounds committed while it runs are
            # looked at by a pass of their own, whenever the wake-up came.
            next_pass = (self.owner.commits // fan_in + 1) * fan_in
            try:
                if self.owner.owning:
                    await self.cut()
                for _ in range(MAX_PASSES):
                    if not self.owner.owning or not await self.compact():
                        break
                pause = RETRY_MIN
            except (EtcdError, ObjectStoreError, OSError) as exc:
                self._log.info("index compaction failed", error=repr(exc), retry_in=pause)
                await anyio.sleep(pause)
                pause = min(RETRY_MAX, pause * 2)

    @property
    def retention(self) -> Retention | None:
        """The partition's retention limits now (None without any)."""
        retention = self._retention() if callable(self._retention) else self._retention
        return retention if retention is not None and retention.active else None

    async def cut(self) -> Cut | None:
        """Cut the entries the partition's retention no longer keeps (fenced
        on the owner's epoch); what went, or None."""
        retention = self.retention
        if retention is None:
            return None
        owner = self.owner
        done = await cut(
            owner.etcd, owner.keys, owner.topic, owner.partition, owner.epoch, retention, time.time_ns() // 1000
        )
        if done is not None:
            self.stats.retention_cut += done.entries
            self._log.info("retention cut the index", entries=done.entries, first=done.first)
        return done

    async def compact(self) -> int:
        """One pass: the merges it committed (0 when there was nothing to do)."""
        self.stats.passes += 1
        etcd = self.owner.etcd
        settings = self.settings
        newest = await etcd.range(self._prefix, prefix_end(self._prefix), limit=settings.keep, descending=True)
        if len(newest.kvs) < settings.keep:
            return 0
        boundary = newest.kvs[-1].key  # the oldest entry kept as it is
        held: list[_Held] = []
        start = self._floor
        while len(held) < SCAN_LIMIT and start < boundary:
            page = await etcd.range(start, boundary, limit=min(PAGE, SCAN_LIMIT - len(held)))
            held.extend(self._decoded(page.kvs))
            if not page.more or not page.kvs:
                break
            start = page.kvs[-1].key + b"\0"
        runs, floor = plan(held, settings.fan_in, settings.max_object_bytes, frozenset(self._bad))
        if floor is not None:
            self._floor = self._keys.index(self.owner.topic, self.owner.partition, floor)
        elif held:
            self._floor = held[-1].key + b"\0"  # every run the size bound closed: none grows again
        merged = 0
        for run in runs:
            if not self.owner.owning:
                break
            async with self.limiter:
                merged += await self._merge(run)
        return merged

    def _decoded(self, kvs: list[KeyValue]) -> list[_Held]:
        out = []
        for kv in kvs:
            try:
                entry = IndexEntry.from_key(self._prefix, kv.key, kv.value)
            except ValueError:
                continue  # not an entry: a gap in the runs, which go around it
            out.append(_Held(entry, kv.key, kv.mod_revision))
        return out

    async def _merge(self, run: list[_Held]) -> int:
        """Merge one run: 1 if committed, 0 if not (nothing changed, or
        the outcome is unknown: either way every offset still reads)."""
        owner = self.owner
        parts: list[bytes] = []
        for held in run:
            entry = held.entry
            try:
                if self.cache is not None and (entry.object, entry.start, entry.size) in self.cache:
                    data = await self.cache.get(entry.object, entry.start, entry.size)
                else:  # not through the cache: old ranges would only push out what readers need
                    data = await owner.store.get(entry.object, entry.start, entry.start + entry.size - 1)
                if len(data) != entry.size:
                    raise DataLoss(self.name, entry.first, entry.first + entry.count - 1, "damaged")
                decode_stored(data, entry.first, entry.count, self.name)
            except (NoSuchKey, DataLoss) as exc:
                # Left as it is: readers report it lost, as before; runs go around it.
                self.stats.damaged += 1
                self._bad[entry.first] = None
                while len(self._bad) > MAX_BAD:
                    del self._bad[next(iter(self._bad))]
                self._log.warning(
                    "index entry not compacted: its bytes do not check", first=entry.first, error=repr(exc)
                )
                return 0
            parts.append(data)
        data = b"".join(parts)
        del parts
        assert owner.names is not None
        name = owner.names.next()
        if not await owner.store.put_if_absent(name, data):
            return 0  # the name is taken: another writer holds this node's names; nothing changed
        first = run[0].entry
        merged = IndexEntry(
            first.first,
            name,
            0,
            len(data),
            sum(h.entry.count for h in run),
            first.timestamp,
            first.level + 1,
        )
        own = owner.keys.own(owner.topic, owner.partition)
        compare = [
            Compare.create_revision(own, "==", owner.epoch),
            *(Compare.mod_revision(h.key, "==", h.mod_revision) for h in run),
            Compare.create_revision(owner.keys.gone(name), "==", 0),
        ]
        success: list[Op] = [Put(run[0].key, merged.encode()), *(Delete(h.key) for h in run[1:])]
        try:
            result = await owner.etcd.txn(compare, success)
        except EtcdError as exc:
            # Applied or not, every offset still reads (old or new entry);
            # an unapplied merge leaves its object to the janitor.
            self.stats.unknown += 1
            self._log.info("index compaction's outcome unknown", object=name, error=repr(exc))
            return 0
        if not result.succeeded:
            self.stats.refused += 1
            self._log.info("index compaction refused (the epoch or an entry changed)", object=name)
            return 0
        self.stats.merges += 1
        self.stats.entries_merged += len(run)
        self.stats.bytes_written += len(data)
        self._log.info(
            "index compacted",
            first=merged.first,
            entries=len(run),
            messages=merged.count,
            bytes=len(data),
            level=merged.level,
        )
        return 1
