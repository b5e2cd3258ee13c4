"""How much a connection may read: its share of the frame budget.

Input is bounded (protocol.md, "Limits", "Frames in progress"): each read is
sized so that what the connection holds of a frame not yet complete stays
within its free allowance plus what it holds of the broker-wide budget
(broker/framebudget.py); a frame that needs more waits for budget.
"""

from __future__ import annotations

import fcntl
import struct
import termios
import trio

from pybroker.protocol import Connection

from ..framebudget import FREE_BYTES, FrameBudget

#: The largest read; smaller ones while a connection may hold less of a
#: frame in progress.
RECEIVE_SIZE = 256 * 1024
#: A read over plain TCP takes twice what the kernel holds, at least this
#: and at most RECEIVE_SIZE: room for what arrives meanwhile, and a buffer
#: the allocator serves from its heap. A RECEIVE_SIZE buffer for every read
#: was over malloc's mmap threshold (128 KiB): an mmap, an mremap, a munmap
#: and fresh zeroed pages per read.
SMALL_READ = 64 * 1024
#: Over TLS a frame in progress past its free allowance grows by a TLS
#: record's worth per read (ReadSizer.size).
TLS_GROW = 16 * 1024
_FIONREAD = struct.Struct("i")


class ReadSizer:
    def __init__(self, stream: trio.abc.Stream, conn: Connection, budget: FrameBudget) -> None:
        self.conn = conn
        self.budget = budget
        #: Set when a read waited for budget: that was not the peer's
        #: silence (the session restarts its idle clock and clears it).
        self.waited = False
        #: Bytes of the broker-wide budget this connection holds.
        self.held = 0
        #: The reader waits for frame budget (backpressure); for tests.
        self.waiting = False
        # Plain TCP: the kernel says how many bytes are there to read.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1

    async def next_size(self) -> int:
        """The size of the next read of an open connection."""
        # What this connection may still buffer: its free allowance plus the
        # budget it holds, less what it has.
        room = FREE_BYTES + self.held - self.conn.buffered_bytes
        if self._fd >= 0 or room <= 0:
            return await self._size(room)
        return room

    async def _size(self, room: int) -> int:
        """``room`` is what the free allowance and the budget this
        connection holds leave; beyond it, budget.

        Over plain TCP budget is taken only once bytes are waiting (FIONREAD;
        if none, it waits for some first), so none is held for a peer that
        is not sending, and what the read does not use goes back as soon as
        it returns (``keep``). A read takes twice the kernel's count (at
        least SMALL_READ, at most RECEIVE_SIZE): the count at one instant
        alone would cut bursts into small reads. A frame in
        progress past its allowance (``room`` 0) waits for budget when there
        is none; a read that could make do with ``room`` takes budget only
        if it is spare.
        """
        conn = self.conn
        while True:
            if self._fd >= 0:
                arrived = self._arrived()
                if arrived == 0:
                    await trio.lowlevel.wait_readable(self._fd)
                    arrived = self._arrived()
                    if arrived == 0:
                        return max(room, 1)  # end of stream or an error: the read says which
                want = min(RECEIVE_SIZE, max(SMALL_READ, 2 * arrived))
            elif room > 0:
                return room
            else:
                # TLS: the kernel's count says nothing of the records the
                # TLS layer holds, and a read returns one record at most, so
                # a frame past its allowance grows a record at a time (held
                # while the record arrives).
                want = TLS_GROW
            if room > 0:
                if want <= room:
                    return room
            elif self.budget.waiting:
                # Others wait: at most the rest of this frame plus what the
                # next one may have without budget, so that once this frame
                # is decoded the connection holds nothing and goes to the
                # back of the queue of holders (not always: that would keep
                # reads a frame long).
                want = min(want, conn.frame_remaining + FREE_BYTES)
            got = self.budget.take(self, want - room, optional=room > 0)
            if got:
                self.held += got
                return room + got
            if room > 0:
                return room
            self.waiting = True
            try:
                await self.budget.wait()
            finally:
                self.waiting = False
            self.waited = True

    def _arrived(self) -> int:
        """Bytes the kernel holds for this connection to read (FIONREAD); 0
        on an error, which the read that follows reports."""
        try:
            answer = fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        count: int = _FIONREAD.unpack(answer)[0]
        return count

    def keep(self) -> None:
        """Keep what the buffered bytes need beyond the free allowance and
        give the rest back (after each read and its frames)."""
        if not self.held:
            return
        keep = self.conn.buffered_bytes - FREE_BYTES
        if keep < self.held:
            keep = max(keep, 0)
            self.budget.give(self, self.held - keep)
            self.held = keep

    def release(self) -> None:
        """The connection ends: whatever is half-sent goes now, its memory
        and its budget to the connections waiting for some."""
        self.budget.release(self)
        self.held = 0
        self.conn.discard_received()
