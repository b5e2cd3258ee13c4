"""Opening older segments through their indexes (broker/storage/segment.py,
``load_indexes``; broker/storage/recovery.py): an index is trusted only when
every entry names a batch whose checked header says the same; anything else
is rebuilt by a scan, and bytes the scan cannot read are set aside, never
read as batches, never a crash.

Each test damages one file of a closed store the way a bad disk or a crash
leaves it, reopens the store and compares what it serves with what was
appended.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.segment import HEADER, HEADER_SIZE, INDEX_ENTRY, TIME_ENTRY, Segment

from helpers.logs import batches_in, open_store, walk
from helpers.stored import BIG, append_many, assert_log_holds

SEGMENT_BYTES = 32 * 1024
TS_STEP = 10


def build(data_dir: Path) -> tuple[list[StoredBatch], list[Segment]]:
    """A closed store, topic "t", over several segments of several index
    entries each; what it holds and its segments (closed)."""
    store = open_store(data_dir, segment_bytes=SEGMENT_BYTES)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 5 for i in range(500)], size=80, ts_step=TS_STEP)
    segments = list(log.segments)
    assert len(segments) >= 4
    assert all(len(s._idx_offsets) >= 6 for s in segments[:-1])
    store.close()
    return expected, segments


def entries(path: Path, st: struct.Struct) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in st.iter_unpack(path.read_bytes())]


def write_entries(path: Path, st: struct.Struct, items: list[tuple[int, int]]) -> None:
    path.write_bytes(b"".join(st.pack(*e) for e in items))


def reopened_intact(data_dir: Path, expected: list[StoredBatch], victim: Segment, index: bytes, times: bytes) -> None:
    """The store reopens with nothing to report, the victim's indexes are
    rebuilt to what they were, and every read and time lookup is right."""
    store = open_store(data_dir, segment_bytes=SEGMENT_BYTES)
    assert store.findings == []
    log = store.topic("t")
    assert_log_holds(log, expected)
    assert walk(log) == (expected, [])
    assert victim.index_path.read_bytes() == index
    assert victim.time_path.read_bytes() == times
    wrong = [
        (b.timestamp, got)
        for b in expected
        for t in (b.timestamp - 1, b.timestamp)
        if (got := log.offset_at_time(t)) != b.base_offset
    ]
    assert wrong == []
    # More appends continue after the recovered end and survive a reopen.
    more = append_many(log, [2, 3], ts0=expected[-1].timestamp + 100, tag0=7000)
    assert more[0].base_offset == expected[-1].next_offset
    store.close()
    store = open_store(data_dir, segment_bytes=SEGMENT_BYTES)
    assert store.findings == []
    assert store.topic("t").read(0, BIG)[0] == expected[0]
    assert walk(store.topic("t"))[0] == expected + more
    store.close()


# -- index entries that do not match their segment: rebuilt ------------------------------


def _time_entry_later(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    ts, rel = times[3]
    times[3] = (ts + 1, rel)


def _time_entry_earlier(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    ts, rel = times[3]
    times[3] = (ts - 1, rel)


def _first_entry_missing(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    del index[0], times[0]


def _first_index_entry_missing(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    del index[0]


def _last_time_entry_missing(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    del times[-1]


def _entry_repeated(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    index.insert(3, index[2])
    times.insert(3, times[2])


def _entries_out_of_order(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    index[2], index[3] = index[3], index[2]
    times[2], times[3] = times[3], times[2]


def _entry_offset_off_by_one(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    rel, pos = index[3]
    index[3] = (rel + 1, pos)
    ts, trel = times[3]
    times[3] = (ts, trel + 1)


def _entry_at_end_of_file(index: list[tuple[int, int]], times: list[tuple[int, int]]) -> None:
    # Well-formed and increasing, but pointing at the end of the log file.
    rel, pos = index[-1]
    ts, _ = times[-1]
    index.append((rel + 1, 1 << 31))
    times.append((ts, rel + 1))


@pytest.mark.parametrize(
    "damage",
    [
        _time_entry_later,
        _time_entry_earlier,
        _first_entry_missing,
        _first_index_entry_missing,
        _last_time_entry_missing,
        _entry_repeated,
        _entries_out_of_order,
        _entry_offset_off_by_one,
        _entry_at_end_of_file,
    ],
)
def test_index_that_does_not_match_its_segment_is_rebuilt(
    tmp_path: Path, damage: Callable[[list[tuple[int, int]], list[tuple[int, int]]], None]
) -> None:
    expected, segments = build(tmp_path)
    victim = segments[1]
    good_index, good_times = victim.index_path.read_bytes(), victim.time_path.read_bytes()
    index, times = entries(victim.index_path, INDEX_ENTRY), entries(victim.time_path, TIME_ENTRY)
    damage(index, times)
    write_entries(victim.index_path, INDEX_ENTRY, index)
    write_entries(victim.time_path, TIME_ENTRY, times)
    assert (victim.index_path.read_bytes(), victim.time_path.read_bytes()) != (good_index, good_times)
    reopened_intact(tmp_path, expected, victim, good_index, good_times)


@pytest.mark.parametrize("before_end", [0, 1, 10, HEADER_SIZE + 7])
def test_index_entry_at_or_just_before_the_end_of_the_log_is_not_trusted(tmp_path: Path, before_end: int) -> None:
    """An entry pointing at the end of the file, or so close to it that no
    header fits there: rebuilt, never read as a header (no struct.error)."""
    expected, segments = build(tmp_path)
    victim = segments[0]
    good_index, good_times = victim.index_path.read_bytes(), victim.time_path.read_bytes()
    index, times = entries(victim.index_path, INDEX_ENTRY), entries(victim.time_path, TIME_ENTRY)
    size = victim.path.stat().st_size
    index.append((index[-1][0] + 1, size - before_end))
    times.append((times[-1][0], index[-1][0]))
    write_entries(victim.index_path, INDEX_ENTRY, index)
    write_entries(victim.time_path, TIME_ENTRY, times)
    reopened_intact(tmp_path, expected, victim, good_index, good_times)


@pytest.mark.parametrize("indexed", [True, False])
def test_replayed_copy_of_an_indexed_batch_is_not_trusted(tmp_path: Path, indexed: bool) -> None:
    """The older segment ends in a second copy of its last indexed batch (a
    write replayed), named by its index or not: each header checks out on
    its own, but offsets do not go forward, so the segment is scanned and
    the copy set aside; no offset is lost or served twice."""
    expected, segments = build(tmp_path)
    victim = segments[1]
    index, times = entries(victim.index_path, INDEX_ENTRY), entries(victim.time_path, TIME_ENTRY)
    rel, pos = index[-1]
    at = {b.pos: b for b in batches_in(victim.path)}[pos]
    data = victim.path.read_bytes()
    copy = data[pos : pos + at.stored]
    with open(victim.path, "ab") as f:
        f.write(copy)
    if indexed:
        index.append((rel, len(data)))
        times.append((times[-1][0], rel))
    write_entries(victim.index_path, INDEX_ENTRY, index)
    write_entries(victim.time_path, TIME_ENTRY, times)

    store = open_store(tmp_path, segment_bytes=SEGMENT_BYTES)
    [found] = store.findings
    assert (found.segment, found.position, found.dropped_bytes, found.lost) == (victim.path, len(data), len(copy), 0)
    log = store.topic("t")
    assert walk(log) == (expected, [])
    store.close()


# -- a batch header that does not check out --------------------------------------------


def test_corrupted_header_timestamp_is_caught_even_when_the_time_index_agrees(tmp_path: Path) -> None:
    """The timestamp in an indexed batch's header changed, and the time
    index changed to match (as if written from the damaged header): the
    header's CRC no longer matches, so the segment is scanned and that one
    batch set aside on start, not trusted and served with a wrong time."""
    expected, segments = build(tmp_path)
    victim = segments[1]
    index, times = entries(victim.index_path, INDEX_ENTRY), entries(victim.time_path, TIME_ENTRY)
    rel, pos = index[3]
    data = bytearray(victim.path.read_bytes())
    base, count, length, first, last, crc = HEADER.unpack_from(data, pos)
    assert first == times[3][0]
    HEADER.pack_into(data, pos, base, count, length, first + 3, last, crc)
    victim.path.write_bytes(bytes(data))
    times[3] = (first + 3, times[3][1])
    write_entries(victim.time_path, TIME_ENTRY, times)

    store = open_store(tmp_path, segment_bytes=SEGMENT_BYTES)
    lost = next(b for b in expected if b.base_offset == base)
    assert [(f.segment, f.position, f.first_offset, f.last_offset, f.action) for f in store.findings] == [
        (victim.path, pos, lost.base_offset, lost.next_offset - 1, "quarantined")
    ]
    assert "checksum" in store.findings[0].reason
    log = store.topic("t")
    assert walk(log) == ([b for b in expected if b is not lost], [(lost.base_offset, lost.next_offset - 1, "damaged")])
    assert log.offset_at_time(first + 1) == lost.next_offset
    store.close()


def test_corrupted_header_after_the_last_index_entry_is_caught(tmp_path: Path) -> None:
    """Past the last index entry the batches are walked header by header to
    find the segment's end; a header whose last timestamp was changed no
    longer matches its CRC, so the segment is scanned and the batch set
    aside on start (its timestamp would otherwise steer time lookups and
    retention)."""
    expected, segments = build(tmp_path)
    victim = segments[1]
    last_indexed = entries(victim.index_path, INDEX_ENTRY)[-1][1]
    after = [b for b in batches_in(victim.path) if b.pos > last_indexed]
    assert after
    target = after[-1]
    data = bytearray(victim.path.read_bytes())
    base, count, length, first, last, crc = HEADER.unpack_from(data, target.pos)
    HEADER.pack_into(data, target.pos, base, count, length, first, last + 10**9, crc)
    victim.path.write_bytes(bytes(data))

    store = open_store(tmp_path, segment_bytes=SEGMENT_BYTES)
    assert [(f.position, f.first_offset, f.action) for f in store.findings] == [(target.pos, base, "quarantined")]
    log = store.topic("t")
    lost = (base, base + count - 1, "damaged")
    assert walk(log) == ([b for b in expected if b.base_offset != base], [lost])
    assert log.segments[1].last_timestamp < 10**9
    store.close()


# -- junk after the last batch of an older segment --------------------------------------


@pytest.mark.parametrize("junk_bytes", [1, 8, 35, 36, 43, 44, 45, 300])
def test_older_segment_ending_in_junk_opens_and_sets_the_junk_aside(tmp_path: Path, junk_bytes: int) -> None:
    """Fewer bytes than a batch header, exactly a header, a header and part
    of an envelope, more: start-up never fails on them, no offset is lost or
    moved, and the junk goes to the quarantine folder."""
    expected, segments = build(tmp_path)
    victim = segments[1]
    size = victim.path.stat().st_size
    junk = bytes((7 * i + 1) % 256 for i in range(junk_bytes))
    with open(victim.path, "ab") as f:
        f.write(junk)

    store = open_store(tmp_path, segment_bytes=SEGMENT_BYTES)
    [found] = store.findings
    assert (found.segment, found.position, found.dropped_bytes, found.lost) == (victim.path, size, junk_bytes, 0)
    assert found.quarantined_to is not None and found.quarantined_to.read_bytes() == junk
    note = json.loads(found.quarantined_to.with_suffix(".json").read_text())
    assert (note["position"], note["bytes"]) == (size, junk_bytes)
    assert victim.path.stat().st_size == size
    log = store.topic("t")
    assert [s.base_offset for s in log.segments] == [s.base_offset for s in segments]
    assert walk(log) == (expected, [])
    store.close()
    store = open_store(tmp_path, segment_bytes=SEGMENT_BYTES)
    assert store.findings == []
    store.close()


def test_index_of_a_segment_with_a_torn_last_batch_is_not_trusted(tmp_path: Path) -> None:
    """The older segment's last batch lost its final byte: the walk from the
    last index entry does not end at the file's end, so the segment is
    scanned and the torn batch set aside (its offsets become a hole)."""
    expected, segments = build(tmp_path)
    victim = segments[2]
    last = batches_in(victim.path)[-1]
    victim.path.write_bytes(victim.path.read_bytes()[:-1])
    store = open_store(tmp_path, segment_bytes=SEGMENT_BYTES)
    [found] = store.findings
    assert (found.position, found.first_offset, found.last_offset) == (last.pos, last.base, segments[3].base_offset - 1)
    log = store.topic("t")
    lost = [b for b in expected if b.base_offset == last.base]
    assert walk(log) == ([b for b in expected if b not in lost], [(last.base, last.base + last.messages - 1, "damaged")])
    assert HEADER_SIZE + last.length == found.dropped_bytes + 1
    store.close()


def test_index_entries_with_equal_timestamps_are_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches published within the same microsecond share a timestamp, so
    neighbouring time-index entries may be equal: that index is valid, and
    the older segments open through it without a scan."""
    store = open_store(tmp_path, segment_bytes=SEGMENT_BYTES)
    log = store.topic("t")
    expected = append_many(log, [1 + i % 5 for i in range(500)], size=80, ts_step=0)
    bases = [s.base_offset for s in log.segments]
    assert len(bases) >= 3 and len(set(log.segments[0]._time_stamps)) == 1 < len(log.segments[0]._time_stamps)
    store.close()
    scanned: list[int] = []
    real_scan = Segment.scan

    def counting(self: Segment) -> object:
        scanned.append(self.base_offset)
        return real_scan(self)

    monkeypatch.setattr(Segment, "scan", counting)
    store = open_store(tmp_path, segment_bytes=SEGMENT_BYTES)
    assert scanned == [bases[-1]]  # only the newest, as always
    log = store.topic("t")
    assert walk(log) == (expected, [])
    assert log.offset_at_time(expected[0].timestamp) == 0
    store.close()
