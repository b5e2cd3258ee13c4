"""One broker per data directory.

Two brokers appending to the same segment files would hand out the same
offsets for different messages and tear each other's batches. The store
takes an exclusive ``flock`` on ``DATA_DIR/LOCK`` for the life of the
process (the kernel drops it when the process dies, even by kill -9, so a
stale lock never needs cleaning up) and writes its PID into the file so the
second broker can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "LOCK"


class DataDirLocked(Exception):
    """Another process holds the data directory."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        holder = f" by process {pid}" if pid is not None else ""
        super().__init__(
            f"the data directory {directory} is in use{holder}: "
            "one broker per data directory (stop the other one, or use --data-dir)"
        )
        self.directory = directory
        self.pid = pid


class DataDirLock:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirLocked(self.directory, pid) from None
        except BaseException:
            os.close(fd)
            raise
        # Ours now: record who we are (informational; the flock is the lock).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            # Closing drops the flock; the file stays (removing it would
            # race with a broker that opened it a moment ago).
            os.close(self._fd)
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
