"""What a history proves about a cluster's log (tests/helpers/history.py).

For each partition (``key``), from the appends' outcomes, the reads made
during the run and the ``final`` reads made after every fault healed:

- **lost**: an acknowledged append that the final reads do not hold at its
  offset (must be 0);
- **conflicts**: an offset seen with two different values, by any reads,
  acknowledgements or group deliveries (no offset ever holds two values);
- **gaps**: offsets missing between 0 and the final end (offsets are dense);
- **duplicates**: a value stored at more than one offset (an append whose
  outcome was unknown, retried or not, appears at most once; an
  acknowledged one exactly once);
- **failed_present**: an append answered ``fail`` (certainly not applied)
  that is stored;
- **phantoms**: a stored value nobody appended;
- **nonmonotonic**: a read that is not dense and increasing, or a complete
  read (one that reached the end) shorter than what the same process had
  already read to the end before;
- **unknown** / **unknown_present**: appends without a definite outcome,
  and how many of them were stored (allowed, once).

For each consumer group and partition: **backwards**, a committed cursor
observed lower than one observed before it; **ahead**, a committed cursor
past the partition's final end (it counts messages that do not exist);
**undelivered**, an acknowledged append the group's members never received
(delivery is at least once). A delivery of a value at an offset that holds
another is a conflict of the partition.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import attrs

from .history import Op

VIOLATIONS = ("lost", "conflicts", "gaps", "duplicates", "failed_present", "phantoms", "nonmonotonic")


@attrs.define
class KeyReport:
    key: str
    acked: int = 0
    unknown: int = 0
    unknown_present: int = 0
    failed: int = 0
    stored: int = 0
    lost: list[tuple[int, str]] = attrs.field(factory=list)
    conflicts: list[tuple[int, list[str]]] = attrs.field(factory=list)
    gaps: list[int] = attrs.field(factory=list)
    duplicates: list[tuple[str, list[int]]] = attrs.field(factory=list)
    failed_present: list[str] = attrs.field(factory=list)
    phantoms: list[str] = attrs.field(factory=list)
    nonmonotonic: list[str] = attrs.field(factory=list)

    @property
    def valid(self) -> bool:
        return not any(getattr(self, name) for name in VIOLATIONS)

    def counts(self) -> dict[str, int]:
        return {
            "acked": self.acked, "unknown": self.unknown, "unknown_present": self.unknown_present,
            "failed": self.failed, "stored": self.stored,
            **{name: len(getattr(self, name)) for name in VIOLATIONS},
        }


@attrs.define
class GroupReport:
    group: str
    key: str
    delivered: int = 0
    #: Cursor readings in the history.
    cursors: int = 0
    backwards: list[tuple[int, int]] = attrs.field(factory=list)
    ahead: list[tuple[int, int]] = attrs.field(factory=list)
    undelivered: list[tuple[int, str]] = attrs.field(factory=list)

    @property
    def valid(self) -> bool:
        return not self.backwards and not self.ahead and not self.undelivered


@attrs.define
class Report:
    keys: dict[str, KeyReport]
    groups: dict[tuple[str, str], GroupReport]
    #: Operations invoked and never completed (their process died): unknown.
    open_ops: int = 0

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.keys.values()) and all(g.valid for g in self.groups.values())

    def summary(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "open_ops": self.open_ops,
            "keys": {k: r.counts() for k, r in sorted(self.keys.items())},
            "groups": {
                f"{g}@{k}": {
                    "delivered": r.delivered, "cursors": r.cursors, "backwards": len(r.backwards), "ahead": len(r.ahead),
                    "undelivered": len(r.undelivered),
                }
                for (g, k), r in sorted(self.groups.items())
            },
        }


def check(ops: Iterable[Op]) -> Report:
    """Check a history (every process's operations, in time order)."""
    invoked: dict[tuple[Any, int], Op] = {}
    appends: list[tuple[Op, str]] = []  # (invocation, outcome)
    reads: list[Op] = []
    delivers: list[Op] = []
    cursors: list[Op] = []
    for op in ops:
        kind, ident = op["type"], (op["process"], op["id"])
        if kind == "invoke":
            invoked[ident] = op
            continue
        f = op["f"]
        if f == "deliver":
            delivers.append(op)
            continue
        if f == "cursor":
            cursors.append(op)
            continue
        start = invoked.pop(ident, None)
        if start is None:
            raise ValueError(f"an outcome without its invocation: {op}")
        if f == "append":
            appends.append(({**start, **op}, kind))
        elif f == "read" and kind == "ok":
            reads.append({**start, **op})
    # Invoked, never completed: the process died meanwhile; unknown.
    open_ops = len(invoked)
    for start in invoked.values():
        if start["f"] == "append":
            appends.append((start, "info"))

    keys: dict[str, KeyReport] = {}

    def report(key: str) -> KeyReport:
        if key not in keys:
            keys[key] = KeyReport(key)
        return keys[key]

    # Everything ever observed at each offset: acknowledgements and reads.
    seen: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    acked: dict[str, dict[int, str]] = defaultdict(dict)
    outcome_of: dict[str, dict[str, str]] = defaultdict(dict)
    for op, outcome in appends:
        key, value = op["key"], op["value"]
        r = report(key)
        outcome_of[key][value] = outcome
        if outcome == "ok":
            r.acked += 1
            acked[key][op["offset"]] = value
            seen[key][op["offset"]].add(value)
        elif outcome == "fail":
            r.failed += 1
        else:
            r.unknown += 1

    final: dict[str, dict[int, str]] = defaultdict(dict)
    #: The end of each partition as its final reads found it.
    final_end: dict[str, int] = {}
    longest: dict[tuple[Any, str], int] = {}
    for op in reads:
        key = op["key"]
        r = report(key)
        values = [(int(o), v) for o, v in op["values"]]
        offsets = [o for o, _ in values]
        if offsets and offsets != list(range(offsets[0], offsets[0] + len(offsets))):
            r.nonmonotonic.append(f"read by {op['process']} from {op['offset']}: offsets {offsets[:5]}... not dense")
        for o, v in values:
            seen[key][o].add(v)
            if op.get("final"):
                final[key].setdefault(o, v)
        if op.get("final"):
            final_end[key] = max(final_end.get(key, 0), offsets[-1] + 1 if offsets else op["offset"])
        if op.get("complete"):
            end = offsets[-1] + 1 if offsets else op["offset"]
            before = longest.get((op["process"], key), 0)
            if end < before:
                r.nonmonotonic.append(f"read by {op['process']} ended at {end}, after one that ended at {before}")
            longest[(op["process"], key)] = max(before, end)
    # What a group was handed is an observation of the offset, as a read is.
    for op in delivers:
        report(op["key"])
        seen[op["key"]][int(op["offset"])].add(op["value"])

    for key, r in keys.items():
        for offset, values in sorted(seen[key].items()):
            if len(values) > 1:
                r.conflicts.append((offset, sorted(values)))
        stored = final[key]
        r.stored = len(stored)
        for offset, value in sorted(acked[key].items()):
            if stored.get(offset) != value:
                r.lost.append((offset, value))
        if stored:
            r.gaps = [o for o in range(0, max(stored) + 1) if o not in stored]
        where: dict[str, list[int]] = defaultdict(list)
        for offset, value in stored.items():
            where[value].append(offset)
        for value, offsets in where.items():
            outcome = outcome_of[key].get(value)
            if len(offsets) > 1:
                r.duplicates.append((value, sorted(offsets)))
            if outcome is None:
                r.phantoms.append(value)
            elif outcome == "fail":
                r.failed_present.append(value)
            elif outcome == "info":
                r.unknown_present += 1

    groups: dict[tuple[str, str], GroupReport] = {}
    highest: dict[tuple[str, str], int] = {}
    for op in cursors:
        ident = (op["group"], op["key"])
        g = groups.setdefault(ident, GroupReport(*ident))
        g.cursors += 1
        if ident in highest and op["offset"] < highest[ident]:
            g.backwards.append((highest[ident], op["offset"]))
        highest[ident] = max(op["offset"], highest.get(ident, op["offset"]))
        final_at = final_end.get(op["key"])
        if final_at is not None and op["offset"] > final_at:
            g.ahead.append((op["offset"], final_at))
    got: dict[tuple[str, str], set[str]] = defaultdict(set)
    for op in delivers:
        groups.setdefault((op["group"], op["key"]), GroupReport(op["group"], op["key"]))
        got[(op["group"], op["key"])].add(op["value"])
    for (group, key), g in groups.items():
        g.delivered = len(got[(group, key)])
        g.undelivered = [(o, v) for o, v in sorted(acked[key].items()) if v not in got[(group, key)]]
    return Report(keys, groups, open_ops)
