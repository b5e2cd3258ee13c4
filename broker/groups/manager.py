"""Every consumer group of one broker, and the one task that runs them.

Counted before sent (protocol.md, "Consumer groups"): with persistent
group state (file storage) every hand-out and dead letter is recorded in
the groups' journal (broker/storage/groupjournal.py) before it happens,
so delivery counts and dead letters hold across kill -9. Records go to the
OS at the end of each dispatch pass; with ``sync`` the hand-outs also wait
for the fsync covering them (one per round for all groups, in a worker
thread, the way the log's group commit holds PUBACKs). Each group that
changed is snapshotted into the journal at most every ``persist_interval``
seconds (acks reach the disk this way), and at shutdown.

In cluster mode the groups' state is the cluster's, not this node's: a
``SharedGroupState`` (broker/cluster/groupstate.py) admits groups only for
the topics this node owns, loads a group's saved state before it
dispatches, holds every hand-out until its count is saved in etcd, and
evicts the groups of a topic this node stops owning (``evict``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from pybroker.protocol import AckKind, StartKind, partition_topic, pattern_error

from ..logs import get_logger
from ..storage.fileops import REAL, FileOps
from ..storage.groupjournal import FileGroupState, GroupState, MemoryGroupState
from ..storage.groupstate import encode_dead_lettering, encode_delivered, encode_removed, encode_snapshot
from .config import GroupConfig
from .group import Group, GroupTopic, Member, Pending

if TYPE_CHECKING:
    from ..router import Router, Subscription, Topic


class SharedGroupState(Protocol):
    """Group state kept outside this node (cluster mode, docs/cluster.md §10)."""

    def admit(self, name: str, pattern: str) -> None:
        """May group ``name`` reading ``pattern`` be run here? NotOwnerError
        (another node owns its topic), ValueError (not in this mode)."""

    def created(self, group: Group) -> None:
        """A group was made here: its saved state is to be loaded first."""

    def attached(self, group: Group, topic: str) -> None:
        """A group met a topic after it was made: its saved state there is
        to be loaded before it goes on."""

    def may_dispatch(self, group: Group) -> bool:
        """Whether ``group`` may time out and hand out messages now."""

    def hold(self, group: Group, topic: str, send: Callable[[], None]) -> None:
        """Send a hand-out from ``topic`` once the state that counts it is saved."""

    def deleted(self, name: str) -> None:
        """Group ``name`` was deleted here: its saved state goes too."""

    async def run(self) -> None:
        """Save what changed, follow ownership; until cancelled."""


class GroupManager:
    """Groups by name, their membership and dispatch; their saved state in
    ``state`` (a journal in ``state_dir``, or nothing)."""

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
        self.logger: Any = get_logger(component="groups")
        self.state: GroupState = (
            FileGroupState(state_dir, self.logger, ops) if state_dir is not None else MemoryGroupState()
        )
        self._persisted: dict[str, int] = {}
        self.groups: dict[str, Group] = {}
        self.timer_ids = itertools.count()
        self._wake = trio.Event()
        # Records of this dispatch pass, written at its end.
        self._records = bytearray()
        # Hand-outs and dead letters whose records are not durable yet, in
        # order. Bounded: a hand-out counts against its member's
        # max_ack_pending, a dead letter is one of the group's pending messages.
        self._held: list[Callable[[], None]] = []
        self._writer_wake = trio.Event()
        #: Cluster mode: the groups' state in etcd (None on a single node).
        self.shared: SharedGroupState | None = None
        #: Cluster mode: hands a dead letter to the node that owns its topic
        #: (topic, msg-id, batch, done), broker/cluster/handoff.py.
        self.hand_off: Callable[[str, str, bytes, Callable[[], None]], None] | None = None

    @property
    def broken(self) -> bool:
        """The saved state cannot be written: hand-outs wait until a new
        generation (a checkpoint of everything) is written and fsynced."""
        return self.state.broken

    def dead_letter_topic(self, name: str) -> str:
        """Where dead letters to ``name`` go: the topic, or partition 0 of
        a partitioned one (protocol.md, "Partitioned topics"): one place,
        so that a restart finds what it dead-lettered where it looks."""
        return partition_topic(name, 0) if self.router.store.partition_count(name) else name

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
        max_ack_pending: int | None = None,
    ) -> Member:
        """Add ``sub`` to group ``name``, creating it with ``config``;
        ValueError if the group exists with another pattern. The member's
        prefetch is ``max_ack_pending`` if it named one, else the group's."""
        group, _ = self.create(name, pattern, config, start, start_value)
        member = group.add_member(sub, max_ack_pending)
        self.wake()
        return member

    def create(
        self, name: str, pattern: str, config: GroupConfig, start: StartKind, start_value: int
    ) -> tuple[Group, bool]:
        """Group ``name``, created with these settings and start unless it
        exists (then they are ignored), and whether it was created now;
        ValueError if it exists with another pattern. A group created
        without members (GROUPS create) keeps its position from now on:
        what it reads waits for its first member."""
        if self.shared is not None:
            self.shared.admit(name, pattern)  # (may evict a stale copy of the group first)
        group = self.groups.get(name)
        created = group is None
        if group is None:
            if pattern_error(pattern):
                raise ValueError(f"bad pattern {pattern!r}")
            group = self.groups[name] = Group(self, name, pattern, config, start, start_value)
            for topic in self.router.topics.values():
                if group.matches(topic):
                    group.attach(topic)
                    topic.groups.append(group)
            if self.shared is not None:
                self.shared.created(group)
        elif group.pattern != pattern:
            raise ValueError(f"group {name!r} reads {group.pattern!r}, not {pattern!r}")
        if self.state.persistent and name not in self._persisted:
            # Saved before it hands anything out: its records mean nothing
            # without the settings and start its snapshot carries.
            self._append(encode_snapshot(group.snapshot()))
            self._persisted[name] = group.version
        return group, created

    def delete(self, name: str) -> None:
        """Forget a group with no members (KeyError if unknown, ValueError if in use)."""
        group = self.groups[name]
        if group.members:
            raise ValueError(f"group {name!r} has {len(group.members)} members")
        del self.groups[name]
        if self.shared is not None:
            self.shared.deleted(name)
        if self._persisted.pop(name, None) is not None:
            self._append(encode_removed(group.name_bytes))
        for gt in group.topics.values():
            gt.topic.groups = [g for g in gt.topic.groups if g is not group]

    def evict(self, name: str, tell: Callable[[Member, str], None]) -> None:
        """Cluster mode: this node no longer runs group ``name`` (another
        node owns its topic now). Its members are told (``tell``: a
        NOT_OWNER on their sub_id, so that clients move to the owner) and
        let go; what they hold unsettled is the next owner's to redeliver.
        The group is forgotten here; it is loaded again if it comes back."""
        group = self.groups.pop(name, None)
        if group is None:
            return
        for member in group.members:
            member.active = False  # held deliveries are not sent
            for gt in group.topics.values():
                tell(member, gt.topic.name)
        group.members = []
        for gt in group.topics.values():
            gt.topic.groups = [g for g in gt.topic.groups if g is not group]
        self.logger.info("group evicted", group=name)

    def topic_created(self, topic: Topic) -> None:
        for group in self.groups.values():
            if group.matches(topic):
                group.attach(topic, created_now=True)
                topic.groups.append(group)
                group.version += 1  # its cursor there is saved with the next snapshot
                if self.shared is not None:
                    self.shared.attached(group, topic.name)

    def topic_deleted(self, topic: Topic) -> None:
        """A deleted topic: every group reading it lets it go, with what was
        pending there (settled by the deletion); members are told."""
        for group in topic.groups:
            group.detach(topic)
        topic.groups = []
        self.wake()

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
        shared = self.shared
        for group in list(self.groups.values()):
            if shared is not None and not shared.may_dispatch(group):
                continue  # its state is not loaded (or not ours) yet: timers wait too
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
        """Send a GROUP_DELIVER once the journal (or etcd) has counted it."""
        if self.shared is not None:
            self.shared.hold(group, topic.name, partial(_send, member, topic, base, timestamp, deliveries, batch))
            return
        if not self.state.persistent:
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
        if not self.state.persistent:
            group._try_dead_letter(gt, offset, p, timestamp, record, now)
            return
        dlq = self.router.topics.get(self.dead_letter_topic(group.config.dead_letter))
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
        self.state.append(data)
        if self.state.broken:
            self._writer_wake.set()  # its retry: a new checkpoint

    # -- saving and loading -------------------------------------------------

    def load(self) -> None:
        """Recreate the groups saved (after the log's recovery) and start a
        new journal generation with all of them; the files read are deleted
        once it is durable."""
        if not self.state.persistent:
            return
        saved = self.state.read()
        if saved.problems:
            # Written whole before anything relies on them: a newer file that
            # does not read is a checkpoint cut short, anything else is damage
            # from outside. Say so, keep serving; such files are left in place
            # until a newer journal supersedes them.
            self.logger.error("unreadable group state ignored", problems=saved.problems)
        for name, state in saved.groups.items():
            try:
                group = self._group_from(state.doc)
            except (ValueError, KeyError, TypeError) as exc:
                self.logger.error("unreadable group state ignored", group=name, problems=[repr(exc)])
                continue
            self.groups[group.name] = group
            for topic in self.router.topics.values():
                if group.matches(topic):
                    group.attach(topic)
                    topic.groups.append(group)
            group.restore(state.topics)
            self.logger.info(
                "group recovered",
                group=group.name,
                pending=sum(len(gt.pending) for gt in group.topics.values()),
            )
        if saved.dropped_bytes:
            self.logger.info("group journal tail dropped", bytes=saved.dropped_bytes)
        if self._checkpoint():
            # Durable before anything listens. (A failure leaves the groups
            # waiting for the writer's next checkpoint, not the broker down.)
            self.state.sync_now()

    def _group_from(self, snap: dict[str, Any]) -> Group:
        config = GroupConfig.from_doc(snap["config"])
        start, start_value = StartKind(snap["start"]), int(snap["start_value"])
        return Group(self, str(snap["name"]), str(snap["pattern"]), config, start, start_value)

    def _checkpoint(self) -> bool:
        """Start the next generation with every group's snapshot (written to
        the OS). False if it could not be."""
        if not self.state.checkpoint(g.snapshot() for g in self.groups.values()):
            return False
        self._persisted = {name: g.version for name, g in self.groups.items()}
        return True

    def snapshot_changed(self) -> None:
        """Snapshot every group that changed into the journal (acks reach the
        disk this way), or start the next generation once it has grown, or
        after a failure."""
        if self.state.checkpoint_due():
            self._checkpoint()
            return
        changed = [g for name, g in self.groups.items() if self._persisted.get(name) != g.version]
        if changed:
            self._append(b"".join(encode_snapshot(g.snapshot()) for g in changed))
            for g in changed:
                self._persisted[g.name] = g.version

    async def sync_round(self) -> None:
        """Make what the journal has been given durable, then release the
        hand-outs it counts: the writer task's work. Nothing is released
        while the journal is broken (a new checkpoint mends it first)."""
        held, self._held = self._held, []
        if await self.state.sync():
            _release(held)
        else:
            self._held[:0] = held  # not released: their counts are not durable

    def persist_now(self) -> None:
        """Synchronous final snapshot, at shutdown; the journal is closed."""
        if not self.state.persistent:
            return
        self.snapshot_changed()
        self._held = []  # never sent: counted, so a restart over-counts them by one
        self.state.close()

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
            if self.state.persistent:
                nursery.start_soon(self._writer)
            if self.shared is not None:
                nursery.start_soon(self.shared.run)
            await self._dispatch_loop(task_status)

    async def _dispatch_loop(self, task_status: Any) -> None:
        task_status.started()
        while True:
            shared = self.shared
            deadlines = [
                d
                for g in self.groups.values()
                if (d := g.next_deadline) is not None and (shared is None or shared.may_dispatch(g))
            ]
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
