"""One partition's index as a node keeps it in memory (docs/cluster.md §7).

``PartitionIndex`` mirrors ``idx/{t}/{p}/`` (entries ``first offset ->
IndexEntry``) so that reads on any node find an offset's object range
without asking etcd:

- a **load** reads the partition's next offset and its newest index
  entries in one snapshot (paged range reads at one revision, newest
  first, up to ``max_entries``);
- a **watch** from that snapshot's revision + 1 then applies every later
  PUT and DELETE, so nothing committed between the read and the watch is
  missed. A broken watch (etcd unreachable, stream ended) is opened again
  from the last revision applied; one canceled because its start revision
  was compacted away (``WatchCanceled``) loads afresh.
- Entries must stay **dense**: each one starts where the one before it
  ends. An append that does not (a gap: an event was missed, or etcd holds
  a hole) loads afresh; the view then keeps the newest dense run, so a
  real hole stays outside it and reads there go to etcd (and find it).
- Deletes are applied (retention cuts old entries, index compaction
  replaces a run of entries by one larger entry in one transaction: the
  batch is checked once whole).

**Memory bound.** The view keeps at most ``max_entries`` entries (the
newest; 4096 by default, a few hundred bytes each in Python, so about a
megabyte per partition). Offsets older than the window are looked up in
etcd (``lookup``: one reverse range read for the entry holding the offset,
one forward read for the entries after it), which costs a round trip per
read but only for readers catching up from far behind. With index
compaction (§13, compaction.py) a partition's index stays around 256 + a
few hundred entries, inside the default window.

Readers wait for the index to grow with ``wait_beyond(offset)`` (an
event, set when ``next_offset`` moves), never by polling.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import attrs

from .etcd import Etcd, EtcdError, EtcdUnavailable, KeyValue, WatchBatch, WatchCanceled, prefix_end
from .keys import ClusterKeys
from .entries import IndexEntry

log = logging.getLogger(__name__)

#: Entries kept in memory per partition (the newest).
DEFAULT_MAX_ENTRIES = 4096
#: Entries per range read when loading.
DEFAULT_PAGE = 512
#: Pauses between attempts while etcd does not answer: doubling up to the
#: last (the view keeps serving what it has meanwhile).
RETRY_FIRST = 0.05
RETRY_MAX = 2.0


@attrs.frozen
class IndexStatistics:
    #: Entries in memory, and the range of offsets they cover.
    entries: int
    low: int
    next_offset: int
    #: The etcd revision the view is up to date with.
    revision: int
    #: Loads (the first one included), watches canceled by compaction,
    #: gaps found in the watched entries, watches opened again after a break.
    loads: int
    canceled: int
    gaps: int
    reconnects: int
    #: Whether a watch is open now.
    watching: bool


class PartitionIndex:
    """The index of one partition, kept up to date by ``run`` (start it in a
    nursery with ``start``: it returns once the first load is done)."""

    def __init__(
        self,
        etcd: Etcd,
        topic: str,
        partition: int,
        *,
        keys: ClusterKeys | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        page: int = DEFAULT_PAGE,
    ) -> None:
        if max_entries < 1 or page < 1:
            raise ValueError("max_entries and page must be at least 1")
        self.etcd = etcd
        self.topic = topic
        self.partition = partition
        self.keys = keys or ClusterKeys()
        self.max_entries = max_entries
        self.page = page
        #: Called with the start revision before each watch is opened: a
        #: fault hook (tests compact etcd there to cancel the watch).
        self.before_watch: Callable[[int], Awaitable[None]] | None = None
        self.name = f"{topic}[{partition}]"
        self._prefix = self.keys.index_prefix(topic, partition)
        self._next_key = self.keys.next(topic, partition)
        # The window: ``_firsts`` sorted, each a key of ``_entries``, dense.
        self._firsts: list[int] = []
        self._entries: dict[int, IndexEntry] = {}
        self._next_offset = 0
        self._revision = 0
        self._loaded = anyio.Event()
        self._changed = anyio.Event()
        self._watching = False
        self._pause = RETRY_FIRST
        self._loads = self._canceled = self._gaps = self._reconnects = 0

    # -- what readers see ----------------------------------------------------

    @property
    def next_offset(self) -> int:
        """The offset the next committed message gets, as far as this view
        knows (never decreases)."""
        return self._next_offset

    @property
    def low(self) -> int:
        """The first offset the window holds (``next_offset`` when empty):
        offsets below it are looked up in etcd."""
        return self._firsts[0] if self._firsts else self._next_offset

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def __len__(self) -> int:
        return len(self._firsts)

    def entry_for(self, offset: int) -> IndexEntry | None:
        """The entry holding ``offset`` if the window has it (None below the
        window and at or past ``next_offset``)."""
        i = bisect.bisect_right(self._firsts, offset) - 1
        if i < 0:
            return None
        entry = self._entries[self._firsts[i]]
        return entry if offset < entry.first + entry.count else None

    def entries(self) -> list[IndexEntry]:
        """The window's entries in offset order (a copy)."""
        return [self._entries[first] for first in self._firsts]

    def statistics(self) -> IndexStatistics:
        return IndexStatistics(
            len(self._firsts),
            self.low,
            self._next_offset,
            self._revision,
            self._loads,
            self._canceled,
            self._gaps,
            self._reconnects,
            self._watching,
        )

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    async def wait_beyond(self, offset: int) -> None:
        """Return once ``next_offset > offset`` (at once if it already is)."""
        while self._next_offset <= offset:  # each wake-up is a change of the view
            await self._changed.wait()

    async def wait_revision(self, revision: int) -> None:
        """Return once the view is up to date with etcd's ``revision`` (e.g.
        a commit's: then the view holds what that commit wrote)."""
        while self._revision < revision:  # each wake-up is a change of the view
            await self._changed.wait()

    async def lookup(self, offset: int, limit: int) -> tuple[list[IndexEntry], bool]:
        """From etcd: up to ``limit`` entries from the one holding ``offset``
        (or the greatest below it) on, and whether ``offset`` is below the
        partition's first entry. ValueError for an entry that does not decode."""
        below = await self.etcd.range(
            self._prefix, self.keys.index(self.topic, self.partition, offset) + b"\x00", limit=1, descending=True
        )
        start = below.kvs[0].key if below.kvs else self._prefix
        found = await self.etcd.range(start, prefix_end(self._prefix), limit=limit)
        return [self._decode(kv) for kv in found.kvs], not below.kvs

    # -- keeping it up to date ---------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load, then follow the watch, until cancelled. ``task_status`` is
        told once the first load is done."""
        must_load = True
        while True:  # runs for as long as the node reads this partition
            try:
                if must_load:
                    await self._load()
                    must_load = False
                    if self._loads == 1:
                        task_status.started()
                must_load = await self._follow()
            except WatchCanceled as exc:
                self._canceled += 1
                log.info("index %s: watch canceled (%s, compacted to %d): loading afresh", self.name, exc, exc.compact_revision)
                must_load = True
            except EtcdUnavailable as exc:
                self._reconnects += 1
                log.info("index %s: etcd unavailable (%s): again in %.2fs", self.name, exc, self._pause)
                await self._back_off()
            except EtcdError as exc:
                # E.g. the load's revision was compacted between its pages
                # (OUT_OF_RANGE): load again, after a pause in case it persists.
                log.warning("index %s: %s: loading afresh in %.2fs", self.name, exc, self._pause)
                must_load = True
                await self._back_off()
            finally:
                self._watching = False

    async def _back_off(self) -> None:
        await anyio.sleep(self._pause)
        self._pause = min(RETRY_MAX, self._pause * 2)

    async def _load(self) -> None:
        """Read the next offset and the newest dense run of entries, all at
        one revision, and make them the window."""
        first_page = await self.etcd.range(self._prefix, prefix_end(self._prefix), limit=self.page, descending=True)
        revision = first_page.revision
        nxt = await self.etcd.range(self._next_key, revision=revision)
        newest: list[IndexEntry] = []  # newest first
        page = first_page
        for _ in range(self.max_entries // self.page + 2):  # a bound: enough pages to fill the window
            dense = True
            for kv in page.kvs:
                try:
                    entry = self._decode(kv)
                except ValueError:
                    dense = False  # undecodable: the window stops above it
                    break
                if newest and entry.first + entry.count != newest[-1].first:
                    dense = False  # a hole: the window is the run above it
                    break
                newest.append(entry)
                if len(newest) >= self.max_entries:
                    break
            if not dense or not page.more or len(newest) >= self.max_entries or not page.kvs:
                break
            page = await self.etcd.range(
                self._prefix, page.kvs[-1].key, limit=self.page, revision=revision, descending=True
            )
        newest.reverse()
        known = int(nxt.kvs[0].value) if nxt.kvs and nxt.kvs[0].value.isdigit() else 0
        end = newest[-1].first + newest[-1].count if newest else 0
        if max(known, self._next_offset) > end:
            newest = []  # entries below the next offset are not there: none is in the window
        self._firsts = [e.first for e in newest]
        self._entries = {e.first: e for e in newest}
        self._set_next(max(known, end))
        self._revision = revision
        self._loads += 1
        self._loaded.set()
        self._pause = RETRY_FIRST
        self._wake()

    async def _follow(self) -> bool:
        """Apply the watch's batches until it ends; True if a gap was found
        (load afresh), else raises what ended the watch."""
        start = self._revision + 1
        if self.before_watch is not None:
            await self.before_watch(start)
        async with self.etcd.watch(self._prefix, prefix=True, start_revision=start) as watch:
            self._watching = True
            self._pause = RETRY_FIRST
            async for batch in watch:
                if self._apply(batch):
                    self._wake()
                else:
                    self._gaps += 1
                    log.warning("index %s: entries not dense at revision %d: loading afresh", self.name, batch.revision)
                    return True
        raise EtcdUnavailable(f"the index watch of {self.name} ended")  # Watch raises before it ends; a guard

    def _apply(self, batch: WatchBatch) -> bool:
        """Apply one batch of events; False if the window would not be dense.

        The window's invariant: empty, or dense and ending at next_offset.
        An append (the common case) keeps it by construction; anything else
        (deletes, a replaced entry) is checked once the whole batch is in,
        since a compaction's transaction deletes and puts in one revision."""
        changed = False
        for event in batch.events:
            self._revision = max(self._revision, event.kv.mod_revision)
            try:
                first = int(event.kv.key[len(self._prefix) :])
            except ValueError:
                continue  # not an entry key: nothing of ours
            if event.type == "DELETE":
                if first in self._entries:
                    del self._entries[first]
                    self._firsts.remove(first)
                    changed = True
                continue
            try:
                entry = self._decode(event.kv)
            except ValueError:
                return False  # does not decode: a fresh load keeps it outside the window
            if entry.first == self._next_offset:
                self._firsts.append(entry.first)
                self._entries[entry.first] = entry
                self._set_next(entry.first + entry.count)
            elif entry.first in self._entries:  # replaced (index compaction)
                self._entries[entry.first] = entry
                changed = True
            elif entry.first < self.low:
                if self._firsts and entry.first + entry.count >= self.low:
                    # A merged entry reaching into the window from below it.
                    bisect.insort(self._firsts, entry.first)
                    self._entries[entry.first] = entry
                    changed = True
                # else older than the window: looked up in etcd when read
            else:
                return False  # a gap at the end, or overlapping what we hold
        if changed and not self._dense():
            return False
        self._trim()
        return True

    def _dense(self) -> bool:
        """Each entry starts where the one before ends; the last ends at next_offset."""
        end: int | None = None
        for first in self._firsts:
            if end is not None and first != end:
                return False
            entry = self._entries[first]
            end = entry.first + entry.count
        return end is None or end == self._next_offset

    def _trim(self) -> None:
        extra = len(self._firsts) - self.max_entries
        if extra > 0:
            for first in self._firsts[:extra]:
                del self._entries[first]
            del self._firsts[:extra]

    def _set_next(self, offset: int) -> None:
        self._next_offset = max(self._next_offset, offset)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _decode(self, kv: KeyValue) -> IndexEntry:
        return IndexEntry.from_key(self._prefix, kv.key, kv.value)
