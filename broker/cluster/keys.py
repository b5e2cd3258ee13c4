"""The etcd key schema and data object names of docs/cluster.md (§3, §5).

Integers in keys are zero-padded decimal so that key order is numeric
order; topic names are escaped (``%`` and ``/`` percent-encoded) so that a
key splits on ``/`` one way only and a prefix scan of one topic never
reaches another's keys (``a`` and ``a/b`` are both valid topic names).
"""

from __future__ import annotations

import attrs

#: Width of an offset in an index key: 20 digits hold any u64.
OFFSET_DIGITS = 20


def escape(name: str) -> bytes:
    """A name as one key segment: ``%`` and ``/`` percent-encoded."""
    return name.replace("%", "%25").replace("/", "%2F").encode("utf-8")


def object_name(incarnation: int, round_number: int) -> str:
    """``data/{incarnation:016x}/{round:012d}``: the incarnation is the
    node's member lease id (unique in the etcd cluster's lifetime), the
    round counts up, so no two commit rounds anywhere share a name."""
    return f"data/{incarnation:016x}/{round_number:012d}"


@attrs.frozen
class ClusterKeys:
    """The keys of one cluster, all under ``prefix`` (e.g. ``/pybroker/prod/``)."""

    prefix: bytes = b""

    def _partition(self, kind: bytes, topic: str, partition: int) -> bytes:
        return b"%s%s/%s/%d" % (self.prefix, kind, escape(topic), partition)

    def own(self, topic: str, partition: int) -> bytes:
        return self._partition(b"own", topic, partition)

    def next(self, topic: str, partition: int) -> bytes:
        return self._partition(b"next", topic, partition)

    def index_prefix(self, topic: str, partition: int) -> bytes:
        return self._partition(b"idx", topic, partition) + b"/"

    def index(self, topic: str, partition: int, first: int) -> bytes:
        return self.index_prefix(topic, partition) + b"%0*d" % (OFFSET_DIGITS, first)

    def gone(self, object_key: str) -> bytes:
        return self.prefix + b"gone/" + object_key.encode("utf-8")
