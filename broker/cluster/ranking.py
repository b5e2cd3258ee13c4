"""Rendezvous (highest random weight) ranking of nodes for a partition.

Each node's weight for ``(topic, partition)`` is a stable hash of the
three (blake2b, the same in every process and on every machine, unlike
Python's salted ``hash()``); the node with the highest weight ranks first.
A node joining takes exactly the partitions for which it outweighs every
other node, and a node leaving gives each of its partitions to the next in
that partition's ranking: nothing else moves (docs/cluster.md §4).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable


def weight(node: str, topic: str, partition: int) -> int:
    """``node``'s weight for the partition: 64 bits of blake2b over an
    unambiguous encoding of the three."""
    data = json.dumps([node, topic, partition], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def rank(nodes: Iterable[str], topic: str, partition: int) -> list[str]:
    """``nodes`` from the first choice to the last (ties, which need equal
    64-bit hashes, go by name)."""
    return sorted(set(nodes), key=lambda node: (-weight(node, topic, partition), node))


def first(nodes: Iterable[str], topic: str, partition: int) -> str | None:
    """The first choice among ``nodes`` (None if there are none)."""
    best: tuple[int, str] | None = None
    for node in nodes:
        candidate = (-weight(node, topic, partition), node)
        if best is None or candidate < best:
            best = candidate
    return best[1] if best is not None else None
