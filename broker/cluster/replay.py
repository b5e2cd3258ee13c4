"""Reads older than a node's in-memory copy of a topic (docs/cluster.md §7).

Each node keeps the newest part of every topic in memory (store.py's copy,
bounded in bytes); the objects holding the older part are still in the
object store and indexed in etcd. ``TopicLog.read`` is synchronous, so a
read below the copy cannot wait for them. ``Replay.read`` answers it from
the batches fetched so far or, when they are not there:

- starts **one background fetch** of the batches from that offset on (at
  most ``fetch_bytes``, through the topic's ``IndexedReader``: the index
  view, etcd below its window, and the node's ``RangeCache``) and raises
  ``ReadPending``: the caller asks to be woken (``notify``) and reads again.
  Readers of a range being fetched wait for that fetch (single flight);
  at most ``max_fetches`` run at once on a node, and a read beyond that
  waits for one of them to end.
- keeps what fetches bring in a cache **bounded in bytes** (``max_bytes``,
  least recently used batches go first; the newest batch is kept even if
  it alone is larger), shared by the node's topics.
- a fetch that finds its range lost (a hole in the index, an object
  missing, damaged bytes) records that **exact range** as lost: reads in it
  raise ``DataLoss`` for it (from the reader's offset), never other data,
  and the reader goes on after it. Such records are few and bounded
  (``MAX_LOST``); one forgotten is fetched, and found lost, again.
- a store that fails (etcd or the object store unreachable) is retried by
  the fetch with a doubling pause; its readers wait meanwhile. Once the
  node stops (its fetches cancelled), no fetch starts again.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable

import attrs
import trio

from ..logs import get_logger
from ..storage.base import StoredBatch
from ..storage.errors import DataLoss, ReadPending
from .etcd import EtcdError
from .objects import ObjectStoreError
from .tail import IndexedReader

#: Bytes of fetched batches a node keeps, all topics together.
DEFAULT_MAX_BYTES = 16 << 20
#: Fetches running at once on a node.
DEFAULT_MAX_FETCHES = 4
#: Bytes one fetch asks for (at least one batch comes).
FETCH_BYTES = 1 << 20
#: Lost ranges remembered (the oldest is forgotten first).
MAX_LOST = 1024
#: Pauses between a failed fetch's attempts: doubling from MIN to MAX.
RETRY_MIN = 0.1
RETRY_MAX = 2.0
#: Seconds a fetch waits for its reader's index view to reach the offset
#: (the view follows etcd's watch, which may lag the commits the copy
#: already holds); past it, the fetch reads what the view has.
INDEX_WAIT = 10.0


class Waiter:
    """Done once; ``notify(wake)`` calls each distinct ``wake`` once then."""

    __slots__ = ("done", "_wakes")

    def __init__(self) -> None:
        self.done = False
        self._wakes: set[Callable[[], None]] = set()

    def notify(self, wake: Callable[[], None]) -> None:
        if self.done:
            wake()
        else:
            self._wakes.add(wake)  # a bound method asked again is equal: one call

    def fire(self) -> None:
        self.done = True
        wakes, self._wakes = self._wakes, set()
        for wake in wakes:
            wake()

    async def wait(self) -> None:
        """For async callers (tests): until done."""
        event = trio.Event()
        self.notify(event.set)
        await event.wait()


@attrs.define(eq=False)
class _Fetch:
    topic: str
    start: int
    waiter: Waiter = attrs.field(factory=Waiter)


@attrs.frozen
class ReplayStatistics:
    #: Bytes and batches held, and the bound on bytes.
    bytes: int
    batches: int
    max_bytes: int
    #: The most bytes ever held, and the most fetches ever running at once.
    peak_bytes: int
    peak_fetches: int
    #: Reads served from memory, ReadPending raised, fetches started, fetch
    #: attempts that failed (and were retried), lost ranges recorded.
    hits: int
    pending: int
    fetches: int
    retries: int
    lost: int
    #: Fetches running now.
    in_flight: int


class Replay:
    """Batches below the copies of one node's topics, fetched on demand.
    ``nursery`` (set by the store while it runs) is where fetches run."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_fetches: int = DEFAULT_MAX_FETCHES,
        fetch_bytes: int = FETCH_BYTES,
    ) -> None:
        self.bound(max_bytes, max_fetches, fetch_bytes)
        self.nursery: trio.Nursery | None = None
        self._bases: dict[str, list[int]] = {}  # per topic, sorted
        self._batches: OrderedDict[tuple[str, int], StoredBatch] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lost: OrderedDict[tuple[str, int], DataLoss] = OrderedDict()
        self._fetches: dict[tuple[str, int], _Fetch] = {}
        self._slot = Waiter()  # fired when a fetch ends (a slot is free)
        self._never = Waiter()  # while no fetch can start (the store is not running)
        self._peak_bytes = self._peak_fetches = 0
        self._hits = self._pending = self._started = self._retries = self._lost_count = 0
        self.logger = get_logger(component="cluster-replay")

    def bound(self, max_bytes: int, max_fetches: int, fetch_bytes: int = FETCH_BYTES) -> None:
        """Set the bounds (what is held over a lower one goes at the next fetch)."""
        if max_bytes <= 0 or max_fetches <= 0 or fetch_bytes <= 0:
            raise ValueError("max_bytes, max_fetches and fetch_bytes must be positive")
        self.max_bytes = max_bytes
        self.max_fetches = max_fetches
        # A fetch's batches must not push out what the other fetches brought
        # before their readers come for them.
        self.fetch_bytes = max(1, min(fetch_bytes, max_bytes // (2 * max_fetches)))

    def statistics(self) -> ReplayStatistics:
        return ReplayStatistics(
            self._bytes, len(self._batches), self.max_bytes, self._peak_bytes, self._peak_fetches,
            self._hits, self._pending, self._started, self._retries, self._lost_count, len(self._fetches),
        )  # fmt: skip

    def read(self, topic: str, reader: IndexedReader, offset: int, end: int, max_bytes: int) -> list[StoredBatch]:
        """Batches of ``topic`` (``reader``'s partition) from the one holding ``offset``
        (below ``end``, where the node's copy starts) on, up to about
        ``max_bytes``, as far as they are here (at least one); DataLoss for a
        range found lost; ReadPending while they are being fetched."""
        lost = self._lost_at(topic, offset)
        if lost is not None:
            raise DataLoss(topic, max(lost.first, offset), lost.last, lost.reason)
        found = self._held(topic, offset, max_bytes)
        if found:
            self._hits += 1
            return found
        self._pending += 1
        raise ReadPending(topic, offset, end - 1, self._fetch_for(topic, reader, offset, end))

    # -- what is held -----------------------------------------------------------

    def _lost_at(self, topic: str, offset: int) -> DataLoss | None:
        for (name, _), lost in self._lost.items():
            if name == topic and lost.first <= offset <= lost.last:
                return lost
        return None

    def _held(self, topic: str, offset: int, max_bytes: int) -> list[StoredBatch]:
        bases = self._bases.get(topic)
        if not bases:
            return []
        i = bisect.bisect_right(bases, offset) - 1
        if i < 0:
            return []
        out: list[StoredBatch] = []
        size = 0
        expected = None
        while i < len(bases) and (not out or size < max_bytes):
            key = (topic, bases[i])
            stored = self._batches[key]
            if expected is None:
                if stored.next_offset <= offset:
                    return []  # the batch holding offset is not here
            elif stored.base_offset != expected:
                break  # a batch in between was evicted: the next read fetches it
            self._batches.move_to_end(key)
            out.append(stored)
            size += len(stored.batch)
            expected = stored.next_offset
            i += 1
        return out

    def _insert(self, topic: str, batches: list[StoredBatch]) -> None:
        bases = self._bases.setdefault(topic, [])
        for stored in batches:
            key = (topic, stored.base_offset)
            if key in self._batches:
                self._batches.move_to_end(key)
                continue
            bisect.insort(bases, stored.base_offset)
            self._batches[key] = stored
            self._bytes += len(stored.batch)
        # The newest batch stays even alone over the bound: a reader gets it.
        while self._bytes > self.max_bytes and len(self._batches) > 1:
            (name, base), stored = self._batches.popitem(last=False)
            self._bytes -= len(stored.batch)
            names = self._bases[name]
            del names[bisect.bisect_left(names, base)]
            if not names:
                del self._bases[name]
        self._peak_bytes = max(self._peak_bytes, self._bytes)

    def _record_lost(self, lost: DataLoss) -> None:
        self._lost_count += 1
        self._lost[(lost.topic, lost.first)] = lost
        self._lost.move_to_end((lost.topic, lost.first))
        while len(self._lost) > MAX_LOST:
            self._lost.popitem(last=False)

    # -- fetching -----------------------------------------------------------

    def _fetch_for(self, topic: str, reader: IndexedReader, offset: int, end: int) -> Waiter:
        """The waiter of the fetch that brings ``offset``: one running from
        at or before it in this topic (it may well bring it; if not, the
        read after it starts another), or a new one; while all slots are
        taken, the next slot."""
        running = [f for (name, start), f in self._fetches.items() if name == topic and start <= offset]
        if running:
            return max(running, key=lambda f: f.start).waiter
        if self.nursery is None:
            return self._never  # the store is not running: nothing will come
        if len(self._fetches) >= self.max_fetches:
            return self._slot
        fetch = _Fetch(topic, offset)
        self._fetches[(topic, offset)] = fetch
        self._started += 1
        self._peak_fetches = max(self._peak_fetches, len(self._fetches))
        self.nursery.start_soon(self._fetch, reader, fetch, end)
        return fetch.waiter

    async def _fetch(self, reader: IndexedReader, fetch: _Fetch, end: int) -> None:
        topic, start = fetch.topic, fetch.start
        pause = RETRY_MIN
        try:
            # The copy starts at ``end``, so the partition holds ``start``;
            # a view that has not yet seen it (its watch lagging the commits
            # under load) would read nothing, and the range would be taken
            # for cut by retention.
            with trio.move_on_after(INDEX_WAIT):
                await reader.index.wait_beyond(start)
            while True:
                try:
                    batches = await reader.read(start, self.fetch_bytes)
                except DataLoss as lost:
                    # Exactly the range that cannot be served, as the reader
                    # found it (it holds ``start``: IndexedReader.read's
                    # contract; were it not to, it is made to, or the readers
                    # at ``start`` would fetch it again and again).
                    first, last = lost.first, lost.last
                    if not first <= start <= last:
                        self.logger.error("a loss not holding the offset", topic=topic, offset=start, error=str(lost))
                        first, last = start, max(start, last)
                    self.logger.error("old batches lost", topic=topic, first=first, last=last, reason=lost.reason)
                    self._record_lost(DataLoss(topic, first, last, lost.reason))
                    return
                except (EtcdError, ObjectStoreError, OSError) as exc:
                    self._retries += 1
                    self.logger.info(
                        "fetching old batches failed", topic=topic, offset=start, error=repr(exc), retry_in=pause
                    )
                    await trio.sleep(pause)
                    pause = min(RETRY_MAX, pause * 2)
                    continue
                if not batches or batches[0].base_offset > start:
                    # Below the partition's first entry now (retention): lost
                    # up to where the index goes on, or to the copy.
                    upto = batches[0].base_offset if batches else end
                    self._record_lost(DataLoss(topic, start, upto - 1, "retention"))
                # The reader hands out whole entries (a round may be
                # megabytes): keep the first batch and what fits in
                # fetch_bytes after it, so what was fetched for a reader is
                # never pushed out by the rest of its own fetch.
                size, keep = 0, 0
                while keep < len(batches) and (keep == 0 or size + len(batches[keep].batch) <= self.fetch_bytes):
                    size += len(batches[keep].batch)
                    keep += 1
                self._insert(topic, batches[:keep])
                return
        except trio.Cancelled:
            # The store is stopping (its nursery is cancelled, nothing else
            # cancels a fetch): no fetch starts from now on, or the readers
            # this one wakes would start one after another, each cancelled
            # at once, for as long as their connections last.
            self.nursery = None
            raise
        finally:
            del self._fetches[(topic, start)]
            slot, self._slot = self._slot, Waiter()
            fetch.waiter.fire()
            slot.fire()
