"""The durable file log (broker/storage/file.py, broker/storage/segment.py).

Real files under ``tmp_path``, no sockets. Batches are built with the client's
``encode_batch`` so what is stored is exactly what a publisher would send.
Damage for the recovery tests is done with plain file operations while the
store is closed, the way a crash or a bad disk would leave things.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.file import FileStore, FileTopicLog
from pybroker.server.storage.segment import HEADER, HEADER_SIZE, INDEX_ENTRY, INDEX_INTERVAL, TIME_ENTRY, Segment, header_crc
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.protocol import Durability, encode_batch

from helpers.logs import batches_in, flip_byte, open_store, walk


BIG = 1 << 30
SMALL_SEGMENT = 1024  # the smallest segment_bytes TopicSettings allows


# -- helpers ------------------------------------------------------------------


def make_batch(tag: int, count: int, size: int = 40) -> bytes:
    """A wire batch of ``count`` distinct messages of about ``size`` bytes each."""
    return encode_batch([f"m{tag}:{i}:".encode().ljust(size, b".") for i in range(count)])


def append_many(
    log: FileTopicLog,
    counts: Sequence[int],
    *,
    size: int = 40,
    ts0: int = 1_000_000,
    ts_step: int = 10,
    tag0: int = 0,
) -> list[StoredBatch]:
    """Append one batch per entry of ``counts``; return what should be stored."""
    out: list[StoredBatch] = []
    for i, count in enumerate(counts):
        batch = make_batch(tag0 + i, count, size)
        ts = ts0 + i * ts_step
        expected_base = log.next_offset
        base = log.append(batch, count, ts)
        assert base == expected_base
        out.append(StoredBatch(base, count, ts, batch))
        assert log.next_offset == base + count
    return out


def containing(expected: Sequence[StoredBatch], offset: int) -> int:
    """Index of the batch in ``expected`` that holds ``offset``."""
    i = bisect.bisect_right([b.base_offset for b in expected], offset) - 1
    assert 0 <= i < len(expected) and expected[i].base_offset <= offset < expected[i].next_offset
    return i


def assert_log_holds(log: FileTopicLog, expected: Sequence[StoredBatch]) -> None:
    """The log holds exactly ``expected`` (contiguous, byte-identical)."""
    assert expected, "helper wants a non-empty expectation"
    assert log.first_offset == expected[0].base_offset
    assert log.next_offset == expected[-1].next_offset
    for a, b in zip(expected, expected[1:]):
        assert a.next_offset == b.base_offset
    # Every offset: the batch holding it comes first (max_bytes=1 -> exactly one).
    for offset in range(log.first_offset, log.next_offset):
        got = log.read(offset, 1)
        assert got == [expected[containing(expected, offset)]], offset
    assert log.read(log.next_offset, BIG) == []
    assert log.read(log.next_offset + 7, BIG) == []
    # A sequential walk over everything, across segment boundaries.
    walked: list[StoredBatch] = []
    offset = log.first_offset
    for _ in range(len(expected) + 1):
        if offset >= log.next_offset:
            break
        got = log.read(offset, 16 * 1024)
        assert got
        walked.extend(got)
        offset = got[-1].next_offset
    assert walked == list(expected)


def log_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.log"))


def build_multi_segment(
    data_dir: Path, n_batches: int = 30, topic: str = "t"
) -> tuple[list[StoredBatch], Path, list[int]]:
    """A closed store with one topic over several small segments."""
    store = open_store(data_dir, segment_bytes=SMALL_SEGMENT)
    log = store.topic(topic)
    expected = append_many(log, [1 + i % 4 for i in range(n_batches)], size=60)
    bases = [seg.base_offset for seg in log.segments]
    directory = log.directory
    assert len(bases) >= 4
    store.close()
    return expected, directory, bases


def reopen_continues(
    data_dir: Path,
    topic: str,
    prefix: list[StoredBatch],
    store: FileStore | None = None,
    **settings: Any,
) -> None:
    """After recovery: new appends continue at the recovered next offset, read
    back at once (in the same session as the recovery, as a broker would
    use it, when ``store`` is given) and survive another close and reopen,
    together with the recovered prefix."""
    if store is None:
        store = open_store(data_dir, **settings)
    log = store.topic(topic)
    next_before = log.next_offset
    ts0 = (prefix[-1].timestamp if prefix else 0) + 1000
    more = append_many(log, [3, 1, 5], ts0=ts0, tag0=9000)
    assert more[0].base_offset == next_before
    whole = prefix + more
    assert_log_holds(log, whole)
    store.close()
    store = open_store(data_dir, **settings)
    assert store.findings == []
    assert_log_holds(store.topic(topic), whole)
    store.close()


# -- 1. append and read -------------------------------------------------------


def test_offsets_are_contiguous_and_reads_are_byte_identical(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("orders.eu")
    assert log.first_offset == 0 and log.next_offset == 0
    assert log.read(0, BIG) == []
    counts = [1, 5, 2, 17, 1, 1, 9, 3, 20, 4]
    expected = append_many(log, counts)
    assert [b.base_offset for b in expected] == [sum(counts[:i]) for i in range(len(counts))]
    assert log.next_offset == sum(counts)
    assert_log_holds(log, expected)
    # Offsets inside a batch: that batch first, then the rest in order.
    for offset in range(log.next_offset):
        got = log.read(offset, BIG)
        i = containing(expected, offset)
        assert got == expected[i:]
        # The stored bytes are the very bytes appended.
        assert got[0].batch == expected[i].batch
        assert isinstance(got[0].batch, bytes)
    store.close()


def test_read_honours_max_bytes_but_returns_at_least_one_batch(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [2] * 20, size=100)
    sizes = [len(b.batch) for b in expected]
    assert len(set(sizes)) == 1
    one = sizes[0]
    for max_bytes in (0, 1, one - 1, one, one + 1, 2 * one, 5 * one + 3, 19 * one, BIG):
        for start in (0, 1, 7, 38, 39):
            got = log.read(start, max_bytes)
            i = containing(expected, start)
            assert got == expected[i : i + len(got)]
            assert len(got) >= 1
            total = sum(len(b.batch) for b in got)
            assert len(got) == 1 or total <= max_bytes
            if i + len(got) < len(expected):  # stopped early: the next would not fit
                assert total + sizes[i + len(got)] > max_bytes
    store.close()


def test_single_large_batch_bigger_than_read_chunk(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [1, 3, 1], size=200 * 1024)  # each > the 64 KiB read chunk
    expected += append_many(log, [2, 2], size=10, ts0=2_000_000)
    assert_log_holds(log, expected)
    assert log.read(0, 1) == [expected[0]]
    assert log.read(0, BIG) == expected
    store.close()


# -- 2. rolling segments ------------------------------------------------------


def test_roll_creates_segments_named_by_base_offset(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 5 for i in range(60)], size=50, ts_step=3)
    assert len(log.segments) >= 5
    bases = [seg.base_offset for seg in log.segments]
    assert bases[0] == 0
    assert bases == sorted(bases)
    # Each segment starts where the previous one ended, at a batch boundary.
    batch_bases = {b.base_offset for b in expected}
    for prev, seg in zip(log.segments, log.segments[1:]):
        assert seg.base_offset == prev.next_offset
        assert seg.base_offset in batch_bases
        # Rolled once the previous one reached segment_bytes, not before.
        assert prev.size >= SMALL_SEGMENT
        assert prev.size - (HEADER_SIZE + max(len(b.batch) for b in expected)) < SMALL_SEGMENT
    names = log_files(log.directory)
    want = sorted(f"{base:020d}{suffix}" for base in bases for suffix in (".log", ".index", ".timeindex"))
    assert names == want
    assert all(len(Path(n).stem) == 20 for n in names)
    assert log.first_offset == 0
    assert log.next_offset == expected[-1].next_offset
    assert log.size_bytes == sum(seg.size for seg in log.segments)
    assert log.size_bytes == sum(HEADER_SIZE + len(b.batch) for b in expected)
    assert_log_holds(log, expected)
    # A read starting just before a boundary returns that batch (the read
    # may stop at the segment end, but must never skip anything).
    for seg in log.segments[1:]:
        before = seg.base_offset - 1
        got = log.read(before, BIG)
        assert got[0] == expected[containing(expected, before)]
        assert log.read(seg.base_offset, BIG)[0].base_offset == seg.base_offset
    store.close()


def test_offset_at_time_across_segments(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    log = store.topic("t")
    assert log.offset_at_time(0) == 0  # empty: next_offset
    rng = random.Random(7)
    expected: list[StoredBatch] = []
    ts = 5_000_000
    for i in range(80):
        ts += rng.choice([0, 0, 1, 7, 1000])  # non-decreasing, with ties
        count = rng.randint(1, 6)
        batch = make_batch(i, count, 30)
        base = log.append(batch, count, ts)
        expected.append(StoredBatch(base, count, ts, batch))
    assert len(log.segments) >= 4

    def model(t: int) -> int:
        for b in expected:
            if b.timestamp >= t:
                return b.base_offset
        return log.next_offset

    probes = {0, expected[0].timestamp - 1, expected[-1].timestamp, expected[-1].timestamp + 1, 2**63}
    for b in expected:
        probes.update((b.timestamp - 1, b.timestamp, b.timestamp + 1))
    for t in sorted(probes):
        assert log.offset_at_time(t) == model(t), t
    store.close()
    # Same answers from the recovered (index-loaded) segments.
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    log = store.topic("t")
    for t in sorted(probes):
        assert log.offset_at_time(t) == model(t), t
    store.close()


# -- 3. indexes and reopening ---------------------------------------------------


def test_reopen_reads_back_everything(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    topics = {"orders.eu": 40, "a/b%c": 7, "café.ü": 3, "x": 1}
    expected: dict[str, list[StoredBatch]] = {}
    for n, (name, n_batches) in enumerate(topics.items()):
        expected[name] = append_many(
            store.topic(name), [1 + i % 3 for i in range(n_batches)], size=70, tag0=100 * n
        )
    store.topic("empty.topic")
    store.close()

    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    assert store.findings == []
    assert sorted(store.topic_names()) == sorted([*topics, "empty.topic"])
    for name, batches in expected.items():
        log = store.topic(name)
        assert_log_holds(log, batches)
        for seg in log.segments:
            assert seg.index_path.exists() and seg.time_path.exists()
    empty = store.topic("empty.topic")
    assert empty.first_offset == empty.next_offset == 0
    assert empty.read(0, BIG) == []
    store.close()
    for name, batches in expected.items():
        reopen_continues(tmp_path, name, batches, segment_bytes=SMALL_SEGMENT)


def test_index_is_sparse_and_reopen_does_not_scan_old_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    segment_bytes = 128 * 1024
    store = open_store(tmp_path, segment_bytes=segment_bytes)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 7 for i in range(1200)], size=90)
    assert len(log.segments) >= 3
    max_batch = max(HEADER_SIZE + len(b.batch) for b in expected)
    before = [(list(s._idx_offsets), list(s._idx_positions), list(s._time_stamps)) for s in log.segments]
    store.close()

    scans: list[int] = []
    real_scan = Segment.scan

    def counting_scan(self: Segment) -> Any:
        scans.append(self.base_offset)
        return real_scan(self)

    monkeypatch.setattr(Segment, "scan", counting_scan)
    store = open_store(tmp_path, segment_bytes=segment_bytes)
    log = store.topic("t")
    # Only the newest segment is scanned; older ones trust their indexes.
    assert scans == [log.segments[-1].base_offset]
    after = [(list(s._idx_offsets), list(s._idx_positions), list(s._time_stamps)) for s in log.segments]
    assert after == before

    for seg in log.segments:
        assert seg.index_path.stat().st_size == len(seg._idx_offsets) * INDEX_ENTRY.size
        assert seg.time_path.stat().st_size == len(seg._time_offsets) * TIME_ENTRY.size
        assert seg._idx_positions[0] == 0 and seg._idx_offsets[0] == seg.base_offset
        assert seg._time_offsets == seg._idx_offsets
        # Roughly one entry per INDEX_INTERVAL bytes of log.
        gaps = [b - a for a, b in zip(seg._idx_positions, seg._idx_positions[1:])]
        assert gaps and all(INDEX_INTERVAL <= g <= INDEX_INTERVAL + max_batch for g in gaps)
        assert len(seg._idx_offsets) >= seg.size // (INDEX_INTERVAL + max_batch)

    # A read near the end of a big segment starts at the nearest index entry,
    # not at the start of the file.
    seg = log.segments[0]
    target = seg.next_offset - 1
    positions: list[int] = []
    real_pread = os.pread

    def recording_pread(fd: int, n: int, pos: int) -> bytes:
        positions.append(pos)
        return real_pread(fd, n, pos)

    monkeypatch.setattr(os, "pread", recording_pread)  # what segment.py calls
    got = log.read(target, 1)
    monkeypatch.setattr(os, "pread", real_pread)
    assert got == [expected[containing(expected, target)]]
    assert positions and min(positions) >= seg.size - INDEX_INTERVAL - 2 * max_batch
    assert_log_holds(log, expected)
    store.close()


# -- 4. recovery --------------------------------------------------------------


def test_torn_tail_of_newest_segment(tmp_path: Path) -> None:
    expected, directory, bases = build_multi_segment(tmp_path)
    newest = segment_paths(directory)[-1]
    batches = batches_in(newest)
    assert len(batches) >= 2
    pos, base, _count, length = batches[-1]
    cut = pos + HEADER_SIZE + length // 2
    size = newest.stat().st_size
    os.truncate(newest, cut)

    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    assert len(store.findings) == 1
    t = store.findings[0]
    assert t.segment == newest
    assert t.position == pos
    assert t.dropped_bytes == cut - pos
    assert t.first_offset == base
    assert "torn" in t.reason
    assert newest.stat().st_size == pos  # cut off on disk
    prefix = [b for b in expected if b.next_offset <= base]
    log = store.topic("t")
    assert log.next_offset == base
    assert_log_holds(log, prefix)
    assert size > pos
    reopen_continues(tmp_path, "t", prefix, store, segment_bytes=SMALL_SEGMENT)


@pytest.mark.parametrize("keep", [0, 1, 3, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5])
def test_torn_tail_at_every_kind_of_cut(tmp_path: Path, keep: int) -> None:
    """Cut the last batch after ``keep`` of its bytes (0 = cleanly at a boundary)."""
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [2, 3, 4])
    path = log.segments[-1].path
    store.close()
    pos, base, _count, _length = batches_in(path)[-1]
    os.truncate(path, pos + keep)
    store = open_store(tmp_path)
    if keep == 0:
        assert store.findings == []
    else:
        assert [(t.position, t.dropped_bytes, t.first_offset) for t in store.findings] == [
            (pos, keep, base)
        ]
    assert_log_holds(store.topic("t"), expected[:-1])
    reopen_continues(tmp_path, "t", expected[:-1], store)


def test_flipped_byte_in_last_batch_records(tmp_path: Path) -> None:
    expected, directory, _bases = build_multi_segment(tmp_path)
    newest = segment_paths(directory)[-1]
    pos, base, _count, length = batches_in(newest)[-1]
    flip_byte(newest, pos + HEADER_SIZE + 8 + (length - 8) // 2)  # inside the records

    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    assert [(t.segment, t.position, t.first_offset) for t in store.findings] == [(newest, pos, base)]
    assert "checksum" in store.findings[0].reason
    prefix = [b for b in expected if b.next_offset <= base]
    assert_log_holds(store.topic("t"), prefix)
    reopen_continues(tmp_path, "t", prefix, store, segment_bytes=SMALL_SEGMENT)


def test_flipped_byte_in_middle_batch_costs_only_that_batch(tmp_path: Path) -> None:
    store = open_store(tmp_path)  # one big segment
    log = store.topic("t")
    expected = append_many(log, [1 + i % 3 for i in range(12)])
    path = log.segments[0].path
    store.close()
    original = path.read_bytes()
    pos, base, count, length = batches_in(path)[5]
    flip_byte(path, pos + HEADER_SIZE + length - 1)
    store = open_store(tmp_path)
    [found] = store.findings
    assert (found.action, found.position, found.dropped_bytes) == ("quarantined", pos, HEADER_SIZE + length)
    assert (found.first_offset, found.last_offset) == (base, base + count - 1)
    # The damaged bytes are set aside, with a note, not destroyed.
    assert found.quarantined_to is not None
    assert found.quarantined_to.read_bytes()[:-1] == original[pos : pos + HEADER_SIZE + length - 1]
    assert json.loads(found.quarantined_to.with_suffix(".json").read_text())["first_lost_offset"] == base
    log = store.topic("t")
    kept = expected[:5] + expected[6:]
    assert walk(log) == (kept, [(base, base + count - 1, "damaged")])
    assert log.next_offset == expected[-1].next_offset  # later offsets unchanged, none reused
    store.close()
    # The hole and its reason survive a restart; appends go on after it.
    store = open_store(tmp_path)
    assert store.findings == []
    log = store.topic("t")
    assert walk(log)[1] == [(base, base + count - 1, "damaged")]
    more = append_many(log, [2], ts0=10**7, tag0=500)
    assert more[0].base_offset == expected[-1].next_offset
    store.close()


# Header: base u64 | count u32 | length u32 | first_ts u64 | last_ts u64 | crc u32,
# then the wire envelope: count u32 | records crc u32.
@pytest.mark.parametrize(
    "where",
    [0, 7, 8, 11, 12, 13, 15, 16, 23, 24, 31, 32, 35, HEADER_SIZE + 0, HEADER_SIZE + 3, HEADER_SIZE + 4, HEADER_SIZE + 7],
)
def test_flipped_byte_in_batch_header(tmp_path: Path, where: int) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    expected = append_many(log, [2, 3, 4, 1])
    path = log.segments[0].path
    store.close()
    pos, base, _count, _length = batches_in(path)[-1]
    flip_byte(path, pos + where)
    store = open_store(tmp_path)
    assert [(t.position, t.first_offset) for t in store.findings] == [(pos, base)]
    assert path.stat().st_size == pos
    assert_log_holds(store.topic("t"), expected[:-1])
    reopen_continues(tmp_path, "t", expected[:-1], store)


@pytest.mark.parametrize("garbage", ["zeros", "random", "short", "fake_header"])
def test_garbage_after_last_batch_is_dropped(tmp_path: Path, garbage: str) -> None:
    expected, directory, _bases = build_multi_segment(tmp_path)
    newest = segment_paths(directory)[-1]
    size = newest.stat().st_size
    rng = random.Random(garbage)
    junk = {
        "zeros": bytes(4096),
        "random": rng.randbytes(5000),
        "short": b"\x01\x02\x03",
        # A header that claims the right next offset but a length past the end.
        "fake_header": HEADER.pack(expected[-1].next_offset, 1, 10_000, 1, 1, 0) + b"xx",
    }[garbage]
    with open(newest, "ab") as f:
        f.write(junk)
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    assert [(t.segment, t.position, t.dropped_bytes, t.first_offset) for t in store.findings] == [
        (newest, size, len(junk), expected[-1].next_offset)
    ]
    assert newest.stat().st_size == size
    assert_log_holds(store.topic("t"), expected)
    reopen_continues(tmp_path, "t", expected, store, segment_bytes=SMALL_SEGMENT)


@pytest.mark.parametrize("which", ["index", "timeindex", "both"])
def test_deleted_index_of_older_segment_is_rebuilt(tmp_path: Path, which: str) -> None:
    expected, directory, bases = build_multi_segment(tmp_path)
    victim = bases[1]
    seg = Segment(directory, victim)
    index_before = seg.index_path.read_bytes()
    time_before = seg.time_path.read_bytes()
    if which in ("index", "both"):
        seg.index_path.unlink()
    if which in ("timeindex", "both"):
        seg.time_path.unlink()
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    assert store.findings == []
    assert seg.index_path.read_bytes() == index_before
    assert seg.time_path.read_bytes() == time_before
    log = store.topic("t")
    assert [s.base_offset for s in log.segments] == bases
    assert_log_holds(log, expected)
    reopen_continues(tmp_path, "t", expected, store, segment_bytes=SMALL_SEGMENT)


def _nonsense_odd(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 3)


def _nonsense_random(path: Path) -> None:
    path.write_bytes(random.Random(3).randbytes(8 * 24))


def _nonsense_zeros(path: Path) -> None:
    path.write_bytes(bytes(8 * 12))


def _nonsense_empty(path: Path) -> None:
    path.write_bytes(b"")


def _nonsense_past_end(path: Path) -> None:
    # A well-formed entry pointing past the end of the log file.
    data = path.read_bytes()
    if path.suffix == ".index":
        path.write_bytes(data + INDEX_ENTRY.pack(10_000, 1 << 30))
    else:
        path.write_bytes(data + TIME_ENTRY.pack(1 << 60, 10_000))


@pytest.mark.parametrize("suffix", [".index", ".timeindex"])
@pytest.mark.parametrize(
    "damage", [_nonsense_odd, _nonsense_random, _nonsense_zeros, _nonsense_empty, _nonsense_past_end]
)
def test_corrupt_index_of_older_segment_is_rebuilt(
    tmp_path: Path, suffix: str, damage: Callable[[Path], None]
) -> None:
    store = open_store(tmp_path, segment_bytes=20 * 1024)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 5 for i in range(400)], size=80, ts_step=2)
    assert len(log.segments) >= 3
    assert all(len(s._idx_offsets) >= 4 for s in log.segments[:-1])
    victim = log.segments[1]
    path = victim.index_path if suffix == ".index" else victim.time_path
    good_index = victim.index_path.read_bytes()
    good_time = victim.time_path.read_bytes()
    store.close()
    damage(path)
    store = open_store(tmp_path, segment_bytes=20 * 1024)
    assert store.findings == []
    log = store.topic("t")
    assert victim.index_path.read_bytes() == good_index
    assert victim.time_path.read_bytes() == good_time
    assert_log_holds(log, expected)
    for b in expected[::17]:
        assert log.offset_at_time(b.timestamp) == next(x.base_offset for x in expected if x.timestamp >= b.timestamp)
    reopen_continues(tmp_path, "t", expected, store, segment_bytes=20 * 1024)


def test_plausible_but_wrong_index_entry_is_not_trusted(tmp_path: Path) -> None:
    """An index entry that is well-formed (increasing, inside the file) but
    does not point at the batch it names does not match its segment, so it
    must be rebuilt (segment.py module docstring), not followed."""
    store = open_store(tmp_path, segment_bytes=64 * 1024)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 5 for i in range(400)], size=80)
    victim = log.segments[0]
    assert len(victim._idx_offsets) >= 6
    good_index = victim.index_path.read_bytes()
    store.close()
    entries = list(INDEX_ENTRY.iter_unpack(good_index))
    rel, position = entries[3]
    entries[3] = (rel, position + 4)  # off by a few bytes: inside a batch header
    victim.index_path.write_bytes(b"".join(INDEX_ENTRY.pack(*e) for e in entries))
    store = open_store(tmp_path, segment_bytes=64 * 1024)
    assert_log_holds(store.topic("t"), expected)
    assert victim.index_path.read_bytes() == good_index
    store.close()


def test_wrong_timestamp_in_timeindex_is_not_trusted(tmp_path: Path) -> None:
    """A .timeindex entry whose offset matches the .index but whose timestamp
    is not the batch's (here 0, so the stamps are not even non-decreasing)
    does not match its segment: rebuilt, and offset_at_time stays right."""
    store = open_store(tmp_path, segment_bytes=64 * 1024)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 5 for i in range(400)], size=80)
    victim = log.segments[0]
    assert len(victim._time_stamps) >= 6
    good_time = victim.time_path.read_bytes()
    store.close()
    entries = list(TIME_ENTRY.iter_unpack(good_time))
    _ts, rel = entries[3]
    entries[3] = (0, rel)
    victim.time_path.write_bytes(b"".join(TIME_ENTRY.pack(*e) for e in entries))
    store = open_store(tmp_path, segment_bytes=64 * 1024)
    log = store.topic("t")
    wrong = [
        (b.timestamp, log.offset_at_time(b.timestamp), b.base_offset)
        for b in expected
        if log.offset_at_time(b.timestamp) != b.base_offset
    ]
    assert wrong == []
    assert victim.time_path.read_bytes() == good_time
    store.close()


def test_empty_newest_segment(tmp_path: Path) -> None:
    expected, directory, bases = build_multi_segment(tmp_path)
    # A roll that crashed before its first append: an empty newest .log, no indexes.
    empty = Segment(directory, expected[-1].next_offset)
    empty.path.write_bytes(b"")
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    assert store.findings == []
    log = store.topic("t")
    assert [s.base_offset for s in log.segments] == [*bases, empty.base_offset]
    assert empty.index_path.exists() and empty.time_path.exists()
    assert log.offset_at_time(2**62) == log.next_offset
    assert_log_holds(log, expected)
    reopen_continues(tmp_path, "t", expected, store, segment_bytes=SMALL_SEGMENT)


def test_only_segment_empty_and_indexes_missing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    log = store.topic("t")
    path = log.segments[0].path
    store.close()
    for p in path.parent.iterdir():
        if p.suffix != ".log":
            p.unlink()
    store = open_store(tmp_path)
    assert store.findings == []
    log = store.topic("t")
    assert log.first_offset == log.next_offset == 0
    assert log.read(0, BIG) == []
    reopen_continues(tmp_path, "t", [], store)


def test_topic_directory_without_segments(tmp_path: Path) -> None:
    (tmp_path / "topics" / "lonely").mkdir(parents=True)
    store = open_store(tmp_path)
    assert store.findings == []
    assert store.topic_names() == ["lonely"]
    log = store.topic("lonely")
    assert log.next_offset == 0
    reopen_continues(tmp_path, "lonely", [], store)


@pytest.mark.parametrize("shift", [1, 1000])
def test_segment_after_a_gap_keeps_its_offsets(tmp_path: Path, shift: int) -> None:
    """A newest segment whose base is past its predecessor's end (offsets in
    between missing): kept where it is, the gap reported as a hole."""
    expected, directory, bases = build_multi_segment(tmp_path)
    last = bases[-1]
    moved = last + shift
    shifted = _shift_segment(directory, last, shift)
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    assert store.findings == []
    log = store.topic("t")
    assert [s.base_offset for s in log.segments] == [*bases[:-1], moved]
    prefix = [b for b in expected if b.next_offset <= last]
    assert walk(log) == (prefix + shifted, [(last, moved - 1, "missing")])
    store.close()


def test_segment_overlapping_its_predecessor_is_set_aside(tmp_path: Path) -> None:
    expected, directory, bases = build_multi_segment(tmp_path)
    last = bases[-1]
    _shift_segment(directory, last, -1)
    overlapping = Segment(directory, last - 1)
    data = overlapping.path.read_bytes()
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    [found] = store.findings
    assert (found.action, found.segment, found.dropped_bytes) == ("quarantined", overlapping.path, len(data))
    assert "overlaps" in found.reason
    assert found.quarantined_to is not None and found.quarantined_to.read_bytes() == data
    assert not overlapping.path.exists() and not overlapping.index_path.exists()
    prefix = [b for b in expected if b.next_offset <= last]
    log = store.topic("t")
    assert [s.base_offset for s in log.segments] == bases[:-1]
    assert_log_holds(log, prefix)
    reopen_continues(tmp_path, "t", prefix, store, segment_bytes=SMALL_SEGMENT)


def _shift_segment(directory: Path, base: int, shift: int) -> list[StoredBatch]:
    """Rename a segment (and its indexes) to ``base + shift`` with its header
    offsets rewritten to match, so the file itself is valid; return what it
    now holds."""
    old = Segment(directory, base)
    new = Segment(directory, base + shift)
    data = bytearray(old.path.read_bytes())
    held = []
    for pos, b, count, length in batches_in(old.path):
        struct.pack_into(">Q", data, pos, b + shift)
        first = HEADER.unpack_from(data, pos)[3]
        fields = bytes(data[pos : pos + HEADER_SIZE - 4])
        envelope = bytes(data[pos + HEADER_SIZE : pos + HEADER_SIZE + 8])
        struct.pack_into(">I", data, pos + HEADER_SIZE - 4, header_crc(fields, envelope))
        held.append(StoredBatch(b + shift, count, first, bytes(data[pos + HEADER_SIZE : pos + HEADER_SIZE + length])))
    old.path.unlink()
    new.path.write_bytes(bytes(data))
    old.index_path.unlink()
    old.time_path.unlink()
    return held


def test_missing_middle_segment_is_a_hole_and_later_segments_stay(tmp_path: Path) -> None:
    expected, directory, bases = build_multi_segment(tmp_path)
    for suffix in (".log", ".index", ".timeindex"):
        (directory / f"{bases[2]:020d}{suffix}").unlink()
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    assert store.findings == []
    log = store.topic("t")
    assert [s.base_offset for s in log.segments] == [b for b in bases if b != bases[2]]
    kept = [b for b in expected if not bases[2] <= b.base_offset < bases[3]]
    assert walk(log) == (kept, [(bases[2], bases[3] - 1, "missing")])
    assert log.next_offset == expected[-1].next_offset
    store.close()


def test_missing_newest_segment_file_does_not_reuse_its_offsets(tmp_path: Path) -> None:
    """Only the .log of the newest segment is gone: its index still shows
    which offsets it handed out, and new appends start after them."""
    expected, directory, bases = build_multi_segment(tmp_path)
    newest = Segment(directory, bases[-1])
    last_indexed = bases[-1] + INDEX_ENTRY.unpack(newest.index_path.read_bytes()[-INDEX_ENTRY.size :])[0]
    newest.path.unlink()
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    log = store.topic("t")
    assert log.next_offset == last_indexed + 1
    prefix = [b for b in expected if b.next_offset <= bases[-1]]
    assert walk(log) == (prefix, [(bases[-1], last_indexed, "missing")])
    assert not newest.index_path.exists() and not newest.time_path.exists()
    reopen = append_many(log, [2], ts0=10**7, tag0=77)
    assert reopen[0].base_offset == last_indexed + 1
    store.close()


def test_torn_tail_of_older_segment(tmp_path: Path) -> None:
    """The segment before the newest lost its tail (e.g. an fsync=never topic
    rolled, then the machine crashed before the page cache was written). The
    torn bytes are set aside, the newest segment keeps its batches and
    offsets, and the lost offsets are a hole."""
    expected, directory, bases = build_multi_segment(tmp_path)
    older = Segment(directory, bases[-2])
    pos, base, _count, length = batches_in(older.path)[-1]
    os.truncate(older.path, pos + HEADER_SIZE + length // 2)
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    [found] = store.findings
    assert (found.segment, found.position, found.action) == (older.path, pos, "quarantined")
    assert (found.first_offset, found.last_offset) == (base, bases[-1] - 1)
    log = store.topic("t")
    kept = [b for b in expected if b.base_offset != base]
    assert walk(log) == (kept, [(base, bases[-1] - 1, "damaged")])
    assert log.next_offset == expected[-1].next_offset
    store.close()


def test_garbage_after_last_batch_of_older_segment_is_never_read(tmp_path: Path) -> None:
    """Junk after the last batch of an older segment (here: a stray copy of
    that batch) is found when recovery checks the segment; reads must stop at the
    segment's valid end instead of returning the junk as batches."""
    expected, directory, bases = build_multi_segment(tmp_path)
    older = Segment(directory, bases[1])
    pos, _base, _count, length = batches_in(older.path)[-1]
    data = older.path.read_bytes()
    with open(older.path, "ab") as f:
        f.write(data[pos : pos + HEADER_SIZE + length])
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    log = store.topic("t")
    # Whether or not recovery reports it, the log must read back unchanged.
    assert [s.base_offset for s in log.segments] == bases
    assert_log_holds(log, expected)
    for offset in range(bases[1], bases[2]):
        got = log.read(offset, BIG)
        assert got == expected[containing(expected, offset) : containing(expected, bases[2] - 1) + 1]
    store.close()


