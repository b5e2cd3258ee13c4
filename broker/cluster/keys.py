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


def unescape(segment: bytes) -> str:
    """The name ``escape`` made ``segment`` of (ValueError if it is not one)."""
    text = segment.decode("utf-8")
    if "/" in text:
        raise ValueError(f"not one key segment: {segment!r:.200}")
    return text.replace("%2F", "/").replace("%25", "%")


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

    def ids_prefix(self, topic: str, partition: int) -> bytes:
        return self._partition(b"ids", topic, partition) + b"/"

    def ids(self, topic: str, partition: int, first: int) -> bytes:
        """``ids/{topic}/{partition}/{first:020d}``: the msg-ids of the
        batches of the broker's commit round from ``first`` (the
        exactly-once window below a new owner's copy, docs/cluster.md §7)."""
        return self.ids_prefix(topic, partition) + b"%0*d" % (OFFSET_DIGITS, first)

    def group(self, group: str, topic: str, partition: int) -> bytes:
        """``grp/{group}/{topic}/{partition}``: one consumer group's state in
        one partition (docs/cluster.md §10), written by the partition's owner."""
        return b"%sgrp/%s/%s/%d" % (self.prefix, escape(group), escape(topic), partition)

    def coordinator(self, group: str) -> bytes:
        """``grpown/{group}``: the node coordinating a group over several
        topics (coordinator.py), under its member lease."""
        return b"%sgrpown/%s" % (self.prefix, escape(group))

    def groups_prefix(self, group: str) -> bytes:
        """``grp/{group}/``: the group's keys in every topic it reads."""
        return b"%sgrp/%s/" % (self.prefix, escape(group))

    def group_prefix(self, group: str, topic: str) -> bytes:
        """``grp/{group}/{topic}/``: the group's keys in each partition of ``topic``."""
        return b"%sgrp/%s/%s/" % (self.prefix, escape(group), escape(topic))

    def gone(self, object_key: str) -> bytes:
        return self.prefix + b"gone/" + object_key.encode("utf-8")

    # Membership, topics and owners (§3, §4): the ownership manager's keys.

    @property
    def members_prefix(self) -> bytes:
        return self.prefix + b"members/"

    def member(self, node: str) -> bytes:
        return self.members_prefix + escape(node)

    @property
    def topics_prefix(self) -> bytes:
        return self.prefix + b"topics/"

    def topic(self, topic: str) -> bytes:
        return self.topics_prefix + escape(topic)

    @property
    def own_prefix(self) -> bytes:
        return self.prefix + b"own/"

    def name_of(self, prefix: bytes, key: bytes) -> str:
        """The name in ``{prefix}{name}`` (ValueError if ``key`` is not one)."""
        if not key.startswith(prefix):
            raise ValueError(f"{key!r:.200} is not under {prefix!r:.200}")
        return unescape(key[len(prefix) :])

    def partition_of(self, own_key: bytes) -> tuple[str, int]:
        """(topic, partition) of an ``own/{topic}/{partition}`` key
        (ValueError if it is not one)."""
        if not own_key.startswith(self.own_prefix):
            raise ValueError(f"{own_key!r:.200} is not an owner key")
        topic, sep, number = own_key[len(self.own_prefix) :].partition(b"/")
        if not sep or not number.isdigit():
            raise ValueError(f"{own_key!r:.200} is not an owner key")
        return unescape(topic), int(number)
