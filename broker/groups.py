"""Consumer groups: each message to one member, acknowledged, redelivered.

A group reads its topics from the log (never from the live fan-out), from
its own cursor, and hands batches to members with room under
``max_ack_pending``. Every handed-out message is pending until the member
settles it (ACK frame); a pending message whose ack wait expires, that is
nak'ed, or whose member leaves, is delivered again, alone; one delivered
``max_deliver`` times goes to the dead-letter topic.

All of it is synchronous and takes ``now`` (Trio's clock) as an argument;
:class:`GroupManager` is the one task that runs timers and dispatch, so a
test with ``MockClock`` drives redelivery in milliseconds. Tracking is per
message (a dict entry per pending offset): work queues settle messages one
by one, so this is inherent, and it stays off the plain pub/sub hot path.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import attrs
import trio

from client.protocol import AckKind, StartKind, decode_batch, encode_batch, encode_batch_from_records
from client.protocol.batch import RECORD_HEADER, MalformedBatch, split_records
from client.protocol.subjects import pattern_error, tokens_match, topic_error

from .log import DataLoss, StorageError, StoredBatch
from .logs import get_logger

if TYPE_CHECKING:
    from .router import Router, Subscription, Topic

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_DELIVER = 5
DEFAULT_MAX_ACK_PENDING = 1000
#: Seconds before a dead letter the log refused (disk full) is tried again.
DEAD_LETTER_RETRY_SECONDS = 1.0


@attrs.frozen
class GroupConfig:
    ack_wait: float = DEFAULT_ACK_WAIT
    max_deliver: int = DEFAULT_MAX_DELIVER  # 0: unlimited
    backoff: tuple[float, ...] = ()
    max_ack_pending: int = DEFAULT_MAX_ACK_PENDING
    dead_letter: str = ""

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, str]) -> GroupConfig:
        """Parse SUBSCRIBE options (protocol.md, "Consumer groups")."""
        known = {"group", "ack_wait_ms", "max_deliver", "backoff_ms", "max_ack_pending", "dead_letter"}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}")
        try:
            ack_wait = int(options.get("ack_wait_ms", DEFAULT_ACK_WAIT * 1000)) / 1000
            max_deliver = int(options.get("max_deliver", DEFAULT_MAX_DELIVER))
            max_ack_pending = int(options.get("max_ack_pending", DEFAULT_MAX_ACK_PENDING))
            backoff_text = options.get("backoff_ms", "")
            backoff = tuple(int(x) / 1000 for x in backoff_text.split(",") if x.strip())
        except ValueError as exc:
            raise ValueError(f"bad group option: {exc}") from None
        dead_letter = options.get("dead_letter") or f"dlq.{name}"
        if ack_wait <= 0 or any(b <= 0 for b in backoff):
            raise ValueError("ack_wait_ms and backoff_ms must be positive")
        if max_deliver < 0 or not 1 <= max_ack_pending <= 1_000_000:
            raise ValueError("max_deliver must be >= 0 and max_ack_pending 1..1000000")
        problem = topic_error(dead_letter)
        if problem:
            raise ValueError(f"dead_letter: {problem}")
        return cls(ack_wait, max_deliver, backoff, max_ack_pending, dead_letter)

    def wait_for(self, deliveries: int) -> float:
        """The ack wait of a message's ``deliveries``-th delivery."""
        if self.backoff:
            return self.backoff[min(deliveries, len(self.backoff)) - 1]
        return self.ack_wait


def group_name_error(name: str) -> str | None:
    problem = topic_error(name)
    if problem is None and "." in name:
        problem = "a group name is one token (no dots)"
    return problem


class Member:
    __slots__ = ("sub", "unacked")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.unacked = 0


class Pending:
    """One unsettled message: handed to ``member`` (or waiting to be)."""

    __slots__ = ("member", "deliveries", "deadline", "queued")

    def __init__(self, member: Member | None, deliveries: int, deadline: float) -> None:
        self.member = member
        self.deliveries = deliveries
        self.deadline = deadline  # ack wait expiry, or when a nak'ed message is due
        self.queued = False  # in the topic's redelivery queue