@pytest.mark.parametrize("name", ["bad..name", "%2A", "a%20b", "%3E", ".hidden", "x.", "%00"])
def test_directory_that_is_not_a_topic_is_ignored(tmp_path: Path, name: str) -> None:
    store = open_store(tmp_path)
    expected = append_many(store.topic("good"), [2, 2])
    store.close()
    bogus = tmp_path / "topics" / name
    bogus.mkdir()
    (bogus / f"{0:020d}.log").write_bytes(b"not a segment at all" * 10)
    (tmp_path / "topics" / "stray-file").write_bytes(b"x")
    store = open_store(tmp_path)
    assert store.topic_names() == ["good"]
    assert store.findings == []
    assert_log_holds(store.topic("good"), expected)
    store.close()
    # Left alone, not deleted.
    assert (bogus / f"{0:020d}.log").read_bytes() == b"not a segment at all" * 10


def test_many_kinds_of_damage_at_once_never_raise(tmp_path: Path) -> None:
    rng = random.Random(11)
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    written: dict[str, list[StoredBatch]] = {}
    for n in range(6):
        written[f"t{n}"] = append_many(store.topic(f"t{n}"), [1 + i % 4 for i in range(25)], size=50)
    store.close()
    for n in range(6):
        directory = tmp_path / "topics" / f"t{n}"
        files = sorted(directory.iterdir())
        for _ in range(4):
            victim = rng.choice(files)
            if not victim.exists():
                continue
            action = rng.choice(["flip", "truncate", "delete", "append"])
            size = victim.stat().st_size
            if action == "flip" and size:
                flip_byte(victim, rng.randrange(size))
            elif action == "truncate":
                os.truncate(victim, rng.randrange(size + 1))
            elif action == "delete":
                victim.unlink()
            else:
                with open(victim, "ab") as f:
                    f.write(rng.randbytes(rng.randrange(1, 300)))
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    for n in range(6):
        log = store.topic(f"t{n}")
        # Whatever is served is exactly what was written, at its offsets;
        # everything else is reported lost, nothing is skipped silently.
        served, losses = walk(log)
        original = {b.base_offset: b for b in written[f"t{n}"]}
        for b in served:
            assert original[b.base_offset] == b
        covered = sum(b.count for b in served) + sum(last - first + 1 for first, last, _ in losses)
        assert covered == log.next_offset - log.first_offset
    store.close()


