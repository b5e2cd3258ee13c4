"""The durable log: per topic, a directory of segment files.

Layout: ``DATA_DIR/topics/<quoted topic name>/<base offset>.log`` (+
``.index``, ``.timeindex``); ``DATA_DIR/LOCK`` (one broker per directory);
``DATA_DIR/quarantine/`` (damaged bytes recovery set aside). Appends are
plain ``writev`` calls (to the OS page cache, cheap enough for the event
loop); fsyncs run in a worker thread from :meth:`FileStore.sync`, driven by
the server's committer (group commit).

When storage fails (README, "Durability"): an append that fails is rolled
back and refused (:class:`~.errors.StorageError`); an fsync that fails rolls
its segment back to the last good sync and the batches it would have covered
are refused, never acknowledged; the store reports itself degraded
(:attr:`FileStore.problem`) until a write succeeds again, and probes the disk
meanwhile so that publishing resumes by itself when space returns.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import attrs
import trio

from pybroker.protocol import Durability, partition_of, partition_topic, topic_error

from ..logs import get_logger
from ..stats import Histogram
from .base import StoredBatch, SyncResult, TopicLog
from .errors import DataLoss, LossReason, StorageError
from .fileops import REAL, FileOps, fsync_dir, replace_durably
from .lock import DataDirLock
from .partitions import PartitionCounts, check_partitions
from .recovery import Finding, Hole, TopicRecovery
from .segment import Damage, Segment, SyncMark
from .settings import SettingsResolver, TopicSettings, parse_runtime_settings
from .syncthread import SyncThread

_DURABILITY = {"always": Durability.DISK, "interval": Durability.OS, "never": Durability.OS}
#: Seconds between log lines about the same kind of storage failure.
FAILURE_LOG_SECONDS = 10.0
#: Seconds between checks of the free space (--min-free-bytes).
FREE_CHECK_SECONDS = 0.5
PROBE_FILE = ".write-probe"


class FileTopicLog:
    def __init__(self, store: FileStore, name: str, directory: Path, settings: TopicSettings) -> None:
        self.store = store
        self.name = name
        self.directory = directory
        self.settings = settings
        self.segments: list[Segment] = []
        self.bases: list[int] = []
        #: Offsets between segments that the log does not hold, and why.
        self.holes: list[Hole] = []
        self.needs_sync = settings.fsync == "always"
        self.durability = _DURABILITY[settings.fsync]
        #: Offsets below this were purged (TOPICS purge); saved in START.
        self.start = 0

    @classmethod
    def create(cls, store: FileStore, name: str, directory: Path, settings: TopicSettings) -> FileTopicLog:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError.from_os(exc, f"creating topic directory {directory.name}", name) from exc
        log = cls(store, name, directory, settings)
        log.add_segment(log._new_segment(0))
        # Both the topic's directory (in topics/) and its first segment (in
        # the topic's directory) are new entries a DISK ack depends on.
        store.new_entry(directory.parent)
        store.new_entry(directory)
        return log

    @classmethod
    def recover(
        cls, store: FileStore, name: str, directory: Path, settings: TopicSettings
    ) -> tuple[FileTopicLog, list[Finding]]:
        log = cls(store, name, directory, settings)
        findings = TopicRecovery(log).run()
        log.start = min(read_start(directory), log.next_offset)
        return log, findings

    def _new_segment(self, base: int) -> Segment:
        return Segment.create(
            self.directory, base, topic=self.name, ops=self.store.ops, on_damage=self.store.note_damage
        )

    def add_segment(self, seg: Segment) -> None:
        self.segments.append(seg)
        self.bases.append(seg.base_offset)

    # -- the TopicLog interface ---------------------------------------------

    @property
    def first_offset(self) -> int:
        base = self.segments[0].base_offset
        return self.start if self.start > base else base

    @property
    def next_offset(self) -> int:
        return self.segments[-1].next_offset

    @property
    def last_timestamp(self) -> int:
        for seg in reversed(self.segments):
            if seg.batches:
                return seg.last_timestamp
        return 0

    @property
    def size_bytes(self) -> int:
        return sum(seg.size for seg in self.segments)

    def append(self, batch: bytes, count: int, timestamp: int) -> int:
        """Store a checked batch; StorageError (nothing stored) if that fails."""
        store = self.store
        try:
            store.check_room(self.name)
            active = self.segments[-1]
            if active.size >= self.settings.segment_bytes and active.batches:
                active = self._roll()
            base = active.next_offset
            active.append(batch, count, timestamp)
        except StorageError as exc:
            store.failed(exc)
            raise
        store.appended(self, active)
        return base

    def append_many(self, batches: list[bytes], counts: list[int], start: int, timestamp: int) -> int:
        """Store ``batches[start:]`` in the active segment with one write, as
        many as it takes before it would roll (at least one): the log, its
        segments and indexes are what as many :meth:`append` calls would
        leave. Returns how many it stored; StorageError having stored none.

        A failure is reported to the store once, as the failed append of
        the first of them (what appending them one by one would have met
        first); the caller refuses that one and appends the rest one by one
        (each stored, or refused and counted, as before), so that exactly
        the batches not stored are refused."""
        store = self.store
        try:
            store.check_room(self.name)
            active = self.segments[-1]
            if active.size >= self.settings.segment_bytes and active.batches:
                active = self._roll()
            stored = active.append_many(batches, counts, start, timestamp, self.settings.segment_bytes)
        except StorageError as exc:
            store.failed(exc)
            raise
        store.appended(self, active)
        return stored

    def _roll(self) -> Segment:
        seg = self._new_segment(self.next_offset)
        self.add_segment(seg)
        self.store.new_entry(self.directory)
        return seg

    def read(self, offset: int, max_bytes: int) -> list[StoredBatch]:
        """Intact batches from the one holding ``offset`` (at least one while
        offset < next_offset); DataLoss when that offset is in a hole or a
        damaged batch."""
        if offset >= self.next_offset:
            return []
        offset = max(offset, self.first_offset)
        i = bisect.bisect_right(self.bases, offset) - 1
        seg = self.segments[i]
        if offset >= seg.next_offset:
            # Between this segment's end and the next one's base: a hole.
            end = self.segments[i + 1].base_offset - 1
            raise DataLoss(self.name, offset, end, self._hole_reason(offset))
        return seg.read(offset, max_bytes)

    def _hole_reason(self, offset: int) -> LossReason:
        for hole in self.holes:
            if hole.first <= offset <= hole.last:
                return hole.reason
        return "missing"

    def offset_at_time(self, timestamp: int) -> int:
        for seg in self.segments:
            found = seg.offset_at_time(timestamp)
            if found is not None:
                return max(found, self.first_offset)
        return self.next_offset

    # -- purging ------------------------------------------------------------

    def purge(self, keep_from: int) -> tuple[int, list[Segment]]:
        """Drop every batch before the one holding ``keep_from`` (all of
        them at or past the end): whole segments go, the new first offset is
        saved in START before anything is deleted. Returns the new first
        offset and the segments to delete (their files: the caller's, once
        no fsync is using them)."""
        keep_from = min(keep_from, self.next_offset)
        if keep_from <= self.first_offset:
            return self.first_offset, []
        if keep_from < self.next_offset:
            try:
                holding = self.read(keep_from, 1)
            except DataLoss:
                holding = []  # in a hole: keep from the hole on
            if holding and holding[0].base_offset < keep_from:
                keep_from = max(holding[0].base_offset, self.first_offset)  # batches are not split
        elif self.segments[-1].batches:
            self._roll()  # the new, empty active segment starts at the end
        write_start(self.directory, keep_from, self.store.ops)
        self.start = keep_from
        removed: list[Segment] = []
        while len(self.segments) > 1 and self.segments[0].next_offset <= keep_from:
            removed.append(self.segments.pop(0))
            self.bases.pop(0)
        if removed:
            self.holes = [h for h in self.holes if h.last >= self.first_offset]
        return keep_from, removed

    # -- faults -------------------------------------------------------------

    def rollback_unsynced(self, seg: Segment) -> int:
        """After ``seg``'s fsync failed: cut the topic back to what its last
        good sync covered (later segments, all unsynced, are removed); return
        the topic's next offset. Raises StorageError if the cut itself fails
        (the segment then refuses appends until it can be repaired)."""
        i = self.segments.index(seg)
        for later in self.segments[i + 1 :]:
            later.delete()
        if len(self.segments) > i + 1:
            del self.segments[i + 1 :], self.bases[i + 1 :]
            self.store.new_entry(self.directory)
        seg.rollback_to_synced()
        return self.next_offset

    # -- retention --------------------------------------------------------

    def enforce_retention(self, now_us: int) -> list[Segment]:
        """Delete whole old segments past the topic's limits; never the active one."""
        removed: list[Segment] = []
        max_bytes = self.settings.retention_bytes
        max_age = self.settings.retention_seconds
        total = self.size_bytes
        while len(self.segments) > 1:
            oldest = self.segments[0]
            too_big = max_bytes is not None and total > max_bytes
            too_old = max_age is not None and oldest.last_timestamp < now_us - max_age * 1_000_000
            if not (too_big or too_old):
                break
            total -= oldest.size
            self.segments.pop(0)
            self.bases.pop(0)
            removed.append(oldest)
        if removed:
            self.holes = [h for h in self.holes if h.last >= self.first_offset]
        return removed

    def close(self) -> None:
        for seg in self.segments:
            seg.close()


