"""Exactly-once publishing in cluster mode: what a partition's owner
remembers of msg-ids, and the window leases its ``dedup/`` entries live
under (docs/cluster.md §3, §5).

Each exactly-once batch commits ``dedup/{topic}/{partition}/{msg-id}`` =
``"{base} {count}"`` in the same transaction as its index entry, attached
to the newest **window lease**: a lease of TTL ``window + window/4``
granted every ``window/4`` and never renewed, so entries end on their own
after at least the window and at most 1.25 times it, whatever happens to
the node. A new owner reads the partition's entries from etcd; the owner
keeps them in memory (bounded, oldest forgotten first, as on a single node).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import anyio
import attrs

from .etcd import Etcd

#: Defaults as on a single node (``--dedup-window``, ``--dedup-max-ids``).
DEFAULT_DEDUP_WINDOW = 120.0
DEFAULT_DEDUP_MAX_IDS = 100_000
#: A msg-id is 1 to this many bytes (protocol.md, "Publishing exactly once").
MAX_MSG_ID_BYTES = 128


def encode_entry(base: int, count: int) -> bytes:
    return b"%d %d" % (base, count)


def decode_entry(value: bytes) -> tuple[int, int]:
    """(base, count) of a ``dedup/`` value; ValueError if it is not one."""
    parts = value.split(b" ")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) < 1:
        raise ValueError(f"not a dedup entry: {value!r:.100}")
    return int(parts[0]), int(parts[1])


#: One named batch of a broker round's ``ids/`` key: (msg-id, base, count, timestamp µs).
Named = tuple[str, int, int, int]


def encode_ids(named: list[Named]) -> bytes:
    """The value of an ``ids/`` key: ``[[msg-id, base, count, ts], ...]``."""
    return json.dumps([list(n) for n in named], separators=(",", ":")).encode()


def decode_ids(value: bytes) -> list[Named]:
    """The named batches of an ``ids/`` value; what does not read is left
    out (written whole by an owner: anything else came from outside)."""
    try:
        raw = json.loads(value)
    except ValueError:
        return []
    out: list[Named] = []
    for entry in raw if isinstance(raw, list) else []:
        if (
            isinstance(entry, list)
            and len(entry) == 4
            and isinstance(entry[0], str)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in entry[1:])
        ):
            out.append((entry[0], entry[1], entry[2], entry[3]))
    return out


@attrs.frozen
class Remembered:
    base: int
    count: int
    #: Monotonic time after which it is forgotten.
    expires: float


class DedupMemory:
    """msg-id -> where its batch was stored, for ``window`` seconds, at
    most ``max_ids`` of them (the oldest forgotten first)."""

    def __init__(self, max_ids: int = DEFAULT_DEDUP_MAX_IDS) -> None:
        if max_ids < 1:
            raise ValueError("max_ids must be at least 1")
        self.max_ids = max_ids
        self._ids: OrderedDict[bytes, Remembered] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def find(self, msg_id: bytes, now: float) -> Remembered | None:
        found = self._ids.get(msg_id)
        if found is not None and found.expires <= now:
            del self._ids[msg_id]
            return None
        return found

    def remember(self, msg_id: bytes, base: int, count: int, expires: float) -> None:
        self._ids.pop(msg_id, None)
        self._ids[msg_id] = Remembered(base, count, expires)
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)


class WindowLeases:
    """The newest window lease: a lease of TTL ``ceil(window * 1.25)``
    granted when the newest is ``window / 4`` old (lazily, on the first
    exactly-once commit after that), never renewed. Share one between the
    partitions of a node."""

    def __init__(self, etcd: Etcd, window: float = DEFAULT_DEDUP_WINDOW) -> None:
        if window <= 0:
            raise ValueError("the dedup window must be positive")
        self.etcd = etcd
        self.window = window
        self.ttl = max(2, math.ceil(window * 1.25))
        self.granted = 0
        self._lease = 0
        self._granted_at = -math.inf
        self._lock = anyio.Lock()

    async def current(self) -> int:
        """The lease to attach a new entry to (EtcdError if one cannot be granted)."""
        async with self._lock:
            now = anyio.current_time()
            if now - self._granted_at >= self.window / 4:
                self._lease, _ttl = await self.etcd.grant(self.ttl)
                self._granted_at = now
                self.granted += 1
            return self._lease
