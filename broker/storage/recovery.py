"""Opening a topic's log after a stop, a crash or damage: keep everything intact.

The rule (README, "Durability"): recovery costs only the bytes that are
physically damaged.

- The newest segment is checked batch by batch (a crash may have torn its
  tail); older ones are trusted when their indexes match them, and checked
  batch by batch otherwise or when a read found damage in them (a
  ``.damaged`` marker).
- A torn tail of the newest segment (nothing intact after it) is cut off, as
  a crash leaves it: those batches were never acknowledged under fsync
  ``always``.
- Damage anywhere else (a bad header, a bad checksum, a bad length, junk) is
  set aside: the damaged bytes are moved into ``DATA_DIR/quarantine/`` with a
  note, the intact batches after them move into a segment of their own named
  by their base offset, and the offsets in between become a *hole* that
  readers are told about (DATA_LOST). Nothing after the damage is deleted
  and no offset moves.
- A missing segment file is a hole too; offsets never go below what the
  files on disk (segments, or the index of a deleted newest segment) show
  was handed out.

Holes are recorded in ``holes.json`` in the topic's directory so that their
reason survives restarts.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import attrs

from .errors import LossReason, StorageError
from .fileops import REAL, fsync_dir, replace_durably
from .scan import find_next_batch
from .segment import DAMAGED_SUFFIX, INDEX_ENTRY, Segment, ScanStop, segment_name

if TYPE_CHECKING:
    from .file import FileStore, FileTopicLog

HOLES_FILE = "holes.json"
COPY_CHUNK = 8 << 20


@attrs.frozen
class Finding:
    """One thing recovery changed in a topic's files."""

    topic: str
    segment: Path
    position: int  # where the dropped bytes started in ``segment``
    dropped_bytes: int
    first_offset: int  # the offset the dropped bytes would have started at
    last_offset: int  # last offset lost, inclusive; first_offset - 1 if none
    reason: str
    action: Literal["truncated", "quarantined", "removed"]
    quarantined_to: Path | None = None

    @property
    def lost(self) -> int:
        return max(0, self.last_offset - self.first_offset + 1)


@attrs.frozen
class Hole:
    """Offsets ``first..last`` (inclusive) that the log does not hold."""

    first: int
    last: int
    reason: LossReason


