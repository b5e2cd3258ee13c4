"""Exactly-once publishing in cluster mode: what a commit round keeps of
its msg-ids in etcd, and the window leases it is kept under
(docs/cluster.md §3, §5, §7).

The broker's exactly-once window (broker/dedup.py) works on a cluster
node as on a single one, reading msg-ids back from its copy of the topic.
For a node taking a partition over whose copy does not reach back over
the whole window, each commit round with named batches also writes
``ids/{topic}/{partition}/{first}`` = ``[[msg-id, base, count, ts], ...]``
in its transaction, attached to the newest **window lease**: a lease of
TTL ``window + window/4`` granted every ``window/4`` and never renewed, so
the key ends on its own after at least the window and at most 1.25 times
it, whatever happens to the node.
"""

from __future__ import annotations

import json
import math

import anyio

from .etcd import Etcd

#: Defaults as on a single node (``--dedup-window``, ``--dedup-max-ids``).
DEFAULT_DEDUP_WINDOW = 120.0
DEFAULT_DEDUP_MAX_IDS = 100_000
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


class WindowLeases:
    """The newest window lease: a lease of TTL ``ceil(window * 1.25)``
    granted when the newest is ``window / 4`` old (lazily, on the first
    commit with msg-ids after that), never renewed. Share one between the
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