# -- 5. retention -------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 1])
def test_retention_bytes_never_deletes_the_active_segment(tmp_path: Path, limit: int) -> None:
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT, retention_bytes=limit)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 3 for i in range(30)], size=60)
    n = len(log.segments)
    assert n >= 3
    active = log.segments[-1]
    assert store.enforce_retention() == n - 1
    assert log.segments == [active]
    assert log.first_offset == active.base_offset
    kept = [b for b in expected if b.base_offset >= active.base_offset]
    assert_log_holds(log, kept)
    assert log.read(0, BIG)[0] == kept[0]  # below first_offset: from first_offset
    assert store.enforce_retention() == 0
    assert segment_paths(log.directory) == [active.path]
    assert log_files(log.directory) == sorted(
        [active.path.name, active.index_path.name, active.time_path.name]
    )
    store.close()
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT, retention_bytes=limit)
    assert store.findings == []
    log = store.topic("t")
    assert_log_holds(log, kept)
    reopen_continues(tmp_path, "t", kept, store, segment_bytes=SMALL_SEGMENT, retention_bytes=limit)


def test_retention_bytes_keeps_the_newest_segments(tmp_path: Path) -> None:
    limit = 3 * SMALL_SEGMENT
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT, retention_bytes=limit)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 3 for i in range(60)], size=60)
    sizes = [s.size for s in log.segments]
    bases = [s.base_offset for s in log.segments]
    deleted = store.enforce_retention()
    assert deleted >= 1
    kept_bases = bases[deleted:]
    assert [s.base_offset for s in log.segments] == kept_bases
    assert log.size_bytes == sum(sizes[deleted:])
    assert log.size_bytes <= limit
    assert log.size_bytes + sizes[deleted - 1] > limit  # deleted no more than needed
    assert log.first_offset == kept_bases[0]
    kept = [b for b in expected if b.base_offset >= kept_bases[0]]
    assert_log_holds(log, kept)
    for offset in (0, 1, kept_bases[0] - 1):
        assert log.read(offset, 1) == [kept[0]]
    for base in bases[:deleted]:
        assert not (log.directory / f"{base:020d}.log").exists()
        assert not (log.directory / f"{base:020d}.index").exists()
        assert not (log.directory / f"{base:020d}.timeindex").exists()
    # Appending more and enforcing again moves first_offset on.
    more = append_many(log, [2] * 30, size=60, ts0=9_000_000, tag0=500)
    store.enforce_retention()
    assert log.size_bytes <= limit or len(log.segments) == 1
    assert log.first_offset > kept_bases[0]
    whole = [b for b in kept + more if b.base_offset >= log.first_offset]
    assert_log_holds(log, whole)
    store.close()
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT, retention_bytes=limit)
    assert store.findings == []
    assert_log_holds(store.topic("t"), whole)
    store.close()