class FileStore:
    """Every topic's log under ``data_dir``; recovers them when opened.

    ``ops`` is the file layer segments write through (tests pass a faulty
    one); ``min_free_bytes`` refuses appends (STORAGE_FULL) once the file
    system has less free space than that, before it is completely full.
    """

    def __init__(
        self,
        data_dir: Path,
        settings: SettingsResolver | Callable[[str], TopicSettings] | None = None,
        *,
        ops: FileOps = REAL,
        min_free_bytes: int = 0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.topics_dir = self.data_dir / "topics"
        #: Deleted topics on their way out (emptied on start, too).
        self.trash_dir = self.data_dir / "trash"
        self.quarantine_dir = self.data_dir / "quarantine"
        self.settings_for = settings or SettingsResolver()
        self.ops = ops
        self.min_free_bytes = min_free_bytes
        self.logger = get_logger(component="log")
        self._topics: dict[str, FileTopicLog] = {}
        self._dirty_always: set[Segment] = set()
        self._dirty_interval: set[Segment] = set()
        self._dirs_to_sync: set[Path] = set()
        self._syncing = 0
        # One sync at a time: an "always" round must not acknowledge while a
        # directory entry it depends on is still being synced by an
        # "interval" round in another thread.
        self._sync_lock = trio.StrictFIFOLock()
        # Where the rounds' fsyncs run: one thread for the store's lifetime,
        # not a worker thread handed each round (broker/storage/syncthread.py).
        self._sync_thread = SyncThread()
        self.fsyncs = 0
        #: Seconds per fsync round (worker thread hand-off included).
        self.fsync_seconds = Histogram()
        #: What recovery changed (torn tails cut, damage set aside).
        self.findings: list[Finding] = []
        #: Appends refused and fsyncs failed, by kind ("full", "io"); damaged
        #: batches found by reads (GET /metrics).
        self.storage_errors: dict[str, int] = {"full": 0, "io": 0}
        self.fsync_failures = 0
        self.damaged_batches = 0
        #: Why the store is degraded (GET /readyz), None when it is not.
        self.problem: str | None = None
        self._last_failure_log: dict[str, float] = {}
        self._next_free_check = 0.0
        self._low_on_space = False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = DataDirLock(self.data_dir)
        self._lock.acquire()  # before recovery touches a file
        try:
            self.topics_dir.mkdir(parents=True, exist_ok=True)
            # What a deletion interrupted by a crash left behind.
            shutil.rmtree(self.trash_dir, ignore_errors=True)
            self._changed = read_changed_settings(self.data_dir / SETTINGS_FILE)
            self._partitions = PartitionCounts()
            self._recover()
        except BaseException:
            self._lock.release()
            raise

    @property
    def truncations(self) -> list[Finding]:
        """Recovery's findings (the name of the first versions)."""
        return self.findings

    def _recover(self) -> None:
        started = time.monotonic()
        for directory in sorted(p for p in self.topics_dir.iterdir() if p.is_dir()):
            name = unquote(directory.name)
            if topic_error(name) is not None:
                self.logger.warning("ignoring a directory that is not a topic", path=str(directory))
                continue
            log, findings = FileTopicLog.recover(self, name, directory, self.settings_of(name))
            self._topics[name] = log
            self._partitions.opened(name)
            named = partition_of(name)
            if named is not None:
                self._partitions.set(named[0], read_partitions(directory))
            for found in findings:
                self.findings.append(found)
                self.logger.warning(
                    "recovery dropped an invalid log tail"
                    if found.action == "truncated"
                    else "recovery set damaged log bytes aside",
                    topic=name,
                    segment=found.segment.name,
                    position=found.position,
                    dropped_bytes=found.dropped_bytes,
                    first_offset=found.first_offset,
                    lost_offsets=found.lost,
                    reason=found.reason,
                    quarantined_to=str(found.quarantined_to) if found.quarantined_to else None,
                )
            for hole in log.holes:
                self.logger.warning(
                    "topic has a hole: readers get DATA_LOST for it",
                    topic=name,
                    first=hole.first,
                    last=hole.last,
                    reason=hole.reason,
                )
        self.logger.info(
            "log recovered",
            topics=len(self._topics),
            findings=len(self.findings),
            seconds=round(time.monotonic() - started, 3),
        )

    # -- the LogStore interface ---------------------------------------------

    @property
    def durability(self) -> Durability:
        return _DURABILITY[self.settings_for("_").fsync]

    @property
    def needs_sync(self) -> bool:
        return any(log.needs_sync for log in self._topics.values()) or (
            self.settings_for("_").fsync == "always"
        )

    def topic(self, name: str) -> FileTopicLog:
        log = self._topics.get(name)
        if log is None:
            directory = self.topics_dir / quote(name, safe="")
            try:
                log = FileTopicLog.create(self, name, directory, self.settings_of(name))
            except StorageError as exc:
                self.failed(exc)
                raise
            self._topics[name] = log
            self._partitions.opened(name)
        return log

    def topic_names(self) -> list[str]:
        return list(self._topics)

    def partition_count(self, name: str) -> int:
        return self._partitions.count(name)

    async def create_topic(self, name: str, partitions: int) -> bool:
        """TOPICS create: a partitioned topic's partitions are made at once,
        each directory holding the count (PARTITIONS, durably), so that any
        of them tells a restart what the topic is."""
        have = self._partitions.count(name) or (1 if name in self._topics else 0)
        if not check_partitions(name, partitions, have):
            return False
        if partitions == 1:
            self.topic(name)
            return True
        for p in range(partitions):
            log = self.topic(partition_topic(name, p))
            try:
                write_partitions(log.directory, partitions, self.ops)
            except OSError as exc:
                error = StorageError.from_os(exc, "saving the partition count", log.name)
                self.failed(error)
                raise error from exc
        self._partitions.set(name, partitions)
        return True

    def settings_of(self, name: str) -> TopicSettings:
        """A topic's settings: from the command line (``--topic``, the
        defaults), with what TOPICS set changed at run time on top."""
        base = self.settings_for(name)
        changed = self._changed.get(name)
        return attrs.evolve(base, **changed) if changed else base

    async def set_topic(self, name: str, changes: Mapping[str, str]) -> TopicSettings:
        """TOPICS set: change a topic's retention or segment size at run time,
        saved in DATA_DIR/topic-settings.json (durably, before it applies);
        ValueError for a setting that cannot change so, or a bad value. A
        partitioned topic's partitions all change, in one write."""
        log = self._topics.get(name)
        if log is not None:
            logs = [log]
        else:
            names = (partition_topic(name, p) for p in range(self._partitions.count(name)))
            logs = [self._topics[n] for n in names if n in self._topics]
            if not logs:
                raise KeyError(name)
        parsed = parse_runtime_settings(changes)
        saved = dict(self._changed)
        updated = []
        for each in logs:
            merged = saved[each.name] = {**self._changed.get(each.name, {}), **parsed}
            updated.append((each, attrs.evolve(self.settings_for(each.name), **merged)))  # checks them
        try:
            write_changed_settings(self.data_dir / SETTINGS_FILE, saved, self.ops)
        except OSError as exc:
            error = StorageError.from_os(exc, "saving topic settings", name)
            self.failed(error)
            raise error from exc
        self._changed = saved
        for each, settings in updated:
            each.settings = settings
        return updated[0][1]

    async def delete_topic(self, name: str) -> FileTopicLog | None:
        """Take topic ``name`` out (TOPICS delete): its directory moves to
        DATA_DIR/trash at once, so that a topic of the same name starts
        afresh, and a restart never brings it back; :meth:`discard` closes
        and removes it. Its open files keep working meanwhile (an fsync in
        flight is not disturbed). StorageError, with nothing changed, if the
        move fails."""
        log = self._topics.get(name)
        if log is None:
            return None
        trash = self.trash_dir / f"{log.directory.name}.{time.time_ns()}"
        try:
            self.trash_dir.mkdir(exist_ok=True)
            os.rename(log.directory, trash)
        except OSError as exc:
            error = StorageError.from_os(exc, f"moving topic directory {log.directory.name} to the trash", name)
            self.failed(error)
            raise error from exc
        del self._topics[name]
        self._partitions.removed(name)
        log.directory = trash
        if name in self._changed:
            # A topic of the name later starts from the command line's settings.
            remaining = {k: v for k, v in self._changed.items() if k != name}
            try:
                write_changed_settings(self.data_dir / SETTINGS_FILE, remaining, self.ops)
                self._changed = remaining
            except OSError as exc:
                self.logger.error("could not forget a deleted topic's settings", topic=name, error=repr(exc))
        # The move is durable once both directories are synced (next round).
        self.new_entry(self.topics_dir)
        self.new_entry(self.trash_dir)
        return log

    async def purge(self, log: TopicLog, keep_from: int) -> int:
        """Purge a topic's log up to the batch holding ``keep_from``, between
        fsync rounds (no segment it deletes is being synced); the new first
        offset. StorageError if saving it fails (nothing is deleted then)."""
        assert isinstance(log, FileTopicLog), log
        async with self._sync_lock:
            try:
                first, removed = log.purge(keep_from)
            except OSError as exc:
                error = StorageError.from_os(exc, "saving the purged start", log.name)
                self.failed(error)
                raise error from exc
            for seg in removed:
                self._dirty_always.discard(seg)
                self._dirty_interval.discard(seg)
                try:
                    seg.delete()
                except OSError as exc:
                    self.logger.error("could not delete a purged segment", path=str(seg.path), error=repr(exc))
        return first

    async def discard(self, log: TopicLog) -> None:
        """Close a deleted topic's files (between fsync rounds: none of its
        segments is being synced then) and remove them."""
        assert isinstance(log, FileTopicLog), log
        async with self._sync_lock:
            for seg in log.segments:
                self._dirty_always.discard(seg)
                self._dirty_interval.discard(seg)
            log.close()
        await trio.to_thread.run_sync(partial(shutil.rmtree, log.directory, ignore_errors=True))

    #: One fsync round at a time (the committer's rounds do not overlap).
    sync_depth = 1

    @property
    def sync_interval(self) -> float | None:
        """Seconds between fsyncs for ``interval`` topics (the shortest)."""
        intervals = [
            log.settings.fsync_interval_ms
            for log in self._topics.values()
            if log.settings.fsync == "interval"
        ]
        default = self.settings_for("_")
        if default.fsync == "interval":
            intervals.append(default.fsync_interval_ms)
        return min(intervals) / 1000 if intervals else None

    # -- bookkeeping from the topic logs -------------------------------------

    def appended(self, log: FileTopicLog, seg: Segment) -> None:
        mode = log.settings.fsync
        if mode == "always":
            self._dirty_always.add(seg)
        elif mode == "interval":
            self._dirty_interval.add(seg)
        if self.problem is not None:
            self._recovered("an append succeeded")

    def new_entry(self, directory: Path) -> None:
        self._dirs_to_sync.add(directory)

    def check_room(self, topic: str) -> None:
        """The --min-free-bytes guard (checked at most every FREE_CHECK_SECONDS)."""
        if not self.min_free_bytes:
            return
        now = time.monotonic()
        if now >= self._next_free_check:
            self._next_free_check = now + FREE_CHECK_SECONDS
            try:
                st = os.statvfs(self.data_dir)
                self._low_on_space = st.f_bavail * st.f_frsize < self.min_free_bytes
            except OSError:
                self._low_on_space = False
        if self._low_on_space:
            raise StorageError(
                f"storage full: less than {self.min_free_bytes} bytes free in {self.data_dir} "
                "(--min-free-bytes)",
                full=True,
                topic=topic,
            )

    def failed(self, exc: StorageError) -> None:
        """An append or sync failed: count it, say so (not once per publish)."""
        kind = "full" if exc.full else "io"
        self.storage_errors[kind] += 1
        self.problem = exc.message
        now = time.monotonic()
        if now - self._last_failure_log.get(kind, -FAILURE_LOG_SECONDS) >= FAILURE_LOG_SECONDS:
            self._last_failure_log[kind] = now
            self.logger.error(
                "storage failure: publishes are refused until it clears",
                topic=exc.topic,
                error=exc.message,
                refused_so_far=self.storage_errors[kind],
            )

    def _recovered(self, how: str) -> None:
        self.logger.warning("storage works again", how=how, was=self.problem)
        self.problem = None
        self._last_failure_log.clear()
        self._next_free_check = 0.0

    def note_damage(self, seg: Segment, damage: Damage) -> None:
        self.damaged_batches += 1
        self.logger.error(
            "damaged log data found while reading: readers get DATA_LOST for it",
            topic=seg.topic,
            segment=seg.path.name,
            position=damage.position,
            first_offset=damage.first_offset,
            last_offset=damage.last_offset,
        )

    async def probe(self) -> None:
        """While degraded, try a small durable write; clear the problem if it
        works (so /readyz recovers without waiting for a publish)."""
        if self.problem is None:
            return
        if self.min_free_bytes:
            self._next_free_check = 0.0
            try:
                self.check_room("")
            except StorageError:
                return
        try:
            await trio.to_thread.run_sync(_write_probe, self.data_dir / PROBE_FILE)
        except OSError:
            return
        self._recovered("a probe write succeeded")

    # -- syncing ------------------------------------------------------------

    async def sync(self) -> SyncResult:
        """Group commit: fsync every ``always`` segment appended to since the
        last call (and directories that gained entries), in a worker thread.
        A segment whose fsync failed is rolled back to its last good sync;
        the result names the topics and the offset they were cut back to."""
        failed = await self._sync(self._take(self._dirty_always), rollback=True)
        return SyncResult(Durability.DISK, failed)

    async def sync_interval_topics(self) -> None:
        await self._sync(self._take(self._dirty_interval), rollback=False)

    def _take(self, dirty: set[Segment]) -> list[Segment]:
        segs = list(dirty)
        dirty.clear()
        return segs

    async def _sync(self, segs: list[Segment], *, rollback: bool) -> dict[str, tuple[int, StorageError]]:
        async with self._sync_lock:
            dirs = list(self._dirs_to_sync)
            self._dirs_to_sync.clear()
            if not segs and not dirs:
                return {}
            marks = [seg.sync_mark() for seg in segs]
            self._syncing += 1
            started = time.monotonic()
            try:
                errors, dir_error = await self._sync_thread.run(_fsync_all, segs, dirs)
            finally:
                self._syncing -= 1
            self.fsync_seconds.observe(time.monotonic() - started)
            self.fsyncs += 1
            if dir_error is not None:
                # A directory entry a segment depends on may not be durable:
                # none of this round's segments can be promised, and the
                # directories are synced again next round.
                self._dirs_to_sync.update(dirs)
                errors = [e if e is not None else dir_error for e in errors]
            return self._settle(segs, marks, errors, rollback)

    def _settle(
        self, segs: list[Segment], marks: list[SyncMark], errors: list[OSError | None], rollback: bool
    ) -> dict[str, tuple[int, StorageError]]:
        failed: dict[str, tuple[int, StorageError]] = {}
        for seg, mark, error in zip(segs, marks, errors):
            if error is None:
                seg.synced(mark)
                continue
            self.fsync_failures += 1
            exc = StorageError.from_os(error, f"fsync of {seg.path.name}", seg.topic)
            self.failed(exc)
            log = self._topics.get(seg.topic)
            if not rollback or log is None or seg not in log.segments:
                continue  # interval: acknowledged as "written to the OS" already
            try:
                cut = log.rollback_unsynced(seg)
            except StorageError as broken:
                self.failed(broken)
                cut = log.next_offset
            # What was appended since is gone; removed segments are not synced.
            self._dirty_always.difference_update(
                [s for s in self._dirty_always if s is seg or (s.topic == seg.topic and s not in log.segments)]
            )
            previous = failed.get(seg.topic)
            if previous is None or cut < previous[0]:
                failed[seg.topic] = (cut, exc)
        return failed

    def enforce_retention(self) -> int:
        """Apply every topic's retention; returns the segments deleted."""
        if self._syncing:
            return 0  # a worker thread may be fsyncing one of them
        now = time.time_ns() // 1000
        deleted = 0
        for log in self._topics.values():
            for seg in log.enforce_retention(now):
                self._dirty_always.discard(seg)
                self._dirty_interval.discard(seg)
                self.logger.info(
                    "retention deleted a segment",
                    topic=log.name,
                    base_offset=seg.base_offset,
                    next_offset=seg.next_offset,
                    bytes=seg.size,
                )
                try:
                    seg.delete()
                except OSError as exc:
                    self.logger.error("could not delete a segment", path=str(seg.path), error=repr(exc))
                deleted += 1
        return deleted

    def close(self) -> None:
        """Flush everything written (whatever the policy), close files, unlock."""
        self._sync_thread.stop()
        try:
            segs = set(self._dirty_always) | self._dirty_interval
            segs |= {s for log in self._topics.values() for s in log.segments if s.dirty}
            ordered = list(segs)
            errors, dir_error = _fsync_all(ordered, list(self._dirs_to_sync))
            for seg, error in zip(ordered, errors):
                if error is None:
                    seg.dirty = False
            if dir_error is not None or any(errors):
                self.logger.error("final fsync failed", errors=[repr(e) for e in errors if e] + [repr(dir_error)])
            for log in self._topics.values():
                log.close()
            self._topics.clear()
        finally:
            self._lock.release()


def _fsync_all(segs: list[Segment], dirs: list[Path]) -> tuple[list[OSError | None], OSError | None]:
    """fsync each segment and directory (in a worker thread); the error of
    each segment (None: synced) and the first directory error."""
    errors: list[OSError | None] = []
    for seg in segs:
        try:
            seg.fsync()
            errors.append(None)
        except OSError as exc:
            errors.append(exc)
    dir_error = None
    for d in dirs:
        try:
            fsync_dir(d)
        except FileNotFoundError:
            pass  # removed since (a topic rolled back, retention)
        except OSError as exc:
            dir_error = dir_error or exc
    return errors, dir_error


def _write_probe(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()


#: Settings changed at run time (TOPICS set), per topic, in the data directory.
SETTINGS_FILE = "topic-settings.json"


def read_changed_settings(path: Path) -> dict[str, dict[str, Any]]:
    try:
        saved = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StorageError.from_os(exc, f"reading {path.name}") from exc
    except ValueError as exc:
        raise StorageError(f"storage error: {path} is not valid JSON: {exc}", full=False, topic="") from exc
    if not isinstance(saved, dict):
        return {}
    return {str(k): dict(v) for k, v in saved.items() if isinstance(v, dict)}


def write_changed_settings(path: Path, changed: Mapping[str, Mapping[str, Any]], ops: FileOps) -> None:
    replace_durably(path, json.dumps(changed, indent=1, sort_keys=True).encode("utf-8"), ops)


#: A partition's topic's partition count, in the partition's directory.
PARTITIONS_FILE = "PARTITIONS"


def read_partitions(directory: Path) -> int:
    """The partition count a partition's directory holds (0 if none: one
    made by a publish after a crash cut its topic's creation short)."""
    try:
        return int((directory / PARTITIONS_FILE).read_text("ascii").strip())
    except (OSError, ValueError):
        return 0


def write_partitions(directory: Path, partitions: int, ops: FileOps) -> None:
    replace_durably(directory / PARTITIONS_FILE, f"{partitions}\n".encode("ascii"), ops)


#: A purged topic's first offset (protocol.md, "TOPICS"), in its directory.
START_FILE = "START"


def read_start(directory: Path) -> int:
    """The first offset a purge left (0 if none): what START says."""
    try:
        return int((directory / START_FILE).read_text("ascii").strip() or 0)
    except (OSError, ValueError):
        return 0  # no purge (a damaged file only loses the purge: safe side)


def write_start(directory: Path, offset: int, ops: FileOps) -> None:
    """Save the first offset durably (OSError if that fails)."""
    replace_durably(directory / START_FILE, f"{offset}\n".encode("ascii"), ops)
