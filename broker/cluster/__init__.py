"""Cluster mode's clients for the services it stands on (docs/cluster.md).

- ``etcd``: etcd v3 through its JSON gateway (ranges, puts, deletes,
  transactions with compares, leases, watches).
- ``lease``: keeping an etcd lease alive, and knowing by this process's
  own monotonic clock until when it is certainly still held.
- ``objects``: the few S3 calls the data path needs (conditional PUT,
  ranged GET, DELETE, LIST), optionally signed (``sigv4``).
- ``httpio``: bounded reads of httpx streams (shared by both clients).
- ``keys``: the etcd key schema and data object names.
- ``partition``: one partition's owner (ownership, group-committed
  appends: one object and one fenced transaction per round) and reader
  (index in etcd, ranged GETs).
- ``index``: one partition's index kept in memory from a range read and
  an etcd watch; ``cache``: data objects' byte ranges (LRU in bytes,
  single flight); ``tail``: reads and tails through the two, without an
  etcd round trip per read.
- ``mirror``: the keys under an etcd prefix kept in memory (range read,
  then a watch from its revision + 1; a fresh read when the watch ends).
- ``members``, ``topics``: membership (``members/{node}`` under the
  member lease) and the topic registry (partition counts).
- ``dedup``: exactly-once: msg-ids an owner remembers and the window
  leases its ``dedup/`` entries live under.
- ``ranking``, ``ownership``: rendezvous ranking, and the ownership
  manager that acquires, hands over and takes over partitions.
- ``compaction``: the owner merging runs of old index entries into one
  larger object and entry, so etcd holds a bounded index per partition.

Nothing here imports the broker's core, sessions or HTTP side: these are
storage-level building blocks (``partition`` uses the single-node log's
stored batch format from ``storage``). They use anyio (through httpx), so they run
under Trio, as the broker does, and under asyncio.
"""

from __future__ import annotations