def test_retention_seconds_deletes_whole_old_segments(tmp_path: Path) -> None:
    now = time.time_ns() // 1000
    hour = 3600 * 1_000_000
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT, retention_seconds=60.0)
    log = store.topic("t")
    old = append_many(log, [2] * 20, size=60, ts0=now - 2 * hour, ts_step=1000)
    old_segments = len(log.segments)
    # The next batches go to the current active segment (which also holds old
    # messages, so its newest message is recent) and then on to new segments.
    new = append_many(log, [2] * 20, size=60, ts0=now, ts_step=1, tag0=100)
    expected = old + new
    boundary = log.segments[old_segments - 1]  # mixed: old and new messages
    assert boundary.last_timestamp >= now
    bases = [s.base_offset for s in log.segments]
    deleted = store.enforce_retention()
    assert deleted == old_segments - 1
    assert log.segments[0] is boundary
    assert log.first_offset == boundary.base_offset
    kept = [b for b in expected if b.base_offset >= boundary.base_offset]
    assert_log_holds(log, kept)
    assert log.read(0, 1) == [kept[0]]
    assert log.offset_at_time(0) == boundary.base_offset
    for base in bases[:deleted]:
        assert not (log.directory / f"{base:020d}.log").exists()
    assert store.enforce_retention() == 0
    store.close()


