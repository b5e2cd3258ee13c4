"""One consumer group: its members, its position in each topic, and every
message it handed out and not yet settled.

A synchronous state machine that takes ``now`` (Trio's clock) as an
argument: the manager (:mod:`.manager`) is the one task that runs timers
and dispatch, so a test with ``MockClock`` drives redelivery in
milliseconds. Tracking is per message (a dict entry per pending offset):
work queues settle messages one by one, so this is inherent, and it stays
off the plain pub/sub hot path.

Fair dispatch: the unit handed out is the message, not the stored batch.
Each member takes at most its own ``max_ack_pending`` unsettled messages
(its prefetch), and a stored batch is split across every member with room
at that moment, as evenly as their room allows; a member gets the stored
batch's own bytes only when it takes all of it.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import time
from collections import deque
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from pybroker.protocol import (
    KEY_HEADER,
    MSG_ID_HEADER,
    RECORD_HEADER,
    AckKind,
    MalformedBatch,
    StartKind,
    decode_batch,
    encode_batch,
    encode_batch_from_records,
    record_headers,
    split_records,
    tokens_match,
)

from ..start import start_offset
from ..storage import DataLoss, StorageError, StoredBatch
from ..storage.errors import NotOwnerError, ReadPending
from ..storage.groupstate import FORMAT, SavedTopic, find_dead_letters
from .config import DEAD_LETTER_RETRY_SECONDS, KEY_SCAN_LIMIT, GroupConfig

if TYPE_CHECKING:
    from ..router import Held, Subscription, Topic
    from .manager import GroupManager


#: Members listed one by one in an inspection; beyond, only counted.
MAX_LISTED_MEMBERS = 100


class Member:
    __slots__ = ("sub", "unacked", "max_ack_pending", "active", "delivered", "acked")

    def __init__(self, sub: Subscription, max_ack_pending: int) -> None:
        self.sub = sub
        self.unacked = 0
        #: Deliveries handed to it (redeliveries included) and its acks.
        self.delivered = 0
        self.acked = 0
        #: Its prefetch: at most this many unsettled messages handed to it.
        self.max_ack_pending = max_ack_pending
        self.active = True  # False once it left: held deliveries are not sent


class Pending:
    """One unsettled message: handed to ``member`` (or waiting to be)."""

    __slots__ = ("member", "deliveries", "deadline", "queued", "dead_letter_from", "key", "key_known")

    def __init__(
        self, member: Member | None, deliveries: int, deadline: float, key: str | None = None, key_known: bool = True
    ) -> None:
        self.member = member
        self.deliveries = deliveries
        self.deadline = deadline  # ack wait expiry, or when a nak'ed message is due
        self.queued = False  # in the topic's redelivery queue
        #: Being dead-lettered: the dead-letter topic's next offset when that
        #: was recorded (where a restart looks for it). None otherwise.
        self.dead_letter_from: int | None = None
        #: Key-ordered groups: the message's key (None: it has none), once
        #: known (after a restart it is read back from the log when needed).
        self.key: str | None = key
        self.key_known = key_known


class GroupTopic:
    """A group's position in one topic."""

    __slots__ = ("topic", "cursor", "pending", "ready", "ahead", "_cached", "_records")

    def __init__(self, topic: Topic, cursor: int) -> None:
        self.topic = topic
        self.cursor = cursor  # next offset never handed out yet
        self.pending: dict[int, Pending] = {}
        #: Key-ordered groups: offsets past the cursor already handed out
        #: (the cursor waits at a message whose key is busy).
        self.ahead: set[int] = set()
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
        if created_now:
            cursor = log.first_offset  # a topic made after the group: all of it
        else:
            cursor = start_offset(log, self.start, self.start_value, topic.visible_next)
        self.topics[topic] = GroupTopic(topic, cursor)

    def detach(self, topic: Topic) -> None:
        """Stop following a deleted ``topic``: its pending messages are gone
        with it (their members get room back); members are told. Timers
        for them find nothing pending and do nothing."""
        gt = self.topics.pop(topic, None)
        if gt is None:
            return
        for p in gt.pending.values():
            if p.member is not None:
                p.member.unacked -= 1
        self.version += 1
        for member in self.members:
            member.sub.subscriber.topic_deleted(member.sub, topic)

    def add_member(self, sub: Subscription, max_ack_pending: int | None = None) -> Member:
        """``max_ack_pending``: the member's own prefetch (None: the group's)."""
        self.version += 1
        member = Member(sub, max_ack_pending or self.config.max_ack_pending)
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
                p.deadline = now + self.config.ack_wait
                self._timer(p.deadline, gt, offset, offset)
                continue
            if p.member is member:
                member.unacked -= 1
            if kind is AckKind.NAK:
                p.member = None
                # No delay of its own: the group's backoff for this delivery.
                wait = delay if delay > 0 else self._backoff(p.deliveries)
                if wait > 0 and not self._exhausted(p):
                    p.deadline = now + wait
                    self._timer(p.deadline, gt, offset, offset)
                else:
                    # (Exhausted: its next turn dead-letters it; no point waiting.)
                    self._make_ready(gt, offset, p)
            else:
                del gt.pending[offset]
                if kind is AckKind.ACK:
                    self.acked += 1
                    member.acked += 1
                else:
                    self.termed += 1
        return touched

    def _backoff(self, deliveries: int) -> float:
        wait = self.config.backoff_for(deliveries)
        if wait and self.config.backoff_jitter:
            wait *= 1 + random.random() * self.config.backoff_jitter
        return wait

    def _exhausted(self, p: Pending) -> bool:
        return bool(self.config.max_deliver) and p.deliveries >= self.config.max_deliver

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
            if member.unacked < member.max_ack_pending and member.sub.subscriber.accepting:
                self._next_member = (self._next_member + i + 1) % n
                return member
        return None

    def _members_with_room(self, most: int) -> list[tuple[Member, int]]:
        """The members that can take more, with their room, in turn order
        (from the next member in turn), at most ``most`` of them: ``most``
        messages go one each to the first ``most`` members with room
        anyway, so a batch of one costs one member's check, not all."""
        n = len(self.members)
        out = []
        for i in range(n):
            member = self.members[(self._next_member + i) % n]
            room = member.max_ack_pending - member.unacked
            if room > 0 and member.sub.subscriber.accepting:
                out.append((member, room))
                if len(out) >= most:
                    break
        return out

    def _confirm_dead_letters(self) -> None:
        """Drop dead letters their topic made durable; a dead letter whose
        fsync failed (the log rolled it back) is pending again, to be
        dead-lettered anew: it must not be lost with its original."""
        still = []
        for u in self.unconfirmed:
            dlq, dlq_offset, gt, offset, deliveries, _, held = u
            if held.error is not None:
                p = gt.pending[offset] = Pending(None, deliveries, 0.0, key_known=False)
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
                if not self._redeliver(gt, offset, p, member, now):
                    return  # its batch is being fetched: this pass ends, the fetch wakes the next
        if self.config.ordering == "key":
            for gt in list(self.topics.values()):
                if not self._deliver_new_by_key(gt, now):
                    return
            return
        for gt in list(self.topics.values()):
            visible = gt.topic.visible_next
            while gt.cursor < visible:
                if not self._deliver_new(gt, now):
                    return

    def _deliver_new_by_key(self, gt: GroupTopic, now: float) -> bool:
        """Key-ordered: hand out new messages one at a time, in offset
        order, skipping (for now) each whose key a pending message holds;
        False once no member has room. A message waits until the one before
        it with its key is settled, so one key is never worked on twice at
        once and never out of order, while other keys go on."""
        try:
            busy = self._busy_keys(gt)
        except ReadPending as pending:
            pending.notify(self.manager.wake)  # a pending message's key is being fetched
            return False
        visible = gt.topic.visible_next
        offset = gt.cursor
        scanned = 0
        while offset < visible and scanned < KEY_SCAN_LIMIT:
            if offset in gt.ahead or offset in gt.pending:
                offset += 1
                continue
            if gt.cursor < gt.topic.log.first_offset:
                # Retention (or a purge) removed what we had not read.
                gt.cursor = offset = gt.topic.log.first_offset
                gt.ahead = {o for o in gt.ahead if o >= gt.cursor}
                continue
            try:
                batch = gt.batch_at(offset)
            except ReadPending as pending:
                # Cluster mode, older than the node's copy: being fetched.
                pending.notify(self.manager.wake)
                self._advance(gt)
                return False
            except DataLoss as lost:
                self.lost += lost.count
                self.manager.logger.error(
                    "group skipped lost offsets",
                    group=self.name, topic=lost.topic, first=lost.first, last=lost.last, reason=lost.reason,
                )
                gt.ahead.update(range(max(offset, lost.first), lost.last + 1))
                offset = lost.last + 1
                self._advance(gt)
                continue
            if batch is None:
                offset += 1
                continue
            try:
                records = gt.records_of(batch)
            except MalformedBatch as exc:
                self._settle_malformed(gt, range(offset, batch.next_offset), exc)
                gt.ahead.update(range(offset, batch.next_offset))
                offset = batch.next_offset
                self._advance(gt)
                continue
            for o in range(offset, min(batch.next_offset, visible)):
                scanned += 1
                if o in gt.ahead or o in gt.pending:
                    continue
                record = records[o - batch.base_offset]
                key = record_key(record)
                if key is not None and key in busy:
                    continue  # waits for the message before it with this key
                member = self._member_with_room()
                if member is None:
                    self._advance(gt)
                    return False
                deadline = now + self.config.ack_wait
                gt.pending[o] = Pending(member, 1, deadline, key)
                gt.ahead.add(o)
                if key is not None:
                    busy.add(key)
                member.unacked += 1
                member.delivered += 1
                self.version += 1
                self.delivered += 1
                self._timer(deadline, gt, o, o)
                payload = encode_batch_from_records([record])
                self.manager.hand_out(self, member, gt.topic, o, 1, batch.timestamp, 1, payload)
            offset = batch.next_offset
        self._advance(gt)
        return True

    @staticmethod
    def _advance(gt: GroupTopic) -> None:
        """Move the cursor over what has been handed out."""
        ahead = gt.ahead
        while gt.cursor in ahead:
            ahead.discard(gt.cursor)
            gt.cursor += 1

    def _busy_keys(self, gt: GroupTopic) -> set[str]:
        """The keys of the topic's pending messages (read back from the log
        for those restored after a restart; ReadPending while one is being
        fetched, cluster mode)."""
        busy: set[str] = set()
        for offset, p in gt.pending.items():
            if not p.key_known:
                p.key, p.key_known = self._key_at(gt, offset), True
            if p.key is not None:
                busy.add(p.key)
        return busy

    @staticmethod
    def _key_at(gt: GroupTopic, offset: int) -> str | None:
        try:
            stored = gt.batch_at(offset)
            if stored is None:
                return None
            return record_key(gt.records_of(stored)[offset - stored.base_offset])
        except ReadPending:
            raise  # not known yet (the caller waits): not "no key"
        except (DataLoss, MalformedBatch):
            return None

    def _deliver_new(self, gt: GroupTopic, now: float) -> bool:
        """Hand out the stored batch at the cursor (from the cursor on),
        split across the members with room as evenly as their room allows;
        False if no member has room."""
        if not any(m.unacked < m.max_ack_pending and m.sub.subscriber.accepting for m in self.members):
            return False  # (before reading the log: nobody could take it)
        log = gt.topic.log
        if gt.cursor < log.first_offset:
            gt.cursor = log.first_offset  # retention removed what we had not read
        try:
            batch = gt.batch_at(gt.cursor)
        except ReadPending as pending:
            # Cluster mode, older than the node's copy: being fetched. This
            # pass ends; the fetch wakes the next (asking again adds nothing).
            pending.notify(self.manager.wake)
            return False
        except DataLoss as lost:
            # Damaged or missing in the log: nobody can be given these.
            self.lost += lost.count
            self.manager.logger.error(
                "group skipped lost offsets",
                group=self.name, topic=lost.topic, first=lost.first, last=lost.last, reason=lost.reason,
            )
            gt.cursor = lost.last + 1
            return True
        if batch is None or batch.base_offset >= gt.topic.visible_next:
            gt.cursor = max(gt.cursor, gt.topic.visible_next)
            return True
        skip = gt.cursor - batch.base_offset
        takers = self._members_with_room(batch.count - skip)
        if not takers:
            return False
        shares = fair_shares(batch.count - skip, [room for _, room in takers])
        # The next hand-out starts its turn order one member on, so the
        # larger shares of uneven splits (and batches of one) rotate.
        self._next_member = (self.members.index(takers[0][0]) + 1) % len(self.members)
        deadline = now + self.config.ack_wait
        base = gt.cursor
        for (member, _), count in zip(takers, shares):
            if not count:
                continue
            if skip == 0 and count == batch.count:
                payload = batch.batch  # all of it: the stored bytes, no copy
            else:
                # Part of a batch: from the cursor, only what this member takes.
                try:
                    records = gt.records_of(batch)[base - batch.base_offset : base - batch.base_offset + count]
                except MalformedBatch as exc:
                    self._settle_malformed(gt, range(base, batch.next_offset), exc)
                    gt.cursor = batch.next_offset
                    return True
                payload = encode_batch_from_records(records)
            for offset in range(base, base + count):
                gt.pending[offset] = Pending(member, 1, deadline)
            member.unacked += count
            member.delivered += count
            gt.cursor = base + count
            self.version += 1
            self.delivered += count
            self._timer(deadline, gt, base, base + count - 1)
            self.manager.hand_out(self, member, gt.topic, base, count, batch.timestamp, 1, payload)
            base += count
        return True

    def _redeliver(self, gt: GroupTopic, offset: int, p: Pending, member: Member, now: float) -> bool:
        """Hand ``offset`` out again (or settle it as lost, malformed or
        dead); False when its batch is being fetched (cluster mode, older
        than the node's copy): it stays first in line, and the fetch wakes
        the next dispatch."""
        try:
            stored = gt.batch_at(offset)
        except ReadPending as pending:
            gt.ready.appendleft(offset)
            p.queued = True
            pending.notify(self.manager.wake)
            return False
        except DataLoss as lost:
            del gt.pending[offset]
            self.lost += 1
            self.manager.logger.error(
                "group message lost from the log", group=self.name, topic=gt.topic.name,
                offset=offset, reason=lost.reason,
            )
            return True
        if stored is None:
            del gt.pending[offset]  # removed by retention meanwhile
            self.manager.logger.warning(
                "group message lost to retention", group=self.name, topic=gt.topic.name, offset=offset
            )
            return True
        try:
            record = gt.records_of(stored)[offset - stored.base_offset]
        except MalformedBatch as exc:
            del gt.pending[offset]
            self._settle_malformed(gt, range(offset, offset + 1), exc)
            return True
        if self._exhausted(p):
            self.manager.dead_letter(self, gt, offset, p, stored.timestamp, record, now)
            return True
        p.deliveries += 1
        self.version += 1
        p.member = member
        p.deadline = now + self.config.ack_wait
        member.unacked += 1
        member.delivered += 1
        self.redelivered += 1
        self._timer(p.deadline, gt, offset, offset)
        payload = encode_batch_from_records([record])
        self.manager.hand_out(self, member, gt.topic, offset, 1, stored.timestamp, p.deliveries, payload)
        return True

    def _settle_malformed(self, gt: GroupTopic, offsets: range, exc: MalformedBatch) -> None:
        """Messages of a stored batch that does not split into its records.

        The broker stores batches without parsing records (protocol.md,
        "Batches"), so a client can publish one whose CRC matches but whose
        records do not tile it. Where the group must hand it out in pieces
        or one message alone, it cannot: those messages are settled as
        termed, and the log says so. Plain subscribers still get the batch."""
        self.termed += len(offsets)
        self.version += 1
        self.manager.logger.warning(
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
            if isinstance(exc, NotOwnerError) and self.manager.hand_off is not None:
                self._hand_off(gt, offset, p, record, now)
                return
            # Nothing was stored: a restart that looks for it finds nothing
            # and publishes it then, as the retry would.
            p.dead_letter_from = None
            p.deadline = now + DEAD_LETTER_RETRY_SECONDS
            self._timer(p.deadline, gt, offset, offset)
            self.manager.logger.error(
                "dead letter could not be stored; retrying",
                group=self.name, topic=gt.topic.name, offset=offset, error=exc.message,
            )

    def _hand_off(self, gt: GroupTopic, offset: int, p: Pending, record: bytes, now: float) -> None:
        """Cluster mode, the dead-letter topic owned by another node: hand
        the dead letter to it through etcd, named so that it is stored once
        however often it is handed off; settled once handed off. Meanwhile
        it stays pending and comes back after the retry pause (a hand-off
        still in flight is not started again)."""
        hand_off = self.manager.hand_off
        assert hand_off is not None
        digest = hashlib.sha256(f"{self.name}\0{gt.topic.name}\0{offset}".encode()).hexdigest()[:32]
        msg_id = f"dead-letter-{digest}"
        batch = self._dead_letter_batch(gt, offset, p, record, {MSG_ID_HEADER: msg_id})
        p.deadline = now + DEAD_LETTER_RETRY_SECONDS
        self._timer(p.deadline, gt, offset, offset)
        hand_off(self.manager.dead_letter_topic(self.config.dead_letter), msg_id, batch, partial(self._handed_off, gt, offset, p))

    def _handed_off(self, gt: GroupTopic, offset: int, p: Pending) -> None:
        if gt.pending.get(offset) is not p or self.manager.groups.get(self.name) is not self:
            return  # settled meanwhile (a late ack), or the group deleted
        del gt.pending[offset]
        self.version += 1
        self.dead_lettered += 1
        self.manager.logger.info(
            "dead-lettered (handed to the owner of its topic)",
            group=self.name, topic=gt.topic.name, offset=offset, deliveries=p.deliveries,
            dead_letter=self.config.dead_letter,
        )  # fmt: skip
        self.manager.wake()

    def _dead_letter(self, gt: GroupTopic, offset: int, p: Pending, timestamp: int, record: bytes) -> None:
        batch = self._dead_letter_batch(gt, offset, p, record)
        router = self.manager.router
        dlq = router.topic(self.manager.dead_letter_topic(self.config.dead_letter))
        dlq_offset, _, held = router.publish(dlq, batch, 1, time.time_ns() // 1000)
        if held is not None:
            self.unconfirmed.append((dlq, dlq_offset, gt, offset, p.deliveries, p.dead_letter_from, held))
        del gt.pending[offset]
        self.version += 1
        self.dead_lettered += 1
        self.manager.logger.info(
            "dead-lettered",
            group=self.name,
            topic=gt.topic.name,
            offset=offset,
            deliveries=p.deliveries,
            dead_letter=self.config.dead_letter,
        )

    def _dead_letter_batch(
        self, gt: GroupTopic, offset: int, p: Pending, record: bytes, extra: Mapping[str, str] | None = None
    ) -> bytes:
        """The dead letter: the message's payload and headers, and ours
        (``extra`` last: a hand-off's msg-id replaces the original's)."""
        dead_letter_headers = {
            "x-original-topic": gt.topic.name,
            "x-original-offset": str(offset),
            "x-group": self.name,
            "x-deliveries": str(p.deliveries),
            "x-reason": "max_deliver",
            **(extra or {}),
        }
        try:
            ((payload, headers),) = decode_batch(encode_batch_from_records([record]))
        except MalformedBatch:
            # The record splits but its headers do not parse: keep the payload.
            headers_len = RECORD_HEADER.unpack_from(record, 0)[1]
            payload, headers = record[RECORD_HEADER.size + headers_len :], {}
        try:
            return encode_batch([(payload, {**headers, **dead_letter_headers})])
        except ValueError:
            # Headers already near the 65535-byte block limit: ours must fit.
            return encode_batch([(payload, dead_letter_headers)])

    # -- persistence --------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a restart needs (broker/storage/groupstate.py: the snapshot
        that starts a journal)."""
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
            "config": self.config.to_doc(),
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
                # Past the cursor only in key-ordered groups (handed out
                # ahead of a message waiting for its key).
                if offset < topic.log.next_offset:
                    sp = saved.pending[offset]
                    p = gt.pending[offset] = Pending(None, sp.deliveries, 0.0, key_known=False)
                    p.dead_letter_from = sp.dead_letter_from
                    restored.append((gt, offset, p))
                    if offset >= gt.cursor:
                        gt.ahead.add(offset)
        self._settle_published_dead_letters([r for r in restored if r[2].dead_letter_from is not None])
        for gt, offset, p in restored:
            if gt.pending.get(offset) is p:
                self._make_ready(gt, offset, p)

    def pending_due(self, gt: GroupTopic, now: float, wall_ms: int) -> dict[int, tuple[int, int]]:
        """Cluster mode (docs/cluster.md §10): every pending message of
        ``gt`` as ``offset -> (deadline, deliveries)``, the deadline in
        wall-clock milliseconds (so that another node can resume it), 0 for
        one waiting for a member now."""
        out: dict[int, tuple[int, int]] = {}
        for offset, p in gt.pending.items():
            if p.queued or (p.member is None and p.deadline <= now):
                due = 0
            else:
                due = wall_ms + max(0, round((p.deadline - now) * 1000))
            out[offset] = (due, p.deliveries)
        return out

    def resume_at(
        self, gt: GroupTopic, cursor: int, pending: Mapping[int, tuple[int, int]], now: float, wall_ms: int
    ) -> None:
        """Cluster mode: take over ``gt``'s position as another node saved it,
        before anything is handed out here. The saved cursor is kept as it
        is (never moved back: the copy of the topic may still be behind it,
        and dispatch waits for it); a pending message whose deadline has
        passed is ready at once, the others when their deadline comes."""
        gt.cursor = cursor
        gt.pending.clear()
        gt.ready.clear()
        gt.ahead.clear()
        for offset in sorted(pending):
            due_ms, deliveries = pending[offset]
            p = gt.pending[offset] = Pending(None, deliveries, 0.0, key_known=False)
            if offset >= cursor:
                gt.ahead.add(offset)  # key-ordered groups hand out past the cursor
            if due_ms <= wall_ms:
                self._make_ready(gt, offset, p)
            else:
                p.deadline = now + (due_ms - wall_ms) / 1000
                self._timer(p.deadline, gt, offset, offset)
        self.version += 1

    def _settle_published_dead_letters(self, waiting: list[tuple[GroupTopic, int, Pending]]) -> None:
        """Messages a crash caught being dead-lettered: settled if their dead
        letter is in the dead-letter topic, else dead-lettered (again) at
        their next turn, since their count has reached max_deliver."""
        if not waiting:
            return
        dlq = self.manager.router.topics.get(self.manager.dead_letter_topic(self.config.dead_letter))
        wanted = {(gt.topic.name, offset) for gt, offset, _ in waiting}
        start = min(p.dead_letter_from or 0 for _, _, p in waiting)
        found = find_dead_letters(dlq.log, self.name, wanted, start) if dlq is not None else set()
        for gt, offset, p in waiting:
            p.dead_letter_from = None
            if (gt.topic.name, offset) in found:
                del gt.pending[offset]
                self.dead_lettered += 1
        self.manager.logger.info(
            "group recovered dead letters in flight",
            group=self.name,
            already_published=len(found),
            to_publish=len(waiting) - len(found),
        )

    def _oldest_unsettled_us(self) -> int | None:
        """When the oldest message the group has not settled was published
        (handed out or not yet), µs; None when there is none. Reads one
        stored batch per topic."""
        oldest: int | None = None
        for gt in self.topics.values():
            offset = min(gt.pending) if gt.pending else None
            if gt.cursor < gt.topic.visible_next and (offset is None or gt.cursor < offset):
                offset = gt.cursor
            if offset is None:
                continue
            try:
                batch = gt.batch_at(offset)
            except DataLoss:
                continue
            if batch is not None and (oldest is None or batch.timestamp < oldest):
                oldest = batch.timestamp
        return oldest

    def statistics(self, detail: bool = False) -> dict[str, Any]:
        """The group's figures (with the age of its oldest unsettled
        message); ``detail`` (an inspection of this group): each member's too."""
        config = self.config
        doc = self._summary(config)
        oldest = self._oldest_unsettled_us()
        doc["oldest_unacked_age_ms"] = None if oldest is None else max(0, (time.time_ns() // 1000 - oldest) // 1000)
        if detail:
            doc["member_list"] = [
                {
                    "client": who.client[:64],
                    "peer": who.peer,
                    "sub_id": m.sub.sub_id,
                    "in_flight": m.unacked,
                    "prefetch": m.max_ack_pending,
                    "delivered": m.delivered,
                    "acked": m.acked,
                }
                for m in self.members[:MAX_LISTED_MEMBERS]
                for who in (m.sub.subscriber.describe(),)
            ]
            doc["members_omitted"] = max(0, len(self.members) - MAX_LISTED_MEMBERS)
        return doc

    def _summary(self, config: GroupConfig) -> dict[str, Any]:
        return {
            "group": self.name,
            "pattern": self.pattern,
            "config": {
                "ack_wait_ms": round(config.ack_wait * 1000),
                "max_deliver": config.max_deliver,
                "backoff_ms": [round(b * 1000) for b in config.backoff],
                "backoff_jitter_pct": round(config.backoff_jitter * 100),
                "max_ack_pending": config.max_ack_pending,
                "dead_letter": config.dead_letter,
                "ordering": config.ordering or "none",
            },
            "members": len(self.members),
            # Handed to members and unsettled, and how many they may hold
            # together (the sum of their max_ack_pending).
            "in_flight": sum(m.unacked for m in self.members),
            "prefetch": sum(m.max_ack_pending for m in self.members),
            "pending": sum(len(gt.pending) for gt in self.topics.values()),
            # Published and not handed out yet.
            "backlog": sum(max(0, gt.topic.visible_next - gt.cursor) for gt in self.topics.values()),
            "delivered": self.delivered,
            "redelivered": self.redelivered,
            "acked": self.acked,
            "termed": self.termed,
            "dead_lettered": self.dead_lettered,
            "topics": {
                gt.topic.name: {
                    "cursor": gt.cursor,
                    "pending": len(gt.pending),
                    "backlog": max(0, gt.topic.visible_next - gt.cursor),
                }
                for gt in self.topics.values()
            },
        }


def fair_shares(count: int, rooms: list[int]) -> list[int]:
    """Split ``count`` messages across members with these rooms, as evenly
    as the rooms allow and never above one: water-filling, every member
    takes up to a common level and one with less room all it can. What an
    even split leaves over goes one each to the first in order (the turn
    order) with room to spare."""
    n = len(rooms)
    level = max(rooms, default=0)
    used = 0  # the rooms of the members already full below the level
    for i, room in enumerate(sorted(rooms)):
        if used + room * (n - i) > count:
            level = (count - used) // (n - i)
            break
        used += room
    shares = [min(room, level) for room in rooms]
    left = count - sum(shares)
    for i, room in enumerate(rooms):
        if left <= 0:
            break
        if room > shares[i]:
            shares[i] += 1
            left -= 1
    return shares


def record_key(record: bytes) -> str | None:
    """A record's ``key`` header, reading only its headers block."""
    headers = record_headers(record)
    return headers.get(KEY_HEADER) if headers else None
