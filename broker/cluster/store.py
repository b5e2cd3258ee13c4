"""A broker's log store in cluster mode (docs/cluster.md §5, §7, §8).

The server depends on the ``LogStore`` interface only (storage/base.py):
appends are synchronous and cheap, acknowledgements wait for ``sync``
(group commit), reads are synchronous. In cluster mode:

- every log is one partition: a plain topic's is partition 0 of it; a
  partitioned topic's partitions (``orders~3``, protocol.md) are
  partitions of its record in etcd (``address``). A partition's owner,
  found by the ownership manager, is the only node that takes its appends. ``append`` on
  any other node raises ``NotOwnerError`` naming the owner's address
  (ERROR 218 NOT_OWNER); nothing is stored.
- the owner appends to its in-memory copy of the topic at the next offset
  and keeps the batch pending; ``sync`` (the committer's round) commits all
  of a topic's pending batches as one round of the ``PartitionOwner``: one
  object PUT and one fenced etcd transaction, after which the publishers
  are acknowledged. A round that fails is cut from the copy and its
  publishers refused (``SyncResult.failed``), as a failed fsync is.
- every node keeps an in-memory copy of each topic (a window bounded in
  bytes, like the memory store) and fills it by tailing the partition's
  committed index (``IndexedReader.tail``): the batches other nodes commit
  reach this node's subscribers and groups through ``on_committed``.
- a read older than the copy (and not older than the partition's first
  index entry, its ``floor``) is served from the object store: the first
  such read starts one bounded background fetch (replay.py) and raises
  ``ReadPending``; a subscriber catching up, or a consumer group, waits
  for it without blocking anything and reads again. A range the fetch
  finds lost is DATA_LOST for exactly that range. ``first_offset`` is the floor, so SUBSCRIBE from an
  offset or ``earliest`` starts there. ``offset_at_time`` before the copy
  answers from the index entries' times (an entry's first batch): the
  entry that may hold the time, so never late, at most one entry early;
  before the index window, the floor.

Consumer groups run at their topic's owner with their state in etcd
(groupstate.py); a msg-id resend to the next owner is found in its copy
(the core's exactly-once window reads it back). What is not here yet
(docs/cluster.md §14): consumer groups reading more than one partition. The
HTTP fetch and event streams wait for a fetch as subscribers do; the
exactly-once window's read-back cannot: older than the copy is lost
(retention) to it, as before.
"""

from __future__ import annotations

import bisect
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from pybroker.protocol import Durability, MalformedBatch, first_msg_id, partition_of, partition_topic

from ..logs import get_logger
from ..storage.base import StoredBatch, SyncResult, TopicLog
from ..storage.errors import DataLoss, NotOwnerError, StorageError
from ..storage.memory import DEFAULT_MAX_BYTES, MemoryTopicLog
from ..storage.settings import SettingsResolver, TopicSettings, parse_runtime_settings
from .cache import CacheStatistics, RangeCache
from .compaction import CompactionSettings, CompactionStats
from .dedup import DEFAULT_DEDUP_MAX_IDS, DEFAULT_DEDUP_WINDOW, Named, decode_ids
from .deletion import DeleteError, delete_delayed
from .deletion import delete_topic as delete_topic_keys
from .etcd import Etcd, EtcdError
from .handoff import HandOffs
from .index import PartitionIndex
from .janitor import DEFAULT_EVERY, DEFAULT_GRACE, Janitor
from .keys import ClusterKeys
from .lease import LeaseKeeper, LeaseLost
from .members import Membership
from .objects import ObjectStore, ObjectStoreError
from .ownership import OwnershipManager
from .outcomes import AppendError, ChainBroken, NotOwner, OutcomeUnknown
from .partition import DEFAULT_MAX_ROUND_BYTES, PartitionOwner, _Round
from .replay import DEFAULT_MAX_BYTES as DEFAULT_REPLAY_BYTES
from .replay import DEFAULT_MAX_FETCHES, Replay, ReplayStatistics
from .purge import PurgeError
from .purge import purge as purge_partition
from .retention import Retention
from .stepaside import StepAside
from .tail import IndexedReader
from .topics import PartitionCountMismatch, TopicError, TopicRegistry

#: Backoff of a follower whose store failed: doubles from MIN to MAX.
RETRY_MIN = 0.1
RETRY_MAX = 2.0
#: Seconds a graceful stop waits for the partitions to be handed over.
LEAVE_TIMEOUT = 10.0

#: Bytes of pending batches one round carries (a round is one object),
#: and batches (each msg-id goes into the round's ``ids/`` key).
ROUND_BYTES = DEFAULT_MAX_ROUND_BYTES // 2
ROUND_BATCHES = 1024
#: ``ids/`` keys read per range and ranges read at most, at a take-over
#: (the keys expire with the exactly-once window: this is its rounds).
IDS_PAGE = 64
IDS_PAGES = 1024

#: ``on_committed(topic, batch)``: a batch another node committed is in this
#: node's copy of ``topic`` (the router hands it to subscribers).
Committed = Callable[[str, StoredBatch], None]
#: ``on_positioned(topic, offset)``: this node's copy of ``topic`` starts at
#: ``offset`` (where the cluster's index window begins), not at 0.
Positioned = Callable[[str, int], None]
#: The router's hook for a topic deleted through another node.
Deleted = Callable[[str], None]
#: ``on_older_ids(topic, named)``: at a take-over, the msg-ids committed
#: within the exactly-once window below this node's copy of ``topic``.
OlderIds = Callable[[str, list[Named]], None]


