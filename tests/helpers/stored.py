"""Batches appended to a file log and what reading them must give back: the
model the storage edge tests (test_segment_edges.py, test_index_recovery.py)
compare the real segment files against."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from pybroker.protocol import encode_batch
from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.file import FileTopicLog

BIG = 1 << 40


def make_batch(tag: int, count: int, size: int = 40) -> bytes:
    """A wire batch of ``count`` distinct messages of about ``size`` bytes each."""
    return encode_batch([f"m{tag}:{i}:".encode().ljust(size, b".") for i in range(count)])


def append(log: FileTopicLog, batch: bytes, count: int, ts: int) -> StoredBatch:
    base = log.next_offset
    assert log.append(batch, count, ts) == base
    return StoredBatch(base, count, ts, batch)


def append_many(
    log: FileTopicLog,
    counts: Sequence[int],
    *,
    size: int | Sequence[int] = 40,
    ts0: int = 1_000_000,
    ts_step: int = 10,
    tag0: int = 0,
) -> list[StoredBatch]:
    """One batch per entry of ``counts`` (messages of ``size`` bytes, or of
    ``size[i]`` for batch ``i``), timestamps ``ts0 + i * ts_step``."""
    out = []
    for i, count in enumerate(counts):
        n = size if isinstance(size, int) else size[i]
        out.append(append(log, make_batch(tag0 + i, count, n), count, ts0 + i * ts_step))
    return out


def containing(batches: Sequence[StoredBatch], offset: int) -> int:
    """Index of the batch in ``batches`` that holds ``offset``."""
    i = bisect.bisect_right([b.base_offset for b in batches], offset) - 1
    assert 0 <= i < len(batches) and batches[i].base_offset <= offset < batches[i].next_offset
    return i


def model_read(segment: Sequence[StoredBatch], offset: int, max_bytes: int) -> list[StoredBatch]:
    """What ``Segment.read(offset, max_bytes)`` promises for an intact
    segment holding ``segment``: the batch holding ``offset``, then the
    following ones while their wire bytes in total stay within ``max_bytes``."""
    if not segment or offset >= segment[-1].next_offset:
        return []
    i = containing(segment, max(offset, segment[0].base_offset))
    out = [segment[i]]
    total = len(segment[i].batch)
    for b in segment[i + 1 :]:
        if total + len(b.batch) > max_bytes:
            break
        out.append(b)
        total += len(b.batch)
    return out


def assert_reads_match_model(
    log: FileTopicLog, expected: Sequence[StoredBatch], max_bytes_values: Sequence[int], offsets: Sequence[int] | None = None
) -> None:
    """Every read of ``log`` (one segment per expected run of batches) gives
    what :func:`model_read` says, for each offset and ``max_bytes``."""
    by_segment: dict[int, list[StoredBatch]] = {}
    bases = [seg.base_offset for seg in log.segments]
    for b in expected:
        seg = bases[bisect.bisect_right(bases, b.base_offset) - 1]
        by_segment.setdefault(seg, []).append(b)
    if offsets is None:
        offsets = [o for b in expected for o in {b.base_offset, b.next_offset - 1}]
    wrong = []
    for offset in offsets:
        seg = bases[bisect.bisect_right(bases, offset) - 1]
        for max_bytes in max_bytes_values:
            want = model_read(by_segment[seg], offset, max_bytes)
            got = log.read(offset, max_bytes)
            if got != want:
                wrong.append((offset, max_bytes, [b.base_offset for b in got], [b.base_offset for b in want]))
    assert wrong == [], wrong[:5]


def assert_log_holds(log: FileTopicLog, expected: Sequence[StoredBatch]) -> None:
    """The log holds exactly ``expected``: same offsets, byte-identical
    batches, read one batch at a time and all at once."""
    assert log.first_offset == expected[0].base_offset
    assert log.next_offset == expected[-1].next_offset
    walked: list[StoredBatch] = []
    offset = log.first_offset
    for _ in range(len(expected) + 1):
        if offset >= log.next_offset:
            break
        got = log.read(offset, 1)
        assert len(got) == 1
        walked.extend(got)
        offset = got[-1].next_offset
    assert walked == list(expected)
    assert log.read(log.next_offset, BIG) == []
