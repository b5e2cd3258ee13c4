"""The file operations the log uses, in one replaceable object.

Segments call these instead of ``os`` directly so that tests can put a
shim in between that fails the Nth write or fsync, or writes short, the way
a full or failing disk does (tests/helpers/faults.py). The real object is a thin
pass-through: one attribute lookup per call, nothing per message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class FileOps:
    """Pass-through to ``os``; subclass to inject faults."""

    def open(self, path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def writev(self, fd: int, buffers: Sequence[bytes]) -> int:
        return os.writev(fd, buffers)

    def pread(self, fd: int, size: int, position: int) -> bytes:
        return os.pread(fd, size, position)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)


REAL = FileOps()


def write_all(ops: FileOps, fd: int, data: bytes) -> None:
    """One write that must complete: a short write is an error (ENOSPC)."""
    written = ops.write(fd, data)
    if written != len(data):
        raise OSError(28, f"short write ({written} of {len(data)} bytes)")  # ENOSPC


def fsync_dir(path: str | os.PathLike[str], ops: FileOps = REAL) -> None:
    """Make a directory's new or removed entries durable."""
    fd = ops.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ops.fsync(fd)
    finally:
        ops.close(fd)


def replace_durably(path: str | os.PathLike[str], data: bytes, ops: FileOps = REAL) -> None:
    """Put ``data`` at ``path`` so that a crash leaves the old file or the
    new one, never part of it: a temporary file beside it, written and
    fsynced, renamed over it, and the directory fsynced. OSError if any
    step fails (the old file then stands)."""
    target = os.fspath(path)
    tmp = target + ".tmp"
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(ops, fd, data)
        ops.fsync(fd)
    finally:
        ops.close(fd)
    os.replace(tmp, target)
    fsync_dir(os.path.dirname(target) or ".", ops)
