"""The log interface the server depends on, and nothing else.

A batch is stored exactly as it arrived on the wire (``count | crc |
records``), with the offsets and timestamp the broker assigned, so delivery
can hand the stored bytes on without re-encoding them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs

from pybroker.protocol import Durability

from .errors import StorageError


@attrs.frozen
class StoredBatch:
    base_offset: int
    count: int
    timestamp: int  # µs since the epoch, non-decreasing within a topic
    batch: bytes

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.count


@attrs.frozen
class SyncResult:
    """What one group-commit round made durable."""

    durability: Durability
    #: Topics whose fsync failed, with the offset their log was cut back to
    #: (every batch appended at or after it is gone) and the error.
    failed: Mapping[str, tuple[int, StorageError]] = attrs.field(factory=dict)
    #: Called by the committer once the round's results are released to
    #: the router (a store whose syncs overlap keeps a failed topic's
    #: appends refused until then: LogStore.sync_depth).
    on_released: Callable[[], None] | None = None


class TopicLog(Protocol):
    """One topic's append-only log. Synchronous: appends and reads must not
    block the event loop for long (file writes go to the OS page cache; fsync
    belongs in :meth:`LogStore.sync`)."""

    name: str
    #: Whether acknowledgements (and deliveries) wait for LogStore.sync.
    needs_sync: bool
    #: What an acknowledgement for this topic promises (after sync if needed).
    durability: Durability

    @property
    def first_offset(self) -> int:
        """The first offset still retained (== next_offset when empty)."""

    @property
    def next_offset(self) -> int:
        """The offset the next appended message will get."""

    @property
    def size_bytes(self) -> int:
        """Bytes the log holds now."""

    def append(self, batch: bytes, count: int, timestamp: int) -> int:
        """Store a checked batch of ``count`` messages; return its base offset.
        Raises StorageError, having stored nothing, when storage fails."""

    def read(self, offset: int, max_bytes: int) -> list[StoredBatch]:
        """Batches from the one containing ``offset`` on, in order, up to
        about ``max_bytes``: at least one while ``offset`` < next_offset, or
        DataLoss when the batch holding ``offset`` cannot be served (a hole,
        damage). An offset below first_offset reads from first_offset.
        Every batch returned is intact (its CRCs checked)."""

    def offset_at_time(self, timestamp: int) -> int:
        """The first offset whose timestamp is >= ``timestamp`` (next_offset
        when there is none)."""


class LogStore(Protocol):
    """All topic logs of one broker."""

    @property
    def durability(self) -> Durability:
        """What an acknowledgement means once :meth:`sync` has returned."""

    @property
    def needs_sync(self) -> bool:
        """True when acknowledgements must wait for :meth:`sync`."""

    def topic(self, name: str) -> TopicLog:
        """Open a topic's log, creating it if it does not exist."""

    def topic_names(self) -> list[str]:
        """Topics that already exist (recovered on start)."""

    def partition_count(self, name: str) -> int:
        """How many partitions topic ``name`` was created with (TOPICS
        create), when more than one; else 0 (a plain topic, or none)."""

    async def create_topic(self, name: str, partitions: int) -> bool:
        """TOPICS create: make ``name`` with ``partitions`` partitions (its
        partitions' logs are then opened with :meth:`topic`), saved for
        restarts; False when it exists so already. ValueError when it
        exists otherwise (partitions.check_partitions)."""

    async def delete_topic(self, name: str) -> TopicLog | None:
        """Take a topic out of the store (a later ``topic(name)`` starts a
        new, empty log); None if there is none. Its files go with
        :meth:`discard`, which must follow. A local store does it without
        a checkpoint (no append comes between); a cluster's awaits etcd."""

    async def discard(self, log: TopicLog) -> None:
        """Close and remove a log :meth:`delete_topic` took out."""

    async def set_topic(self, name: str, changes: Mapping[str, str]) -> Any:
        """Change a topic's retention or segment size while running, saved
        for restarts; the new settings. A partitioned topic's name changes
        every one of its partitions. KeyError for no such topic,
        ValueError for what cannot be set so."""

    async def purge(self, log: TopicLog, keep_from: int) -> int:
        """Remove a topic's messages before the batch holding ``keep_from``
        (all of them at or past its end), durably; the new first offset."""

    async def sync(self) -> SyncResult:
        """Return once every batch appended before the call to a topic that
        needs sync is durable (group commit: one sync covers all), or has
        been rolled back because its sync failed (``SyncResult.failed``)."""

    @property
    def problem(self) -> str | None:
        """Why storage is degraded (appends failing), or None."""

    async def probe(self) -> None:
        """While degraded, check whether storage works again."""

    @property
    def sync_interval(self) -> float | None:
        """Seconds between :meth:`sync_interval_topics` calls, or None."""

    @property
    def sync_depth(self) -> int:
        """Calls of :meth:`sync` the committer may have in flight at once
        (1: one at a time). With more, it releases their results in call
        order, and the store must keep a later call's failures from
        covering batches appended after an earlier one's cut (by refusing
        a failed topic's appends until ``SyncResult.on_released``)."""

    async def sync_interval_topics(self) -> None:
        """fsync what ``interval`` topics appended since the last call."""

    def enforce_retention(self) -> int:
        """Delete what retention allows; return how many segments went."""

    def close(self) -> None:
        """Release files; the store is not used afterwards."""
