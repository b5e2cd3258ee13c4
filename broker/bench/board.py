"""The progress board: counters shared by `pybroker bench` and its load processes.

A small file mapped into every process (``mmap``): one slot of a few signed
64-bit fields per connection. Load processes write their own slots as they
go (one ``pack_into`` per batch, cheap); the parent reads them to show
progress, to see when everyone is ready or done, and writes the control
slot to stop or resume them. Final, verified results travel as JSON on each
process's stdout; the board is only for watching.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

_FIELD = struct.Struct("<q")
FIELDS_PER_SLOT = 4

# Fields of a slot.
STATE = 0
COUNT = 1  # messages received (subscriber) or sent (publisher) or connections opened
ACKED = 2  # messages acknowledged (publisher)
EXTRA = 3  # per-role: first error code, lagging flag...

# States.
STARTING = 0
READY = 1  # subscribed / connected; waiting for load
RUNNING = 2  # publisher: about to send the first message
DONE = 3
FAILED = 4

#: Slot 0 is the parent's: its fields are commands.
CONTROL = 0
STOP = 1  # field of slot 0: load processes stop now (abort)
RESUME = 2  # field of slot 0: a stalled subscriber resumes reading
CLOSE = 3  # field of slot 0: idle connections close


class Board:
    def __init__(self, path: str | Path, slots: int, *, create: bool = False) -> None:
        self.path = Path(path)
        self.slots = slots
        size = slots * FIELDS_PER_SLOT * _FIELD.size
        if create:
            self.path.write_bytes(b"\0" * size)
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)

    def get(self, slot: int, field: int) -> int:
        value: int = _FIELD.unpack_from(self._map, (slot * FIELDS_PER_SLOT + field) * 8)[0]
        return value

    def set(self, slot: int, field: int, value: int) -> None:
        _FIELD.pack_into(self._map, (slot * FIELDS_PER_SLOT + field) * 8, value)

    def command(self, field: int) -> bool:
        return self.get(CONTROL, field) != 0

    def close(self) -> None:
        self._map.close()
