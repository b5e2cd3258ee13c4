"""The broker core: the rules of the broker, once, for every transport.

``Broker`` owns the storage, the router, the committer (group commit), the
consumer groups, the inboxes' router side and the authenticator, and offers
the operations the transports need: publish, wait until durable, subscribe,
unsubscribe, settle group deliveries, topic and group information and
administration. It decides (may this principal publish here, how big may
this be, where does a subscription start, when is an acknowledgement
durable); the TCP session (broker/session/) and the HTTP handlers
(broker/http/) translate bytes to these calls and their answers, or a
:class:`Refused` with its protocol error code, back to bytes.

Layers (README, "Layout"): this module imports storage, router, committer,
groups and auth; nothing here imports a transport.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs
import trio

from pybroker.protocol import (
    MAX_INFO_ENTRIES,
    PUBLISH_FLAG_DEDUP,
    PUBLISH_FLAG_DELAYED,
    PUBLISH_FLAG_NEEDS_RECEIVER,
    RemoteProtocolError,
    DELIVER_AT_HEADER,
    MAX_MSG_ID_BYTES,
    MAX_PARTITIONS,
    MSG_ID_HEADER,
    NO_OFFSET,
    RESUME_OPTION_PREFIX,
    AckKind,
    Durability,
    ErrorCode,
    GroupsAction,
    StartKind,
    TopicInfo,
    MalformedBatch,
    check_batch,
    first_headers,
    first_msg_id,
    info_entry_size,
    info_reply_room,
    pattern_error,
    partition_of,
    partition_topic,
    tokens_match,
    topic_error,
)

from .auth import Authenticator, authenticator_for
from .committer import Committer
from .config import Config
from .dedup import DedupWindow, Stored
from .delays import Entry, FileBuckets, MemoryBuckets, Schedule
from .groups import GroupConfig, GroupManager, group_name_error
from .inboxes import has_wildcard, is_inbox
from .logs import get_logger
from .principal import Principal
from .router import Held, Router, Subscription, Topic
from .start import resume_offset, start_offset
from .storage import FileStore, LogStore, MemoryStore, NotOwnerError, StorageError, StoredBatch
from .subscriber import Subscriber

if TYPE_CHECKING:
    from .cluster.delayed import ClusterSchedule
    from .cluster.store import ClusterStore


#: A GROUPS_REPLY's body before its document: request_id (8), length (4).
GROUPS_REPLY_FIXED = 12
#: Refusals of a handed-off batch that no retry can change (it is dropped).
_PERMANENT = frozenset(
    {ErrorCode.BAD_TOPIC, ErrorCode.BAD_REQUEST, ErrorCode.BATCH_LIMIT, ErrorCode.CHECKSUM_MISMATCH}
)


def _bounded(statistics: dict[str, Any], room: int) -> dict[str, Any]:
    """A group's statistics within ``room`` bytes of JSON: a group reading
    very many topics lists as many of them as fit, and how many it left out
    (``topics_omitted``); an inspection's members likewise
    (``members_omitted``)."""
    if len(json.dumps(statistics).encode("utf-8")) <= room:
        return statistics
    members = statistics.get("member_list")
    if members:
        # Members go first: a frame too small for them all keeps the topics.
        bare = {**statistics, "member_list": [], "members_omitted": statistics["members_omitted"] + len(members)}
        used = len(json.dumps(bare).encode("utf-8"))
        kept_members = []
        for m in members:
            used += len(json.dumps(m).encode("utf-8")) + 2
            if used > room:
                break
            kept_members.append(m)
        statistics = {
            **statistics,
            "member_list": kept_members,
            "members_omitted": statistics["members_omitted"] + len(members) - len(kept_members),
        }
        if len(json.dumps(statistics).encode("utf-8")) <= room:
            return statistics
    topics = statistics["topics"]
    kept: dict[str, Any] = {}
    used = len(json.dumps({**statistics, "topics": {}, "topics_omitted": len(topics)}).encode("utf-8"))
    for name, figures in topics.items():
        used += len(json.dumps({name: figures}).encode("utf-8"))
        if used > room:
            break
        kept[name] = figures
    return {**statistics, "topics": kept, "topics_omitted": len(topics) - len(kept)}


class Refused(Exception):
    """The core refuses a request: the protocol's error code (transports map
    it to an ERROR frame or an HTTP status), a message, and the fields of
    the ERROR frame where it has them."""

    def __init__(self, code: ErrorCode, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields: Mapping[str, str] = dict(fields or {})

    @classmethod
    def denied(cls, who: Principal, what: str) -> Refused:
        return cls(ErrorCode.PERMISSION_DENIED, f"{who.who()} may not {what}")


class Published:
    """A batch the log took: where it is, and what its acknowledgement
    promises once ``held`` (a batch waiting for the fsync) is settled.
    (A slots class, not attrs: one is made per PUBLISH frame.)"""

    __slots__ = ("topic", "base", "count", "timestamp", "held", "durability", "duplicate", "request_id")

    def __init__(
        self,
        topic: Topic,
        base: int,
        count: int,
        timestamp: int,
        held: Held | None,
        durability: Durability,
        duplicate: bool = False,
        request_id: int = 0,
    ) -> None:
        self.topic = topic
        self.base = base
        self.count = count
        self.timestamp = timestamp
        self.held = held
        self.durability = durability
        #: A resent batch (flag DEDUP): these are the original's offsets,
        #: and nothing was stored or delivered this time.
        self.duplicate = duplicate
        #: The PUBLISH frame's request id, where a transport has one (the
        #: session answers with it).
        self.request_id = request_id


@attrs.frozen
class SubscribeRequest:
    """A SUBSCRIBE's settings, whichever transport it came over."""

    sub_id: int
    pattern: str
    start: StartKind | int
    start_value: int
    #: Messages the subscriber may be sent ahead (None: no flow control).
    credit: int | None
    options: Mapping[str, str] = attrs.field(factory=dict)


