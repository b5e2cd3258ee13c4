"""The memory the broker gives to frames that have not fully arrived.

A frame is decoded only once all its bytes are in; until then they sit in
the connection's receive buffer. Without a bound, peers that send all but
the last byte of the largest frame pin ``max_frame_bytes`` each, for as long
as they like (protocol.md, "Limits": frames in progress).

- Before its handshake a connection's frame can only be a HELLO, at most
  ``MAX_HELLO_BYTES`` (larger is FRAME_TOO_LARGE), and the session reads no
  more than that HELLO at a time.
- After it, each connection may buffer ``FREE_BYTES`` of a frame in
  progress on its own: smaller frames never wait for anyone, so clients
  with ordinary frames are served whatever large frames are doing.
- Bytes beyond that come from one :class:`FrameBudget` shared by every
  connection (``Config.max_pending_frame_bytes``), and only for bytes that
  have arrived: a session takes some just before a read, once the kernel
  says bytes are waiting, gives back what the read did not bring as soon as
  it returns, and the rest once the frame is decoded or the connection
  closes. When the budget is spent, a connection that needs more stops
  being read until some comes back (backpressure).

So what incomplete frames hold is at most the budget plus ``FREE_BYTES``
per connection (``MAX_HELLO_BYTES`` per connection still in its handshake).

No deadlock: ordinary grants leave ``reserve`` bytes (one largest frame)
unused, and only the oldest holder, the frame that started drawing first,
may use them. So the oldest frame can always be finished, then the next
oldest, whatever the others hold. A holder whose peer stops sending is
closed by the idle timeout (incomplete frames are not activity), which
gives its bytes back; a connection merely waiting for budget is not idle
(we are not reading it).

Freed is not yet returned: glibc keeps the pages of large buffers once they
are freed, so after large frames the server calls ``trim_heap``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import attrs
import trio

#: Largest HELLO body accepted before the handshake is done (a HELLO with a
#: client name and credentials is well under 1 KiB).
MAX_HELLO_BYTES = 8 * 1024
#: What one connection may buffer of a frame in progress without drawing on
#: the budget, once its handshake is done. Frames up to this size (header
#: included) never wait for budget.
FREE_BYTES = 64 * 1024
#: Returning at least this much at once (a large frame decoded, or dropped
#: with its connection) asks for the heap to be trimmed (``trim_heap``).
LARGE_RETURN = 512 * 1024


@attrs.frozen
class FrameBudgetStatistics:
    capacity: int
    #: Bytes granted now, to every holder together.
    used: int
    #: Connections holding some of the budget.
    holders: int
    #: Connections that stopped reading until budget comes back.
    waiting: int


class FrameBudget:
    """Bytes of incomplete frames, shared by all connections of a broker.

    Sessions ``take`` bytes for what has arrived and is not yet a frame,
    ``give`` them back once it is (or the connection ends), and ``wait``
    when they need more and none is left. A holder is any hashable object
    (a session), compared by identity.
    """

    def __init__(self, capacity: int, reserve: int) -> None:
        if capacity < 1 or reserve < 0 or reserve > capacity:
            raise ValueError(f"bad frame budget: capacity {capacity}, reserve {reserve}")
        self.capacity = capacity
        #: Kept for the oldest holder: enough to finish the largest frame.
        self.reserve = reserve
        self.used = 0
        # Holder -> bytes held, in the order they started holding: the
        # first is the oldest.
        self._held: dict[object, int] = {}
        self._waiting = 0
        self._returned = trio.Event()
        #: Bytes given back in amounts of at least LARGE_RETURN, ever: the
        #: server trims the heap when this grows (Server._trim_heap).
        self.large_returned = 0
        #: Set when ``large_returned`` grows; the trimmer replaces it once
        #: the returns so far are covered (an idle broker then has no timer
        #: waking it every second to look).
        self.large_return = trio.Event()

    def take(self, holder: object, want: int, *, optional: bool = False) -> int:
        """Grant up to ``want`` bytes at once (maybe fewer, maybe none).

        ``optional``: the holder could do without (a larger read than it
        needs); refused while anyone waits, so it cannot starve them.
        """
        if want <= 0 or (optional and self._waiting):
            return 0
        held = self._held
        room = self.capacity - self.used
        if held:
            oldest, oldest_holds = next(iter(held.items()))
            if oldest is not holder:
                # Everyone else together stays within capacity - reserve.
                room = min(room, self.capacity - self.reserve - (self.used - oldest_holds))
        grant = min(want, room)
        if grant <= 0:
            return 0
        held[holder] = held.get(holder, 0) + grant
        self.used += grant
        return grant

    def give(self, holder: object, amount: int) -> None:
        """Return ``amount`` of what ``holder`` holds."""
        if amount <= 0:
            return
        left = self._held.get(holder, 0) - amount
        if left < 0:
            raise ValueError(f"returning {amount} bytes, {holder!r} holds {left + amount}")
        if left:
            self._held[holder] = left
        else:
            del self._held[holder]  # no longer the oldest, if it was
        self.used -= amount
        if amount >= LARGE_RETURN:
            self.large_returned += amount
            self.large_return.set()
        if self._waiting:
            self._returned.set()
            self._returned = trio.Event()

    def release(self, holder: object) -> None:
        """Return everything ``holder`` holds (its connection is ending)."""
        held = self._held.get(holder, 0)
        if held:
            self.give(holder, held)

    def holds(self, holder: object) -> int:
        return self._held.get(holder, 0)

    @property
    def waiting(self) -> int:
        """Connections waiting for budget now."""
        return self._waiting

    async def wait(self) -> None:
        """Until some budget is given back."""
        self._waiting += 1
        try:
            await self._returned.wait()
        finally:
            self._waiting -= 1

    def statistics(self) -> FrameBudgetStatistics:
        return FrameBudgetStatistics(self.capacity, self.used, len(self._held), self._waiting)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_malloc_trim = _find_malloc_trim()


def trim_heap() -> bool:
    """Give the C heap's free pages back to the operating system.

    glibc keeps memory freed in the middle of its heap (and, after large
    blocks were freed, serves blocks up to their size from the heap rather
    than mmap), so the buffers of large frames, once freed, would stay in
    the broker's RSS. ``malloc_trim(0)`` returns them; it walks the heap,
    so it runs in a worker thread, and no more than once a second
    (Server._trim_heap). False where there is no such call (not glibc).
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