def test_retention_seconds_never_deletes_the_active_segment(tmp_path: Path) -> None:
    now = time.time_ns() // 1000
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT, retention_seconds=1.0)
    log = store.topic("t")
    expected = append_many(log, [3] * 25, size=60, ts0=now - 10**10, ts_step=5)
    assert len(log.segments) >= 3
    active = log.segments[-1]
    assert store.enforce_retention() >= 2
    assert log.segments == [active]
    kept = [b for b in expected if b.base_offset >= active.base_offset]
    assert_log_holds(log, kept)
    reopen_continues(tmp_path, "t", kept, store, segment_bytes=SMALL_SEGMENT, retention_seconds=1.0)


def test_no_retention_limits_deletes_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    log = store.topic("t")
    expected = append_many(log, [2] * 30, size=60, ts0=1)  # ancient timestamps
    n = len(log.segments)
    assert store.enforce_retention() == 0
    assert len(log.segments) == n
    assert_log_holds(log, expected)
    store.close()


def test_retention_is_per_topic(tmp_path: Path) -> None:
    resolver = SettingsResolver.from_specs(
        TopicSettings(segment_bytes=SMALL_SEGMENT), ["short.>:retention_bytes=0"]
    )
    store = FileStore(tmp_path, resolver)
    short = store.topic("short.a")
    long = store.topic("long.a")
    append_many(short, [2] * 30, size=60)
    expected_long = append_many(long, [2] * 30, size=60)
    n_long = len(long.segments)
    assert store.enforce_retention() >= 2
    assert len(short.segments) == 1
    assert len(long.segments) == n_long
    assert_log_holds(long, expected_long)
    store.close()