class GroupTopic:
    """A group's position in one topic."""

    __slots__ = ("topic", "cursor", "pending", "ready", "_cached", "_records")

    def __init__(self, topic: Topic, cursor: int) -> None:
        self.topic = topic
        self.cursor = cursor  # next offset never handed out yet
        self.pending: dict[int, Pending] = {}
        self.ready: deque[int] = deque()  # offsets to deliver again, in order
        # The last stored batch read and, once needed, its records split
        # out: handing a big batch out in pieces, or redelivering its
        # messages one by one, reads and splits it once, not once per piece.
        self._cached: StoredBatch | None = None
        self._records: list[bytes] | None = None

    def batch_at(self, offset: int) -> StoredBatch | None:
        """The stored batch holding ``offset`` (None if not retained);
        DataLoss if the log lost it (damage, a hole)."""
        log = self.topic.log
        if offset < log.first_offset:
            return None  # retention removed it (cached or not)
        cached = self._cached
        if cached is not None and cached.base_offset <= offset < cached.next_offset:
            return cached
        found = log.read(offset, 1)[:1]
        if not found or not found[0].base_offset <= offset < found[0].next_offset:
            return None
        self._cached, self._records = found[0], None
        return found[0]

    def records_of(self, stored: StoredBatch) -> list[bytes]:
        if self._cached is not stored or self._records is None:
            self._cached, self._records = stored, split_records(stored.batch)
        return self._records


