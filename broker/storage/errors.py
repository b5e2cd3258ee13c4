"""What the log says when it cannot do what was asked.

Two kinds, told apart because callers answer them differently:

- :class:`StorageError`: an append (or the fsync covering it) failed. The
  log has rolled back to its last complete batch, nothing was stored, and
  the publisher gets a per-request error (``STORAGE_FULL`` when the disk or
  a quota is full, ``STORAGE_ERROR`` otherwise), never an acknowledgement.
- :class:`DataLoss`: a read reached offsets that cannot be served: removed
  by retention, damaged on disk, or missing. The reader reports the range
  (DATA_LOST) and goes on after it; no damaged byte is ever handed out.

And one signal that is neither: :class:`ReadPending`, "not yet". A cluster
node's read below its in-memory copy starts fetching those batches from the
object store and raises it; a caller that can wait (a subscription catching
up, broker/session/outbox.py) asks to be woken when they are there and
reads again. It is a DataLoss for the rest, so a caller that cannot wait
reports the range as it always did (lost to retention), never blocks.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Literal, Protocol

from pybroker.protocol import ErrorCode

#: errnos that mean "no room": a full file system, a quota, a file-size limit.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

LossReason = Literal["retention", "damaged", "missing"]


class StorageError(Exception):
    """An append or sync failed; nothing of that batch is stored."""

    def __init__(self, message: str, *, full: bool, topic: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.full = full
        self.topic = topic

    @property
    def code(self) -> ErrorCode:
        return ErrorCode.STORAGE_FULL if self.full else ErrorCode.STORAGE_ERROR

    def fields(self, topic: str) -> dict[str, str]:
        """The ERROR frame's fields for a PUBLISH to ``topic`` it refused."""
        return {"topic": topic}

    @staticmethod
    def from_os(exc: OSError, what: str, topic: str = "") -> StorageError:
        full = exc.errno in FULL_ERRNOS
        reason = exc.strerror or str(exc)
        prefix = "storage full" if full else "storage error"
        return StorageError(f"{prefix}: {what}: {reason}", full=full, topic=topic)


class NotOwnerError(StorageError):
    """Cluster mode: this node does not own the topic's partition (or lost
    it before the batch was committed); nothing was stored. ``owner`` is the
    owner's ``host:port``, or "" while the partition has none; ``owner_url``
    the URL of its HTTP side, when it has one."""

    def __init__(self, message: str, *, topic: str = "", owner: str = "", owner_url: str = "") -> None:
        super().__init__(message, full=False, topic=topic)
        self.owner = owner
        self.owner_url = owner_url

    @property
    def code(self) -> ErrorCode:
        return ErrorCode.NOT_OWNER

    def fields(self, topic: str) -> dict[str, str]:
        found = {"topic": topic}
        if self.owner:
            found["owner"] = self.owner
        if self.owner_url:
            found["owner_url"] = self.owner_url
        return found


class DataLoss(Exception):
    """Offsets ``first..last`` (inclusive) of ``topic`` cannot be read."""

    def __init__(self, topic: str, first: int, last: int, reason: LossReason) -> None:
        super().__init__(f"topic {topic}: offsets {first}..{last} are lost ({reason})")
        self.topic = topic
        self.first = first
        self.last = last
        self.reason: LossReason = reason

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def fields(self) -> dict[str, str]:
        """The ERROR frame's fields for DATA_LOST (protocol.md, "ERROR")."""
        return {
            "topic": self.topic,
            "first": str(self.first),
            "last": str(self.last),
            "reason": self.reason,
        }

    def describe(self) -> str:
        why = {
            "retention": "were removed by retention before delivery",
            "damaged": "are damaged on disk and were set aside",
            "missing": "are missing from the log",
        }[self.reason]
        return f"topic {self.topic}: offsets {self.first}..{self.last} {why}"


class Waitable(Protocol):
    """Something a reader waits for without blocking: ``notify(wake)`` calls
    ``wake()`` once, when it is done (at once if it already is). Asking
    again with an equal callable before then does not add a second call."""

    def notify(self, wake: Callable[[], None]) -> None: ...


class ReadPending(DataLoss):
    """Offsets ``first..last`` of ``topic`` are being fetched (cluster mode: a
    read below the node's in-memory copy); read again once ``waitable``
    says so. Raised instead of blocking, as ``TopicLog.read`` is
    synchronous. Callers that cannot wait see a DataLoss (retention), which
    is what such a read answered before it could be fetched."""

    def __init__(self, topic: str, first: int, last: int, waitable: Waitable) -> None:
        super().__init__(topic, first, last, "retention")
        self.waitable = waitable

    def notify(self, wake: Callable[[], None]) -> None:
        self.waitable.notify(wake)
