"""What a store knows of its partitioned topics (protocol.md, "Partitioned
topics"): each one's partition count, and how many of its partitions' logs
exist, so the count goes with the last of them (TOPICS delete)."""

from __future__ import annotations

from pybroker.protocol import MAX_PARTITIONS, partition_of


def check_partitions(name: str, partitions: int, have: int) -> bool:
    """Whether creating ``name`` with ``partitions`` makes anything, given
    the partitions it ``have`` now (0: no such topic; 1: a plain topic):
    False when it exists so already; ValueError when it exists otherwise
    or the count is out of bounds."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be 1 to {MAX_PARTITIONS}, not {partitions}")
    if have == 0:
        return True
    if have == partitions:
        return False
    noun = "partition" if have == 1 else "partitions"
    raise ValueError(f"topic {name!r} exists with {have} {noun}, not {partitions}")


class PartitionCounts:
    """Partition counts by topic, kept while any of its partitions' logs is."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._logs: dict[str, int] = {}

    def count(self, name: str) -> int:
        """``name``'s partition count if it is partitioned, else 0."""
        return self._counts.get(name, 0)

    def set(self, name: str, partitions: int) -> None:
        self._counts[name] = max(partitions, self._counts.get(name, 0))

    def opened(self, log_name: str) -> None:
        """A log called ``log_name`` exists (created or recovered)."""
        named = partition_of(log_name)
        if named is not None:
            self._logs[named[0]] = self._logs.get(named[0], 0) + 1

    def removed(self, log_name: str) -> None:
        """A log called ``log_name`` was deleted: the last partition of a
        topic takes its count along (the name may be used afresh)."""
        named = partition_of(log_name)
        if named is None or named[0] not in self._logs:
            return
        left = self._logs[named[0]] - 1
        if left:
            self._logs[named[0]] = left
        else:
            del self._logs[named[0]]
            self._counts.pop(named[0], None)