class Group:
    def __init__(
        self,
        manager: GroupManager,
        name: str,
        pattern: str,
        config: GroupConfig,
        start: StartKind,
        start_value: int,
    ) -> None:
        self.manager = manager
        self.name = name
        self.pattern = pattern
        self.tokens = pattern.split(".")
        self.config = config
        self.start = start
        self.start_value = start_value
        self.members: list[Member] = []
        self._next_member = 0
        self.topics: dict[Topic, GroupTopic] = {}
        # (due, tie-breaker, topic state, first offset, last offset): one
        # entry per hand-out, checked against each message's own deadline.
        self._timers: list[tuple[float, int, GroupTopic, int, int]] = []
        #: Bumped by every change a snapshot would record (GroupManager persists).
        self.version = 0
        self.delivered = 0
        self.redelivered = 0
        self.acked = 0
        self.termed = 0
        self.dead_lettered = 0
        #: Messages the log lost (damage, holes) before they could be handed out.
        self.lost = 0

    def matches(self, topic: Topic) -> bool:
        return tokens_match(self.tokens, topic.name.split("."))

    # -- topics and members -----------------------------------------------

    def attach(self, topic: Topic, *, created_now: bool = False) -> None:
        """Start following ``topic`` (an existing one, or one just created)."""
        if topic in self.topics:
            return
        log = topic.log
        if created_now or self.start is StartKind.EARLIEST:
            cursor = log.first_offset
        elif self.start is StartKind.OFFSET:
            cursor = max(self.start_value, log.first_offset)
        elif self.start is StartKind.TIME:
            cursor = log.offset_at_time(self.start_value)
        else:
            cursor = topic.visible_next
        self.topics[topic] = GroupTopic(topic, cursor)

    def add_member(self, sub: Subscription) -> Member:
        self.version += 1
        member = Member(sub)
        self.members.append(member)
        return member

    def remove_member(self, member: Member, now: float) -> None:
        """Its unsettled messages go to the other members (or wait for one)."""
        if member in self.members:
            self.members.remove(member)
        for gt in self.topics.values():
            for offset, p in gt.pending.items():
                if p.member is member:
                    p.member = None
                    self._make_ready(gt, offset, p)
        member.unacked = 0

    # -- settling -----------------------------------------------------------

    def settle(
        self,
        member: Member,
        topic: Topic,
        kind: AckKind,
        ranges: tuple[tuple[int, int], ...],
        delay: float,
        now: float,
    ) -> int:
        """Apply an ACK frame; return how many pending messages it touched."""
        gt = self.topics.get(topic)
        if gt is None:
            return 0
        self.version += 1
        touched = 0
        for offset in self._offsets_in(gt, ranges):
            p = gt.pending.get(offset)
            if p is None:
                continue  # settled already
            if p.member is not member and not (
                # Waiting for redelivery because the member it went to left
                # (a client that reconnects acks what it processed while
                # away): done is done, whoever in the group says so.
                p.member is None and kind in (AckKind.ACK, AckKind.TERM)
            ):
                continue  # since given to another member
            touched += 1
            if kind is AckKind.IN_PROGRESS:
                p.deadline = now + self.config.wait_for(p.deliveries)
                self._timer(p.deadline, gt, offset, offset)
                continue
            if p.member is member:
                member.unacked -= 1
            if kind is AckKind.NAK:
                p.member = None
                if delay > 0:
                    p.deadline = now + delay
                    self._timer(p.deadline, gt, offset, offset)
                else:
                    self._make_ready(gt, offset, p)
            else:
                del gt.pending[offset]
                if kind is AckKind.ACK:
                    self.acked += 1
                else:
                    self.termed += 1
        return touched

    @staticmethod
    def _offsets_in(gt: GroupTopic, ranges: tuple[tuple[int, int], ...]) -> list[int]:
        out: list[int] = []
        for first, last in ranges:
            span = last - first + 1
            if span <= 2 * len(gt.pending):
                out.extend(range(first, last + 1))
            else:  # a huge range: walk what is pending instead
                out.extend(o for o in gt.pending if first <= o <= last)
        return out

    def _make_ready(self, gt: GroupTopic, offset: int, p: Pending) -> None:
        if not p.queued:
            p.queued = True
            gt.ready.append(offset)

    def _timer(self, due: float, gt: GroupTopic, first: int, last: int) -> None:
        heapq.heappush(self._timers, (due, next(self.manager.timer_ids), gt, first, last))
        self.manager.wake()

    @property
    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def run_timers(self, now: float) -> None:
        """Expired ack waits: deliver again (or dead-letter); due naks: ready."""
        while self._timers and self._timers[0][0] <= now:
            due, _, gt, first, last = heapq.heappop(self._timers)
            for offset in range(first, last + 1):
                p = gt.pending.get(offset)
                if p is None or p.deadline != due or p.queued:
                    continue  # settled, extended or already waiting: stale for it
                if p.member is not None:
                    p.member.unacked -= 1
                    p.member = None
                self._make_ready(gt, offset, p)

    # -- dispatch -----------------------------------------------------------

    def _member_with_room(self) -> Member | None:
        n = len(self.members)
        for i in range(n):
            member = self.members[(self._next_member + i) % n]
            if member.unacked < self.config.max_ack_pending and member.sub.session.accepting:
                self._next_member = (self._next_member + i + 1) % n
                return member
        return None

    def dispatch(self, now: float) -> None:
        """Hand out what is ready again, then new messages, while members have room."""
        # Lists: a dead letter may create a topic this group then follows.
        for gt in list(self.topics.values()):
            while gt.ready:
                member = self._member_with_room()
                if member is None:
                    return
                offset = gt.ready.popleft()
                p = gt.pending.get(offset)
                if p is None:
                    continue
                p.queued = False
                self._redeliver(gt, offset, p, member, now)
        for gt in list(self.topics.values()):
            visible = gt.topic.visible_next
            while gt.cursor < visible:
                member = self._member_with_room()
                if member is None:
                    return
                self._deliver_new(gt, member, now)

    def _deliver_new(self, gt: GroupTopic, member: Member, now: float) -> None:
        log = gt.topic.log
        if gt.cursor < log.first_offset:
            gt.cursor = log.first_offset  # retention removed what we had not read
        try:
            batch = gt.batch_at(gt.cursor)
        except DataLoss as lost:
            # Damaged or missing in the log: nobody can be given these.
            self.lost += lost.count
            self.manager.log.error(
                "group skipped lost offsets",
                group=self.name, topic=lost.topic, first=lost.first, last=lost.last, reason=lost.reason,
            )
            gt.cursor = lost.last + 1
            return
        if batch is None or batch.base_offset >= gt.topic.visible_next:
            gt.cursor = max(gt.cursor, gt.topic.visible_next)
            return
        room = self.config.max_ack_pending - member.unacked
        skip = gt.cursor - batch.base_offset
        if skip or batch.count > room:
            # Part of a batch: from the cursor, and only what the member has room for.
            try:
                records = gt.records_of(batch)[skip : skip + room]
            except MalformedBatch as exc:
                self._settle_malformed(gt, range(gt.cursor, batch.next_offset), exc)
                gt.cursor = batch.next_offset
                return
            payload = encode_batch_from_records(records)
            base, count = gt.cursor, len(records)
        else:
            payload, base, count = batch.batch, batch.base_offset, batch.count
        deadline = now + self.config.wait_for(1)
        for offset in range(base, base + count):
            gt.pending[offset] = Pending(member, 1, deadline)
        member.unacked += count
        gt.cursor = base + count
        self.version += 1
        self.delivered += count
        self._timer(deadline, gt, base, base + count - 1)
        member.sub.session.deliver_group(member.sub, gt.topic, base, batch.timestamp, 1, payload)

    def _redeliver(self, gt: GroupTopic, offset: int, p: Pending, member: Member, now: float) -> None:
        try:
            stored = gt.batch_at(offset)
        except DataLoss as lost:
            del gt.pending[offset]
            self.lost += 1
            self.manager.log.error(
                "group message lost from the log", group=self.name, topic=gt.topic.name,
                offset=offset, reason=lost.reason,
            )
            return
        if stored is None:
            del gt.pending[offset]  # removed by retention meanwhile
            self.manager.log.warning(
                "group message lost to retention", group=self.name, topic=gt.topic.name, offset=offset
            )
            return
        try:
            record = gt.records_of(stored)[offset - stored.base_offset]
        except MalformedBatch as exc:
            del gt.pending[offset]
            self._settle_malformed(gt, range(offset, offset + 1), exc)
            return
        if self.config.max_deliver and p.deliveries >= self.config.max_deliver:
            try:
                self._dead_letter(gt, offset, p, stored.timestamp, record)
            except StorageError as exc:
                # The dead-letter topic cannot take it now (disk full): the
                # message stays pending here and is tried again later.
                p.deadline = now + DEAD_LETTER_RETRY_SECONDS
                self._timer(p.deadline, gt, offset, offset)
                self.manager.log.error(
                    "dead letter could not be stored; retrying",
                    group=self.name, topic=gt.topic.name, offset=offset, error=exc.message,
                )
            return
        p.deliveries += 1
        self.version += 1
        p.member = member
        p.deadline = now + self.config.wait_for(p.deliveries)
        member.unacked += 1
        self.redelivered += 1
        self._timer(p.deadline, gt, offset, offset)
        member.sub.session.deliver_group(
            member.sub,
            gt.topic,
            offset,
            stored.timestamp,
            p.deliveries,
            encode_batch_from_records([record]),
        )

    def _settle_malformed(self, gt: GroupTopic, offsets: range, exc: MalformedBatch) -> None:
        """Messages of a stored batch that does not split into its records.

        The broker stores batches without parsing records (protocol.md,
        "Batches"), so a client can publish one whose CRC matches but whose
        records do not tile it. Where the group must hand it out in pieces
        or one message alone, it cannot: those messages are settled as
        termed, and the log says so. Plain subscribers still get the batch."""
        self.termed += len(offsets)
        self.version += 1
        self.manager.log.warning(
            "malformed batch settled",
            group=self.name,
            topic=gt.topic.name,
            offsets=f"{offsets.start}..{offsets.stop - 1}",
            detail=str(exc),
        )

    def _dead_letter(self, gt: GroupTopic, offset: int, p: Pending, timestamp: int, record: bytes) -> None:
        dead_letter_headers = {
            "x-original-topic": gt.topic.name,
            "x-original-offset": str(offset),
            "x-group": self.name,
            "x-deliveries": str(p.deliveries),
            "x-reason": "max_deliver",
        }
        try:
            ((payload, headers),) = decode_batch(encode_batch_from_records([record]))
        except MalformedBatch:
            # The record splits but its headers do not parse: keep the payload.
            headers_len = RECORD_HEADER.unpack_from(record, 0)[1]
            payload, headers = record[RECORD_HEADER.size + headers_len :], {}
        try:
            batch = encode_batch([(payload, {**headers, **dead_letter_headers})])
        except ValueError:
            # Headers already near the 65535-byte block limit: ours must fit.
            batch = encode_batch([(payload, dead_letter_headers)])
        router = self.manager.router
        dlq = router.topic(self.config.dead_letter)
        router.publish(dlq, batch, 1, time.time_ns() // 1000)
        del gt.pending[offset]
        self.version += 1
        self.dead_lettered += 1
        self.manager.log.info(
            "dead-lettered",
            group=self.name,
            topic=gt.topic.name,
            offset=offset,
            deliveries=p.deliveries,
            dead_letter=self.config.dead_letter,
        )

    # -- persistence --------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a restart needs. Any older snapshot is safe to restore
        (it can only cause redeliveries), so these need not be written on
        every change."""
        c = self.config
        return {
            "version": 1,
            "name": self.name,
            "pattern": self.pattern,
            "start": int(self.start),
            "start_value": self.start_value,
            "config": {
                "ack_wait": c.ack_wait,
                "max_deliver": c.max_deliver,
                "backoff": list(c.backoff),
                "max_ack_pending": c.max_ack_pending,
                "dead_letter": c.dead_letter,
            },
            "topics": {
                gt.topic.name: {
                    "cursor": gt.cursor,
                    "pending": [[o, p.deliveries] for o, p in sorted(gt.pending.items())],
                }
                for gt in self.topics.values()
            },
        }

    def restore(self, topics: Mapping[str, Any]) -> None:
        """Positions and pending messages from a snapshot; every pending one
        is ready to be delivered again (its member is gone)."""
        router = self.manager.router
        for name, state in topics.items():
            topic = router.topics.get(name)
            if topic is None:
                continue  # the topic's log is gone: nothing left to deliver
            gt = self.topics.get(topic)
            if gt is None:
                continue
            # The log may have lost a tail it had not fsynced (fsync never):
            # offsets past its end no longer exist.
            end = topic.log.next_offset
            gt.cursor = min(int(state["cursor"]), end)
            for offset, deliveries in state["pending"]:
                if offset < gt.cursor:
                    p = gt.pending[int(offset)] = Pending(None, int(deliveries), 0.0)
                    self._make_ready(gt, int(offset), p)

    def statistics(self) -> dict[str, Any]:
        config = self.config
        return {
            "group": self.name,
            "pattern": self.pattern,
            "config": {
                "ack_wait_ms": round(config.ack_wait * 1000),
                "max_deliver": config.max_deliver,
                "backoff_ms": [round(b * 1000) for b in config.backoff],
                "max_ack_pending": config.max_ack_pending,
                "dead_letter": config.dead_letter,
            },
            "members": len(self.members),
            "pending": sum(len(gt.pending) for gt in self.topics.values()),
            "delivered": self.delivered,
            "redelivered": self.redelivered,
            "acked": self.acked,
            "termed": self.termed,
            "dead_lettered": self.dead_lettered,
            "topics": {
                gt.topic.name: {"cursor": gt.cursor, "pending": len(gt.pending)}
                for gt in self.topics.values()
            },
        }


class GroupManager:
    """Every group of one broker, and the one task that runs them.

    With a ``state_dir`` each group's snapshot is kept in
    ``state_dir/<quoted name>.json``: loaded on start, rewritten atomically
    (write, fsync, rename, fsync the directory) at most every
    ``persist_interval`` seconds when it changed, and on shutdown.
    """

    def __init__(
        self, router: Router, state_dir: Path | None = None, persist_interval: float = 0.2
    ) -> None:
        self.router = router
        self.state_dir = state_dir
        self.persist_interval = persist_interval
        self._persisted: dict[str, int] = {}
        self.groups: dict[str, Group] = {}
        self.timer_ids = itertools.count()
        self._wake = trio.Event()
        self.log: Any = get_logger(component="groups")

    def wake(self) -> None:
        self._wake.set()

    def join(
        self,
        sub: Subscription,
        name: str,
        pattern: str,
        config: GroupConfig,
        start: StartKind,
        start_value: int,
    ) -> Member:
        """Add ``sub`` to group ``name``, creating it; ValueError if the
        group exists with another pattern."""
        group = self.groups.get(name)
        if group is None:
            if pattern_error(pattern):
                raise ValueError(f"bad pattern {pattern!r}")
            group = self.groups[name] = Group(self, name, pattern, config, start, start_value)
            for topic in self.router.topics.values():
                if group.matches(topic):
                    group.attach(topic)
                    topic.groups.append(group)
        elif group.pattern != pattern:
            raise ValueError(f"group {name!r} reads {group.pattern!r}, not {pattern!r}")
        member = group.add_member(sub)
        self.wake()
        return member

    def delete(self, name: str) -> None:
        """Forget a group with no members (KeyError if unknown, ValueError if in use)."""
        group = self.groups[name]
        if group.members:
            raise ValueError(f"group {name!r} has {len(group.members)} members")
        del self.groups[name]
        self._persisted.pop(name, None)
        if self.state_dir is not None:
            self._path(name).unlink(missing_ok=True)
        for gt in group.topics.values():
            gt.topic.groups = [g for g in gt.topic.groups if g is not group]

    def topic_created(self, topic: Topic) -> None:
        for group in self.groups.values():
            if group.matches(topic):
                group.attach(topic, created_now=True)
                topic.groups.append(group)

    def leave(self, group: Group, member: Member) -> None:
        group.remove_member(member, trio.current_time())
        self.wake()

    def settle(
        self,
        group: Group,
        member: Member,
        topic_name: str,
        kind: AckKind,
        ranges: tuple[tuple[int, int], ...],
        delay: float,
    ) -> None:
        topic = self.router.topics.get(topic_name)
        if topic is not None and group.settle(member, topic, kind, ranges, delay, trio.current_time()):
            self.wake()

    def run_once(self) -> None:
        now = trio.current_time()
        for group in list(self.groups.values()):
            group.run_timers(now)
            group.dispatch(now)

    # -- persistence --------------------------------------------------------

    def _path(self, name: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"{quote(name, safe='')}.json"

    def load(self) -> None:
        """Recreate the groups saved in state_dir (after the log's recovery)."""
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.state_dir.glob("*.json")):
            try:
                snap = json.loads(path.read_text("utf-8"))
                c = snap["config"]
                config = GroupConfig(
                    float(c["ack_wait"]),
                    int(c["max_deliver"]),
                    tuple(float(b) for b in c["backoff"]),
                    int(c["max_ack_pending"]),
                    str(c["dead_letter"]),
                )
                name = str(snap["name"])
                group = Group(
                    self, name, str(snap["pattern"]), config, StartKind(snap["start"]), int(snap["start_value"])
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Written atomically, so this is damage from outside: say so,
                # keep serving; the group will be recreated by its next member.
                self.log.error("unreadable group state ignored", path=str(path), error=repr(exc))
                continue
            self.groups[name] = group
            for topic in self.router.topics.values():
                if group.matches(topic):
                    group.attach(topic)
                    topic.groups.append(group)
            group.restore(snap["topics"])
            self._persisted[name] = group.version
            self.log.info(
                "group recovered",
                group=name,
                pending=sum(len(gt.pending) for gt in group.topics.values()),
            )

    def _changed(self) -> list[tuple[str, int, bytes]]:
        out = []
        for name, group in self.groups.items():
            if self._persisted.get(name) != group.version:
                out.append((name, group.version, json.dumps(group.snapshot()).encode()))
        return out

    async def persist(self) -> None:
        """Write the snapshot of every group that changed since the last write."""
        if self.state_dir is None:
            return
        changed = self._changed()
        if changed:
            paths = [(self._path(name), data) for name, _, data in changed]
            await trio.to_thread.run_sync(_write_snapshots, paths, self.state_dir)
            for name, version, _ in changed:
                if name in self.groups:
                    self._persisted[name] = version
                else:  # deleted while we wrote it: it must not come back
                    self._path(name).unlink(missing_ok=True)

    def persist_now(self) -> None:
        """Synchronous final write, at shutdown."""
        if self.state_dir is not None:
            changed = self._changed()
            _write_snapshots([(self._path(n), d) for n, _, d in changed], self.state_dir)
            for name, version, _ in changed:
                self._persisted[name] = version

    async def _persist_loop(self) -> None:
        while True:
            await trio.sleep(self.persist_interval)
            await self.persist()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.state_dir is not None:
                nursery.start_soon(self._persist_loop)
            await self._dispatch_loop(task_status)

    async def _dispatch_loop(self, task_status: Any) -> None:
        task_status.started()
        while True:
            deadlines = [d for g in self.groups.values() if (d := g.next_deadline) is not None]
            with trio.move_on_at(min(deadlines) if deadlines else float("inf")):
                await self._wake.wait()
            self._wake = trio.Event()
            self.run_once()


def _write_snapshots(items: list[tuple[Path, bytes]], directory: Path) -> None:
    """Atomically replace each file (runs in a worker thread)."""
    if not items:
        return
    for path, data in items:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
