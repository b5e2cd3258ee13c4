"""The durable log: per topic, a directory of segment files.

Layout: ``DATA_DIR/topics/<quoted topic name>/<base offset>.log`` (+
``.index``, ``.timeindex``). Appends are plain ``writev`` calls (to the OS
page cache, cheap enough for the event loop); fsyncs run in a worker thread
from :meth:`FileStore.sync`, driven by the server's committer (group commit).
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote

import trio

from client.protocol import Durability
from client.protocol.subjects import topic_error

from ..logs import get_logger
from ..stats import Histogram
from .base import StoredBatch
from .segment import Segment, Truncation
from .settings import SettingsResolver, TopicSettings

_DURABILITY = {"always": Durability.DISK, "interval": Durability.OS, "never": Durability.OS}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileTopicLog:
    def __init__(self, store: FileStore, name: str, directory: Path, settings: TopicSettings) -> None:
        self.store = store
        self.name = name
        self.directory = directory
        self.settings = settings
        self.segments: list[Segment] = []
        self._bases: list[int] = []
        self.needs_sync = settings.fsync == "always"
        self.durability = _DURABILITY[settings.fsync]

    @classmethod
    def create(cls, store: FileStore, name: str, directory: Path, settings: TopicSettings) -> FileTopicLog:
        directory.mkdir(parents=True, exist_ok=True)
        log = cls(store, name, directory, settings)
        log._add_segment(Segment.create(directory, 0))
        # Both the topic's directory (in topics/) and its first segment (in
        # the topic's directory) are new entries a DISK ack depends on.
        store._new_entry(directory.parent)
        store._new_entry(directory)
        return log

    @classmethod
    def recover(
        cls, store: FileStore, name: str, directory: Path, settings: TopicSettings
    ) -> tuple[FileTopicLog, list[Truncation]]:
        log = cls(store, name, directory, settings)
        bases = sorted(
            int(p.stem) for p in directory.glob("*.log") if len(p.stem) == 20 and p.stem.isdigit()
        )
        truncations: list[Truncation] = []
        scanned_last = False
        for i, base in enumerate(bases):
            newest = i == len(bases) - 1
            if log.segments and base != log.segments[-1].next_offset:
                # A gap or overlap between segments: everything from here on
                # cannot be trusted to be in order. Keep the valid prefix.
                for later in bases[i:]:
                    seg = Segment(directory, later)
                    size = seg.path.stat().st_size if seg.path.exists() else 0
                    truncations.append(
                        Truncation(seg.path, 0, size, later, "segment does not follow its predecessor")
                    )
                    seg.delete()
                break
            seg, cut = Segment.recover(directory, base, full_scan=newest)
            if cut is not None:
                truncations.append(cut)
            log._add_segment(seg)
            scanned_last = newest
        if log.segments and not scanned_last:
            # Later segments were dropped, so this one is now the newest: it
            # was cut off by the crash too, so check every batch of it.
            seg = log.segments.pop()
            log._bases.pop()
            seg.close()
            seg, cut = Segment.recover(directory, seg.base_offset, full_scan=True)
            if cut is not None:
                truncations.append(cut)
            log._add_segment(seg)
        if not log.segments:
            log._add_segment(Segment.create(directory, 0))
        return log, truncations

    def _add_segment(self, seg: Segment) -> None:
        self.segments.append(seg)
        self._bases.append(seg.base_offset)

    # -- the TopicLog interface ---------------------------------------------

    @property
    def first_offset(self) -> int:
        return self.segments[0].base_offset

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
        active = self.segments[-1]
        if active.size >= self.settings.segment_bytes and active.batches:
            active = self._roll()
        base = active.next_offset
        active.append(batch, count, timestamp)
        self.store._appended(self, active)
        return base

    def _roll(self) -> Segment:
        seg = Segment.create(self.directory, self.next_offset)
        self._add_segment(seg)
        self.store._new_entry(self.directory)
        return seg

    def read(self, offset: int, max_bytes: int) -> list[StoredBatch]:
        if offset >= self.next_offset:
            return []
        offset = max(offset, self.first_offset)
        i = max(0, bisect.bisect_right(self._bases, offset) - 1)
        while i < len(self.segments):
            found = self.segments[i].read(offset, max_bytes)
            if found:
                return found
            i += 1  # offset was at the end of that segment
        return []

    def offset_at_time(self, timestamp: int) -> int:
        for seg in self.segments:
            found = seg.offset_at_time(timestamp)
            if found is not None:
                return found
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
            self._bases.pop(0)
            removed.append(oldest)
        return removed

    def close(self) -> None:
        for seg in self.segments:
            seg.close()


class FileStore:
    """Every topic's log under ``data_dir``; recovers them when opened."""

    def __init__(
        self,
        data_dir: Path,
        settings: SettingsResolver | Callable[[str], TopicSettings] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.topics_dir = self.data_dir / "topics"
        self.settings_for = settings or SettingsResolver()
        self.log = get_logger(component="log")
        self._topics: dict[str, FileTopicLog] = {}
        self._dirty_always: set[Segment] = set()
        self._dirty_interval: set[Segment] = set()
        self._dirs_to_sync: set[Path] = set()
        self._syncing = 0
        # One sync at a time: an "always" round must not acknowledge while a
        # directory entry it depends on is still being synced by an
        # "interval" round in another thread.
        self._sync_lock = trio.StrictFIFOLock()
        self.fsyncs = 0
        #: Seconds per fsync round (worker thread hand-off included).
        self.fsync_seconds = Histogram()
        self.truncations: list[Truncation] = []
        self.topics_dir.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        started = time.monotonic()
        for directory in sorted(p for p in self.topics_dir.iterdir() if p.is_dir()):
            name = unquote(directory.name)
            if topic_error(name) is not None:
                self.log.warning("ignoring a directory that is not a topic", path=str(directory))
                continue
            log, cuts = FileTopicLog.recover(self, name, directory, self.settings_for(name))
            self._topics[name] = log
            for cut in cuts:
                self.truncations.append(cut)
                self.log.warning(
                    "recovery dropped an invalid log tail",
                    topic=name,
                    segment=cut.segment.name,
                    first_dropped_offset=cut.first_dropped_offset,
                    dropped_bytes=cut.dropped_bytes,
                    reason=cut.reason,
                )
        self.log.info(
            "log recovered",
            topics=len(self._topics),
            truncated_segments=len(self.truncations),
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
            log = FileTopicLog.create(self, name, directory, self.settings_for(name))
            self._topics[name] = log
        return log

    def topic_names(self) -> list[str]:
        return list(self._topics)

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

    def _appended(self, log: FileTopicLog, seg: Segment) -> None:
        mode = log.settings.fsync
        if mode == "always":
            self._dirty_always.add(seg)
        elif mode == "interval":
            self._dirty_interval.add(seg)

    def _new_entry(self, directory: Path) -> None:
        self._dirs_to_sync.add(directory)

    async def sync(self) -> Durability:
        """Group commit: fsync every ``always`` segment appended to since the
        last call (and directories that gained entries), in a worker thread."""
        await self._sync(self._take(self._dirty_always))
        return Durability.DISK

    async def sync_interval_topics(self) -> None:
        await self._sync(self._take(self._dirty_interval))

    def _take(self, dirty: set[Segment]) -> list[Segment]:
        segs = list(dirty)
        dirty.clear()
        return segs

    async def _sync(self, segs: list[Segment]) -> None:
        async with self._sync_lock:
            dirs = list(self._dirs_to_sync)
            self._dirs_to_sync.clear()
            if not segs and not dirs:
                return
            self._syncing += 1
            started = time.monotonic()
            try:
                await trio.to_thread.run_sync(_fsync_all, segs, dirs)
            finally:
                self._syncing -= 1
            self.fsync_seconds.observe(time.monotonic() - started)
            self.fsyncs += 1

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
                self.log.info(
                    "retention deleted a segment",
                    topic=log.name,
                    base_offset=seg.base_offset,
                    next_offset=seg.next_offset,
                    bytes=seg.size,
                )
                seg.delete()
                deleted += 1
        return deleted

    def close(self) -> None:
        """Flush everything written (whatever the policy) and close files."""
        segs = set(self._dirty_always) | self._dirty_interval
        segs |= {s for log in self._topics.values() for s in log.segments if s.dirty}
        _fsync_all(list(segs), list(self._dirs_to_sync))
        for log in self._topics.values():
            log.close()
        self._topics.clear()


def _fsync_all(segs: list[Segment], dirs: list[Path]) -> None:
    for seg in segs:
        seg.fsync()
        seg.dirty = False
    for d in dirs:
        _fsync_dir(d)
