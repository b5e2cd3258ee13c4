"""A storage shim that fails the way disks do, for the log's fault tests.

``FaultyOps`` sits where the segments call the file system
(``broker/storage/fileops.py``) and passes every call through until a test arms
a fault:

- ``fail_next(op, errno, after=N)``: the (N+1)th call of ``op`` from now
  raises OSError(errno) without doing anything;
- ``short_next(op, after=N)``: that call writes only part of its data for
  real, then returns the short count (what write(2) does when the disk
  fills up mid-write), and the calls after it raise ENOSPC until ``free()``;
- ``fill()`` / ``free()``: a full disk: every write raises ENOSPC (each
  after writing nothing) until freed.

Every call is counted per operation, so a test can assert what was tried.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Sequence

from pybroker.server.storage.fileops import FileOps

WRITES = ("write", "writev")


class FaultyOps(FileOps):
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._faults: dict[str, tuple[int, int, bool]] = {}  # op -> (calls left, errno, short)
        self.full = False
        #: Raised in place of the real fdatasync/fsync while set.
        self.sync_errno: int | None = None

    # -- arming -----------------------------------------------------------

    def fail_next(self, op: str, err: int = errno.EIO, *, after: int = 0) -> None:
        self._faults[op] = (after, err, False)

    def short_next(self, op: str = "writev", *, after: int = 0) -> None:
        self._faults[op] = (after, errno.ENOSPC, True)

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False
        self._faults.clear()

    def _fault(self, op: str) -> tuple[int, bool] | None:
        """(errno, short) if this call of ``op`` is to fail."""
        self.calls[op] += 1
        if self.full and op in WRITES:
            return errno.ENOSPC, False
        armed = self._faults.get(op)
        if armed is None:
            return None
        left, err, short = armed
        if left:
            self._faults[op] = (left - 1, err, short)
            return None
        del self._faults[op]
        if short:
            self.full = True  # what follows a short write on a full disk
        return err, short

    # -- the operations ---------------------------------------------------

    def write(self, fd: int, data: bytes) -> int:
        fault = self._fault("write")
        if fault is None:
            return os.write(fd, data)
        err, short = fault
        if short and len(data) > 1:
            return os.write(fd, data[: len(data) // 2])
        raise OSError(err, os.strerror(err))

    def writev(self, fd: int, buffers: Sequence[bytes]) -> int:
        fault = self._fault("writev")
        if fault is None:
            return os.writev(fd, buffers)
        err, short = fault
        data = b"".join(buffers)
        if short and len(data) > 1:
            # Part of the header and the batch reach the file: a torn batch
            # unless the log cuts it back off.
            return os.write(fd, data[: len(data) // 2])
        raise OSError(err, os.strerror(err))

    def fdatasync(self, fd: int) -> None:
        fault = self._fault("fdatasync")
        if fault is not None or self.sync_errno is not None:
            err = fault[0] if fault is not None else self.sync_errno
            assert err is not None
            raise OSError(err, os.strerror(err))
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        fault = self._fault("ftruncate")
        if fault is not None:
            raise OSError(fault[0], os.strerror(fault[0]))
        os.ftruncate(fd, size)

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
        fault = self._fault("open")
        if fault is not None:
            raise OSError(fault[0], os.strerror(fault[0]))
        return os.open(path, flags, mode)