# -- 6. sync and settings -----------------------------------------------------


async def test_sync_fsyncs_only_when_something_was_appended(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert store.durability is Durability.DISK
    assert store.needs_sync
    assert (await store.sync()).durability is Durability.DISK
    assert store.fsyncs == 0  # nothing at all to do
    log = store.topic("t")
    assert log.needs_sync and log.durability is Durability.DISK
    log.append(make_batch(0, 2), 2, 1)
    assert (await store.sync()).durability is Durability.DISK
    assert store.fsyncs == 1
    assert (await store.sync()).durability is Durability.DISK
    assert store.fsyncs == 1  # nothing new
    log.append(make_batch(1, 1), 1, 2)
    log.append(make_batch(2, 1), 1, 3)
    assert (await store.sync()).durability is Durability.DISK
    assert store.fsyncs == 2  # one group commit covers both appends
    assert not any(s.dirty for s in log.segments)
    await store.sync_interval_topics()
    assert store.fsyncs == 2
    store.close()


async def test_sync_covers_rolled_segments(tmp_path: Path) -> None:
    store = open_store(tmp_path, segment_bytes=SMALL_SEGMENT)
    log = store.topic("t")
    append_many(log, [2] * 40, size=60)
    assert len(log.segments) >= 3
    assert any(s.dirty for s in log.segments)
    assert (await store.sync()).durability is Durability.DISK
    assert store.fsyncs == 1
    assert not any(s.dirty for s in log.segments)
    store.close()


async def test_per_topic_fsync_settings(tmp_path: Path) -> None:
    resolver = SettingsResolver.from_specs(TopicSettings(), ["logs.>:fsync=never"])
    store = FileStore(tmp_path, resolver)
    logs = store.topic("logs.app")
    orders = store.topic("orders")
    assert logs.settings.fsync == "never"
    assert not logs.needs_sync and logs.durability is Durability.OS
    assert orders.settings.fsync == "always"
    assert orders.needs_sync and orders.durability is Durability.DISK
    assert store.needs_sync and store.durability is Durability.DISK
    assert store.sync_interval is None
    await store.sync()  # the new topic directories
    base = store.fsyncs
    logs.append(make_batch(0, 1), 1, 1)
    assert (await store.sync()).durability is Durability.DISK
    assert store.fsyncs == base  # a never-topic append needs no fsync
    await store.sync_interval_topics()
    assert store.fsyncs == base
    orders.append(make_batch(1, 1), 1, 1)
    assert (await store.sync()).durability is Durability.DISK
    assert store.fsyncs == base + 1
    # close() flushes whatever was written, whatever the policy.
    store.close()
    assert not any(s.dirty for s in logs.segments)
    store = FileStore(tmp_path, resolver)
    assert store.topic("logs.app").next_offset == 1
    assert store.topic("logs.app").needs_sync is False
    store.close()


async def test_interval_topics_are_synced_by_sync_interval_topics(tmp_path: Path) -> None:
    resolver = SettingsResolver.from_specs(
        TopicSettings(fsync="never"), ["metrics.>:fsync=interval,fsync_interval_ms=50"]
    )
    store = FileStore(tmp_path, resolver)
    assert not store.needs_sync
    assert store.durability is Durability.OS
    metrics = store.topic("metrics.cpu")
    assert metrics.durability is Durability.OS and not metrics.needs_sync
    assert store.sync_interval == pytest.approx(0.05)
    await store.sync_interval_topics()  # directory entries
    base = store.fsyncs
    metrics.append(make_batch(0, 1), 1, 1)
    await store.sync()
    assert store.fsyncs == base  # sync() is for always-topics only
    await store.sync_interval_topics()
    assert store.fsyncs == base + 1
    assert not any(s.dirty for s in metrics.segments)
    store.close()


def test_settings_resolver_first_match_wins() -> None:
    default = TopicSettings(segment_bytes=4096)
    resolver = SettingsResolver.from_specs(
        default,
        [
            "logs.debug.>:fsync=never,retention_bytes=100",
            "logs.>:fsync=interval,fsync_interval_ms=10, segment_bytes=2048",
            "*.audit:retention_seconds=1.5",
        ],
    )
    assert resolver("orders") == default
    assert resolver("logs.debug.x") == TopicSettings(fsync="never", segment_bytes=4096, retention_bytes=100)
    assert resolver("logs.app") == TopicSettings(fsync="interval", fsync_interval_ms=10, segment_bytes=2048)
    assert resolver("x.audit") == TopicSettings(segment_bytes=4096, retention_seconds=1.5)
    assert SettingsResolver.from_specs(default, []) == SettingsResolver(default)


@pytest.mark.parametrize(
    "spec",
    [
        "logs.>",  # no colon
        "logs.>:bogus=1",
        "logs.>:fsync",  # no value
        "logs.>:fsync=sometimes",
        "logs.>:segment_bytes=abc",
        "logs.>:segment_bytes=10",
        "logs.>:fsync_interval_ms=0",
        "logs.>:retention_seconds=soon",
        "a.>.b:fsync=never",  # '>' not last
        "a..b:fsync=never",
        ":fsync=never",  # empty pattern
    ],
)
def test_from_specs_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        SettingsResolver.from_specs(TopicSettings(), [spec])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fsync": "sometimes"},
        {"fsync": ""},
        {"fsync_interval_ms": 0},
        {"fsync_interval_ms": -5},
        {"segment_bytes": 1023},
        {"segment_bytes": 0},
    ],
)
def test_topic_settings_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TopicSettings(**kwargs)


