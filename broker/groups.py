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

With file storage the manager records every hand-out and dead letter in the
groups' journal (broker/storage/groupstate.py) before it happens, so delivery counts
and dead letters hold across kill -9 (protocol.md, "Consumer groups").
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from client.protocol import AckKind, StartKind, decode_batch, encode_batch, encode_batch_from_records
from client.protocol.batch import RECORD_HEADER, MalformedBatch, split_records
from client.protocol.subjects import pattern_error, tokens_match, topic_error

from .storage.groupstate import (
    FORMAT,
    Journal,
    SavedTopic,
    encode_checkpoint,
    encode_dead_lettering,
    encode_delivered,
    encode_removed,
    encode_snapshot,
    find_dead_letters,
    read_state_dir,
)
from .storage import DataLoss, StorageError, StoredBatch
from .storage.fileops import REAL, FileOps, fsync_dir
from .logs import get_logger

if TYPE_CHECKING:
    from .router import Held, Router, Subscription, Topic

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
    __slots__ = ("sub", "unacked", "active")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.unacked = 0
        self.active = True  # False once it left: held deliveries are not sent


class Pending:
    """One unsettled message: handed to ``member`` (or waiting to be)."""

    __slots__ = ("member", "deliveries", "deadline", "queued", "dead_letter_from")

    def __init__(self, member: Member | None, deliveries: int, deadline: float) -> None:
        self.member = member
        self.deliveries = deliveries
        self.deadline = deadline  # ack wait expiry, or when a nak'ed message is due
        self.queued = False  # in the topic's redelivery queue
        #: Being dead-lettered: the dead-letter topic's next offset when that
        #: was recorded (where a restart looks for it). None otherwise.
        self.dead_letter_from: int | None = None


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
        self.name_bytes = name.encode()
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
        #: Dead letters published whose message the dead-letter topic has not
        #: made durable yet (fsync always): (that topic, its offset, topic
        #: state, offset, deliveries, dead_letter_from, the held batch).
        #: Snapshots keep them pending until it has, so a power loss cannot
        #: lose both copies; one whose fsync failed is dead-lettered again.
        self.unconfirmed: list[tuple[Topic, int, GroupTopic, int, int, int | None, Held]] = []
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
        member.active = False
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
            if member.unacked < self.config.max_ack_pending and member.sub.subscriber.accepting:
                self._next_member = (self._next_member + i + 1) % n
                return member
        return None

    def _confirm_dead_letters(self) -> None:
        """Drop dead letters their topic made durable; a dead letter whose
        fsync failed (the log rolled it back) is pending again, to be
        dead-lettered anew: it must not be lost with its original."""
        still = []
        for u in self.unconfirmed:
            dlq, dlq_offset, gt, offset, deliveries, _, held = u
            if held.error is not None:
                p = gt.pending[offset] = Pending(None, deliveries, 0.0)
                self._make_ready(gt, offset, p)
                self.dead_lettered -= 1
                self.version += 1
            elif dlq.visible_next <= dlq_offset:
                still.append(u)
        self.unconfirmed = still

    def dispatch(self, now: float) -> None:
        """Hand out what is ready again, then new messages, while members have room."""
        if self.unconfirmed:
            self._confirm_dead_letters()
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
        self.manager.hand_out(self, member, gt.topic, base, count, batch.timestamp, 1, payload)

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
            self.manager.dead_letter(self, gt, offset, p, stored.timestamp, record, now)
            return
        p.deliveries += 1
        self.version += 1
        p.member = member
        p.deadline = now + self.config.wait_for(p.deliveries)
        member.unacked += 1
        self.redelivered += 1
        self._timer(p.deadline, gt, offset, offset)
        payload = encode_batch_from_records([record])
        self.manager.hand_out(self, member, gt.topic, offset, 1, stored.timestamp, p.deliveries, payload)

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

    def _try_dead_letter(
        self, gt: GroupTopic, offset: int, p: Pending, timestamp: int, record: bytes, now: float
    ) -> None:
        """Publish the dead letter, or, when the dead-letter topic cannot
        take it now (disk full), keep the message pending and try again later."""
        try:
            self._dead_letter(gt, offset, p, timestamp, record)
        except StorageError as exc:
            # Nothing was stored: a restart that looks for it finds nothing
            # and publishes it then, as the retry would.
            p.dead_letter_from = None
            p.deadline = now + DEAD_LETTER_RETRY_SECONDS
            self._timer(p.deadline, gt, offset, offset)
            self.manager.log.error(
                "dead letter could not be stored; retrying",
                group=self.name, topic=gt.topic.name, offset=offset, error=exc.message,
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
        dlq_offset, _, held = router.publish(dlq, batch, 1, time.time_ns() // 1000)
        if held is not None:
            self.unconfirmed.append((dlq, dlq_offset, gt, offset, p.deliveries, p.dead_letter_from, held))
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
        """Everything a restart needs (broker/storage/groupstate.py: the snapshot
        that starts a journal)."""
        c = self.config
        # Dead letters the dead-letter topic has made durable are settled.
        self._confirm_dead_letters()
        topics: dict[str, Any] = {}
        for gt in self.topics.values():
            topics[gt.topic.name] = {
                "cursor": gt.cursor,
                "pending": [
                    [o, p.deliveries] if p.dead_letter_from is None else [o, p.deliveries, p.dead_letter_from]
                    for o, p in sorted(gt.pending.items())
                ],
            }
        for _, _, gt, offset, deliveries, dead_letter_from, _ in self.unconfirmed:
            if dead_letter_from is not None:
                topics[gt.topic.name]["pending"].append([offset, deliveries, dead_letter_from])
        return {
            "version": FORMAT,
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
            "topics": topics,
        }

    def restore(self, topics: Mapping[str, SavedTopic]) -> None:
        """Positions and pending messages as saved; every pending one is
        ready to be delivered again (its member is gone), except one whose
        dead letter was published before the crash: that one is settled."""
        router = self.manager.router
        restored: list[tuple[GroupTopic, int, Pending]] = []
        for name, saved in topics.items():
            topic = router.topics.get(name)
            if topic is None:
                continue  # the topic's log is gone: nothing left to deliver
            gt = self.topics.get(topic)
            if gt is None:
                continue
            # The log may have lost a tail it had not fsynced (fsync never):
            # offsets past its end no longer exist.
            gt.cursor = min(saved.cursor, topic.log.next_offset)
            for offset in sorted(saved.pending):
                if offset < gt.cursor:
                    sp = saved.pending[offset]
                    p = gt.pending[offset] = Pending(None, sp.deliveries, 0.0)
                    p.dead_letter_from = sp.dead_letter_from
                    restored.append((gt, offset, p))
        self._settle_published_dead_letters([r for r in restored if r[2].dead_letter_from is not None])
        for gt, offset, p in restored:
            if gt.pending.get(offset) is p:
                self._make_ready(gt, offset, p)

    def _settle_published_dead_letters(self, waiting: list[tuple[GroupTopic, int, Pending]]) -> None:
        """Messages a crash caught being dead-lettered: settled if their dead
        letter is in the dead-letter topic, else dead-lettered (again) at
        their next turn, since their count has reached max_deliver."""
        if not waiting:
            return
        dlq = self.manager.router.topics.get(self.config.dead_letter)
        wanted = {(gt.topic.name, offset) for gt, offset, _ in waiting}
        start = min(p.dead_letter_from or 0 for _, _, p in waiting)
        found = find_dead_letters(dlq.log, self.name, wanted, start) if dlq is not None else set()
        for gt, offset, p in waiting:
            p.dead_letter_from = None
            if (gt.topic.name, offset) in found:
                del gt.pending[offset]
                self.dead_lettered += 1
        self.manager.log.info(
            "group recovered dead letters in flight",
            group=self.name,
            already_published=len(found),
            to_publish=len(waiting) - len(found),
        )

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

    With a ``state_dir`` the groups' state is kept in a journal there
    (broker/storage/groupstate.py), opened by :meth:`load`: every hand-out and dead
    letter is recorded before it happens, and each group that changed is
    snapshotted into it at most every ``persist_interval`` seconds, and at
    shutdown. With ``sync`` (the broker's fsync ``always``) a hand-out waits
    for the fsync covering its record, one fsync per round for all groups,
    in a worker thread, the way the log's group commit holds PUBACKs;
    otherwise the record is written to the OS before the delivery is queued
    (it survives kill -9, not power loss) and fsynced with the snapshots.
    """

    #: The journal starts over with a fresh checkpoint once it is this many
    #: times its last checkpoint (and at least ROTATE_MIN_BYTES): replaying
    #: it at start-up stays proportional to the state it describes.
    ROTATE_FACTOR = 4
    ROTATE_MIN_BYTES = 4 << 20

    def __init__(
        self,
        router: Router,
        state_dir: Path | None = None,
        persist_interval: float = 0.2,
        *,
        sync: bool = True,
        ops: FileOps = REAL,
    ) -> None:
        self.router = router
        self.state_dir = state_dir
        self.persist_interval = persist_interval
        self.sync = sync
        self.ops = ops
        self._persisted: dict[str, int] = {}
        self.groups: dict[str, Group] = {}
        self.timer_ids = itertools.count()
        self._wake = trio.Event()
        self.log: Any = get_logger(component="groups")
        #: The open journal (after load() with a state_dir). None while a
        #: write or fsync failure has left no file to trust (``broken``).
        self.journal: Journal | None = None
        #: A journal write or fsync failed: hand-outs wait until a new
        #: generation (a checkpoint of everything) is written and fsynced.
        self.broken = False
        self._generation = 0
        # Records of this dispatch pass, written at its end.
        self._records = bytearray()
        # Hand-outs and dead letters whose records are not durable yet, in
        # order. Bounded: a hand-out counts against its member's
        # max_ack_pending, a dead letter is one of the group's pending messages.
        self._held: list[Callable[[], None]] = []
        self._writer_wake = trio.Event()
        # Journals a new checkpoint replaced: deleted once it is durable;
        # and files read at start-up, likewise.
        self._retired: list[Journal] = []
        self._superseded: list[Path] = []
        #: Writer rounds that fsynced the journal, and checkpoints written.
        self.sync_rounds = 0
        self.checkpoints = 0

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
        if self.state_dir is not None and name not in self._persisted:
            # Saved before it hands anything out: its records mean nothing
            # without the settings and start its snapshot carries.
            self._append(encode_snapshot(group.snapshot()))
            self._persisted[name] = group.version
        self.wake()
        return member

    def delete(self, name: str) -> None:
        """Forget a group with no members (KeyError if unknown, ValueError if in use)."""
        group = self.groups[name]
        if group.members:
            raise ValueError(f"group {name!r} has {len(group.members)} members")
        del self.groups[name]
        if self._persisted.pop(name, None) is not None:
            self._append(encode_removed(group.name_bytes))
        for gt in group.topics.values():
            gt.topic.groups = [g for g in gt.topic.groups if g is not group]

    def topic_created(self, topic: Topic) -> None:
        for group in self.groups.values():
            if group.matches(topic):
                group.attach(topic, created_now=True)
                topic.groups.append(group)
                group.version += 1  # its cursor there is saved with the next snapshot

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
            if not self.broken:
                # (While it is, nothing could be sent: handing out more would
                # only grow the held list with every ack-wait expiry.)
                group.dispatch(now)
        self._write_records()

    # -- counted before sent ------------------------------------------------

    def hand_out(
        self,
        group: Group,
        member: Member,
        topic: Topic,
        base: int,
        count: int,
        timestamp: int,
        deliveries: int,
        batch: bytes,
    ) -> None:
        """Send a GROUP_DELIVER once the journal has counted it."""
        if self.state_dir is None:
            member.sub.subscriber.deliver_group(member.sub, topic, base, timestamp, deliveries, batch)
            return
        self._records += encode_delivered(group.name_bytes, topic.name_bytes, base, count, deliveries)
        self._held.append(partial(_send, member, topic, base, timestamp, deliveries, batch))

    def dead_letter(
        self,
        group: Group,
        gt: GroupTopic,
        offset: int,
        p: Pending,
        timestamp: int,
        record: bytes,
        now: float,
    ) -> None:
        """Publish a dead letter once the journal says it may have been: a
        restart then looks for it before publishing it (again)."""
        if self.state_dir is None:
            group._try_dead_letter(gt, offset, p, timestamp, record, now)
            return
        dlq = self.router.topics.get(group.config.dead_letter)
        p.dead_letter_from = dlq.log.next_offset if dlq is not None else 0
        group.version += 1
        self._records += encode_dead_lettering(
            group.name_bytes, gt.topic.name_bytes, offset, p.dead_letter_from
        )
        self._held.append(partial(self._publish_dead_letter, group, gt, offset, p, timestamp, record))

    def _publish_dead_letter(
        self, group: Group, gt: GroupTopic, offset: int, p: Pending, timestamp: int, record: bytes
    ) -> None:
        # Settled meanwhile (a late ack), or the group deleted: nothing to publish.
        if gt.pending.get(offset) is p and self.groups.get(group.name) is group:
            group._try_dead_letter(gt, offset, p, timestamp, record, trio.current_time())

    def _write_records(self) -> None:
        """End of a dispatch pass: its records go to the OS in one write;
        its hand-outs go out now, or after the writer's fsync."""
        if self._records:
            records, self._records = self._records, bytearray()
            self._append(bytes(records))
        if not self._held:
            return
        if self.sync or self.broken:
            self._writer_wake.set()
        else:
            held, self._held = self._held, []
            _release(held)

    def _append(self, data: bytes) -> None:
        """Append to the journal; after a failure, nothing more goes into that
        file (the next checkpoint covers what would have)."""
        if self.journal is None:
            return  # broken: the checkpoint that mends it is taken from memory
        try:
            self.journal.write(data)
        except OSError as exc:
            self._failed("write", exc)

    def _failed(self, what: str, exc: OSError) -> None:
        """A journal write or fsync failed (a full or failing disk). Nothing it
        counted may be sent, and after a failed fsync the file cannot be
        trusted: hand-outs wait, dispatch and acks go on in memory, and the
        writer tries a new checkpoint every persist_interval."""
        if not self.broken:
            self.log.error(
                f"group journal {what} failed; group deliveries wait until it can be written",
                error=repr(exc),
            )
        self.broken = True
        if self.journal is not None:
            self._retired.append(self.journal)
            self.journal = None
        self._writer_wake.set()

    # -- saving and loading -------------------------------------------------

    def load(self) -> None:
        """Recreate the groups saved in state_dir (after the log's recovery)
        and start a new journal generation with all of them; the files read
        are deleted once it is durable."""
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        saved = read_state_dir(self.state_dir)
        if saved.problems:
            # Written whole before anything relies on them: a newer file that
            # does not read is a checkpoint cut short, anything else is damage
            # from outside. Say so, keep serving; such files are left in place
            # until a newer journal supersedes them.
            self.log.error("unreadable group state ignored", problems=saved.problems)
        for name, state in saved.groups.items():
            try:
                group = self._group_from(state.doc)
            except (ValueError, KeyError, TypeError) as exc:
                self.log.error("unreadable group state ignored", group=name, problems=[repr(exc)])
                continue
            self.groups[group.name] = group
            for topic in self.router.topics.values():
                if group.matches(topic):
                    group.attach(topic)
                    topic.groups.append(group)
            group.restore(state.topics)
            self.log.info(
                "group recovered",
                group=group.name,
                pending=sum(len(gt.pending) for gt in group.topics.values()),
            )
        if saved.dropped_bytes:
            self.log.info("group journal tail dropped", bytes=saved.dropped_bytes)
        self._generation = saved.generation
        self._superseded = saved.superseded  # deleted once the checkpoint is durable
        if self._checkpoint():
            # Durable before anything listens. (A failure leaves the groups
            # waiting for the writer's next checkpoint, not the broker down.)
            journal = self.journal
            assert journal is not None
            try:
                self._make_durable(journal, [], self._take_superseded())
                journal.unsynced = False
            except OSError as exc:
                self._failed("fsync", exc)

    def _group_from(self, snap: dict[str, Any]) -> Group:
        c = snap["config"]
        config = GroupConfig(
            float(c["ack_wait"]),
            int(c["max_deliver"]),
            tuple(float(b) for b in c["backoff"]),
            int(c["max_ack_pending"]),
            str(c["dead_letter"]),
        )
        start, start_value = StartKind(snap["start"]), int(snap["start_value"])
        return Group(self, str(snap["name"]), str(snap["pattern"]), config, start, start_value)

    def _checkpoint(self) -> bool:
        """Start the next generation with every group's snapshot (written to
        the OS); the current file is retired. False if it could not be."""
        assert self.state_dir is not None
        self._generation += 1
        try:
            checkpoint = encode_checkpoint(g.snapshot() for g in self.groups.values())
            journal = Journal.create(self.state_dir, self._generation, checkpoint, self.ops)
        except OSError as exc:
            self._failed("write", exc)
            return False
        if self.journal is not None:
            self._retired.append(self.journal)
        self.journal = journal
        self._persisted = {name: g.version for name, g in self.groups.items()}
        self.checkpoints += 1
        if self.broken:
            self.broken = False
            self.log.info("group journal writable again", file=journal.path.name)
        return True

    def snapshot_changed(self) -> None:
        """Snapshot every group that changed into the journal (acks reach the
        disk this way), or start the next generation once it has grown, or
        after a failure."""
        journal = self.journal
        if journal is None or journal.size > max(
            self.ROTATE_MIN_BYTES, self.ROTATE_FACTOR * journal.checkpoint_size
        ):
            self._checkpoint()
            return
        changed = [g for name, g in self.groups.items() if self._persisted.get(name) != g.version]
        if changed:
            self._append(b"".join(encode_snapshot(g.snapshot()) for g in changed))
            for g in changed:
                self._persisted[g.name] = g.version

    async def sync_round(self) -> None:
        """fsync what the journal has been given (and, for a new generation,
        the directory; then the files it replaced go), then release the
        hand-outs it counts: the writer task's work. Nothing is released
        while the journal is broken."""
        journal = self.journal
        if journal is None:
            return
        held, self._held = self._held, []
        retired, self._retired = self._retired, []
        superseded = self._take_superseded()
        if journal.unsynced or retired or superseded:
            journal.unsynced = False  # what is written from now on: the next round
            try:
                await trio.to_thread.run_sync(self._make_durable, journal, retired, superseded)
            except OSError as exc:
                self._held[:0] = held  # not released: their counts are not durable
                self._superseded[:0] = superseded
                self._failed("fsync", exc)
                return
            self.sync_rounds += 1
        _release(held)

    def _take_superseded(self) -> list[Path]:
        superseded, self._superseded = self._superseded, []
        return superseded

    def _make_durable(self, journal: Journal, retired: list[Journal], superseded: list[Path]) -> None:
        """fsync the journal (and the directory for a new one), then delete
        the files it replaces (in a worker thread, but at start and stop)."""
        assert self.state_dir is not None
        journal.fsync()
        if journal.new:
            fsync_dir(self.state_dir, self.ops)
            journal.new = False
        for old in retired:
            try:
                old.discard()
            except OSError:
                pass  # closing a file we no longer use: nothing to save
        for path in superseded:
            path.unlink(missing_ok=True)

    def persist_now(self) -> None:
        """Synchronous final snapshot, at shutdown; the journal is closed."""
        if self.state_dir is None:
            return
        self.snapshot_changed()
        self._held = []  # never sent: counted, so a restart over-counts them by one
        journal = self.journal
        if journal is None:
            self.log.error("group state not saved at shutdown: the journal cannot be written")
            return
        retired, self._retired = self._retired, []
        try:
            self._make_durable(journal, retired, self._take_superseded())
            journal.close()
        except OSError as exc:
            self.log.error("group state not saved at shutdown", error=repr(exc))
        self.journal = None

    async def _writer(self) -> None:
        next_snapshot = trio.current_time() + self.persist_interval
        while True:
            with trio.move_on_at(next_snapshot):
                await self._writer_wake.wait()
            self._writer_wake = trio.Event()
            if trio.current_time() >= next_snapshot:
                # (While broken, this is the retry: at most one per interval.)
                self.snapshot_changed()
                next_snapshot = trio.current_time() + self.persist_interval
            await self.sync_round()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.state_dir is not None:
                nursery.start_soon(self._writer)
            await self._dispatch_loop(task_status)

    async def _dispatch_loop(self, task_status: Any) -> None:
        task_status.started()
        while True:
            deadlines = [d for g in self.groups.values() if (d := g.next_deadline) is not None]
            with trio.move_on_at(min(deadlines) if deadlines else float("inf")):
                await self._wake.wait()
            self._wake = trio.Event()
            self.run_once()


def _send(
    member: Member, topic: Topic, base: int, timestamp: int, deliveries: int, batch: bytes
) -> None:
    """A held hand-out, now counted durably. A member that left since has had
    these messages given back (they wait for another member)."""
    if member.active and member.sub.subscriber.accepting:
        member.sub.subscriber.deliver_group(member.sub, topic, base, timestamp, deliveries, batch)


def _release(held: list[Callable[[], None]]) -> None:
    for action in held:
        action()
