"""The history checker (tests/helpers/checker.py) that judges the cluster's
fault runs: a clean history passes, and each kind of anomaly it exists to
catch is caught, counted and attributed to its partition."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.checker import VIOLATIONS, check
from helpers.history import HistoryWriter, read_histories

KEY = "orders/0"


def _append(h: HistoryWriter, value: str, outcome: str, offset: int | None = None, key: str = KEY) -> None:
    op = h.invoke("append", key=key, value=value)
    if outcome == "none":
        return  # the process died before it learned the outcome
    fields = {"key": key, "value": value} | ({"offset": offset} if offset is not None else {})
    h.complete(op, outcome, "append", **fields)


def _read(h: HistoryWriter, values: list[tuple[int, str]], *, start: int = 0, final: bool = False,
          complete: bool = True, key: str = KEY) -> None:
    op = h.invoke("read", key=key, offset=start)
    h.complete(op, "ok", "read", key=key, offset=start, values=[list(v) for v in values],
               final=final, complete=complete)


def _base(h: HistoryWriter) -> None:
    """Three acknowledged appends, one unknown that was stored, one unknown
    that was not, one refused; reads during the run and a final read."""
    _append(h, "a", "ok", 0)
    _append(h, "b", "ok", 1)
    _append(h, "u1", "info")
    _read(h, [(0, "a"), (1, "b")])
    _append(h, "c", "ok", 3)
    _append(h, "u2", "info")
    _append(h, "x", "fail")


FINAL = [(0, "a"), (1, "b"), (2, "u1"), (3, "c")]


def _history(tmp_path: Path, extra: Callable[[HistoryWriter], None], final: list[tuple[int, str]] = FINAL):  # type: ignore[no-untyped-def]
    with HistoryWriter(tmp_path / "p1.jsonl", 1) as h:
        _base(h)
        extra(h)
        _read(h, final, final=True)
    return check(read_histories([tmp_path / "p1.jsonl"]))


def test_a_clean_history_is_valid_and_counted(tmp_path: Path) -> None:
    report = _history(tmp_path, lambda h: None)
    assert report.valid, report.summary()
    assert report.keys[KEY].counts() == {
        "acked": 3, "unknown": 2, "unknown_present": 1, "failed": 1, "stored": 4,
        **{name: 0 for name in VIOLATIONS},
    }


@pytest.mark.parametrize(
    ("violation", "extra", "final"),
    [
        # The final read no longer holds acknowledged "c" at offset 3.
        ("lost", lambda h: None, FINAL[:3]),
        # Acknowledged at 3 as "c"; another read saw "z" there.
        ("conflicts", lambda h: _read(h, [(3, "z")], start=3), FINAL),
        # Offset 2 missing from the final log (read in two parts, each dense).
        ("gaps", lambda h: _read(h, [(3, "c")], start=3, final=True, complete=False), [(0, "a"), (1, "b")]),
        # The unknown append stored twice.
        ("duplicates", lambda h: None, [*FINAL, (4, "u1")]),
        # A refused append is in the log.
        ("failed_present", lambda h: None, [*FINAL, (4, "x")]),
        # A value nobody appended.
        ("phantoms", lambda h: None, [*FINAL, (4, "ghost")]),
        # A read that skips an offset.
        ("nonmonotonic", lambda h: _read(h, [(0, "a"), (2, "u1")], complete=False), FINAL),
        # A complete read shorter than the same process's earlier complete read.
        ("nonmonotonic", lambda h: _read(h, [(0, "a")]), FINAL),
    ],
)
def test_each_anomaly_is_caught(tmp_path: Path, violation: str, extra: Callable[[HistoryWriter], None],
                                final: list[tuple[int, str]]) -> None:
    report = _history(tmp_path, extra, final)
    assert not report.valid
    counts = report.keys[KEY].counts()
    assert counts[violation] >= 1, counts
    others = {name: counts[name] for name in VIOLATIONS if name != violation}
    # Each case plants one anomaly; a lost acknowledged append also leaves
    # nothing else behind, so nothing else may be reported.
    assert not any(others.values()), counts


def test_partitions_are_judged_apart(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "p1.jsonl", 1) as h:
        _append(h, "a", "ok", 0, key="t/0")
        _append(h, "b", "ok", 0, key="t/1")
        _read(h, [(0, "a")], final=True, key="t/0")
        _read(h, [], final=True, key="t/1")  # t/1 lost its acknowledged append
    report = check(read_histories([tmp_path / "p1.jsonl"]))
    assert report.keys["t/0"].valid
    assert report.keys["t/1"].lost == [(0, "b")]


def test_several_processes_and_a_killed_writer(tmp_path: Path) -> None:
    """Files of several processes are read together; a process killed
    mid-line leaves a torn last line, and its open append counts as unknown."""
    with HistoryWriter(tmp_path / "p1.jsonl", 1) as h:
        _append(h, "a", "ok", 0)
    with HistoryWriter(tmp_path / "p2.jsonl", 2) as h:
        _append(h, "k", "none")
    with open(tmp_path / "p2.jsonl", "a") as f:
        f.write('{"type": "ok", "f": "app')  # torn by SIGKILL
    with HistoryWriter(tmp_path / "p3.jsonl", 3) as h:
        _read(h, [(0, "a"), (1, "k")], final=True)
    report = check(read_histories(sorted(tmp_path.glob("*.jsonl"))))
    assert report.valid, report.summary()
    assert report.open_ops == 1
    assert report.keys[KEY].counts()["unknown_present"] == 1


def test_damage_before_the_last_line_is_not_taken_for_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "p1.jsonl"
    path.write_text('{"type": "invoke"\n{"type": "ok"}\n')
    with pytest.raises(ValueError):
        read_histories([path])


def test_group_cursor_going_back_and_an_undelivered_message(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "p1.jsonl", 1) as h:
        _append(h, "a", "ok", 0)
        _append(h, "b", "ok", 1)
        h.observe("deliver", group="g", key=KEY, offset=0, value="a")
        h.observe("cursor", group="g", key=KEY, offset=1)
        h.observe("cursor", group="g", key=KEY, offset=0)  # moved backwards
        _read(h, [(0, "a"), (1, "b")], final=True)
    report = check(read_histories([tmp_path / "p1.jsonl"]))
    group = report.groups[("g", KEY)]
    assert group.backwards == [(1, 0)]
    assert group.undelivered == [(1, "b")]
    assert report.keys[KEY].valid and not report.valid


def test_a_group_that_got_everything_in_order_is_valid(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "p1.jsonl", 1) as h:
        _append(h, "a", "ok", 0)
        h.observe("deliver", group="g", key=KEY, offset=0, value="a")
        h.observe("deliver", group="g", key=KEY, offset=0, value="a")  # redelivered: allowed
        h.observe("cursor", group="g", key=KEY, offset=1)
        _read(h, [(0, "a")], final=True)
    report = check(read_histories([tmp_path / "p1.jsonl"]))
    assert report.valid, report.summary()
    assert report.groups[("g", KEY)].delivered == 1


def test_a_delivery_at_an_offset_holding_another_value_is_a_conflict(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "p1.jsonl", 1) as h:
        _append(h, "a", "ok", 0)
        _append(h, "b", "ok", 1)
        h.observe("deliver", group="g", key=KEY, offset=0, value="a")
        h.observe("deliver", group="g", key=KEY, offset=0, value="b")  # b is at 1
        _read(h, [(0, "a"), (1, "b")], final=True)
    report = check(read_histories([tmp_path / "p1.jsonl"]))
    assert report.keys[KEY].conflicts == [(0, ["a", "b"])]
    assert report.groups[("g", KEY)].valid  # every value was handed out
    assert not report.valid


def test_a_cursor_past_the_partitions_end_is_ahead(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "p1.jsonl", 1) as h:
        _append(h, "a", "ok", 0)
        h.observe("deliver", group="g", key=KEY, offset=0, value="a")
        h.observe("cursor", group="g", key=KEY, offset=1)  # the end: fine
        h.observe("cursor", group="g", key=KEY, offset=3)  # counts two messages nobody stored
        _read(h, [(0, "a")], final=True)
    report = check(read_histories([tmp_path / "p1.jsonl"]))
    group = report.groups[("g", KEY)]
    assert (group.ahead, group.backwards, group.undelivered) == ([(3, 1)], [], [])
    assert report.keys[KEY].valid and not report.valid
    assert report.summary()["groups"][f"g@{KEY}"]["ahead"] == 1


def test_an_outcome_without_its_invocation_is_refused(tmp_path: Path) -> None:
    with HistoryWriter(tmp_path / "p1.jsonl", 1) as h:
        h.complete(7, "ok", "append", key=KEY, value="a", offset=0)
    with pytest.raises(ValueError):
        check(read_histories([tmp_path / "p1.jsonl"]))