@attrs.frozen
class ClusterSettings:
    """What ``pybroker serve --cluster ... --object-store ...`` asks for."""

    etcd: list[str]
    object_endpoint: str
    bucket: str
    keys: ClusterKeys = attrs.field(factory=ClusterKeys)
    object_prefix: str = ""
    node: str = ""
    ttl: int = 10
    #: The group-commit window of the owners' rounds (PartitionOwner.window).
    window: float = 0.002
    #: Bytes of each topic a node keeps in memory.
    copy_bytes: int = DEFAULT_MAX_BYTES
    #: The exactly-once window (``--dedup-window``, its msg-ids at most):
    #: the lifetime of the rounds' ``ids/`` keys, read at a take-over.
    dedup_window: float = DEFAULT_DEDUP_WINDOW
    dedup_max_ids: int = DEFAULT_DEDUP_MAX_IDS
    #: Bytes of object ranges a node caches for its followers.
    cache_bytes: int = 64 * 1024 * 1024
    #: Batches older than the copies, fetched for readers (replay.py): the
    #: bytes a node keeps and the fetches it runs at once.
    replay_bytes: int = DEFAULT_REPLAY_BYTES
    replay_fetches: int = DEFAULT_MAX_FETCHES
    #: The janitor (janitor.py): how old an unreferenced object must be to
    #: go, and the time between sweeps.
    janitor_grace: float = DEFAULT_GRACE
    janitor_every: float = DEFAULT_EVERY
    #: Index compaction by each partition's owner (compaction.py, §13).
    compaction: CompactionSettings = attrs.field(factory=CompactionSettings)
    #: Per-topic settings (``--retention``, ``--retention-bytes``,
    #: ``--topic``): the owner cuts what retention no longer keeps
    #: (retention.py); the fsync and segment settings mean nothing here.
    topic_settings: SettingsResolver = attrs.field(factory=SettingsResolver)


@attrs.frozen
class ClusterFigures:
    """What a node's cluster side did, for ``/metrics`` (read on the event
    loop; plain values)."""

    #: Whether the node holds its member lease now, the members it sees,
    #: and the partitions it owns.
    member: bool
    members: int
    owned: int
    commit_rounds: int
    compaction: CompactionStats
    replay: ReplayStatistics
    cache: CacheStatistics
    janitor_sweeps: int
    janitor_deleted: int
    #: Batches (dead letters) handed to other nodes' topics, and taken here.
    hand_offs_sent: int = 0
    hand_offs_taken: int = 0


def parse_cluster_urls(cluster: str, object_store: str, node: str = "") -> ClusterSettings:
    """``etcd://host:port[,host:port...][/prefix]`` and
    ``s3://host:port/bucket[/prefix]`` (``s3s://`` for HTTPS); ValueError
    for anything else."""
    if not cluster.startswith("etcd://"):
        raise ValueError(f"--cluster wants etcd://host:port[,host:port][/prefix], not {cluster!r}")
    hosts, _, prefix = cluster[len("etcd://") :].partition("/")
    endpoints = [f"http://{h}" for h in hosts.split(",") if h]
    if not endpoints:
        raise ValueError(f"--cluster {cluster!r} names no etcd endpoint")
    scheme, sep, rest = object_store.partition("://")
    if not sep or scheme not in ("s3", "s3s"):
        raise ValueError(f"--object-store wants s3://host:port/bucket[/prefix], not {object_store!r}")
    host, _, path = rest.partition("/")
    bucket, _, object_prefix = path.partition("/")
    if not host or not bucket:
        raise ValueError(f"--object-store {object_store!r} needs a host and a bucket")
    keys = ClusterKeys(f"/{prefix.strip('/')}/".encode() if prefix.strip("/") else b"/pybroker/")
    endpoint = f"{'https' if scheme == 's3s' else 'http'}://{host}"
    object_prefix = f"{object_prefix.strip('/')}/" if object_prefix.strip("/") else ""
    return ClusterSettings(endpoints, endpoint, bucket, keys, object_prefix, node)


