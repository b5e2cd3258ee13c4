"""The group-state journal at its boundaries (broker/storage/groupstate.py,
broker/storage/groupjournal.py): a record that ends exactly at the end of
the file, a header cut anywhere, the rotation threshold at exactly its
size, and a rotation's old file deleted only once the new one is durable.

Real files under ``tmp_path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pybroker.server.storage.groupjournal import FileGroupState
from pybroker.server.storage.groupstate import (
    encode_checkpoint,
    encode_delivered,
    journal_path,
    read_records,
    read_state_dir,
)
from pybroker.protocol import StartKind


def _doc(name: str = "g", cursor: int = 0) -> dict[str, Any]:
    return {
        "version": 2,
        "name": name,
        "pattern": "jobs",
        "start": int(StartKind.EARLIEST),
        "start_value": 0,
        "config": {"ack_wait": 30.0, "max_deliver": 3, "backoff": [], "max_ack_pending": 10, "dead_letter": None},
        "topics": {"jobs": {"cursor": cursor, "pending": []}},
    }


class _Log:
    """What FileGroupState logs, kept (its logger is structlog-style)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def error(self, msg: str, **kw: Any) -> None:
        self.lines.append(("error", msg, kw))

    def info(self, msg: str, **kw: Any) -> None:
        self.lines.append(("info", msg, kw))


# -- reading records ---------------------------------------------------------------


def test_a_record_ending_exactly_at_the_end_of_the_file_is_read() -> None:
    # A checkpoint of no groups is one C record of a bare 9-byte header.
    data = encode_checkpoint([])
    assert len(data) == 9
    assert read_records(data) == ([(b"C", b"")], 9)
    data = encode_checkpoint([_doc()]) + encode_delivered(b"g", b"jobs", 0, 1, 1)
    records, valid = read_records(data)
    assert [k for k, _ in records] == [b"S", b"C", b"D"] and valid == len(data)


def test_a_header_cut_anywhere_ends_the_valid_prefix_there() -> None:
    head = encode_checkpoint([_doc()])
    tail = encode_delivered(b"g", b"jobs", 5, 2, 1)
    for cut in range(len(tail)):
        records, valid = read_records(head + tail[:cut])
        assert ([k for k, _ in records], valid) == ([b"S", b"C"], len(head)), cut


def test_a_journal_that_is_only_a_checkpoint_loads(tmp_path: Path) -> None:
    journal_path(tmp_path, 3).write_bytes(encode_checkpoint([_doc("a", 4)]))
    journal_path(tmp_path, 2).write_bytes(b"older")
    state = read_state_dir(tmp_path)
    assert state.problems == [] and state.generation == 3 and state.dropped_bytes == 0
    assert sorted(state.groups) == ["a"] and state.groups["a"].topics["jobs"].cursor == 4
    assert sorted(p.name for p in state.superseded) == ["journal.2", "journal.3"]


# -- rotation --------------------------------------------------------------------------


@pytest.mark.parametrize("regime", ["minimum", "factor"])
def test_rotation_is_due_only_past_its_threshold(tmp_path: Path, regime: str) -> None:
    state = FileGroupState(tmp_path, _Log())
    state.read()
    # Small thresholds so the files stay small; the rule is the class's.
    state.ROTATE_MIN_BYTES = 2000 if regime == "minimum" else 10
    assert state.checkpoint_due()  # no journal yet
    assert state.checkpoint([_doc()])
    journal = state.journal
    assert journal is not None
    threshold = max(state.ROTATE_MIN_BYTES, state.ROTATE_FACTOR * journal.checkpoint_size)
    assert threshold == (2000 if regime == "minimum" else 4 * journal.checkpoint_size)
    filler = encode_delivered(b"g", b"jobs", 0, 1, 1)
    while journal.size + len(filler) <= threshold:
        state.append(filler)
        assert not state.checkpoint_due()
    # Top up to exactly the threshold (the rule counts bytes, not records).
    state.append(b"\0" * (threshold - journal.size))
    assert journal.size == threshold
    assert not state.checkpoint_due()
    state.append(b"\0")
    assert state.checkpoint_due()
    state.close()


def test_rotation_deletes_the_old_file_only_once_the_new_one_is_synced(tmp_path: Path) -> None:
    log = _Log()
    state = FileGroupState(tmp_path, log)
    state.read()
    assert state.checkpoint([_doc("g", 1)])
    assert state.sync_now()
    state.append(encode_delivered(b"g", b"jobs", 1, 3, 1))
    first = journal_path(tmp_path, 1)
    assert state.checkpoint([_doc("g", 4)])
    second = journal_path(tmp_path, 2)
    assert first.exists() and second.exists()
    assert state.sync_now()
    assert not first.exists() and second.exists()
    state.close()
    again = FileGroupState(tmp_path, log)
    saved = again.read()
    assert saved.generation == 2 and saved.groups["g"].topics["jobs"].cursor == 4
    assert saved.superseded == [second]
    assert again.checkpoint([_doc("g", 4)])
    assert again.sync_now()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.3"]
    again.close()
    assert [line for line in log.lines if line[0] == "error"] == []
    # What the last file says is what the groups were.
    records, valid = read_records(journal_path(tmp_path, 3).read_bytes())
    assert [k for k, _ in records] == [b"S", b"C"] and json.loads(records[0][1])["topics"]["jobs"]["cursor"] == 4
