"""TOPICS purge in cluster mode: the messages before an offset go, on every node.

On a single node a purge drops the batches before the one holding
``keep_from``. Here a topic's messages are index entries (one per commit
round, or merged by compaction), so the unit is the entry: the entries
that end at or before ``keep_from`` go, and the one holding it stays
whole (with the batches of its round before ``keep_from``). At or past the
end, every entry goes. Offsets go on from where they were.

Any node may purge (an operator's request need not find the owner): one
etcd transaction deletes the index keys below the first one kept, as one
range, and writes that offset into the topic's record (``topics/{topic}``
``floor``, or ``floors`` by partition for partitions other than 0). It compares the record's mod revision and the kept entry's,
so that neither a concurrent purge or settings change nor a compaction
that merged the kept entry into one starting below it (whose key the range
would take with data past ``keep_from``) is overwritten: a refused
transaction is read again and retried. Every node follows the registry,
sees the floor, and drops what its in-memory copy holds below it
(store.py); reads below it are DATA_LOST (retention), as on a single
node. The objects go with the janitor, once unreferenced.
"""

from __future__ import annotations

from .etcd import Compare, Delete, Etcd, Op, Put
from .keys import ClusterKeys
from .entries import IndexEntry
from .topics import TopicInfo

#: Transactions tried while others keep changing what a purge compares.
ATTEMPTS = 16


class PurgeError(Exception):
    """The purge could not be done (nothing was changed)."""


async def purge(etcd: Etcd, keys: ClusterKeys, topic: str, partition: int, keep_from: int) -> int:
    """Purge ``topic``'s ``partition`` before the entry holding ``keep_from``;
    the partition's first offset now. KeyError for a topic with no record;
    EtcdError when etcd cannot be reached."""
    record_key, prefix = keys.topic(topic), keys.index_prefix(topic, partition)
    for _ in range(ATTEMPTS):
        record = await etcd.get(record_key)
        if record is None:
            raise KeyError(topic)
        try:
            info = TopicInfo.decode(topic, record)
        except ValueError as exc:
            raise PurgeError(str(exc)) from None
        nxt = await etcd.get(keys.next(topic, partition))
        end = int(nxt.value) if nxt is not None else 0
        kept = None
        if keep_from < end:
            below = await etcd.range(prefix, keys.index(topic, partition, keep_from) + b"\x00", limit=1, descending=True)
            entry = None
            if below.kvs:
                try:
                    entry = IndexEntry.from_key(prefix, below.kvs[0].key, below.kvs[0].value)
                except ValueError as exc:
                    raise PurgeError(f"topic {topic!r}: the index entry holding {keep_from} is damaged: {exc}") from None
            if entry is not None and entry.first + entry.count > keep_from:
                kept = below.kvs[0]  # it holds keep_from: it stays, whole
                first = entry.first
            else:
                first = keep_from
        else:
            first = end
        first = max(first, info.floor_of(partition))  # a floor never goes down
        compare = [Compare.mod_revision(record_key, "==", record.mod_revision)]
        if kept is not None:
            compare.append(Compare.mod_revision(kept.key, "==", kept.mod_revision))
        success: list[Op] = [
            Delete(prefix, range_end=keys.index(topic, partition, first)),
            Put(record_key, info.with_floor(partition, first).encode()),
        ]
        result = await etcd.txn(compare, success)
        if result.succeeded:
            return first
    raise PurgeError(f"topic {topic!r}: what the purge reads kept changing under it; try again")