class ClusterTopicLog:
    """One topic on one node: its in-memory copy (what subscribers read)
    and, on the owner, the batches appended and not yet committed."""

    needs_sync = True
    durability = Durability.DISK

    def __init__(self, store: ClusterStore, name: str) -> None:
        self.name = name
        self._store = store
        self.copy = MemoryTopicLog(name, store.settings.copy_bytes)
        #: Whether ``copy`` starts where the committed log is (set by the follower).
        self.positioned = False
        #: (base, batch, count, timestamp) appended, not yet in a round.
        self.pending: list[tuple[int, bytes, int, int]] = []
        #: Syncs covering this log not yet released by the committer.
        self.committing = 0
        #: The owner epoch whose committed end ``copy`` was found to match:
        #: appends are taken only then.
        self.ready_epoch = 0
        #: The owner epoch for which the msg-ids below the copy were read
        #: (appends wait for that too), and whether they are being read.
        self.ids_epoch = 0
        self.ids_loading = False
        #: Cancelled to make the follower start again from the copy's end.
        self.restart = trio.CancelScope()
        self.follower_started = False
        #: Cancelled when the log is dropped (its topic deleted).
        self.scope = trio.CancelScope()
        #: The create revision of its topic's record once seen: a record
        #: of another generation means the topic was deleted (and perhaps
        #: made again) since.
        self.generation = 0
        #: The partition's first indexed offset, once known (None: reads
        #: below the copy are lost, as before the follower found it), and
        #: the follower's reader that fetches what lies below the copy.
        self.floor: int | None = None
        self.reader: IndexedReader | None = None

    @property
    def first_offset(self) -> int:
        first = self.copy.first_offset
        floor = self.floor
        return first if floor is None or floor > first else floor

    @property
    def next_offset(self) -> int:
        return self.copy.next_offset

    @property
    def size_bytes(self) -> int:
        return self.copy.size_bytes

    @property
    def last_timestamp(self) -> int:
        return self.copy.last_timestamp

    def append(self, batch: bytes, count: int, timestamp: int) -> int:
        self._store.owner_for(self)
        base = self.copy.append(batch, count, timestamp)
        self.pending.append((base, batch, count, timestamp))
        return base

    def read(self, offset: int, max_bytes: int) -> list[StoredBatch]:
        first = self.copy.first_offset
        if offset < first:
            floor, reader = self.floor, self.reader
            if floor is None or reader is None or offset < floor:
                lowest = first if floor is None else min(floor, first)
                raise DataLoss(self.name, offset, lowest - 1, "retention")
            # Older than the copy: fetched (ReadPending until it is here).
            return self._store.replay.read(self.name, reader, offset, first, max_bytes)
        batches = self.copy.read(offset, max_bytes)
        if batches and batches[0].next_offset <= offset:
            # In a range the follower could not get (skip_to): lost, said so,
            # never the batch before it handed out as if it held the offset.
            end = batches[1].base_offset if len(batches) > 1 else self.copy.next_offset
            raise DataLoss(self.name, offset, end - 1, "missing")
        return batches

    def offset_at_time(self, timestamp: int) -> int:
        found = self.copy.offset_at_time(timestamp)
        first = self.copy.first_offset
        floor, reader = self.floor, self.reader
        if found > first or floor is None or reader is None or floor >= first:
            return found
        # At or before the copy's first batch: the index entries below the
        # copy know their first batch's time. The last one starting before
        # ``timestamp`` may hold later batches, so it is the answer (never
        # late, at most an entry early); before all of them, the floor.
        entries = [e for e in reader.index.entries() if e.first < first]
        i = bisect.bisect_left([e.timestamp for e in entries], timestamp)
        return entries[i - 1].first if i > 0 else floor