class TopicRecovery:
    def __init__(self, log: FileTopicLog) -> None:
        self.log = log
        self.store: FileStore = log.store
        self.name = log.name
        self.directory = log.directory
        self.findings: list[Finding] = []
        self.damaged: list[Hole] = []

    def run(self) -> list[Finding]:
        log = self.log
        directory = self.directory
        for tmp in directory.glob("*.log.tmp"):
            tmp.unlink()  # a split that crashed before its rename
        logs = sorted(_bases(directory, ".log"))
        indexed = set(_bases(directory, ".index")) | set(_bases(directory, ".timeindex"))
        orphans = sorted(indexed - set(logs))
        pending = list(logs)
        scanned_last = False
        while pending:
            base = pending.pop(0)
            newest = not pending
            prev = log.segments[-1] if log.segments else None
            if prev is not None and base < prev.next_offset:
                self._overlapping(base, prev)
                continue
            seg = self._segment(base)
            if not newest and not seg.damaged_path.exists() and seg.load_indexes():
                seg.open_files(truncate_indexes=False)
                log.add_segment(seg)
                scanned_last = False
                continue
            later = pending[0] if pending else None
            split = self._scan(seg, newest, later)
            if split is not None and split not in pending:
                bisect.insort(pending, split)
            log.add_segment(seg)
            scanned_last = not pending
        if log.segments and not scanned_last:
            # The segment that was newest is gone (set aside): the one now
            # newest may have been cut off by the same crash; check it all.
            seg = log.segments.pop()
            log.bases.pop()
            seg.close()
            again = self._segment(seg.base_offset)
            self._scan(again, True, None)
            log.add_segment(again)
        self._orphan_indexes(orphans)
        if not log.segments:
            log.add_segment(self._create(0))
        self._record_holes()
        for stray in directory.glob(f"*{DAMAGED_SUFFIX}"):
            if not (directory / (stray.stem + ".log")).exists():
                stray.unlink(missing_ok=True)
        return self.findings

    # -- one segment -------------------------------------------------------

    def _segment(self, base: int) -> Segment:
        return Segment(self.directory, base, topic=self.name, ops=self.store.ops, on_damage=self.store.note_damage)

    def _create(self, base: int) -> Segment:
        return Segment.create(
            self.directory, base, topic=self.name, ops=self.store.ops, on_damage=self.store.note_damage
        )

    def _scan(self, seg: Segment, newest: bool, later: int | None) -> int | None:
        """Check every batch of ``seg``, deal with what is not intact, open
        it; return the base of a segment split off after damage, if any."""
        stop = seg.scan()
        split = None
        if stop is not None:
            split = self._damaged(seg, stop, newest, later)
        seg.open_files(truncate_indexes=True)
        seg.write_indexes()
        seg.damaged_path.unlink(missing_ok=True)
        return split

    def _damaged(self, seg: Segment, stop: ScanStop, newest: bool, later: int | None) -> int | None:
        fd = os.open(seg.path, os.O_RDONLY)
        try:
            found = find_next_batch(
                REAL, fd, stop.position + 1, stop.file_size, stop.next_offset, _index_hints(seg)
            )
        finally:
            os.close(fd)
        if found is None and newest:
            # Nothing intact after it: a write torn by a crash. Cut it off.
            _truncate(seg.path, stop.position)
            self.findings.append(
                Finding(
                    self.name, seg.path, stop.position, stop.file_size - stop.position,
                    stop.next_offset, stop.next_offset - 1, stop.reason, "truncated",
                )
            )
            return None
        if found is None:
            # An older segment damaged to its end: what it lost runs up to
            # the next segment.
            resume, resume_base = stop.file_size, later if later is not None else stop.next_offset
        else:
            resume, resume_base = found
        moved_to = self._quarantine(seg.path, stop.position, resume, stop, resume_base - 1)
        split = None
        if found is not None:
            split = resume_base
            self._split(seg.path, resume, stop.file_size, resume_base)
        _truncate(seg.path, stop.position)
        if resume_base > stop.next_offset:
            self.damaged.append(Hole(stop.next_offset, resume_base - 1, "damaged"))
        self.findings.append(
            Finding(
                self.name, seg.path, stop.position, resume - stop.position,
                stop.next_offset, resume_base - 1, stop.reason, "quarantined", moved_to,
            )
        )
        return split

    def _overlapping(self, base: int, prev: Segment) -> None:
        """A segment starting inside its predecessor: never written so by a
        broker. Empty (a roll whose cleanup failed): removed. Otherwise set
        aside whole, never trusted over the segment before it."""
        seg = self._segment(base)
        size = seg.path.stat().st_size
        moved = None
        if size:
            stop = ScanStop(0, base, size, "segment overlaps its predecessor")
            moved = self._quarantine(seg.path, 0, size, stop, base - 1)
        seg.delete()
        self.findings.append(
            Finding(
                self.name, seg.path, 0, size, base, base - 1,
                f"segment overlaps its predecessor (which ends at offset {prev.next_offset})",
                "quarantined" if size else "removed", moved,
            )
        )

    def _orphan_indexes(self, orphans: list[int]) -> None:
        """Index files whose segment file is gone. Their base offsets and
        entries still show which offsets existed: a deleted oldest segment
        becomes an empty one at its base (so readers are told about the
        hole rather than silently starting later), and the offsets of a
        deleted newest one are never handed out again."""
        log = self.log
        for base in orphans:
            evidence = base
            try:
                data = (self.directory / segment_name(base, ".index")).read_bytes()
                usable = len(data) - len(data) % INDEX_ENTRY.size
                rels = [rel for rel, _pos in INDEX_ENTRY.iter_unpack(data[:usable])]
                if rels:
                    evidence = base + max(rels) + 1
            except OSError:
                pass
            where = self.directory / segment_name(base, ".log")
            if not log.segments or base < log.segments[0].base_offset:
                log.segments.insert(0, self._create(base))
                log.bases.insert(0, base)
                self.store.new_entry(self.directory)
                first, last = base, (log.segments[1].base_offset - 1 if len(log.segments) > 1 else base - 1)
                self.findings.append(
                    Finding(self.name, where, 0, 0, first, last, "segment file missing", "removed")
                )
            if evidence > log.next_offset and base >= log.next_offset:
                start = log.next_offset
                if log.segments[-1].batches == 0 and log.segments[-1].base_offset == start:
                    log.segments.pop().delete()  # the empty placeholder just made
                    log.bases.pop()
                log.add_segment(self._create(evidence))
                self.store.new_entry(self.directory)
                self.findings.append(
                    Finding(
                        self.name, where, 0, 0, start, evidence - 1,
                        "segment file missing; its index shows the offsets it held", "removed",
                    )
                )
            for suffix in (".index", ".timeindex"):
                (self.directory / segment_name(base, suffix)).unlink(missing_ok=True)

    # -- holes ---------------------------------------------------------------

    def _record_holes(self) -> None:
        log = self.log
        known = _load_holes(self.directory) + self.damaged
        holes: list[Hole] = []
        for a, b in zip(log.segments, log.segments[1:]):
            if a.next_offset < b.base_offset:
                first, last = a.next_offset, b.base_offset - 1
                reason: LossReason = next(
                    (h.reason for h in reversed(known) if h.first <= first and last <= h.last),
                    "missing",
                )
                holes.append(Hole(first, last, reason))
        log.holes = holes
        if holes != _load_holes(self.directory):
            _save_holes(self.directory, holes)

    # -- moving bytes --------------------------------------------------------

    def _quarantine(self, path: Path, start: int, end: int, stop: ScanStop, last_lost: int) -> Path:
        """Copy ``path[start:end]`` into the quarantine folder with a note."""
        folder = self.store.quarantine_dir / self.directory.name
        target = folder / f"{path.name}.{start}-{end}.bin"
        note = {
            "topic": self.name,
            "segment": str(path),
            "position": start,
            "bytes": end - start,
            "first_lost_offset": stop.next_offset,
            "last_lost_offset": last_lost,
            "reason": stop.reason,
            "found_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _copy_range(path, start, end, target)
            target.with_suffix(".json").write_text(json.dumps(note, indent=2) + "\n", "utf-8")
            fsync_dir(folder)
        except OSError as exc:
            raise StorageError.from_os(
                exc, f"setting damaged bytes of {path} aside into {folder} (free space and restart)", self.name
            ) from exc
        return target

    def _split(self, path: Path, start: int, end: int, base: int) -> None:
        """Move the intact batches after damage into a segment of their own
        (written whole under a temporary name, then renamed: a crash leaves
        either no new segment or a complete one)."""
        target = self.directory / segment_name(base, ".log")
        if target.exists():
            return  # a recovery that crashed after the rename: already done
        tmp = target.with_suffix(".log.tmp")
        try:
            _copy_range(path, start, end, tmp)
            os.replace(tmp, target)
            fsync_dir(self.directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError.from_os(exc, f"moving intact batches of {path} into {target.name}", self.name) from exc


def _bases(directory: Path, suffix: str) -> list[int]:
    return [
        int(p.name[:20])
        for p in directory.glob(f"*{suffix}")
        if p.name.endswith(suffix) and len(p.name) == 20 + len(suffix) and p.name[:20].isdigit()
    ]


def _index_hints(seg: Segment) -> list[int]:
    """Positions the on-disk index names, however damaged it is: each is
    only a hint that :func:`find_next_batch` checks."""
    try:
        data = seg.index_path.read_bytes()
    except OSError:
        return []
    usable = len(data) - len(data) % INDEX_ENTRY.size
    return [pos for _rel, pos in INDEX_ENTRY.iter_unpack(data[:usable])]


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def _copy_range(source: Path, start: int, end: int, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        src.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = src.read(min(COPY_CHUNK, remaining))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())


def _load_holes(directory: Path) -> list[Hole]:
    try:
        items = json.loads((directory / HOLES_FILE).read_text("utf-8"))
        return [Hole(int(h["first"]), int(h["last"]), h["reason"]) for h in items]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _save_holes(directory: Path, holes: list[Hole]) -> None:
    path = directory / HOLES_FILE
    if not holes:
        path.unlink(missing_ok=True)
        return
    replace_durably(path, (json.dumps([attrs.asdict(h) for h in holes]) + "\n").encode("utf-8"))
