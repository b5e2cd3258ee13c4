"""The schedule: delayed batches in due order, released into their topics.

Memory: the set of bucket keys (one int per non-empty bucket), and the
entries of the one bucket whose time has come (loaded when its first due
time passes, released in due order, then its file removed). Scheduling a
batch for a bucket that is not loaded only appends to that bucket's file.

Releasing an entry publishes its batch to its topic through the broker core
(a new offset, delivered to subscribers and groups like any publish, with
DEDUP if the publisher asked for it). Once those publishes are durable (as
their topics promise), a release note goes to the bucket file, so a restart
does not release them again; a crash between the two releases them again
(at-least-once; with DEDUP the topic's msg-id window stores them once).

Durability of scheduling: appends are written to the OS at once; ``sync``
(run by the committer in the same round as the topics' fsync, so one wait
covers both) fsyncs the buckets written since the last round. A delayed
PUBLISH to a topic with fsync ``always`` is acknowledged after that round,
like any other.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..logs import get_logger
from ..router import Held
from ..storage import StorageError
from .buckets import Buckets, Entry, encode_entry, encode_released, scan

#: Width of a bucket: due times within it share a file.
DEFAULT_BUCKET_MS = 10_000
#: Entries released per round (each round ends with one wait for durability
#: and one release note).
RELEASE_ROUND = 1000
#: After a failed release (storage full, say), try that entry again this much later.
RETRY_MS = 1000

#: Publish one entry's batch to its topic: an object ``durable`` can wait for.
Release = Callable[[Entry], Any]
Durable = Callable[[Any], Awaitable[Any]]


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Schedule:
    def __init__(
        self,
        buckets: Buckets,
        *,
        width_ms: int = DEFAULT_BUCKET_MS,
        clock: Callable[[], int] = wall_ms,
    ) -> None:
        self.buckets = buckets
        self.width_ms = width_ms
        #: Wall-clock milliseconds (a test may pass its own clock).
        self.clock = clock
        self.logger: Any = get_logger(component="delays")
        #: Buckets with entries that are not loaded: a heap of their keys.
        self._waiting: list[int] = []
        self._known: set[int] = set()
        #: The bucket being released, and its unreleased entries as a heap
        #: of (due_ms, position, entry).
        self._current: int | None = None
        self._due: list[tuple[int, int, Entry]] = []
        #: Entries scheduled (not yet released), for metrics.
        self.pending = 0
        self.released = 0
        #: Buckets whose torn tail the last recover() cut off, and damaged
        #: records it skipped.
        self.cut_at_recovery = 0
        self.damaged_at_recovery = 0
        #: Buckets written since the last sync, and the helds waiting for it.
        self._dirty: set[int] = set()
        self._helds: list[tuple[int, int, Held]] = []
        self._wake = trio.Event()

    # -- starting -------------------------------------------------------------

    def recover(self) -> int:
        """Find the stored buckets, cut torn tails, count what is pending
        (damaged records skipped, counted and logged). Reads every bucket
        once (start-up cost proportional to what is scheduled); keeps none
        of it."""
        cut = 0
        damaged = 0
        for bucket in self.buckets.keys():
            found = scan(bucket, self.buckets.read(bucket))
            damaged += found.damaged
            if found.end < self.buckets.size(bucket):
                self.buckets.truncate(bucket, found.end)
                cut += 1
            if not found.entries:
                self.buckets.remove(bucket)
                continue
            self.pending += len(found.entries)
            self._add_key(bucket)
        self.cut_at_recovery = cut
        self.damaged_at_recovery = damaged
        if damaged:
            # Each a delayed batch (or a release note) lost to damage; the
            # records around it are kept.
            self.logger.warning("damaged delayed-delivery records skipped", records=damaged)
        if self.pending or cut:
            self.logger.info("delayed batches recovered", pending=self.pending, buckets=len(self._known), cut=cut)
        return self.pending

    def _add_key(self, bucket: int) -> None:
        if bucket not in self._known:
            self._known.add(bucket)
            heapq.heappush(self._waiting, bucket)

    # -- scheduling -----------------------------------------------------------

    def add(self, due_ms: int, topic: str, batch: bytes, dedup: bool, held: Held | None) -> None:
        """Store a delayed batch. Raises StorageError (nothing stored) when
        the write fails. ``held``: the acknowledgement waits for the next
        sync; marked with the error if that sync fails."""
        bucket = due_ms - due_ms % self.width_ms
        record = encode_entry(due_ms, topic, batch, dedup)
        try:
            position = self.buckets.append(bucket, record)
        except OSError as exc:
            raise StorageError.from_os(exc, "scheduling a delayed batch", topic) from None
        self.pending += 1
        self._dirty.add(bucket)
        if held is not None:
            self._helds.append((bucket, position, held))
        if bucket == self._current:
            heapq.heappush(self._due, (due_ms, position, Entry(bucket, position, due_ms, topic, batch, dedup)))
        else:
            self._add_key(bucket)
        self._wake.set()

    async def sync(self) -> None:
        """fsync what was scheduled since the last call (the committer's
        round). On failure the batches it was to cover are refused
        (``Held.error``) and marked done in their buckets, never released."""
        if not self._dirty:
            return
        dirty, self._dirty = sorted(self._dirty), set()
        helds, self._helds = self._helds, []
        if not self.buckets.durable:
            return
        try:
            await trio.to_thread.run_sync(self.buckets.sync, dirty)
        except OSError as exc:
            error = StorageError.from_os(exc, "fsync of delayed batches")
            self.logger.error("fsync of delayed batches failed; they are refused", error=str(exc))
            self._roll_back(helds, error)

    def _roll_back(self, helds: list[tuple[int, int, Held]], error: StorageError) -> None:
        """Refuse the batches a failed fsync was to cover: a note marks them
        done, so they are never released (the other entries of their buckets,
        already synced or not waiting for a sync, stay)."""
        refused: dict[int, list[int]] = {}
        for bucket, position, held in helds:
            held.error = error
            refused.setdefault(bucket, []).append(position)
        for bucket, positions in refused.items():
            self.pending -= len(positions)
            if bucket == self._current:
                gone = set(positions)
                self._due = [d for d in self._due if d[1] not in gone]
                heapq.heapify(self._due)
            # If this write fails too, a restart may release them after all.
            self._note(bucket, positions)

    # -- releasing ------------------------------------------------------------

    def next_due(self) -> int | None:
        """When the schedule next has work (ms), or None when it is empty."""
        if self._due:
            return self._due[0][0]
        if self._current is not None:
            return self._current + self.width_ms
        if self._waiting:
            return self._waiting[0]
        return None

    def _load(self, bucket: int) -> None:
        found = scan(bucket, self.buckets.read(bucket))
        self._current = bucket
        self._due = [(e.due_ms, e.position, e) for e in found.entries]
        heapq.heapify(self._due)

    async def run(self, release: Release, durable: Durable, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Release entries as they fall due, forever."""
        task_status.started()
        while True:
            await self.step(release, durable)
            wake_at = self.next_due()
            now = self.clock()
            if wake_at is not None and wake_at <= now:
                await trio.lowlevel.checkpoint()
                continue
            self._wake = trio.Event()
            with trio.move_on_after(math.inf if wake_at is None else (wake_at - now) / 1000):
                await self._wake.wait()

    async def step(self, release: Release, durable: Durable) -> int:
        """Release what is due now (one round of at most RELEASE_ROUND
        entries, after any buckets found finished); how many were released."""
        while True:
            now = self.clock()
            if self._current is None:
                if not self._waiting or self._waiting[0] > now:
                    return 0
                due_bucket = heapq.heappop(self._waiting)
                self._known.discard(due_bucket)
                self._load(due_bucket)
            current = self._current
            assert current is not None
            if not self._due and now >= current + self.width_ms:
                self._finish(current)
                continue
            return await self._round(current, now, release, durable)

    async def _round(self, bucket: int, now: int, release: Release, durable: Durable) -> int:
        round_: list[tuple[Entry, Any]] = []
        retry: list[tuple[int, int, Entry]] = []
        while self._due and self._due[0][0] <= now and len(round_) < RELEASE_ROUND:
            _, _, entry = heapq.heappop(self._due)
            try:
                round_.append((entry, release(entry)))
            except Exception as exc:  # a refusal (storage full, a bad topic): try again later
                self.logger.warning("delayed batch not released yet", topic=entry.topic, error=str(exc))
                retry.append((now + RETRY_MS, entry.position, entry))
        done: list[int] = []
        for entry, published in round_:
            try:
                await durable(published)
                done.append(entry.position)
            except Exception as exc:  # its fsync failed: rolled back in its topic
                self.logger.warning("delayed batch not released yet", topic=entry.topic, error=str(exc))
                retry.append((now + RETRY_MS, entry.position, entry))
        for item in retry:
            heapq.heappush(self._due, item)
        if done:
            self.pending -= len(done)
            self.released += len(done)
            if not self._due and now >= bucket + self.width_ms:
                self._finish(bucket)
            else:
                self._note(bucket, done)
        return len(done)

    def _note(self, bucket: int, positions: list[int]) -> None:
        """Mark entries done (released, or refused): a restart skips them."""
        try:
            self.buckets.append(bucket, encode_released(positions))
            self._dirty.add(bucket)
        except OSError as exc:
            # Without the note a restart releases them again (at-least-once).
            self.logger.warning("release note not written", bucket=bucket, error=str(exc))

    def _finish(self, bucket: int) -> None:
        """Every entry of the bucket is in its topic: the file goes."""
        self._current = None
        self._due = []
        self._dirty.discard(bucket)
        self._helds = [h for h in self._helds if h[0] != bucket]
        try:
            self.buckets.remove(bucket)
        except OSError as exc:
            self.logger.warning("released bucket not removed", bucket=bucket, error=str(exc))
