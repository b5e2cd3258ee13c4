"""A history of operations against a cluster, written as they happen.

Every client operation is recorded twice: an ``invoke`` when it starts and
its outcome when it ends, ``ok`` (it happened), ``fail`` (it certainly did
not) or ``info`` (unknown: the client cannot tell, e.g. the connection
dropped after the request was sent). One JSON object per line, appended and
flushed at once, so a history survives its writer being killed and several
processes can write their own files that are read together.

Operations (field ``f``):

- ``append``: ``key`` (a partition, "topic/partition"), ``value`` (unique
  per append); on ``ok`` also ``offset``.
- ``read``: ``key``, ``offset`` (where it started); on ``ok`` also
  ``values``: ``[[offset, value], ...]`` as read, in order. ``final`` marks
  the reads made after the faults healed, which must cover the partition.
- ``deliver``: a consumer-group member got ``value`` at ``offset`` of
  ``key`` (``group``); only ``ok`` entries.
- ``cursor``: the group's committed position for ``key`` as read from the
  cluster (``group``, ``offset``); only ``ok`` entries.

tests/helpers/checker.py reads histories and says what they prove.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

Op = dict[str, Any]
OUTCOMES = ("ok", "fail", "info")


class HistoryWriter:
    """Appends one process's operations to a file, one JSON line each."""

    def __init__(self, path: Path, process: int | str) -> None:
        self.path = path
        self.process = process
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._ids = itertools.count(1)

    def _write(self, op: Op) -> None:
        op.setdefault("process", self.process)
        op.setdefault("time", time.time())
        self._file.write(json.dumps(op, separators=(",", ":")) + "\n")
        self._file.flush()

    def invoke(self, f: str, **fields: Any) -> int:
        """Record the start of an operation; its id for :meth:`complete`."""
        op_id = next(self._ids)
        self._write({"type": "invoke", "f": f, "id": op_id, **fields})
        return op_id

    def complete(self, op_id: int, outcome: str, f: str, **fields: Any) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        self._write({"type": outcome, "f": f, "id": op_id, **fields})

    def observe(self, f: str, **fields: Any) -> None:
        """An observation with no invocation of its own (deliver, cursor)."""
        self._write({"type": "ok", "f": f, "id": next(self._ids), **fields})

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_histories(paths: Iterable[Path]) -> list[Op]:
    """Every operation of the files, in time order. A torn last line (its
    writer killed mid-write) is left out: the operation it would have
    recorded stays without an outcome, i.e. unknown."""
    ops: list[Op] = []
    for path in paths:
        ops.extend(_lines(path))
    ops.sort(key=lambda op: op["time"])
    return ops


def _lines(path: Path) -> Iterator[Op]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise  # damage in the middle is not a torn tail