def test_topic_settings_accepts_the_minimums() -> None:
    s = TopicSettings(fsync="interval", fsync_interval_ms=1, segment_bytes=1024, retention_bytes=0)
    assert s.segment_bytes == 1024 and s.retention_bytes == 0


# -- 7. a model-based property test --------------------------------------------


def _expected_read(model: list[StoredBatch], offset: int) -> int | None:
    """Index of the first batch a read at ``offset`` must return, or None."""
    if not model or offset >= model[-1].next_offset:
        return None
    if offset < model[0].base_offset:
        return 0
    return containing(model, offset)


def _check_against_model(
    log: FileTopicLog,
    model: list[StoredBatch],
    reads: list[tuple[int, int]],
    times: list[int],
) -> None:
    next_offset = model[-1].next_offset if model else 0
    assert log.first_offset == 0
    assert log.next_offset == next_offset
    boundaries = {s.base_offset for s in log.segments} | {next_offset}
    for offset, max_bytes in reads:
        got = log.read(offset, max_bytes)
        i = _expected_read(model, offset)
        if i is None:
            assert got == []
            continue
        assert got and got == model[i : i + len(got)]
        total = sum(len(b.batch) for b in got)
        assert len(got) == 1 or total <= max_bytes
        j = i + len(got)
        if j < len(model) and got[-1].next_offset not in boundaries:
            # Stopped inside a segment: only because the next would not fit.
            assert total + len(model[j].batch) > max_bytes
    for t in times:
        want = next((b.base_offset for b in model if b.timestamp >= t), next_offset)
        assert log.offset_at_time(t) == want


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    appends=st.lists(
        st.tuples(st.integers(1, 20), st.integers(0, 120), st.integers(0, 3)),
        min_size=0,
        max_size=40,
    ),
    data=st.data(),
)
def test_random_appends_and_reads_match_a_model(
    appends: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as d:
        data_dir = Path(d)
        store = open_store(data_dir, segment_bytes=SMALL_SEGMENT)
        log = store.topic("prop.t")
        model: list[StoredBatch] = []
        ts = 1_000
        for n, (count, size, step) in enumerate(appends):
            ts += step
            batch = encode_batch([f"{n}.{i}".encode() * (size // 4) for i in range(count)])
            base = log.append(batch, count, ts)
            assert base == (model[-1].next_offset if model else 0)
            model.append(StoredBatch(base, count, ts, batch))
        high = (model[-1].next_offset if model else 0) + 3
        reads = data.draw(
            st.lists(st.tuples(st.integers(0, high), st.integers(0, 6000)), max_size=25), label="reads"
        )
        times = data.draw(st.lists(st.integers(990, ts + 2), max_size=10), label="times")
        _check_against_model(log, model, reads, times)
        for s in log.segments[1:]:
            assert s.path.name == f"{s.base_offset:020d}.log"
        store.close()

        store = open_store(data_dir, segment_bytes=SMALL_SEGMENT)
        assert store.findings == []
        log = store.topic("prop.t")
        _check_against_model(log, model, reads, times)
        # Appends after reopening continue the model.
        batch = make_batch(-1, 2)
        base = log.append(batch, 2, ts + 1)
        model.append(StoredBatch(base, 2, ts + 1, batch))
        _check_against_model(log, model, [(model[-1].base_offset, 1), (0, BIG)], [ts + 1])
        store.close()