def cluster_store(config: Config) -> LogStore:
    """The store of a cluster node (``--cluster``): imported only then, as
    it needs the ``cluster`` extra (httpx)."""
    if not config.object_store:
        raise ValueError("--cluster needs --object-store s3://host:port/bucket")
    try:
        from .cluster.compaction import CompactionSettings
        from .cluster.sigv4 import Credentials
        from .cluster.store import ClusterStore, parse_cluster_urls
    except ImportError as exc:  # httpx missing
        raise ValueError(f"cluster mode needs the cluster extra (pip install 'pybroker[cluster]'): {exc}") from None
    settings = attrs.evolve(
        parse_cluster_urls(config.cluster or "", config.object_store, config.node_name),
        ttl=config.cluster_lease_ttl,
        dedup_window=config.dedup_window,
        dedup_max_ids=config.dedup_max_ids,
        topic_settings=config.topic_settings,
        compaction=CompactionSettings(keep=config.cluster_index_keep, fan_in=config.cluster_index_fan_in),
    )
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    credentials = Credentials(key, secret, os.environ.get("AWS_REGION", "us-east-1")) if key and secret else None
    return ClusterStore(settings, credentials=credentials)


class Broker:
    def __init__(self, config: Config, store: LogStore | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.logger: Any = get_logger(component="core")
        #: None when the broker runs without a users file (Config.auth_file).
        self.auth: Authenticator | None = authenticator_for(config)
        if store is None:
            if config.cluster is not None:
                store = cluster_store(config)
            elif config.storage == "memory":
                store = MemoryStore(config.memory_retention_bytes)
            else:
                # Locks the data directory and recovers the log.
                store = FileStore(config.data_dir, config.topic_settings, min_free_bytes=config.min_free_bytes)
        self.store: LogStore = store
        self.router = Router(store, events=self, inbox_grace=config.inbox_grace)
        # Cluster mode (broker/cluster/store.py): batches other nodes commit
        # reach this node's subscribers through the router.
        attach = getattr(store, "attach", None)
        if attach is not None:
            attach(self._committed_elsewhere, self.router.copy_positioned, self._deleted_elsewhere, self._older_ids)
        self.committer = Committer(store, self.router, config.retention_check_seconds)
        state_dir = config.data_dir / "groups" if isinstance(store, FileStore) else None
        # Delivery counts are written before a delivery is sent, and fsynced
        # first only if asked (README, "Work queues": the throughput cost).
        self.groups = GroupManager(self.router, state_dir, sync=config.group_counts_fsync)
        if attach is not None:
            # Cluster mode: groups run at their topic's owner, their state in
            # etcd (docs/cluster.md §10).
            from .cluster.groupstate import ClusterGroupState
            from .cluster.store import ClusterStore

            assert isinstance(store, ClusterStore)
            self.groups.shared = ClusterGroupState(store, self.groups)
            # Dead letters to a topic another node owns go through etcd
            # (broker/cluster/handoff.py); those handed to this node's
            # topics are published here.
            self.groups.hand_off = store.hand_offs.send
            store.hand_offs.take = self._take_hand_off
        #: Publish acknowledgements sent, by what they promise (GET /metrics).
        self.acks_by_durability: dict[Durability, int] = dict.fromkeys(Durability, 0)
        self.dedup = DedupWindow(config.dedup_window, config.dedup_max_ids)
        # Delayed delivery: its buckets beside the topics (or in memory),
        # made durable in the committer's rounds.
        # A cluster node keeps them in etcd and the object store, as durably
        # as the cluster keeps messages (broker/cluster/delayed.py).
        #: Whether a DELAYED batch can be kept as durably as the store
        #: keeps messages: in files, in the cluster, or in memory when that
        #: is all the store promises. WELCOME otherwise leaves out
        #: max_delay_ms and such a publish is refused.
        self.keeps_delayed: bool
        self.schedule: Schedule | ClusterSchedule
        if self.storage_kind == "cluster":
            from .cluster.delayed import ClusterSchedule

            self.schedule = ClusterSchedule(cast("ClusterStore", store))
            self.keeps_delayed = True
        else:
            buckets = FileBuckets(config.data_dir / "delayed") if isinstance(store, FileStore) else MemoryBuckets()
            self.schedule = Schedule(buckets)
            self.keeps_delayed = isinstance(buckets, FileBuckets) or store.durability is Durability.MEMORY
        self.committer.also_sync = self.schedule.sync
        #: Releases publish as the broker itself (the publisher's rights were
        #: checked when it scheduled them).
        self._releaser = Principal()

    @property
    def storage_kind(self) -> str:
        if isinstance(self.store, FileStore):
            return "file"
        if isinstance(self.store, MemoryStore):
            return "memory"
        return "cluster" if hasattr(self.store, "attach") else type(self.store).__name__

    # -- lifecycle ----------------------------------------------------------

    def recover(self) -> None:
        """Open every stored topic and the groups' saved state."""
        leftovers = self.router.recover()
        if leftovers:
            self.logger.warning(
                "stored request/reply inboxes ignored: inboxes are kept in memory now; "
                "their directories under the data directory's topics/ may be deleted",
                inboxes=len(leftovers),
                first=sorted(leftovers)[:3],
            )
        self.groups.load()
        self.schedule.recover()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The core's own tasks: group commit, retention, consumer groups and
        inbox expiry. They outlive the connections: closing sessions still
        wait on the committer for their last acknowledgements."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.committer.run)
            await nursery.start(self.groups.run)
            nursery.start_soon(self.router.inboxes.run)
            await nursery.start(self.schedule.run, self._release, self.durable)
            task_status.started()

    def close(self) -> None:
        """Save the groups' state, close the store (after every task stopped)."""
        self.groups.persist_now()
        self.store.close()

    @property
    def stepped_aside(self) -> bool:
        """Cluster mode: this node is cut off from etcd while another node
        is ready, and sends its clients there (broker/cluster/stepaside.py)."""
        return bool(getattr(self.store, "stepped_aside", False))

    @property
    def problem(self) -> str | None:
        """Why the broker is degraded (storage), or None (GET /readyz)."""
        problem = self.store.problem
        if problem is None and self.groups.broken:
            problem = "consumer group state cannot be saved: group deliveries wait"
        return problem

    # -- router events --------------------------------------------------------

    def _committed_elsewhere(self, name: str, stored: StoredBatch) -> None:
        """Cluster mode: a batch another owner committed reached this node's
        copy. Delivered like any other; its msg-id is remembered too, so that
        a resend to this node, once it owns the topic, is not stored again."""
        self.router.committed_elsewhere(name, stored)
        if self.dedup.loaded(name):  # else read back from the copy on first use
            try:
                msg_id = first_msg_id(stored.batch)
            except MalformedBatch:
                return
            if msg_id is not None:
                topic = self.router.topic(name)
                self.dedup.remember(topic, msg_id, Stored(stored.base_offset, stored.count, stored.timestamp, None))

    def _older_ids(self, name: str, named: list[tuple[str, int, int, int]]) -> None:
        """Cluster mode, at a take-over: the msg-ids of the batches committed
        within the exactly-once window but older than this node's copy (read
        from etcd), which reading the copy back cannot see."""
        topic = self.router.topic(name)
        stored = [(msg_id, Stored(base, count, timestamp, None)) for msg_id, base, count, timestamp in named]
        self.dedup.add_older(topic, stored, time.time_ns() // 1000)

    def _deleted_elsewhere(self, name: str) -> None:
        """Cluster mode: a topic was deleted through another node. It leaves
        this node as a deletion here makes it leave: its subscribers and
        groups are told, its exactly-once window forgotten."""
        topic = self.router.topics.get(name)
        if topic is None:
            return
        self.router.drop(topic)
        self.groups.topic_deleted(topic)
        self.dedup.forget(name)
        self.logger.info("topic deleted through another node", topic=name)

    async def _take_hand_off(self, topic_name: str, batch: bytes) -> None:
        """Cluster mode: a batch another node handed to this one, the owner
        of its topic (a dead letter): published here as the broker itself,
        stored once by its msg-id however often it is handed over, and
        durable when this returns."""
        from .cluster.handoff import TakeRefused

        try:
            published = self.publish(self._releaser, topic_name, batch, dedup=True)
            await self.durable(published)
        except Refused as exc:
            raise TakeRefused(f"{exc.code.name}: {exc.message}", permanent=exc.code in _PERMANENT) from None

    def topic_created(self, topic: Topic) -> None:
        self.groups.topic_created(topic)

    def batch_held(self) -> None:
        """A batch waits for the fsync that covers it."""
        self.committer.wake()

    def batch_visible(self, topic: Topic) -> None:
        """New messages in a topic groups read."""
        self.groups.wake()

    def sync_failed(self) -> None:
        """Held batches were dropped: a dead letter among them is redone."""
        self.groups.wake()

    def group_matches(self, name: str) -> bool:
        tokens = name.split(".")
        return any(tokens_match(g.tokens, tokens) for g in self.groups.groups.values())

    # -- publishing -----------------------------------------------------------

    def topic_problem(self, name: str) -> str | None:
        """Why ``name`` is not a valid topic under the broker's limits, or None."""
        if name in self.router.topics:
            return None
        return topic_error(name, self.limits.max_topic_bytes, self.limits.max_topic_depth)

    def new_topic_refusal(self, name: str) -> Refused | None:
        """Why a publish may not go to ``name``, a topic the router does not
        hold yet, or None: an invalid name; a partitioned topic (each of its
        partitions is a topic, ``orders~3``, and publishes go to them); a
        partition its topic does not have (protocol.md, "Partitioned
        topics")."""
        problem = topic_error(name, self.limits.max_topic_bytes, self.limits.max_topic_depth)
        if problem is not None:
            return Refused(ErrorCode.BAD_TOPIC, problem)
        count = self.store.partition_count(name)
        if count:
            return Refused(
                ErrorCode.PARTITIONED,
                f"topic {name!r} has {count} partitions: publish to one of them, "
                f"{partition_topic(name, 0)!r} to {partition_topic(name, count - 1)!r}",
                {"topic": name, "partitions": str(count)},
            )
        named = partition_of(name)
        if named is not None:
            base, p = named
            count = self.store.partition_count(base)
            if p >= count:
                if not count and self.storage_kind == "cluster":
                    # This node's view of the cluster's topics follows etcd
                    # and may lag a creation made through another node: ask
                    # again shortly, as for a topic without an owner yet.
                    return Refused(
                        ErrorCode.NOT_OWNER,
                        f"{name!r}: this node does not know {base!r} as a partitioned topic (yet)",
                        {"topic": name},
                    )
                has = f"has {count} partitions" if count else "is not a partitioned topic (TOPICS create makes one)"
                return Refused(ErrorCode.BAD_TOPIC, f"{name!r} names partition {p} of {base!r}, which {has}")
        return None

    def publish(
        self,
        who: Principal,
        topic_name: str,
        batch: bytes,
        *,
        needs_receiver: bool = False,
        dedup: bool = False,
        delayed: bool = False,
    ) -> Published:
        """Append one batch from ``who`` to a topic; it is delivered (and
        its acknowledgement may be sent) once ``durable`` says so. Raises
        Refused, with nothing stored, when a rule or the storage says no.
        With ``dedup``, a batch whose msg-id the topic stored within the
        window is not stored again: the original's place comes back."""
        topic = self.router.topics.get(topic_name)
        if topic is None:
            refused = self.new_topic_refusal(topic_name)
            if refused is not None:
                raise refused
        if not who.may_publish(topic_name):
            raise Refused.denied(who, f"publish to {topic_name!r}")
        count, crc_ok = check_batch(batch)
        if count > self.limits.max_batch_messages:
            raise Refused(
                ErrorCode.BATCH_LIMIT, f"batch of {count} messages, limit {self.limits.max_batch_messages}"
            )
        if not crc_ok:
            raise Refused(ErrorCode.CHECKSUM_MISMATCH, "batch CRC mismatch")
        if needs_receiver and not self.router.has_receivers(topic_name):
            raise Refused(ErrorCode.NO_RECEIVERS, f"no subscription or group receives {topic_name!r}")
        msg_id = self._msg_id(topic_name, batch) if dedup else None
        now = time.time_ns() // 1000
        if delayed:
            due_ms = self._due_ms(topic_name, batch, now // 1000)
            if due_ms is not None:
                return self._schedule(topic_name, batch, count, due_ms, dedup, now)
        try:
            if topic is None:
                topic = self.router.topic(topic_name)
            if msg_id is not None:
                stored = self.dedup.find(topic, msg_id, now)
                if stored is not None:
                    return self._duplicate(topic, msg_id, stored, count)
            base, timestamp, held = self.router.publish(topic, batch, count, now)
        except StorageError as exc:
            # Disk full or failing: an answer for this publish, nothing stored.
            raise Refused(exc.code, exc.message, exc.fields(topic_name)) from None
        if msg_id is not None:
            self.dedup.remember(topic, msg_id, Stored(base, count, timestamp, held))
        return Published(topic, base, count, timestamp, held, topic.log.durability)

    def publish_run(
        self, who: Principal, frames: list[tuple[int, str, bytes, int]]
    ) -> tuple[list[Published | Refused], RemoteProtocolError | None]:
        """Publish the PUBLISH frames of one socket read, in order: for each
        ``(request_id, topic, batch, flags)`` a Published (its request_id
        set) or the Refused that :meth:`publish` would have raised, by the
        same rules in the same order, with the same outcome.

        What is shared: a topic's name and permission checks are made once
        for consecutive frames to it, and their batches are appended with
        one write (Router.publish_many) and one hold sequence. Flags
        NEEDS_RECEIVER and DEDUP are handled in the same pass: a DEDUP
        batch whose msg-id the topic remembers is answered with the
        original's place; one whose msg-id an earlier frame of this run
        named, not yet stored, first has the batches before it stored (and
        their ids remembered), then is found like any other. A DELAYED
        frame goes through :meth:`publish` on its own, after the batches
        before it are stored. A batch whose envelope cannot be a batch ends
        the run: the results cover the frames before it, which are stored,
        and the error is returned for the transport to raise (it closes
        the connection, as before).
        """
        results: list[Published | Refused | None] = []
        limits = self.limits
        max_messages = limits.max_batch_messages
        router = self.router
        topics = router.topics
        now = time.time_ns() // 1000
        checked: str | None = None  # the topic whose checks the last frame passed
        group = ""  # the topic of the batches waiting in ``batches`` (checked)
        batches: list[bytes] = []
        counts: list[int] = []
        at: list[int] = []  # their places in ``results``
        # The msg-ids of the DEDUP batches among them, with their index in
        # ``batches`` (a later frame naming one of them is a duplicate).
        names: dict[str, int] = {}
        try:
            for request_id, topic_name, batch, flags in frames:
                if flags & PUBLISH_FLAG_DELAYED:
                    if batches:
                        self._publish_group(group, batches, counts, at, frames, results, now, names)
                        batches, counts, at, names = [], [], [], {}
                    try:
                        published = self.publish(
                            who,
                            topic_name,
                            batch,
                            needs_receiver=bool(flags & PUBLISH_FLAG_NEEDS_RECEIVER),
                            dedup=bool(flags & PUBLISH_FLAG_DEDUP),
                            delayed=True,
                        )
                    except Refused as refused:
                        results.append(refused)
                    else:
                        published.request_id = request_id
                        results.append(published)
                    continue
                if topic_name != checked:
                    if batches:
                        self._publish_group(group, batches, counts, at, frames, results, now, names)
                        batches, counts, at, names = [], [], [], {}
                    checked = None
                    if topic_name not in topics:
                        refusal = self.new_topic_refusal(topic_name)
                        if refusal is not None:
                            results.append(refusal)
                            continue
                    if not who.may_publish(topic_name):
                        results.append(Refused.denied(who, f"publish to {topic_name!r}"))
                        continue
                    checked = group = topic_name
                count, crc_ok = check_batch(batch)
                if count > max_messages:
                    results.append(
                        Refused(ErrorCode.BATCH_LIMIT, f"batch of {count} messages, limit {max_messages}")
                    )
                    continue
                if not crc_ok:
                    results.append(Refused(ErrorCode.CHECKSUM_MISMATCH, "batch CRC mismatch"))
                    continue
                if flags:
                    if flags & PUBLISH_FLAG_NEEDS_RECEIVER and not router.has_receivers(topic_name):
                        results.append(
                            Refused(ErrorCode.NO_RECEIVERS, f"no subscription or group receives {topic_name!r}")
                        )
                        continue
                    if flags & PUBLISH_FLAG_DEDUP:
                        try:
                            msg_id = self._msg_id(topic_name, batch)
                        except Refused as refused:
                            results.append(refused)
                            continue
                        if msg_id is not None:
                            if batches and (msg_id in names or not self.dedup.loaded(topic_name)):
                                # Named earlier in this run, or the topic's ids
                                # are yet to be read back from its log: store
                                # the batches before it first, as publish()
                                # one frame at a time would have.
                                self._publish_group(group, batches, counts, at, frames, results, now, names)
                                batches, counts, at, names = [], [], [], {}
                            try:
                                topic = topics.get(topic_name) or router.topic(topic_name)
                                stored = self.dedup.find(topic, msg_id, now)
                            except StorageError as exc:
                                results.append(Refused(exc.code, exc.message, exc.fields(topic_name)))
                                continue
                            if stored is not None:
                                try:
                                    published = self._duplicate(topic, msg_id, stored, count)
                                except Refused as refused:
                                    results.append(refused)
                                else:
                                    published.request_id = request_id
                                    results.append(published)
                                continue
                            names[msg_id] = len(batches)
                at.append(len(results))
                results.append(None)  # _publish_group puts its outcome here
                batches.append(batch)
                counts.append(count)
        except RemoteProtocolError as exc:
            if batches:
                self._publish_group(group, batches, counts, at, frames, results, now, names)
            return cast("list[Published | Refused]", results), exc
        if batches:
            self._publish_group(group, batches, counts, at, frames, results, now, names)
        return cast("list[Published | Refused]", results), None

    def _publish_group(
        self,
        topic_name: str,
        batches: list[bytes],
        counts: list[int],
        at: list[int],
        frames: list[tuple[int, str, bytes, int]],
        results: list[Published | Refused | None],
        now: int,
        names: dict[str, int],
    ) -> None:
        """Store checked batches for one topic, as many per write as the log
        takes; after a failed write, the rest one by one as :meth:`publish`
        would (each stored, or refused with its own StorageError). The
        msg-ids in ``names`` (with their index in ``batches``) of those
        stored are remembered for DEDUP."""
        router = self.router
        named = {i: msg_id for msg_id, i in names.items()} if names else None
        n = len(batches)
        done = 0
        failed: StorageError | None = None
        try:
            topic = router.topics.get(topic_name) or router.topic(topic_name)
            durability = topic.log.durability
            while done < n:
                stored, base, timestamp, helds = router.publish_many(topic, batches, counts, done, now)
                remembered: list[tuple[str, Stored]] = []
                for i in range(done, done + stored):
                    count = counts[i]
                    place = at[i]
                    held = None if helds is None else helds[i - done]
                    results[place] = Published(
                        topic, base, count, timestamp, held, durability, False, frames[place][0]
                    )
                    if named is not None and i in named:
                        remembered.append((named[i], Stored(base, count, timestamp, held)))
                    base += count
                self.dedup.remember_many(topic, remembered)
                done += stored
        except StorageError as exc:
            # The failed write counts as the failed append of its first
            # batch (the log reported it once): refused, as publish() would
            # have refused it; the rest are tried one by one.
            failed = exc
        for i in range(done, n):
            place = at[i]
            if failed is not None:
                results[place] = Refused(failed.code, failed.message, failed.fields(topic_name))
                failed = None
                continue
            try:
                topic = router.topic(topic_name)
                base, timestamp, held = router.publish(topic, batches[i], counts[i], now)
            except StorageError as exc:
                # Disk full or failing: an answer for this publish, nothing stored.
                results[place] = Refused(exc.code, exc.message, exc.fields(topic_name))
                continue
            results[place] = Published(
                topic, base, counts[i], timestamp, held, topic.log.durability, False, frames[place][0]
            )
            if named is not None and i in named:
                self.dedup.remember(topic, named[i], Stored(base, counts[i], timestamp, held))

    def _due_ms(self, topic_name: str, batch: bytes, now_ms: int) -> int | None:
        """A DELAYED batch's due time (ms since the epoch); None when it is
        due already (it is published at once). Refused without a usable one."""
        if is_inbox(topic_name):
            raise Refused(ErrorCode.BAD_REQUEST, "flag DELAYED: replies (inboxes) cannot be delayed")
        try:
            text = first_headers(batch).get(DELIVER_AT_HEADER, "")
        except MalformedBatch as exc:
            raise Refused(ErrorCode.BAD_REQUEST, f"flag DELAYED: the first message's headers do not decode: {exc}") from None
        if not (text.isascii() and text.isdigit() and len(text) <= 19):
            raise Refused(
                ErrorCode.BAD_REQUEST,
                f"flag DELAYED needs a {DELIVER_AT_HEADER!r} header on the first message: "
                "milliseconds since the Unix epoch, as decimal digits",
            )
        due_ms = int(text)
        max_ms = int(self.config.max_delay * 1000)
        if due_ms > now_ms + max_ms:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                f"{DELIVER_AT_HEADER} is {(due_ms - now_ms) / 1000:.0f} s ahead; the limit is {max_ms // 1000} s (max_delay_ms)",
            )
        if due_ms <= now_ms:
            return None
        if not self.keeps_delayed:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                "flag DELAYED: this broker does not keep delayed messages (no max_delay_ms in its WELCOME)",
            )
        return due_ms

    def _schedule(self, topic_name: str, batch: bytes, count: int, due_ms: int, dedup: bool, now: int) -> Published:
        """Keep a delayed batch until it is due (broker/delays/). Its
        acknowledgement waits for the same fsync round as the topic's own
        publishes would; it has no offset until released."""
        try:
            topic = self.router.topic(topic_name)
            if isinstance(self.store, FileStore):
                self.store.check_room(topic_name)
            held = None
            if topic.log.needs_sync:
                self.router.held_seq += 1
                held = Held(self.router.held_seq, NO_OFFSET, now, b"", count)
            self.schedule.add(due_ms, topic_name, batch, dedup, held)
        except StorageError as exc:
            raise Refused(exc.code, exc.message, exc.fields(topic_name)) from None
        if held is not None:
            self.committer.wake()
        return Published(topic, NO_OFFSET, count, now, held, topic.log.durability)

    def _release(self, entry: Entry) -> Published:
        """A due delayed batch becomes a message of its topic."""
        return self.publish(self._releaser, entry.topic, entry.batch, dedup=entry.dedup)

    def _msg_id(self, topic_name: str, batch: bytes) -> str | None:
        """A DEDUP batch's name; None for a topic that is not stored (an
        inbox: replies are not resent). Refused without a usable one."""
        if is_inbox(topic_name):
            return None
        try:
            msg_id = first_msg_id(batch)
        except MalformedBatch as exc:
            raise Refused(ErrorCode.BAD_REQUEST, f"flag DEDUP: the first message's headers do not decode: {exc}") from None
        if not msg_id or len(msg_id.encode("utf-8")) > MAX_MSG_ID_BYTES:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                f"flag DEDUP needs a {MSG_ID_HEADER!r} header of 1 to {MAX_MSG_ID_BYTES} bytes on the first message",
            )
        return msg_id

    def _duplicate(self, topic: Topic, msg_id: str, stored: Stored, count: int) -> Published:
        if stored.count != count:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                f"msg-id {msg_id!r} already names a batch of {stored.count} messages at offset "
                f"{stored.base} of {topic.name!r}, not one of {count}",
            )
        self.dedup.duplicates += 1
        # Still held: the answer waits for the same fsync as the original's.
        return Published(
            topic, stored.base, stored.count, stored.timestamp, stored.held, topic.log.durability, duplicate=True
        )

    async def durable(self, published: Published) -> Durability:
        """Wait until ``published`` may be acknowledged; what the
        acknowledgement promises. Refused (STORAGE_ERROR) if the fsync that
        was to cover it failed: it was rolled back, never delivered."""
        if published.held is None:
            return published.durability
        durability = await self.committer.wait_seq(published.held.seq)
        self.check_held(published.held)
        return durability

    @staticmethod
    def check_held(held: Held) -> None:
        """Refused if the fsync that was to cover ``held`` failed."""
        if held.error is not None:
            error = held.error
            raise Refused(error.code, error.message, error.fields(error.topic) if error.topic else None)

    def acknowledged(self, durability: Durability, n: int = 1) -> None:
        """Count acknowledgements sent, by what they promise (GET /metrics)."""
        self.acks_by_durability[durability] += n

    # -- subscribing ------------------------------------------------------------

    def subscribe(self, who: Principal, subscriber: Subscriber, req: SubscribeRequest) -> Subscription:
        """Register a plain subscription or a consumer-group member. A plain
        subscription comes back with ``sub.lag`` holding, per topic, the
        offset to catch up from (its start); the subscriber reads those from
        the log. Refused when a rule says no (nothing is registered then)."""
        problem = pattern_error(req.pattern, self.limits.max_topic_bytes, self.limits.max_topic_depth)
        if problem is not None:
            raise Refused(ErrorCode.BAD_PATTERN, problem)
        if not who.may_subscribe(req.pattern):
            # Covers group members too: a group reads what its pattern does.
            raise Refused.denied(who, f"subscribe to {req.pattern!r}")
        group = req.options.get("group")
        inbox = is_inbox(req.pattern)
        if inbox:
            self._check_inbox(who, subscriber, req)
        if not isinstance(req.start, StartKind):
            raise Refused(ErrorCode.BAD_REQUEST, f"unknown start kind {req.start}")
        resume: dict[str, int] = {}
        if group is not None:
            if any(key.startswith(RESUME_OPTION_PREFIX) for key in req.options):
                raise Refused(
                    ErrorCode.BAD_REQUEST, "resume positions are for plain subscriptions (a group keeps its own)"
                )
        elif req.options:
            resume = self._resume_positions(req)
        if req.start is StartKind.OFFSET and has_wildcard(req.pattern):
            raise Refused(ErrorCode.BAD_REQUEST, "an offset start needs a pattern without wildcards")
        if req.credit is not None and req.credit <= 0:
            raise Refused(ErrorCode.BAD_REQUEST, "credit must be at least 1")
        sub = Subscription(subscriber, req.sub_id, req.pattern, req.credit)
        if group is not None:
            self._join_group(who, sub, group, req)
            return sub
        if inbox:
            # Every check passed: a refused SUBSCRIBE claims nothing.
            self.router.inboxes.claim(req.pattern, subscriber, who.name)
        matched = self.router.add(sub)
        if req.start is not StartKind.NEW or resume:
            for topic in matched:
                log = topic.log
                position = resume_offset(log, resume.get(topic.name))
                if position is None and topic.name in resume:
                    self.logger.warning(
                        "resume position past the end of the topic",
                        topic=topic.name, position=resume[topic.name], next_offset=log.next_offset,
                    )
                if position is None:
                    if req.start is StartKind.NEW:
                        continue
                    position = start_offset(log, req.start, req.start_value, topic.visible_next)
                if position < topic.visible_next:
                    sub.lag[topic] = position
        return sub

    def _check_inbox(self, who: Principal, subscriber: Subscriber, req: SubscribeRequest) -> None:
        """Inboxes are private to the connection that claimed them
        (broker/inboxes.py)."""
        if has_wildcard(req.pattern):
            raise Refused.denied(
                who, f"subscribe to {req.pattern!r}: inboxes are private, subscribe to your own by its exact name"
            )
        if "group" in req.options:
            raise Refused(ErrorCode.BAD_REQUEST, "an inbox takes plain subscriptions only")
        if not self.router.inboxes.may_claim(req.pattern, subscriber, who.name):
            raise Refused.denied(who, f"subscribe to {req.pattern!r}: another connection's inbox")

    def _resume_positions(self, req: SubscribeRequest) -> dict[str, int]:
        """``resume:<topic>`` options (protocol.md, "Resuming after a reconnect")."""
        tokens = req.pattern.split(".")
        out: dict[str, int] = {}
        for key, value in req.options.items():
            if not key.startswith(RESUME_OPTION_PREFIX):
                raise Refused(ErrorCode.BAD_REQUEST, f"unknown option {key!r}")
            topic = key[len(RESUME_OPTION_PREFIX) :]
            problem = topic_error(topic, self.limits.max_topic_bytes, self.limits.max_topic_depth)
            if problem is not None:
                raise Refused(ErrorCode.BAD_REQUEST, f"resume position for an invalid topic: {problem}")
            if not tokens_match(tokens, topic.split(".")):
                raise Refused(
                    ErrorCode.BAD_REQUEST, f"resume position for {topic!r}, which {req.pattern!r} does not match"
                )
            if not (value.isascii() and value.isdigit()) or len(value) > 20:
                raise Refused(ErrorCode.BAD_REQUEST, f"resume position for {topic!r} is not an offset: {value!r}")
            out[topic] = int(value)
        return out

    def _join_group(self, who: Principal, sub: Subscription, name: str, req: SubscribeRequest) -> None:
        problem = group_name_error(name)
        try:
            if problem:
                raise ValueError(f"group name: {problem}")
            config = GroupConfig.from_options(name, req.options)
            if name not in self.groups.groups and config.max_deliver and not who.may_publish(config.dead_letter):
                # Creating a group picks the topic it dead-letters into.
                raise Refused.denied(
                    who, f"publish to {config.dead_letter!r}, the dead-letter topic of new group {name!r}"
                )
            assert isinstance(req.start, StartKind)
            # max_ack_pending is each member's own prefetch (protocol.md).
            prefetch = config.max_ack_pending if "max_ack_pending" in req.options else None
            sub.member = self.groups.join(
                sub, name, req.pattern, config, req.start, req.start_value, prefetch
            )
        except ValueError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None
        except NotOwnerError as exc:  # cluster mode: the group runs at its topic's owner
            raise Refused(exc.code, exc.message, exc.fields(exc.topic)) from None
        sub.group = self.groups.groups[name]

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.group is not None and sub.member is not None:
            self.groups.leave(sub.group, sub.member)
        else:
            self.router.remove(sub)

    def disconnected(self, subscriber: Subscriber, subs: list[Subscription]) -> None:
        """A subscriber is gone: its inboxes wait for a reconnect (first, so
        that they do not go with their last subscription), its subscriptions
        and group memberships end."""
        self.router.inboxes.release(subscriber, trio.current_time())
        for sub in subs:
            self.unsubscribe(sub)

    def settle(
        self, sub: Subscription, topic: str, kind: AckKind | int, ranges: tuple[tuple[int, int], ...], delay: float
    ) -> None:
        """An ACK frame of a group member (protocol.md, "ACK")."""
        problem = None
        if sub.group is None or sub.member is None:
            problem = f"sub_id {sub.sub_id} is not an active group member"
        elif not isinstance(kind, AckKind):
            problem = f"unknown ack kind {kind}"
        elif not ranges or any(first > last for first, last in ranges):
            problem = "an ACK needs ranges with first <= last"
        if problem is not None:
            raise Refused(ErrorCode.BAD_REQUEST, problem)
        assert sub.group is not None and sub.member is not None and isinstance(kind, AckKind)
        self.groups.settle(sub.group, sub.member, topic, kind, ranges, delay)

    # -- information --------------------------------------------------------------

    def readable(self, who: Principal, name: str) -> bool:
        """May ``who`` see topic ``name`` (lists, figures, reads)? Inboxes are
        no topics: never listed or read by anyone but over their owner's
        subscription."""
        return not is_inbox(name) and who.may_read(name)

    def topic_infos(self, who: Principal, pattern: str, after: str = "") -> tuple[list[TopicInfo], bool]:
        """INFO: the topics after ``after`` (by name) matching ``pattern`` that
        ``who`` may read, as many as one reply holds (MAX_INFO_ENTRIES, and
        within max_frame_bytes), and whether there are more."""
        problem = pattern_error(pattern, self.limits.max_topic_bytes, self.limits.max_topic_depth)
        if problem is not None:
            raise Refused(ErrorCode.BAD_PATTERN, problem)
        tokens = pattern.split(".")
        names = sorted(
            n
            for n in self.router.topics
            if n > after and tokens_match(tokens, n.split(".")) and who.may_read(n)
        )
        room = info_reply_room(self.limits.max_frame_bytes)
        entries = []
        for name in names[:MAX_INFO_ENTRIES]:
            room -= info_entry_size(name)
            if room < 0:
                break
            topic = self.router.topics[name]
            log = topic.log
            entries.append(TopicInfo(name, log.first_offset, log.next_offset, log.size_bytes, len(topic.subs)))
        return entries, len(entries) < len(names)

    def create_group(
        self,
        who: Principal,
        name: str,
        pattern: str,
        start: StartKind | int,
        start_value: int,
        options: Mapping[str, str],
    ) -> str:
        """GROUPS create: a durable group before any member exists, reading
        ``pattern`` from ``start``; the reply's JSON document (its summary
        and ``created``). The rules of a SUBSCRIBE that creates a group:
        who may subscribe to the pattern (and publish to its dead-letter
        topic) may create it; an existing group with the same pattern is
        left as it is (created false), with another one it is refused."""
        problem = pattern_error(pattern, self.limits.max_topic_bytes, self.limits.max_topic_depth)
        if problem is not None:
            raise Refused(ErrorCode.BAD_PATTERN, problem)
        if not who.may_subscribe(pattern):
            raise Refused.denied(who, f"create group {name!r} reading {pattern!r}")
        if is_inbox(pattern):
            raise Refused(ErrorCode.BAD_REQUEST, "an inbox takes plain subscriptions only")
        if not isinstance(start, StartKind):
            raise Refused(ErrorCode.BAD_REQUEST, f"unknown start kind {start}")
        if start is StartKind.OFFSET and has_wildcard(pattern):
            raise Refused(ErrorCode.BAD_REQUEST, "an offset start needs a pattern without wildcards")
        if "group" in options or any(key.startswith(RESUME_OPTION_PREFIX) for key in options):
            raise Refused(ErrorCode.BAD_REQUEST, "create takes the group settings only (its name is the request's)")
        try:
            problem = group_name_error(name)
            if problem:
                raise ValueError(f"group name: {problem}")
            config = GroupConfig.from_options(name, options)
            if name not in self.groups.groups and config.max_deliver and not who.may_publish(config.dead_letter):
                raise Refused.denied(
                    who, f"publish to {config.dead_letter!r}, the dead-letter topic of new group {name!r}"
                )
            group, created = self.groups.create(name, pattern, config, start, start_value)
        except ValueError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None
        except NotOwnerError as exc:  # cluster mode: the group runs at its topic's owner
            raise Refused(exc.code, exc.message, exc.fields(exc.topic)) from None
        if created:
            self.logger.info("group created", group=name, pattern=pattern, start=start.name.lower())
        room = self.limits.max_frame_bytes - GROUPS_REPLY_FIXED - len(',"created":false')
        return json.dumps({**_bounded(group.statistics(), room), "created": created})

    # -- topic administration -----------------------------------------------------

    async def create_topic(self, who: Principal, name: str, settings: Mapping[str, str]) -> dict[str, Any]:
        """TOPICS create: a topic of ``partitions`` partitions (1: a plain
        topic, as a first publish makes), its partitions' logs opened at
        once; ``created`` false when it exists so already."""
        self._check_manageable(who, name)
        if partition_of(name) is not None:
            raise Refused(ErrorCode.BAD_TOPIC, f"{name!r} names a partition: create the topic itself")
        unknown = sorted(set(settings) - {"partitions"})
        text = settings.get("partitions", "1")
        if unknown or not text.isascii() or not text.isdigit():
            raise Refused(ErrorCode.BAD_REQUEST, f"create takes partitions=N (1 to {MAX_PARTITIONS}) only")
        partitions = int(text)
        try:
            created = await self.store.create_topic(name, partitions)
        except ValueError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None
        except StorageError as exc:
            raise Refused(exc.code, exc.message, {"topic": name}) from None
        except NotOwnerError as exc:
            raise Refused(exc.code, exc.message, exc.fields(exc.topic)) from None
        names = [name] if partitions == 1 else [partition_topic(name, p) for p in range(partitions)]
        try:
            for each in names:
                self.router.topic(each)
        except StorageError as exc:
            raise Refused(exc.code, exc.message, {"topic": name}) from None
        if created:
            self.logger.info("topic created", topic=name, partitions=partitions, by=who.name)
        return {"topic": name, "partitions": partitions, "created": created}

    def _partitions_of(self, who: Principal, name: str, action: str) -> list[str] | None:
        """A partitioned topic's partitions, every one opened here, for a
        TOPICS action on the whole topic; None for any other topic. One
        partition alone is refused: ``action`` goes to its topic."""
        self._check_manageable(who, name)
        named = partition_of(name)
        if named is not None and self.store.partition_count(named[0]) > named[1]:
            raise Refused(ErrorCode.BAD_REQUEST, f"{action} the topic {named[0]!r}, not one of its partitions")
        count = self.store.partition_count(name)
        if not count:
            return None
        # Every one (a cluster node holds those it has seen traffic of).
        try:
            return [self.router.topic(partition_topic(name, p)).name for p in range(count)]
        except StorageError as exc:
            raise Refused(exc.code, exc.message, {"topic": name}) from None

    async def delete_topic(self, who: Principal, name: str) -> dict[str, Any]:
        """TOPICS delete: the topic, its messages and its files go; its
        subscribers and the groups reading it are told; a publish to the
        name afterwards starts a new topic at offset 0. What was published
        before is acknowledged first (its fsync is awaited), then deleted.
        A partitioned topic goes partition by partition, its count with the
        last one."""
        partitions = self._partitions_of(who, name, "delete")
        if partitions is not None:
            held = {each: self.router.topics[each].log for each in partitions}
            messages = 0
            for each in partitions:
                gone = self.router.topics.get(each) is None
                if not gone:
                    try:
                        messages += (await self._delete_one(who, each))["messages"]
                    except Refused as refused:
                        if refused.code != ErrorCode.UNKNOWN_TOPIC or each == partitions[0]:
                            raise
                        gone = True
                if gone:
                    # Gone with the first: a cluster deletes the whole topic
                    # at once, and its view drops the other partitions.
                    messages += held[each].next_offset - held[each].first_offset
            return {"deleted": name, "messages": messages, "partitions": len(partitions)}
        return await self._delete_one(who, name)

    async def _delete_one(self, who: Principal, name: str) -> dict[str, Any]:
        topic = await self._settled_topic(who, name)
        log = topic.log
        messages = log.next_offset - log.first_offset
        # From here to the store's move, no checkpoint for a local store:
        # nothing is appended to the old log once it has left the router. A
        # cluster's awaits etcd: a publish meanwhile is refused, its owner
        # fenced by the deletion (cluster/deletion.py).
        try:
            await self.store.delete_topic(name)
        except StorageError as exc:
            raise Refused(exc.code, exc.message, {"topic": name}) from None
        self.router.drop(topic)
        self.groups.topic_deleted(topic)
        self.dedup.forget(name)
        self.logger.info("topic deleted", topic=name, messages=messages, by=who.name)
        with trio.CancelScope(shield=True):  # half-closed files help nobody
            await self.store.discard(log)
        return {"deleted": name, "messages": messages}

    async def purge_topic(self, who: Principal, name: str, keep_from: int) -> dict[str, Any]:
        """TOPICS purge: remove the messages before the batch holding
        ``keep_from`` (all of them at or past the end). Offsets go on from
        where they were; a subscriber behind the new first offset gets
        DATA_LOST for what it missed. What was published before is
        acknowledged first, as for delete. Offsets belong to a partition:
        a partitioned topic is purged partition by partition."""
        named = partition_of(name)
        if named is None and self.store.partition_count(name):
            self._check_manageable(who, name)
            raise Refused(ErrorCode.BAD_REQUEST, f"offsets are per partition: purge {partition_topic(name, 0)!r} and so on")
        topic = await self._settled_topic(who, name)
        log = topic.log
        before = log.first_offset
        try:
            with trio.CancelScope(shield=True):  # a purge half done helps nobody
                first = await self.store.purge(log, keep_from)
        except StorageError as exc:
            raise Refused(exc.code, exc.message, {"topic": name}) from None
        self.logger.info("topic purged", topic=name, first_offset=first, purged=first - before, by=who.name)
        return {"topic": name, "first_offset": first, "next_offset": log.next_offset, "purged": first - before}

    async def set_topic(self, who: Principal, name: str, changes: Mapping[str, str]) -> dict[str, Any]:
        """TOPICS set: change a topic's retention or segment size while
        running (saved for restarts; in cluster mode, in etcd for every
        node); its settings as they are now. A partitioned topic's
        settings are its partitions'."""
        if self._partitions_of(who, name, "set") is None:
            self._managed_topic(who, name)
        try:
            settings = await self.store.set_topic(name, changes)
        except KeyError:
            raise Refused(ErrorCode.UNKNOWN_TOPIC, f"no topic {name!r}") from None
        except ValueError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None
        except StorageError as exc:
            raise Refused(exc.code, exc.message, {"topic": name}) from None
        self.logger.info("topic settings changed", topic=name, changes=dict(changes), by=who.name)
        return {"topic": name, "settings": attrs.asdict(settings)}

    async def _settled_topic(self, who: Principal, name: str) -> Topic:
        """The topic ``who`` may manage, once every batch published to it
        before now is settled: answers owed for batches still waiting for
        their fsync go out as promised before anything is removed. Returns
        with no await after the last check (nothing can be appended in
        between, the caller's next steps being synchronous)."""
        topic = self._managed_topic(who, name)
        while topic.held:
            await self.committer.wait_seq(topic.held[-1].seq)
            if self.router.topics.get(name) is not topic:
                raise Refused(ErrorCode.UNKNOWN_TOPIC, f"no topic {name!r}")
        return topic

    def _check_manageable(self, who: Principal, name: str) -> None:
        problem = topic_error(name, self.limits.max_topic_bytes, self.limits.max_topic_depth)
        if problem is not None:
            raise Refused(ErrorCode.BAD_TOPIC, problem)
        if is_inbox(name):
            raise Refused(ErrorCode.BAD_TOPIC, "an inbox is no topic: it goes with its owner")
        if not who.may_manage(name):
            raise Refused.denied(who, f"manage topic {name!r}")

    def _managed_topic(self, who: Principal, name: str) -> Topic:
        self._check_manageable(who, name)
        topic = self.router.topics.get(name)
        if topic is None:
            raise Refused(ErrorCode.UNKNOWN_TOPIC, f"no topic {name!r}")
        return topic

    def groups_request(self, who: Principal, action: GroupsAction | int, name: str) -> str:
        """GROUPS: list, inspect or delete; the reply's JSON document.
        Administration is for those who may read the group's pattern, and
        for admins (protocol.md, "Authentication and permissions")."""
        manager = self.groups
        room = self.limits.max_frame_bytes - GROUPS_REPLY_FIXED
        if action is GroupsAction.LIST:
            # One page: the groups after ``name`` that fit a frame; "next"
            # names the last one when there are more (protocol.md, "GROUPS").
            names = [
                n
                for n in sorted(manager.groups)
                if n > name and (who.admin or who.may_subscribe(manager.groups[n].pattern))
            ]
            listed: list[str] = []
            used = len('{"groups":[],"next":""}')
            for n in names:
                entry = json.dumps(_bounded(manager.groups[n].statistics(), room // 2))
                used += len(entry) + 1 + len(json.dumps(n))  # both ASCII: json escapes the rest
                if used > room and listed:
                    break
                listed.append(entry)
            doc = '{"groups":[' + ",".join(listed) + "]"
            if len(listed) < len(names):
                doc += ',"next":' + json.dumps(names[len(listed) - 1])
            return doc + "}"
        if not isinstance(action, GroupsAction) or action is GroupsAction.CREATE:
            # (create carries a pattern, start and settings: create_group)
            raise Refused(ErrorCode.BAD_REQUEST, f"unknown action {action}")
        group = manager.groups.get(name)
        if group is None:
            raise Refused(ErrorCode.UNKNOWN_GROUP, f"no group {name!r}")
        if not who.admin and not who.may_subscribe(group.pattern):
            verb = "inspect" if action is GroupsAction.INSPECT else "delete"
            raise Refused.denied(who, f"{verb} group {name!r} (pattern {group.pattern!r})")
        if action is GroupsAction.INSPECT:
            return json.dumps(_bounded(group.statistics(detail=True), room))
        try:
            manager.delete(name)
        except ValueError as exc:
            raise Refused(ErrorCode.BAD_REQUEST, str(exc)) from None
        self.logger.info("group deleted", group=name)
        return json.dumps({"deleted": name})