class ClusterStore:
    """All topics of one cluster node. ``run`` (started once the broker's
    address is known) joins the cluster and runs until cancelled: it grants
    the member lease, runs the ownership manager, and follows every topic;
    when the lease is lost it joins again under a new one."""

    def __init__(self, settings: ClusterSettings, *, credentials: Any = None) -> None:
        self.settings = settings
        self.etcd = Etcd(settings.etcd)
        self.objects = ObjectStore(
            settings.object_endpoint, settings.bucket, prefix=settings.object_prefix, credentials=credentials
        )
        self.cache = RangeCache(self.objects, max_bytes=settings.cache_bytes)
        self.replay = Replay(max_bytes=settings.replay_bytes, max_fetches=settings.replay_fetches)
        #: Runs on the one node that holds the janitor key.
        self.janitor = Janitor(
            self.etcd, self.objects, keys=settings.keys, grace=settings.janitor_grace, every=settings.janitor_every
        )
        #: Dead letters to topics other nodes own, and those handed to
        #: this node's (handoff.py).
        self.hand_offs = HandOffs(self.etcd, self.objects, settings.keys, self.register)
        #: Sends the clients elsewhere while this node is cut off from etcd
        #: and another is not (stepaside.py).
        self.step_aside = StepAside(settings.ttl)
        self.manager: OwnershipManager | None = None
        self.addr = ""
        self.on_committed: Committed | None = None
        self.on_positioned: Positioned | None = None
        self.on_deleted: Deleted | None = None
        self.on_older_ids: OlderIds | None = None
        #: Logs dropped with batches still pending: the next sync refuses them.
        self._orphans: list[ClusterTopicLog] = []
        self.joined = trio.Event()
        self._logs: dict[str, ClusterTopicLog] = {}
        self._creating: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._left = False
        self.commit_rounds = 0
        self.logger: Any = get_logger(component="cluster-store")
        #: Awaited first by a graceful stop, before the partitions are handed
        #: over: the consumer groups' last save (broker/cluster/groupstate.py).
        self.before_leave: Callable[[], Awaitable[None]] | None = None

    # -- LogStore ----------------------------------------------------------

    @property
    def durability(self) -> Durability:
        return Durability.DISK

    @property
    def needs_sync(self) -> bool:
        return True

    def attach(
        self, on_committed: Committed, on_positioned: Positioned, on_deleted: Deleted, on_older_ids: OlderIds
    ) -> None:
        """The core's hooks for batches other nodes committed, for topics
        deleted through other nodes, and for the msg-ids of the window a
        take-over reads from etcd."""
        self.on_committed = on_committed
        self.on_positioned = on_positioned
        self.on_deleted = on_deleted
        self.on_older_ids = on_older_ids

    def topic(self, name: str) -> ClusterTopicLog:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = ClusterTopicLog(self, name)
        self._follow(log)
        return log

    def topic_names(self) -> list[str]:
        return list(self._logs)

    @staticmethod
    def address(name: str) -> tuple[str, int]:
        """Where log ``name`` is kept in etcd: partition p of its topic for
        a partition's name (``orders~3``: ``("orders", 3)``), else partition
        0 of a topic of its own (docs/cluster.md §2)."""
        return partition_of(name) or (name, 0)

    def partition_count(self, name: str) -> int:
        manager = self.manager
        info = manager.topics.info(name) if manager is not None else None
        return info.partitions if info is not None and info.partitions > 1 else 0

    async def create_topic(self, name: str, partitions: int) -> bool:
        """TOPICS create, for every node: the topic's record in etcd with its
        partition count (topics.py), which the ownership manager spreads
        over the nodes partition by partition; returns once this node's
        view holds it (so that its partitions take publishes here)."""
        manager = self.manager
        if manager is None:
            raise StorageError("this node has not joined the cluster", full=False, topic=name)
        try:
            with trio.fail_after(self.etcd.timeout * 2):
                info = await manager.topics.create(name, partitions)
                while manager.topics.info(name) is None:
                    await manager.changed()
        except PartitionCountMismatch as exc:
            noun = "partition" if exc.existing == 1 else "partitions"
            raise ValueError(f"topic {name!r} exists with {exc.existing} {noun}, not {partitions}") from None
        except (EtcdError, TopicError, TimeoutError) as exc:
            raise StorageError(f"could not create {name!r}: {exc}", full=False, topic=name) from None
        return info.new

    async def delete_topic(self, name: str) -> TopicLog | None:
        """TOPICS delete, for every node: the topic's record and everything
        etcd holds of it go in one transaction (deletion.py), its owners
        fenced; this node drops its copy at once, the others when their
        view sees the record go. A partition's name deletes its whole topic
        (the core deletes a partitioned topic partition by partition: the
        first does it)."""
        manager = self.manager
        if manager is None:
            raise StorageError("this node has not joined the cluster", full=False, topic=name)
        base, _ = self.address(name)
        info = manager.topics.info(base)
        if info is not None:
            try:
                with trio.fail_after(self.etcd.timeout * 2):
                    deleted = await delete_topic_keys(self.etcd, self.settings.keys, info)
            except (EtcdError, DeleteError, TimeoutError) as exc:
                raise StorageError(f"could not delete {base!r}: {exc}", full=False, topic=name) from None
            if deleted:
                try:
                    with trio.fail_after(self.etcd.timeout * 20):
                        await delete_delayed(self.etcd, self.objects, self.settings.keys, info)
                except (EtcdError, ObjectStoreError, OSError, TimeoutError) as exc:
                    self.logger.warning("delayed batches of a deleted topic left to be released", topic=base, error=repr(exc))
            # This node's view sees it gone before the name is used again
            # here (a new log must not take the old generation).
            with trio.move_on_after(self.etcd.timeout * 2):
                while (seen := manager.topics.info(base)) is not None and seen.created == info.created:
                    await manager.changed()
        log = self._logs.get(name)
        if log is not None:
            self._drop(log)
        return log

    def _drop(self, log: ClusterTopicLog) -> None:
        """Forget a log whose topic was deleted: its follower stops; batches
        still pending in it are refused by the next sync."""
        if self._logs.get(log.name) is log:
            del self._logs[log.name]
        log.scope.cancel()
        if log.pending:
            self._orphans.append(log)

    async def discard(self, log: TopicLog) -> None:
        return None

    async def set_topic(self, name: str, changes: Mapping[str, str]) -> TopicSettings:
        """TOPICS set: the topic's retention, for every node: kept in its
        record in etcd (``topics/{topic}``), over what the nodes were started
        with; the owner cuts by it from its next pass, every node reads the
        floor by it. KeyError for no such topic, ValueError for a setting
        that cannot change so, StorageError when etcd cannot be reached."""
        manager = self.manager
        if manager is None:
            raise StorageError("this node has not joined the cluster", full=False, topic=name)
        parsed: dict[str, Any] = dict(parse_runtime_settings(changes))
        if "segment_bytes" in parsed:
            raise ValueError("segment_bytes means nothing in cluster mode: the nodes keep no segments")
        attrs.evolve(self.retention_settings(name), **parsed)  # checks the values first
        try:
            info = await manager.topics.set_settings(self.address(name)[0], parsed)
        except (EtcdError, TopicError) as exc:
            raise StorageError(f"could not change the settings of {name!r}: {exc}", full=False, topic=name) from None
        return self._with_registered(name, info.settings)

    async def purge(self, log: TopicLog, keep_from: int) -> int:
        """TOPICS purge, for every node (purge.py): the index entries before
        the one holding ``keep_from`` go and the topic's record gets the new
        floor, which every node applies to its copy; the first offset now."""
        assert isinstance(log, ClusterTopicLog), log
        try:
            first = await purge_partition(self.etcd, self.settings.keys, *self.address(log.name), keep_from)
        except KeyError:
            raise StorageError(f"topic {log.name!r} is not registered in the cluster yet", full=False, topic=log.name) from None
        except (EtcdError, PurgeError) as exc:
            raise StorageError(f"could not purge {log.name!r}: {exc}", full=False, topic=log.name) from None
        self._apply_floor(log, first)
        return log.first_offset

    def _apply_floor(self, log: ClusterTopicLog, floor: int) -> None:
        """A purge's floor: nothing below it is read from here on, and the
        copy drops what it holds below it."""
        if log.floor is None or floor > log.floor:
            log.floor = floor
            log.copy.purge(floor)

    @property
    def problem(self) -> str | None:
        """Why this node is degraded (GET /readyz answers 503 with it, and
        other nodes' StepAside reads that): no member lease it may rely on."""
        manager = self.manager
        if manager is not None and not manager.keeper.held():
            return "no cluster lease to rely on (cut off from etcd, or joining again): publishes are refused"
        return None

    @property
    def stepped_aside(self) -> bool:
        """Cut off from etcd while another node is ready: clients go there."""
        return self.step_aside.stepped_aside

    sync_interval = None

    async def probe(self) -> None:
        return None

    async def sync_interval_topics(self) -> None:
        return None

    def enforce_retention(self) -> int:
        return 0  # each copy evicts by bytes as it grows

    def close(self) -> None:
        self._logs.clear()

    #: The committer's syncs out at once: the next one's rounds are PUT
    #: while the last one's transactions are out (docs/cluster.md §5).
    sync_depth = 2

    async def sync(self) -> SyncResult:
        """Commit every topic's pending batches (a round per topic, at once).
        Every round is handed to its owner before anything is awaited, so
        that a partition's rounds are in sync order whatever overlaps. A
        log stays ``committing`` until the committer has released this
        sync's results (``on_released``): after a failure its appends are
        refused until then, so that no later result's cut covers them."""
        failed: dict[str, tuple[int, StorageError]] = {}
        work = [log for log in self._logs.values() if log.pending]
        if self._orphans:
            work += [log for log in self._orphans if log.pending]
            self._orphans = []
        submitted = []
        for log in work:
            items, log.pending = log.pending, []
            log.committing += 1
            submitted.append((log, self._submit(log, items)))

        def released() -> None:
            for log, _ in submitted:
                log.committing -= 1

        try:
            async with trio.open_nursery() as nursery:
                for log, rounds in submitted:
                    nursery.start_soon(self._settle, log, rounds, failed)
        except BaseException:
            released()
            raise
        return SyncResult(Durability.DISK, failed, on_released=released)

    def cluster_figures(self) -> ClusterFigures:
        manager = self.manager
        return ClusterFigures(
            member=manager is not None and manager.keeper.held(),
            members=len(manager.membership.members) if manager is not None else 0,
            owned=len(manager.held()) if manager is not None else 0,
            commit_rounds=self.commit_rounds,
            compaction=manager.compaction_stats() if manager is not None else CompactionStats(),
            replay=self.replay.statistics(),
            cache=self.cache.statistics(),
            janitor_sweeps=self.janitor.sweeps,
            janitor_deleted=self.janitor.deleted,
            hand_offs_sent=self.hand_offs.sent,
            hand_offs_taken=self.hand_offs.taken,
        )

    # -- the owner's side ----------------------------------------------------

    def owner_for(self, log: ClusterTopicLog) -> PartitionOwner:
        """The PartitionOwner that takes ``log``'s appends now; NotOwnerError
        when there is none on this node or its copy is not caught up."""
        name = log.name
        manager = self.manager
        owner = manager.local(*self.address(name)) if manager is not None else None
        if owner is None or not owner.accepting:
            self.register(name)
            raise self._not_owner(name)
        if log.ready_epoch != owner.epoch:
            if log.pending or log.committing or owner.stale or not log.positioned:
                raise NotOwnerError(f"topic {name!r}: this node is taking it over", topic=name)
            if log.copy.next_offset != owner.next_offset:
                log.restart.cancel()  # the follower reads up to the committed end
                raise NotOwnerError(
                    f"topic {name!r}: this node is taking it over (at {log.copy.next_offset} of {owner.next_offset})",
                    topic=name,
                )
            if log.ids_epoch != owner.epoch and self._window_in_copy(log):
                log.ids_epoch = owner.epoch  # the core reads every msg-id of the window back from the copy
            if log.ids_epoch != owner.epoch:
                if not log.ids_loading and self._nursery is not None:
                    log.ids_loading = True
                    self._nursery.start_soon(self._load_ids, log, owner.epoch)
                raise NotOwnerError(f"topic {name!r}: this node is taking it over (its exactly-once window)", topic=name)
            log.ready_epoch = owner.epoch
        return owner

    def _not_owner(self, name: str, why: str = "") -> NotOwnerError:
        """NOT_OWNER for ``name``, naming where to send it: the owner as this
        node's view of etcd has it; or, while this node has no lease it can
        rely on (cut off from etcd, or rejoining), its view may be stale, so
        another member, which knows better; or nobody (send it here again
        shortly) while the topic simply has no owner yet."""
        manager = self.manager
        info = manager.owner_of(*self.address(name)) if manager is not None else None
        addr = info.addr if info is not None and info.addr != self.addr else ""
        if manager is not None and not manager.keeper.held():
            others = sorted(
                ((m.addr, m.http) for m in manager.membership.members.values() if m.addr and m.addr != self.addr)
            )
            if others:
                addr, url = random.choice(others)
                return NotOwnerError(
                    f"topic {name!r}: this node has lost touch with etcd; ask {addr}", topic=name, owner=addr, owner_url=url
                )
        member = manager.membership.members.get(info.node) if manager is not None and info is not None and addr else None
        url = member.http if member is not None else ""
        if why:
            return NotOwnerError(f"{why}", topic=name, owner=addr, owner_url=url)
        where = f"owned by {info.node} at {addr}" if info is not None and addr else "without an owner yet"
        return NotOwnerError(f"topic {name!r} is {where}", topic=name, owner=addr, owner_url=url)

    def _submit(self, log: ClusterTopicLog, items: list[tuple[int, bytes, int, int]]) -> _Submitted:
        """Hand ``items`` to the partition's owner as rounds (of at most
        ROUND_BYTES and ROUND_BATCHES), in order, without waiting: each
        round's first offset and the round, or the error that stopped it
        (the rounds after it are not handed over)."""
        manager = self.manager
        owner = manager.local(*self.address(log.name)) if manager is not None else None
        rounds: list[tuple[int, _Round | StorageError]] = []
        start = 0
        while start < len(items):
            end, size = start, 0
            while end < len(items) and (
                end == start or (size + len(items[end][1]) <= ROUND_BYTES and end - start < ROUND_BATCHES)
            ):
                size += len(items[end][1])
                end += 1
            chunk = items[start:end]
            base = chunk[0][0]
            if owner is None or owner.epoch != log.ready_epoch:
                rounds.append((base, NotOwnerError(f"topic {log.name!r}: this node no longer owns it", topic=log.name)))
                break
            try:
                round_ = owner.submit_round(
                    [(batch, count, ts) for _, batch, count, ts in chunk], [_msg_id(batch) for _, batch, _, _ in chunk], base
                )
            except NotOwner as exc:
                rounds.append((base, self._not_owner(log.name, f"not stored: {exc}")))
                break
            rounds.append((base, round_))
            start = end
        return _Submitted(owner, rounds)

    async def _settle(
        self, log: ClusterTopicLog, submitted: _Submitted, failed: dict[str, tuple[int, StorageError]]
    ) -> None:
        """Wait for a log's rounds in order; at the first not committed, cut
        the copy there and report it (once: the rounds after it are not
        committed either)."""
        owner = submitted.owner
        for base, round_ in submitted.rounds:
            error = round_ if isinstance(round_, StorageError) else await self._outcome(log, owner, base, round_)
            if error is _CHAIN_BROKEN:
                return  # the round before it failed, in an earlier sync that reported it
            if error is not None:
                self._failed(log, base, error, owner, failed)
                return
            self.commit_rounds += 1

    async def _outcome(
        self, log: ClusterTopicLog, owner: PartitionOwner | None, base: int, round_: _Round
    ) -> StorageError | None:
        assert owner is not None  # (a round was submitted to it)
        try:
            got = await owner.round_outcome(round_)
        except ChainBroken:
            return _CHAIN_BROKEN
        except NotOwner as exc:
            return self._not_owner(log.name, f"not stored: {exc}")
        except OutcomeUnknown as exc:
            return StorageError(f"the cluster commit's outcome is unknown (it may be stored): {exc}", full=False, topic=log.name)
        except AppendError as exc:
            return StorageError(f"the cluster commit failed: {exc}", full=False, topic=log.name)
        except TimeoutError:
            return StorageError("the cluster commit did not finish in time (it may be stored)", full=False, topic=log.name)
        if got != base:
            # Cannot happen while the copy matched the owner's end; if it
            # does, those batches are at other offsets than answered.
            self.logger.error("cluster commit at another offset than appended", topic=log.name, expected=base, got=got)
            return StorageError(f"committed at offset {got}, not {base} (it is stored there)", full=False, topic=log.name)
        return None

    def _window_in_copy(self, log: ClusterTopicLog) -> bool:
        """Whether ``log``'s copy holds the whole exactly-once window: the
        partition from its start, or a batch older than the window."""
        copy = log.copy
        if copy.first_offset <= (log.floor if log.floor is not None else 0):
            return True
        oldest = time.time_ns() // 1000 - int(self.settings.dedup_window * 1_000_000)
        return copy.offset_at_time(oldest) > copy.first_offset

    async def _load_ids(self, log: ClusterTopicLog, epoch: int) -> None:
        """At a take-over: the msg-ids of the rounds committed below this
        node's copy that are still within the exactly-once window (their
        ``ids/`` keys expire with it), for the core's window, which reads
        the rest back from the copy (docs/cluster.md §7). The newest
        ``dedup_max_ids`` are kept. A failed read is tried again by the next
        append (which is refused until then)."""
        topic, partition = self.address(log.name)
        keys = self.settings.keys
        start, end = keys.ids_prefix(topic, partition), keys.ids(topic, partition, log.copy.first_offset)
        named: deque[Named] = deque(maxlen=self.settings.dedup_max_ids)
        try:
            for _ in range(IDS_PAGES):
                page = await self.etcd.range(start, end, limit=IDS_PAGE)
                for kv in page.kvs:
                    named.extend(decode_ids(kv.value))
                if not page.more or not page.kvs:
                    break
                start = page.kvs[-1].key + b"\x00"
        except EtcdError as exc:
            self.logger.warning("exactly-once window not read at a take-over", topic=log.name, error=str(exc))
            return
        finally:
            log.ids_loading = False
        if named and self.on_older_ids is not None:
            self.on_older_ids(log.name, list(named))
        log.ids_epoch = epoch

    def _failed(
        self,
        log: ClusterTopicLog,
        cut: int,
        error: StorageError,
        owner: PartitionOwner | None,
        failed: dict[str, tuple[int, StorageError]],
    ) -> None:
        """A round was not committed (or not known to be): cut it and
        everything appended after it from the copy; its publishers and
        theirs are refused. The copy then takes what the follower reads."""
        self.logger.warning("cluster commit failed", topic=log.name, offset=cut, error=error.message)
        log.pending = []
        if cut < log.copy.next_offset:
            # (Two syncs out at once may both fail, the later one's rounds
            # past the earlier one's cut, whichever is reported first.)
            log.copy.cut(cut)
        log.ready_epoch = 0
        failed[log.name] = (cut, error)
        log.restart.cancel()
        if owner is not None and owner.stale and self._nursery is not None:
            self._nursery.start_soon(owner.refresh)

    def register(self, name: str) -> None:
        """Register ``name`` in the cluster if it is not yet (a first publish,
        or a consumer group made before anything was published): in the
        background; until an owner has it, it is NOT_OWNER without an owner."""
        manager = self.manager
        if manager is None or name in manager.topics.topics or name in self._creating or self._nursery is None:
            return
        if partition_of(name) is not None:
            return  # its topic is registered by TOPICS create, with its count
        self._creating.add(name)
        self._nursery.start_soon(self._register_topic, name, manager.topics)

    async def _register_topic(self, name: str, topics: TopicRegistry) -> None:
        try:
            with trio.move_on_after(self.etcd.timeout * 2):
                await topics.create(name, 1)
        except (EtcdError, TopicError) as exc:
            self.logger.warning("could not create topic", topic=name, error=str(exc))
        finally:
            self._creating.discard(name)

    # -- every node's side: following the committed log ------------------------

    def _follow(self, log: ClusterTopicLog) -> None:
        if not log.follower_started and self._nursery is not None:
            log.follower_started = True
            self._nursery.start_soon(self._follower, log)

    async def _follower(self, log: ClusterTopicLog) -> None:
        with log.scope:
            await self._follow_committed(log)

    async def _follow_committed(self, log: ClusterTopicLog) -> None:
        """Fill ``log``'s copy with the batches committed to the partition, in
        order, and hand those no local append put there to ``on_committed``."""
        index = PartitionIndex(self.etcd, *self.address(log.name), keys=self.settings.keys)
        reader_pause = RETRY_MIN
        reader = IndexedReader(index, self.cache)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(index.run)
            await index.wait_loaded()
            if not log.positioned:
                # A node's copy starts at the index window's first batch.
                log.copy = MemoryTopicLog(log.name, self.settings.copy_bytes, start=index.low)
                log.positioned = True
                if self.on_positioned is not None:
                    self.on_positioned(log.name, index.low)
            if log.reader is None:
                log.reader = reader
                nursery.start_soon(self._find_floor, log, index)
            while True:
                log.restart = trio.CancelScope()
                mismatched = False
                with log.restart:
                    try:
                        tail = reader.tail(log.copy.next_offset)
                        async for stored in tail:
                            reader_pause = RETRY_MIN
                            end = log.copy.next_offset
                            if stored.next_offset <= end:
                                continue  # this node appended it as its owner
                            if stored.base_offset != end:
                                mismatched = True  # not where the copy ends: read again from there
                                break
                            log.copy.append(stored.batch, stored.count, stored.timestamp)
                            if self.on_committed is not None:
                                self.on_committed(log.name, stored)
                    except DataLoss as lost:
                        self.logger.error("cluster batches lost", topic=log.name, error=str(lost))
                        if lost.last + 1 > log.copy.next_offset and not log.pending:
                            log.copy.skip_to(lost.last + 1)
                    except (EtcdError, ObjectStoreError, OSError) as exc:
                        self.logger.info("following failed", topic=log.name, error=repr(exc), retry_in=reader_pause)
                        await trio.sleep(reader_pause)
                        reader_pause = min(RETRY_MAX, reader_pause * 2)
                # Restarted (at once: a take-over waits for it), or the tail
                # did not meet the copy's end (after a pause: no busy loop).
                await trio.sleep(RETRY_MIN if mismatched else 0)

    def retention_of(self, topic: str) -> Retention:
        return Retention.of(self.retention_settings(topic))

    def retention_settings(self, topic: str) -> TopicSettings:
        """The topic's settings: what the node was started with, under what
        TOPICS set put in the topic's record in etcd (set_topic)."""
        manager = self.manager
        info = manager.topics.info(self.address(topic)[0]) if manager is not None else None
        return self._with_registered(topic, info.settings if info is not None else {})

    def _with_registered(self, topic: str, registered: Mapping[str, Any]) -> TopicSettings:
        base = self.settings.topic_settings(topic)
        known: dict[str, Any] = {}
        for key in ("retention_bytes", "retention_seconds"):
            if key not in registered:
                continue
            value = registered[key]
            usable = value is None or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
            )
            if not usable:  # a record no node of this version wrote: the node's own setting stays
                self.logger.error("a topic setting in etcd does not apply", topic=topic, key=key, value=repr(value)[:100])
                continue
            known[key] = int(value) if key == "retention_bytes" and value is not None else value
        return attrs.evolve(base, **known)

    async def _find_floor(self, log: ClusterTopicLog, index: PartitionIndex) -> None:
        """The partition's first indexed offset (what reads below the copy
        can reach): the window's own first when it starts at 0, else the
        first entry in etcd (retried while etcd does not answer). Read
        again every ``retention_every`` seconds while the topic has a
        retention limit (its owner cuts the oldest entries; a limit TOPICS
        set gives it later counts from then on); it only rises."""
        pause = RETRY_MIN
        while True:
            try:
                floor = await self._read_floor(log, index)
            except EtcdError as exc:
                self.logger.info("cannot read the first index entry", topic=log.name, error=repr(exc), retry_in=pause)
                await trio.sleep(pause)
                pause = min(RETRY_MAX, pause * 2)
                continue
            log.floor = floor if log.floor is None else max(log.floor, floor)
            pause = RETRY_MIN
            while True:  # (no etcd read while the topic has no limit)
                await trio.sleep(self.settings.compaction.retention_every)
                if self.retention_of(log.name).active:
                    break

    async def _read_floor(self, log: ClusterTopicLog, index: PartitionIndex) -> int:
        if index.low == 0 and log.floor is None:
            return 0
        try:
            entries, _ = await index.lookup(0, 1)
        except ValueError as exc:  # it does not decode: the window's first is the floor
            self.logger.error("the first index entry is damaged", topic=log.name, error=str(exc))
            return index.low
        return entries[0].first if entries else index.low

    # -- joining -------------------------------------------------------------

    async def run(self, addr: str, http: str = "", *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Join the cluster as ``addr`` (this broker's ``host:port``; ``http``
        that of its HTTP side, if it has one) until cancelled or
        :meth:`leave` returns."""
        self.addr = addr
        node = self.settings.node or f"{socket.gethostname()}:{addr}"
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self.replay.nursery = self.hand_offs.nursery = nursery
                nursery.start_soon(self.step_aside.run, lambda: self.manager, addr)
                for log in list(self._logs.values()):
                    self._follow(log)
                try:
                    with trio.fail_after(self.etcd.timeout * 2):
                        await self.objects.create_bucket()
                except (ObjectStoreError, OSError, TimeoutError) as exc:
                    # Perhaps not ours to create: the first PUT says whether it is there.
                    self.logger.warning("could not create the bucket", bucket=self.settings.bucket, error=str(exc))
                started = False
                while True:
                    keeper = LeaseKeeper(self.etcd, self.settings.ttl)
                    try:
                        await keeper.grant()
                    except EtcdError as exc:
                        self.logger.warning("cannot reach etcd", error=str(exc))
                        await trio.sleep(RETRY_MAX)
                        continue
                    membership = Membership(self.etcd, keeper, node, keys=self.settings.keys, addr=addr, http=http)
                    topics = TopicRegistry(self.etcd, keys=self.settings.keys)
                    manager = OwnershipManager(
                        self.etcd, self.objects, keeper, membership, topics,
                        keys=self.settings.keys,
                        owner_options={
                            "window": self.settings.window,
                            "on_written": self.cache.put,
                            "dedup_window": self.settings.dedup_window,
                        },
                        compaction=self.settings.compaction, retention=self.retention_of, cache=self.cache,
                    )  # fmt: skip
                    self.manager = manager
                    self.logger.info("joined the cluster", node=node, addr=addr, lease=f"{keeper.lease:x}")
                    if not started:
                        started = True
                        self.joined.set()
                        task_status.started()
                    try:
                        async with trio.open_nursery() as incarnation:
                            incarnation.start_soon(keeper.run)
                            incarnation.start_soon(self._follow_registered, manager)
                            incarnation.start_soon(self.janitor.run, keeper)
                            incarnation.start_soon(self.hand_offs.run, manager)
                            try:
                                await manager.run()
                            finally:
                                incarnation.cancel_scope.cancel()
                    except* LeaseLost:
                        self.logger.warning("member lease lost: joining again", node=node)
                    if self._left:
                        return
        finally:
            self._nursery = self.replay.nursery = self.hand_offs.nursery = None
            self.manager = None
            with trio.CancelScope(shield=True):
                await self.etcd.aclose()
                await self.objects.aclose()

    async def leave(self) -> None:
        """A graceful stop, while ``run`` still runs: hand every partition
        over (their owners commit what they took first) and end the lease,
        within LEAVE_TIMEOUT; then ``run`` returns."""
        manager = self.manager
        if manager is None:
            return
        self._left = True
        if self.before_leave is not None:
            await self.before_leave()  # (bounded by its own timeout)
        with trio.move_on_after(LEAVE_TIMEOUT):
            try:
                await manager.leave(LEAVE_TIMEOUT)
            except (TimeoutError, EtcdError, LeaseLost) as exc:
                self.logger.warning("leaving the cluster", error=repr(exc))
            try:
                await self.etcd.revoke(manager.keeper.lease)
            except EtcdError:
                pass  # it runs out by itself
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _follow_registered(self, manager: OwnershipManager) -> None:
        """Follow every topic the cluster has (this node's subscribers may
        read any of them)."""
        # A new incarnation's registry starts empty: until its first read,
        # every topic this node knows would look deleted elsewhere.
        await manager.topics.mirror.synced.wait()
        while True:
            registered = manager.topics.topics
            for log in list(self._logs.values()):
                info = registered.get(self.address(log.name)[0])
                if info is not None and not log.generation:
                    log.generation = info.created
                elif log.generation and (info is None or info.created != log.generation):
                    # Deleted (and perhaps made again) through another node.
                    self._drop(log)
                    if self.on_deleted is not None:
                        self.on_deleted(log.name)
            for name, info in list(registered.items()):
                if info.partitions > 1:
                    for p in range(info.partitions):
                        log = self.topic(partition_topic(name, p))
                        if info.floor_of(p):
                            self._apply_floor(log, info.floor_of(p))  # purged, perhaps by another node
                    continue
                log = self.topic(name)
                if info.floor:
                    self._apply_floor(log, info.floor)  # purged, perhaps by another node
            await manager.changed()


@attrs.frozen
class _Submitted:
    """One sync's rounds of one log, handed to its owner (``_submit``)."""

    owner: PartitionOwner | None
    rounds: list[tuple[int, _Round | StorageError]]


#: ``_outcome`` of a round whose chain broke (outcomes.ChainBroken).
_CHAIN_BROKEN = StorageError("not sent: the round before it failed", full=False)


def _msg_id(batch: bytes) -> str | None:
    try:
        return first_msg_id(batch)
    except MalformedBatch:
        return None
