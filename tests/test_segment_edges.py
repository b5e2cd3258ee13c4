"""The segment at its size boundaries (broker/storage/segment.py): scans
over more than one scan chunk, reads over more than one read chunk, the
exact ``max_bytes`` boundary, batches larger than every chunk, the time
lookup around large batches, and retention giving back its descriptors and
disk space.

Real files under ``tmp_path``; batches built with the client's
``encode_batch``; each read is compared with a model of what the segment
promises (tests/helpers/stored.py).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pybroker.server.storage import StorageError
from pybroker.server.storage.errors import DataLoss
from pybroker.server.storage.fileops import FileOps
from pybroker.server.storage.segment import HEADER_SIZE, INDEX_ENTRY, INDEX_INTERVAL, READ_CHUNK, SCAN_CHUNK, Segment

from helpers.faults import FaultyOps
from helpers.logs import batches_in, flip_byte, open_store, walk
from helpers.stored import BIG, append, append_many, assert_log_holds, assert_reads_match_model, make_batch

MiB = 1 << 20


# -- scanning a segment larger than the scan chunk -------------------------------


def _sizes(n: int) -> list[int]:
    """Message sizes that make batch boundaries fall at odd places."""
    return [300 + (i * 977) % 5000 for i in range(n)]


@pytest.mark.parametrize("which", ["newest", "older-without-index"])
def test_recovery_scans_a_segment_larger_than_the_scan_chunk(tmp_path: Path, which: str) -> None:
    """A segment of 2.7 MiB (with one batch of 1.5 MiB, larger than the scan
    chunk itself) is checked chunk by chunk on start: nothing is dropped and
    the rebuilt indexes are the ones written while appending."""
    segment_bytes = 2 * MiB if which == "older-without-index" else 64 * MiB
    store = open_store(tmp_path, segment_bytes=segment_bytes)
    log = store.topic("t")
    n = 300
    expected = append_many(log, [1 + i % 3 for i in range(n)], size=_sizes(n))
    expected.append(append(log, make_batch(9999, 1, 3 * MiB // 2), 1, 9_000_000))
    expected += append_many(log, [2] * 40, size=700, ts0=9_000_001, tag0=500)
    victim = log.segments[0]
    assert victim.size > 2 * SCAN_CHUNK
    assert (len(log.segments) > 1) == (which == "older-without-index")
    index, times = victim.index_path.read_bytes(), victim.time_path.read_bytes()
    store.close()
    if which == "older-without-index":
        victim.index_path.unlink()  # no index: the older segment is scanned too

    store = open_store(tmp_path, segment_bytes=segment_bytes)
    assert store.findings == []
    log = store.topic("t")
    assert_log_holds(log, expected)
    assert victim.index_path.read_bytes() == index
    assert victim.time_path.read_bytes() == times
    store.close()


@pytest.mark.parametrize("gap", [1, 20, 43, 44, 45, 1000])
def test_batch_boundary_just_before_the_end_of_a_scan_chunk(tmp_path: Path, gap: int) -> None:
    """Batches laid out so that one ends ``gap`` bytes before the end of
    the first scan chunk: with fewer bytes left than a header the scan reads
    the next chunk from that batch boundary, with more it reads on from the
    header it sees; either way every batch is found where it is."""
    store = open_store(tmp_path)
    log = store.topic("t")
    # One message of n bytes, no headers: 36 + 8 + 6 + n bytes stored.
    overhead = HEADER_SIZE + 8 + 6
    expected = [append(log, make_batch(i, 1, 10_000), 1, 1000 + i) for i in range(99)]
    last = SCAN_CHUNK - gap - log.segments[0].size - overhead
    expected.append(append(log, make_batch(99, 1, last), 1, 2000))
    assert log.segments[0].size == SCAN_CHUNK - gap
    expected += append_many(log, [1] * 20, size=3000, ts0=3000, tag0=100)
    store.close()
    store = open_store(tmp_path)
    assert store.findings == []
    assert_log_holds(store.topic("t"), expected)
    store.close()


def test_damage_past_the_first_scan_chunk_costs_only_its_batch(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    n = 400
    expected = append_many(log, [1 + i % 3 for i in range(n)], size=_sizes(n))
    path = log.segments[0].path
    store.close()
    at = batches_in(path)
    victim = next(i for i, b in enumerate(at) if b.pos > SCAN_CHUNK + SCAN_CHUNK // 2)
    assert victim < len(at) - 5
    flip_byte(path, at[victim].pos + HEADER_SIZE + at[victim].length - 3)

    store = open_store(tmp_path)
    lost = expected[victim]
    assert [(f.position, f.first_offset, f.last_offset, f.action) for f in store.findings] == [
        (at[victim].pos, lost.base_offset, lost.next_offset - 1, "quarantined")
    ]
    batches, losses = walk(store.topic("t"))
    assert batches == expected[:victim] + expected[victim + 1 :]
    assert losses == [(lost.base_offset, lost.next_offset - 1, "damaged")]
    store.close()


# -- reads and their chunks ---------------------------------------------------------


def test_last_batch_larger_than_the_read_chunk_is_returned(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [1, 2, 3, 1, 2], size=500)
    expected.append(append(log, make_batch(77, 2, 100 * 1024), 2, 2_000_000))
    assert len(expected[-1].batch) > READ_CHUNK
    assert_log_holds(log, expected)
    last = expected[-1]
    assert log.read(last.base_offset, 1) == [last]
    assert log.read(last.next_offset - 1, 1) == [last]
    before = expected[-2]
    assert log.read(before.base_offset, 1) == [before]
    assert log.read(before.base_offset, len(before.batch) + len(last.batch)) == [before, last]
    assert_reads_match_model(log, expected, [0, 1, READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1, 150 * 1024, BIG])
    store.close()


def test_reads_spanning_several_read_chunks_return_every_batch(tmp_path: Path) -> None:
    """Batches of about 1 KiB, read from every batch with limits around
    the read chunk: the bytes to fetch (from the index entry before the
    offset) are more than one chunk, and nothing may come back short."""
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 4 for i in range(400)], size=[180 + (i * 37) % 250 for i in range(400)])
    assert log.segments[0].size > 4 * READ_CHUNK
    limits = [1, 4000, READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1, 100_000, 3 * READ_CHUNK + 7, BIG]
    assert_reads_match_model(log, expected, limits, offsets=[b.base_offset for b in expected[::3]] + [expected[-1].base_offset])
    # All of it in one read, and from the middle of a batch.
    assert log.read(0, BIG) == expected
    mid = expected[200]
    assert log.read(mid.next_offset - 1, BIG) == expected[200:]
    store.close()


def test_batch_over_8_mib_followed_by_more_batches(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [2, 1], size=300)
    expected.append(append(log, make_batch(50, 1, 9 * MiB), 1, 3_000_000))
    expected += append_many(log, [3, 1, 2, 5], size=200, ts0=3_000_001, tag0=60)
    big = expected[2]
    assert len(big.batch) > 8 * MiB
    assert_log_holds(log, expected)
    assert log.read(0, BIG) == expected
    assert log.read(big.base_offset, BIG) == expected[2:]
    assert log.read(big.base_offset, 1) == [big]
    assert log.read(big.next_offset, BIG) == expected[3:]
    limits = [1, 8 * MiB, len(big.batch), len(big.batch) + len(expected[3].batch), BIG]
    assert_reads_match_model(log, expected, limits)
    store.close()
    store = open_store(tmp_path)
    assert store.findings == []
    assert store.topic("t").read(0, BIG) == expected
    store.close()


def test_max_bytes_is_inclusive_at_its_exact_boundary(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 3 for i in range(30)], size=[40 + 13 * i for i in range(30)])
    sizes = [len(b.batch) for b in expected]
    for i in (0, 1, 7, 20):
        for j in range(i + 1, min(i + 6, len(expected)) + 1):
            exact = sum(sizes[i:j])
            start = expected[i].base_offset
            assert log.read(start, exact) == expected[i:j], (i, j)
            assert log.read(start, exact - 1) == expected[i : max(j - 1, i + 1)], (i, j)
            if j < len(expected):
                assert log.read(start, exact + sizes[j] - 1) == expected[i:j], (i, j)
    store.close()


@pytest.mark.parametrize("gap", [1, 8, 27, 28, 30, 35, 36, 40, 43, 44, 45])
def test_read_chunk_ending_just_after_a_batch_boundary(tmp_path: Path, gap: int) -> None:
    """``max_bytes`` sets the read chunk; make the chunk end ``gap`` bytes
    after a batch boundary, too few for the next header (and its
    envelope) to be checked from that chunk: it is read again from the
    boundary, never parsed short or taken for damage."""
    store = open_store(tmp_path)
    log = store.topic("t")
    # One message of 1000 bytes, no headers: 1050 bytes stored, 1014 on the wire.
    expected = append_many(log, [1] * 90, size=1000)
    stored = HEADER_SIZE + len(expected[0].batch)
    assert stored == 1050
    boundary = 70 * stored
    assert boundary > READ_CHUNK
    got = log.read(0, boundary + gap)  # 70 batches are 70 x 1014 wire bytes: fewer than asked
    assert got == expected[: len(got)] and len(got) == (boundary + gap) // len(expected[0].batch)
    assert store.damaged_batches == 0
    store.close()


# -- the time lookup ----------------------------------------------------------------


@pytest.mark.parametrize("reopen", [False, True])
def test_offset_at_time_steps_over_batches_larger_than_its_read(tmp_path: Path, reopen: bool) -> None:
    """The lookup reads forward 2 x INDEX_INTERVAL bytes at a time from the
    index entry before the time; batches of 20 KiB in the way must neither
    raise nor hide the batch it is looking for."""
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [1, 2], size=100, ts0=1000, ts_step=10)
    expected += append_many(log, [1, 1, 1], size=20 * 1024, ts0=1100, ts_step=10, tag0=10)
    expected += append_many(log, [2, 1, 3], size=100, ts0=1200, ts_step=10, tag0=20)
    expected.append(append(log, make_batch(30, 1, 30 * 1024), 1, 1300))
    expected += append_many(log, [1], size=100, ts0=1400, tag0=40)
    assert max(len(b.batch) for b in expected) > 2 * INDEX_INTERVAL
    if reopen:
        store.close()
        store = open_store(tmp_path)
        log = store.topic("t")

    def model(ts: int) -> int:
        return next((b.base_offset for b in expected if b.timestamp >= ts), log.next_offset)

    probes = sorted({t for b in expected for t in (b.timestamp - 1, b.timestamp, b.timestamp + 1)} | {0, 10**12})
    assert [(t, log.offset_at_time(t)) for t in probes] == [(t, model(t)) for t in probes]
    store.close()


# -- rollbacks keep the index files in step -----------------------------------------


async def test_rollback_after_a_failed_fsync_cuts_the_index_files_back_too(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    log = store.topic("t")
    kept = append_many(log, [1] * 30, size=400)
    assert (await store.sync()).failed == {}
    seg = log.segments[-1]
    entries = len(seg._idx_offsets)
    index, times = seg.index_path.read_bytes(), seg.time_path.read_bytes()
    assert len(index) == entries * INDEX_ENTRY.size and entries >= 3
    append_many(log, [1] * 30, size=400, ts0=2_000_000, tag0=100)
    assert len(seg._idx_offsets) > entries
    ops.sync_errno = errno.EIO
    result = await store.sync()
    assert result.failed["t"][0] == kept[-1].next_offset
    assert (seg.index_path.read_bytes(), seg.time_path.read_bytes()) == (index, times)
    ops.sync_errno = None
    more = append_many(log, [2] * 20, size=400, ts0=3_000_000, tag0=200)
    assert (await store.sync()).failed == {}
    # The time index in memory was cut back with the rest: lookups stay right.
    assert [log.offset_at_time(b.timestamp) for b in kept + more] == [b.base_offset for b in kept + more]
    store.close()
    store = open_store(tmp_path)
    assert store.findings == []
    assert walk(store.topic("t")) == (kept + more, [])
    store.close()


def test_failed_index_write_cuts_the_log_and_index_files_back(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    log = store.topic("t")
    kept = append_many(log, [1] * 30, size=400)
    seg = log.segments[-1]
    files = [p.read_bytes() for p in (seg.path, seg.index_path, seg.time_path)]
    seg._since_index = INDEX_INTERVAL  # the next batch gets index entries
    ops.fail_next("write", errno.ENOSPC)
    with pytest.raises(StorageError):
        log.append(make_batch(999, 1), 1, 5_000_000)
    assert [p.read_bytes() for p in (seg.path, seg.index_path, seg.time_path)] == files
    more = append_many(log, [1] * 5, size=400, ts0=6_000_000, tag0=300)
    store.close()
    store = open_store(tmp_path)
    assert store.findings == []
    assert walk(store.topic("t")) == (kept + more, [])
    store.close()


async def test_a_rollback_that_fails_after_a_failed_fsync_is_an_io_error(tmp_path: Path) -> None:
    """The fsync failed and cutting the segment back failed too: both count
    as I/O errors (not "storage full"), the segment refuses appends until a
    repair works, and the next append repairs it."""
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    log = store.topic("t")
    kept = append_many(log, [1] * 3)
    assert (await store.sync()).failed == {}
    append_many(log, [1] * 3, ts0=2_000_000, tag0=10)
    ops.sync_errno = errno.EIO
    ops.fail_next("ftruncate", errno.EIO)
    result = await store.sync()
    [(cut, error)] = result.failed.values()
    assert not error.full and cut == kept[-1].next_offset
    assert store.storage_errors == {"full": 0, "io": 2}
    assert log.segments[-1].broken
    assert store.problem is not None and "cannot be rolled back" in store.problem
    ops.sync_errno = None
    more = append_many(log, [2], ts0=3_000_000, tag0=20)
    assert more[0].base_offset == kept[-1].next_offset and not log.segments[-1].broken
    assert (await store.sync()).failed == {}
    store.close()
    store = open_store(tmp_path)
    assert walk(store.topic("t")) == (kept + more, [])
    store.close()


def test_offset_at_time_steps_over_damage_found_by_reads(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [2] * 40, size=300, ts_step=10)
    seg = log.segments[0]
    victim = batches_in(seg.path)[5]
    flip_byte(seg.path, victim.pos + HEADER_SIZE + victim.length - 2)  # while the store is open
    lost = expected[5]
    with pytest.raises(DataLoss):
        log.read(lost.base_offset, 1)
    for b in expected[6:12]:
        assert log.offset_at_time(b.timestamp) == b.base_offset
    # A time inside the damaged batch: the first intact batch at or after it.
    assert log.offset_at_time(lost.timestamp) == expected[6].base_offset
    store.close()


class _RecordingOps(FileOps):
    def __init__(self) -> None:
        self.closed: list[int] = []

    def close(self, fd: int) -> None:
        self.closed.append(fd)
        super().close(fd)


def test_a_segment_closes_only_the_files_it_opened(tmp_path: Path) -> None:
    """Recovery builds Segment objects it may delete without opening (a
    segment overlapping its predecessor): closing one closes nothing."""
    ops = _RecordingOps()
    Segment(tmp_path, 0, ops=ops).close()
    assert ops.closed == []
    seg = Segment.create(tmp_path, 0, ops=ops)
    fds = [seg._fd, seg._index_fd, seg._time_fd]
    seg.close()
    seg.close()
    assert sorted(ops.closed) == sorted(fds)


# -- retention -------------------------------------------------------------------------


def _fds_into(directory: Path) -> list[str]:
    """Where this process's open descriptors into ``directory`` point
    (a deleted file shows as "... (deleted)")."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.startswith(str(directory)):
            out.append(target)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_retention_closes_the_files_of_deleted_segments(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_bytes=8 * 1024, retention_bytes=40 * 1024)
    log = store.topic("t")
    append_many(log, [2] * 200, size=300)
    directory = log.directory
    before = _fds_into(directory)
    assert len(before) == 3 * len(log.segments)
    assert store.enforce_retention() > 0
    kept = {p for seg in log.segments for p in (seg.path, seg.index_path, seg.time_path)}
    after = _fds_into(directory)
    assert not [t for t in after if t.endswith("(deleted)")]
    assert sorted(after) == sorted(str(p) for p in kept)
    assert {p for p in directory.iterdir() if p.suffix in (".log", ".index", ".timeindex")} == kept
    store.close()
    assert _fds_into(directory) == []


@contextmanager
def _private_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A file system of our own, so free space moves only with what this test does."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_retention_gives_the_disk_space_back(tmp_path: Path) -> None:
    with _private_tmpfs(tmp_path / "disk", "64m") as disk:
        store = open_store(disk / "data", segment_bytes=1 * MiB, retention_bytes=2 * MiB)
        log = store.topic("t")
        append_many(log, [4] * 800, size=4000)  # about 12.5 MiB in 1 MiB segments
        n = len(log.segments)
        free_before = _free(disk)
        doomed = sum(seg.size for seg in log.segments[:-3])
        deleted = store.enforce_retention()
        assert deleted >= n - 3
        freed = _free(disk) - free_before
        # The kernel frees a file's blocks only once no descriptor holds it.
        assert freed >= doomed, (freed, doomed)
        store.close()
