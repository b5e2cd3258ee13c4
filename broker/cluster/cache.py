"""A cache of data objects' byte ranges, shared by a node's readers
(docs/cluster.md §7).

Data objects are immutable, so a byte range once fetched is right for as
long as anyone asks for it: the cache never revalidates, it only forgets.

- **Bounded in bytes** (``max_bytes``, 256 MiB by default): least recently
  used ranges go first; a range larger than the whole bound is handed out
  but not kept.
- **Single flight**: readers that need a range being fetched wait for that
  fetch instead of sending their own GET. A failed fetch is not cached:
  every waiter gets the error (a copy each), and the next ``get`` tries
  the store again. A fetch whose task was cancelled leaves its waiters to
  fetch again (one of them leads).
- A request inside a cached range (an owner ``put`` the whole object it
  has just written; a reader wants one partition's part of it) is served
  from that range without a GET.

It does not check what it holds: readers decode every range they get
(both CRCs) and ``discard`` one that does not check, so a range damaged in
transit is fetched again next time instead of being served from memory
for as long as it stays cached.
"""

from __future__ import annotations

from collections import OrderedDict

import anyio
import attrs

from .objects import ObjectStore, ObjectStoreError

DEFAULT_MAX_BYTES = 256 << 20
#: Times a reader takes over a fetch whose task was cancelled before it
#: gives up (each such round means a reader was cancelled mid-fetch).
MAX_TAKEOVERS = 8

_Key = tuple[str, int, int]  # object, start, size


@attrs.frozen
class CacheStatistics:
    #: Bytes and ranges held, and the bound on bytes.
    bytes: int
    ranges: int
    max_bytes: int
    #: Requests served from memory, GETs sent, requests that waited for
    #: another's GET, GETs that failed, ranges evicted.
    hits: int
    fetches: int
    joined: int
    failures: int
    evictions: int
    #: GETs in flight and readers waiting for them, now.
    in_flight: int
    waiting: int


@attrs.define(eq=False)
class _Flight:
    done: anyio.Event = attrs.field(factory=anyio.Event)
    data: bytes | None = None
    error: Exception | None = None
    waiting: int = 0


def _again(error: Exception) -> Exception:
    """A fresh exception like ``error`` for one more waiter (one exception
    object raised in several tasks would collect all their tracebacks)."""
    if isinstance(error, ObjectStoreError):
        copy = type(error)(str(error), error.status, error.code)
        copy.__cause__ = error
        return copy
    return error


class RangeCache:
    """Byte ranges of ``store``'s objects, at most ``max_bytes`` of them."""

    def __init__(self, store: ObjectStore, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.store = store
        self.max_bytes = max_bytes
        self._ranges: OrderedDict[_Key, bytes] = OrderedDict()  # least recently used first
        self._by_object: dict[str, set[tuple[int, int]]] = {}
        self._bytes = 0
        self._flights: dict[_Key, _Flight] = {}
        self._hits = self._fetches = self._joined = self._failures = self._evictions = 0

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            self._bytes,
            len(self._ranges),
            self.max_bytes,
            self._hits,
            self._fetches,
            self._joined,
            self._failures,
            self._evictions,
            len(self._flights),
            sum(f.waiting for f in self._flights.values()),
        )

    def __contains__(self, key: _Key) -> bool:
        return self._find(*key, touch=False) is not None

    async def get(self, name: str, start: int, size: int) -> bytes:
        """Bytes ``[start, start + size)`` of object ``name``: from memory,
        from a GET already in flight, or from a GET of our own. Raises what
        the store raised (NoSuchKey, ObjectStoreError). Fewer than ``size``
        bytes (the object is shorter) are returned as they are, not kept."""
        if start < 0 or size <= 0:
            raise ValueError(f"no such byte range: {start}+{size}")
        key = (name, start, size)
        for _ in range(MAX_TAKEOVERS):
            found = self._find(name, start, size, touch=True)
            if found is not None:
                self._hits += 1
                return found
            flight = self._flights.get(key)
            if flight is None:
                return await self._fetch(key)
            self._joined += 1
            flight.waiting += 1
            try:
                await flight.done.wait()
            finally:
                flight.waiting -= 1
            if flight.data is not None:
                return flight.data
            if flight.error is not None:
                raise _again(flight.error)
            # The fetching task was cancelled: look again, and lead if no one does.
        raise ObjectStoreError(f"get {name} {start}+{size}: {MAX_TAKEOVERS} fetches in a row were cancelled")

    async def _fetch(self, key: _Key) -> bytes:
        name, start, size = key
        flight = _Flight()
        self._flights[key] = flight
        self._fetches += 1
        try:
            data = await self.store.get(name, start, start + size - 1)
        except Exception as exc:
            flight.error = exc
            self._failures += 1
            raise
        else:
            flight.data = data
            if len(data) == size:
                self._insert(key, data)
            return data
        finally:
            del self._flights[key]
            flight.done.set()  # with neither data nor error: cancelled, the waiters look again

    def put(self, name: str, data: bytes, start: int = 0) -> None:
        """Keep ``data`` as bytes ``start..`` of object ``name`` (an owner
        puts an object it has just written, so its tail is read from memory)."""
        if data:
            self._insert((name, start, len(data)), data)

    def discard(self, name: str, start: int, size: int) -> int:
        """Forget every cached range of ``name`` overlapping ``[start,
        start + size)`` (it did not check); how many went."""
        gone = 0
        for s, n in list(self._by_object.get(name, ())):
            if s < start + size and start < s + n:
                self._remove((name, s, n))
                gone += 1
        return gone

    def _find(self, name: str, start: int, size: int, *, touch: bool) -> bytes | None:
        exact = self._ranges.get((name, start, size))
        if exact is not None:
            if touch:
                self._ranges.move_to_end((name, start, size))
            return exact
        for s, n in self._by_object.get(name, ()):
            if s <= start and start + size <= s + n:
                if touch:
                    self._ranges.move_to_end((name, s, n))
                return self._ranges[(name, s, n)][start - s : start - s + size]
        return None

    def _insert(self, key: _Key, data: bytes) -> None:
        name, start, size = key
        if size > self.max_bytes or self._find(name, start, size, touch=True) is not None:
            return
        # Ranges the new one contains are redundant now.
        for s, n in list(self._by_object.get(name, ())):
            if start <= s and s + n <= start + size:
                self._remove((name, s, n))
        self._ranges[key] = data
        self._by_object.setdefault(name, set()).add((start, size))
        self._bytes += size
        while self._bytes > self.max_bytes:  # each pass evicts one range, and the new one fits alone
            oldest = next(iter(self._ranges))
            self._remove(oldest)
            self._evictions += 1

    def _remove(self, key: _Key) -> None:
        name, start, size = key
        del self._ranges[key]
        self._bytes -= size
        spans = self._by_object[name]
        spans.discard((start, size))
        if not spans:
            del self._by_object[name]
