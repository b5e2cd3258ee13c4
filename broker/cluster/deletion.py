"""Deleting a topic in cluster mode (TOPICS delete; docs/cluster.md §13).

One etcd transaction, compared on the topic record's create revision (the
topic's generation, so that a topic deleted and made again meanwhile is not
deleted by mistake), deletes everything etcd holds of the topic: its
record, and under every partition its owner keys, next offsets, index
entries, exactly-once entries, pending hand-offs and the consumer groups'
state. Deleting the owner keys fences the owners: a round in flight
compares its owner key's create revision and is refused, so nothing is
acknowledged into a deleted topic. Every node sees the record go (its
mirror) and drops its copies, telling its subscribers (TOPIC_DELETED); a
topic made later under the name is a new generation whose offsets start
at 0. The data objects are referenced by no index entry any more: the
janitor deletes them after its grace period (§9), as it does other
garbage.
"""

from __future__ import annotations

from pybroker.protocol import partition_topic

from .etcd import Compare, Delete, Etcd
from .keys import ClusterKeys, escape
from .objects import ObjectStore
from .topics import TopicInfo

#: Consumer groups whose state in one topic one transaction deletes (one
#: prefix delete each, for all of its partitions), and group keys read a
#: page at a time (etcd takes at most 128 operations
#: per transaction; the rest of the transaction is 7 of them).
MAX_GROUP_KEYS = 100
PAGE = 1000
#: Pages of group keys looked through at most.
MAX_PAGES = 1000


class DeleteError(Exception):
    """The topic could not be deleted; nothing was."""


async def group_prefixes(etcd: Etcd, keys: ClusterKeys, topic: str) -> list[bytes]:
    """The ``grp/{group}/{topic}/`` prefix of each group with state in
    ``topic`` (a key per partition under it), found by reading ``grp/`` a
    page at a time (keys only). DeleteError past MAX_GROUP_KEYS groups."""
    prefix = keys.prefix + b"grp/"
    wanted = escape(topic)
    found: dict[bytes, None] = {}
    start, end = prefix, prefix + b"\xff"
    for _ in range(MAX_PAGES):
        page = await etcd.range(start, end, limit=PAGE, keys_only=True)
        for kv in page.kvs:
            parts = kv.key[len(prefix) :].split(b"/")
            if len(parts) == 3 and parts[1] == wanted:
                found[kv.key[: kv.key.rindex(b"/") + 1]] = None
        if len(found) > MAX_GROUP_KEYS:
            raise DeleteError(f"more than {MAX_GROUP_KEYS} consumer groups read {topic!r}: delete some first")
        if not page.more or not page.kvs:
            return list(found)
        start = page.kvs[-1].key + b"\x00"
    raise DeleteError(f"more than {MAX_PAGES * PAGE} consumer group keys to look through")


async def delete_delayed(etcd: Etcd, objects: ObjectStore, keys: ClusterKeys, info: TopicInfo) -> int:
    """Delete the delayed batches (delayed.py) still waiting for the topic
    or its partitions, after the topic's own transaction, so that none is
    released into the name later. Their keys sort by due time: found by a
    keys-only scan of ``delay/``, each read then deleted with the object
    holding a large one (objects under ``delay/`` are not the janitor's).
    A crash part-way leaves the rest, released into the name when due, as
    before this ran. How many went."""
    prefix = keys.prefix + b"delay/"
    names = {escape(info.name)}
    if info.partitions > 1:
        names |= {escape(partition_topic(info.name, p)) for p in range(info.partitions)}
    start, end = prefix, prefix + b"\xff"
    deleted = 0
    for _ in range(MAX_PAGES):
        page = await etcd.range(start, end, limit=PAGE, keys_only=True)
        for kv in page.kvs:
            parts = kv.key[len(prefix) :].split(b"/")
            if len(parts) != 3 or parts[1] not in names:
                continue
            found = await etcd.get(kv.key)
            if found is None:
                continue  # released meanwhile
            if found.value[:1] == b"o":
                await objects.delete(found.value[2:].decode("utf-8", "replace"))
            await etcd.txn([Compare.mod_revision(kv.key, "==", found.mod_revision)], [Delete(kv.key)])
            deleted += 1
        if not page.more or not page.kvs:
            return deleted
        start = page.kvs[-1].key + b"\x00"
    return deleted


async def delete_topic(etcd: Etcd, keys: ClusterKeys, info: TopicInfo) -> bool:
    """Delete topic ``info.name`` of generation ``info.created`` and all
    etcd holds of it; False when that generation was gone already (deleted
    through another node, or made again)."""
    topic = info.name
    groups = await group_prefixes(etcd, keys, topic)
    record = keys.topic(topic)
    # Dead letters to a partitioned topic go to its partition 0 (groups).
    handed = partition_topic(topic, 0) if info.partitions > 1 else topic
    ops: list[Delete] = [
        Delete(record),
        *(Delete(b"%s%s/%s/" % (keys.prefix, kind, escape(topic)), prefix=True) for kind in (b"own", b"next", b"idx", b"ids")),
        Delete(keys.prefix + b"handoff/" + escape(handed) + b"/", prefix=True),
        *(Delete(group, prefix=True) for group in groups),
    ]
    result = await etcd.txn([Compare.create_revision(record, "==", info.created)], list(ops))
    return result.succeeded
