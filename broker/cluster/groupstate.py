"""Consumer-group state in etcd, run by each topic's owner (docs/cluster.md §10).

A group's dispatch runs on the node that owns its topic (partition 0 of a
partitioned topic), and only there: a group SUBSCRIBE anywhere else is
refused with NOT_OWNER naming the owner (``admit``), which clients follow
as they follow it for a PUBLISH. A group over a partitioned topic reads
every partition from this node's copies (every node follows every
partition), wherever each partition's appends are committed. The state of
one (group, partition) is one key, ``grp/{group}/{topic}/{partition}``::

    {"v": 1, "cursor": n, "pending": {"offset": [deadline_ms, deliveries]},
     "group": {"pattern", "start", "start_value", "config": {...}}}

with deadlines in wall-clock milliseconds (0: due now), so that the next
owner can resume them, and the group's settings, so that they survive
with it.

- **Loaded before anything is handed out.** A group made on this node
  (its first member joined here) reads its key first; until then, and
  until this node's copy of the topic has caught up with the saved cursor
  and pending offsets, it neither dispatches nor runs its timers. The
  saved cursor is taken as it is: cursors never move backwards.
- **Counted before sent.** Every hand-out is held until a transaction has
  saved the state that counts it (protocol.md: ``deliveries`` is never
  lower than the number of GROUP_DELIVERs sent). Changes are gathered for
  ``window`` seconds after the first held hand-out (acks and naks alone:
  for ``interval``) and written in one transaction per topic, which
  compares the owner key's create revision (the epoch of the topic, or of
  its partition 0) and each group key's mod revision as last written; a
  key whose value did not change is not written. Held hand-outs go out once it
  succeeded and only while the owner's lease holds (§6).
- **Fenced.** A transaction refused on its compares means another node
  owns the topic (or wrote the key): the topic's groups are evicted here,
  their held hand-outs dropped unsent, and their members told NOT_OWNER on
  their sub_id. A transaction whose answer was lost keeps its hand-outs
  held; the next one either succeeds or, refused only because the lost
  one did apply (the key holds exactly what it wrote), adopts it.
- **Ownership lost.** When this node stops owning a topic (a hand-over, a
  fenced commit, a lost lease) the topic's groups are saved once more if
  the epoch still holds, then evicted as above. A hand-over saves them
  before the owner key goes (``PartitionOwner.before_release``), and a
  graceful stop saves every group before the partitions are handed over
  (``leave``).

A group whose pattern has wildcards is no topic's: the node coordinating
it (coordinator.py) runs it, its writes fenced on the coordinator key's
create revision, with a part per matching topic (topics met later are
added, their keys read first). A dead letter whose topic another node
owns is handed to that node through etcd (handoff.py). GROUPS delete (on
the owner) deletes the keys too, fenced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from pybroker.protocol import ErrorCode, RefKind, StartKind, matches, partition_topic

from ..groups.config import GroupConfig
from ..inboxes import has_wildcard
from ..logs import get_logger
from ..storage.errors import NotOwnerError
from .coordinator import Coordinators, GroupCoordinator
from .etcd import Compare, Delete, EtcdError, Put
from .partition import PartitionOwner

if TYPE_CHECKING:
    from ..groups.group import Group, Member
    from ..groups.manager import GroupManager
    from .store import ClusterStore

#: The format of a group key's value.
FORMAT = 1
#: Seconds hand-outs are gathered into one transaction, and how often
#: changes without hand-outs (acks, naks) are saved.
DEFAULT_WINDOW = 0.005
DEFAULT_INTERVAL = 0.2
#: Group keys written by one transaction (a compare and a put each, and
#: the epoch's compare, stay under etcd's 128 operations per transaction).
GROUPS_PER_TXN = 60
#: How often ownership is checked besides the ownership manager's changes.
RECHECK = 1.0
#: Keys of a group over several topics read at its load (one per topic and
#: partition it reads; more are read one by one as the topics are met).
MAX_KEYS_READ = 10_000
#: Backoff of a group whose saved state could not be read.
LOAD_RETRY_MIN = 0.1
LOAD_RETRY_MAX = 2.0
#: A graceful stop's bound on the final save.
LEAVE_TIMEOUT = 5.0


@attrs.define(eq=False)
class _Part:
    """One topic a group reads (its topic, or one partition of it) and its key."""

    topic: str
    key: bytes
    #: The key's mod revision as last written or read (0: absent).
    mod_revision: int = 0
    #: The value last written or read (a part whose value is unchanged and
    #: holds no hand-outs is not written again).
    saved: bytes | None = None
    #: Offsets the topic's copy must reach before dispatch (from the saved state).
    needs: int = 0
    #: Hand-outs waiting for the transaction that counts them.
    held: list[Callable[[], None]] = attrs.field(factory=list)
    #: The value of a transaction whose answer was lost (adopted if it applied).
    unsure: bytes | None = None
    #: A topic a group over several topics met after it was loaded: its key
    #: is being read (the group waits for it).
    loading: bool = False


#: What fences a group's writes: its topic's owner (partition 0 of a
#: partitioned topic), or the coordinator of a group over several topics.
EpochHolder = PartitionOwner | GroupCoordinator


@attrs.define(eq=False)
class _Bound:
    """One group run here, under one epoch of its topic's owner (partition
    0 of a partitioned topic) or of its coordinator (a pattern with
    wildcards), with a part per topic it reads."""

    topic: str
    owner: EpochHolder
    parts: dict[str, _Part]
    #: The group's version last saved (-1: to be saved).
    saved_version: int = -1
    loaded: bool = False

    @property
    def held(self) -> bool:
        return any(part.held for part in self.parts.values())


@attrs.frozen
class _Item:
    """One part's write in a save: the value and the hand-outs it counts."""

    name: str
    bound: _Bound
    part: _Part
    value: bytes
    held: list[Callable[[], None]]


class ClusterGroupState:
    """The ``SharedGroupState`` of a cluster node (broker/groups/manager.py)."""

    def __init__(
        self,
        store: ClusterStore,
        groups: GroupManager,
        *,
        window: float = DEFAULT_WINDOW,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.store = store
        self.groups = groups
        self.window = window
        self.interval = interval
        self._bound: dict[str, _Bound] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._leaving = False
        self._flushing = trio.Lock()
        #: Transactions written and refused, for the record (and the tests).
        self.writes = 0
        self.refused = 0
        #: Fault hook: awaited before each transaction (raise to fail it).
        self.before_write: Callable[[str], Any] | None = None
        self.logger: Any = get_logger(component="cluster-groups")
        #: Groups over several topics this node coordinates (coordinator.py).
        self.coordinators = Coordinators(store)
        store.before_leave = self.leave

    # -- admission ------------------------------------------------------------

    def _owner(self, topic: str) -> PartitionOwner | None:
        manager = self.store.manager
        owner = manager.local(*self.store.address(topic)) if manager is not None else None
        if owner is None or not owner.accepting or self._leaving:
            return None
        return owner

    def _owner_addr(self, topic: str) -> str:
        """Where to send a member: the owner as this node sees it (or, from a
        node cut off from etcd, another member: the store's NOT_OWNER rule)."""
        return self.store._not_owner(topic).owner

    def admit(self, name: str, pattern: str) -> None:
        if has_wildcard(pattern):
            coordinator = self.coordinators.admit(name, pattern) if not self._leaving else None
            if coordinator is None:
                raise NotOwnerError(f"group {name!r}: this node is stopping", topic=pattern)
            bound = self._bound.get(name)
            if bound is not None and bound.owner is not coordinator:
                self._evict(bound, name, "an earlier term of its coordination")
            manager = self.store.manager
            registered = list(manager.topics.topics) if manager is not None else []
            for topic in registered:
                for each in self._topics_of(topic):
                    if matches(pattern, each):
                        self.groups.router.topic(each)  # followed here: the group reads it
            return
        owner = self._owner(pattern)
        if owner is None:
            # A group made before anything was published: the topic is
            # registered so that it gets an owner, where the member follows.
            self.store.register(pattern)
            refused = self.store._not_owner(pattern)
            raise NotOwnerError(
                f"group {name!r}: {refused.message}", topic=pattern, owner=refused.owner, owner_url=refused.owner_url
            )
        bound = self._bound.get(name)
        if bound is not None and bound.owner is not owner:
            self._evict(bound, name, "an earlier term of the topic")  # then made again, and loaded
        for topic in self._topics_of(pattern):
            self.groups.router.topic(topic)  # the group follows it from its creation

    def _topics_of(self, pattern: str) -> list[str]:
        """What a group over ``pattern`` reads: its partitions, or itself."""
        count = self.store.partition_count(pattern)
        return [partition_topic(pattern, p) for p in range(count)] if count else [pattern]

    def created(self, group: Group) -> None:
        keys = self.store.settings.keys
        owner: EpochHolder | None
        if has_wildcard(group.pattern):
            owner = self.coordinators.local(group.name)
            topics = [gt.topic.name for gt in group.topics.values()]
        else:
            owner = self._owner(group.pattern)
            topics = self._topics_of(group.pattern)
        assert owner is not None  # admitted just before, with no await between
        parts = {t: _Part(t, keys.group(group.name, *self.store.address(t))) for t in topics}
        bound = self._bound[group.name] = _Bound(group.pattern, owner, parts)
        # A hand-over saves the groups before the owner key goes (their
        # transactions are fenced on it): acks since the last save are kept.
        owner.before_release = self.flush
        if self._nursery is not None:
            self._nursery.start_soon(self._load, group, bound)

    # -- dispatch ------------------------------------------------------------------

    def attached(self, group: Group, topic: str) -> None:
        """A group over several topics met one more (made, or first seen
        here, after the group): its saved state there is read before the
        group goes on."""
        bound = self._bound.get(group.name)
        if bound is None or topic in bound.parts:
            return
        part = bound.parts[topic] = _Part(topic, self.store.settings.keys.group(group.name, *self.store.address(topic)))
        if bound.loaded and self._nursery is not None:
            part.loading = True
            self._nursery.start_soon(self._load_part, group, bound, part)

    async def _load_part(self, group: Group, bound: _Bound, part: _Part) -> None:
        pause = LOAD_RETRY_MIN
        etcd = self.store.etcd
        while self._bound.get(group.name) is bound:
            try:
                with trio.fail_after(etcd.timeout * 2):
                    kv = await etcd.get(part.key)
                break
            except (EtcdError, TimeoutError) as exc:
                self.logger.info("group state not read", group=group.name, topic=part.topic, error=repr(exc))
                await trio.sleep(pause)
                pause = min(LOAD_RETRY_MAX, pause * 2)
        else:
            return
        if kv is not None:
            part.mod_revision, part.saved = kv.mod_revision, kv.value
            try:
                self._apply(group, part, kv.value)
            except (ValueError, KeyError, TypeError) as exc:
                self.logger.error("unreadable group state ignored", group=group.name, topic=part.topic, error=repr(exc))
        part.loading = False
        self.groups.wake()

    def may_dispatch(self, group: Group) -> bool:
        bound = self._bound.get(group.name)
        if bound is None or not bound.loaded or self._leaving or not bound.owner.accepting:
            return False
        for part in bound.parts.values():
            if part.loading:
                return False
            if part.needs:
                topic = self.groups.router.topics.get(part.topic)
                if topic is None or topic.visible_next < part.needs:
                    return False  # the copy is behind what the last owner handed out
                part.needs = 0
        return True

    def hold(self, group: Group, topic: str, send: Callable[[], None]) -> None:
        bound = self._bound.get(group.name)
        part = bound.parts.get(topic) if bound is not None else None
        if part is None:
            return  # evicted meanwhile: never sent
        part.held.append(send)
        self._wake.set()

    def deleted(self, name: str) -> None:
        bound = self._bound.pop(name, None)
        if bound is not None and bound.loaded and self._nursery is not None:
            self._nursery.start_soon(self._delete_keys, name, bound)

    async def _delete_keys(self, name: str, bound: _Bound) -> None:
        try:
            await self._delete_key(name, bound)
        finally:
            if isinstance(bound.owner, GroupCoordinator):
                await self.coordinators.release(name)  # (after: its deletes are fenced on it)

    async def _delete_key(self, name: str, bound: _Bound) -> None:
        """GROUPS delete: the group's keys go, fenced like every write (a
        group of the same name made again meanwhile and already saved keeps
        its keys: their mod revisions moved)."""
        etcd = self.store.etcd
        own = bound.owner.own_key
        parts = list(bound.parts.values())
        for start in range(0, len(parts), GROUPS_PER_TXN):
            chunk = parts[start : start + GROUPS_PER_TXN]
            compares = [Compare.create_revision(own, "==", bound.owner.epoch)]
            compares += [Compare.mod_revision(part.key, "==", part.mod_revision) for part in chunk]
            try:
                with trio.fail_after(etcd.timeout * 2):
                    result = await etcd.txn(compares, [Delete(part.key) for part in chunk])
            except (EtcdError, TimeoutError, OSError) as exc:
                self.logger.warning("deleted group's state not removed", group=name, error=repr(exc))
                return
            if not result.succeeded:
                self.logger.warning("deleted group's state not removed: fenced", group=name, topic=bound.topic)
                return

    # -- loading ---------------------------------------------------------------------

    async def _load(self, group: Group, bound: _Bound) -> None:
        """Read the group's saved state, every part's key in one range read
        (retried while this is its binding)."""
        pause = LOAD_RETRY_MIN
        etcd = self.store.etcd
        keys = self.store.settings.keys
        if has_wildcard(bound.topic):
            prefix, limit = keys.groups_prefix(group.name), MAX_KEYS_READ
        else:
            prefix, limit = keys.group_prefix(group.name, self.store.address(bound.topic)[0]), len(bound.parts) + 1
        while self._bound.get(group.name) is bound:
            try:
                with trio.fail_after(etcd.timeout * 2):
                    found = await etcd.get_prefix(prefix, limit=limit)
                break
            except (EtcdError, TimeoutError) as exc:
                self.logger.info("group state not read", group=group.name, error=repr(exc), retry_in=pause)
                await trio.sleep(pause)
                pause = min(LOAD_RETRY_MAX, pause * 2)
        else:
            return
        if self._bound.get(group.name) is not bound:
            return
        by_key = {part.key: part for part in bound.parts.values()}
        loaded = 0
        for kv in found.kvs:
            part = by_key.get(kv.key)
            if part is None:
                continue  # not a partition the topic has now
            part.mod_revision = kv.mod_revision
            part.saved = kv.value
            loaded += 1
            try:
                self._apply(group, part, kv.value)
            except (ValueError, KeyError, TypeError) as exc:
                # Written whole by an owner: a value that does not read came
                # from outside. That part starts as the SUBSCRIBE says.
                self.logger.error("unreadable group state ignored", group=group.name, topic=part.topic, error=repr(exc))
        bound.loaded = True
        self.logger.info("group loaded", group=group.name, topic=bound.topic, found=loaded, epoch=bound.owner.epoch)
        self.groups.wake()

    def _apply(self, group: Group, part: _Part, value: bytes) -> None:
        doc = json.loads(value)
        if doc.get("v") != FORMAT:
            raise ValueError(f"format {doc.get('v')!r}")
        cursor = int(doc["cursor"])
        pending = {int(o): (int(d), int(n)) for o, (d, n) in doc["pending"].items()}
        if cursor < 0 or any(o < 0 or n < 0 for o, (_, n) in pending.items()):
            raise ValueError("negative offsets or counts")
        saved = doc.get("group") or {}
        if "config" in saved:
            group.config = GroupConfig.from_doc(saved["config"])
            group.start, group.start_value = StartKind(int(saved["start"])), int(saved["start_value"])
        topic = self.groups.router.topics.get(part.topic)
        gt = group.topics.get(topic) if topic is not None else None
        if gt is None:
            raise ValueError(f"the group does not follow {part.topic!r}")
        group.resume_at(gt, cursor, pending, trio.current_time(), time.time_ns() // 1_000_000)
        part.needs = max([cursor, *(o + 1 for o in pending)])

    # -- saving ------------------------------------------------------------------------

    def _encode(self, group: Group, part: _Part) -> bytes | None:
        topic = self.groups.router.topics.get(part.topic)
        gt = group.topics.get(topic) if topic is not None else None
        if gt is None:
            return None
        pending = group.pending_due(gt, trio.current_time(), time.time_ns() // 1_000_000)
        config = group.config
        doc = {
            "v": FORMAT,
            "cursor": gt.cursor,
            "pending": {str(o): [d, n] for o, (d, n) in sorted(pending.items())},
            "group": {
                "pattern": group.pattern,
                "start": int(group.start),
                "start_value": group.start_value,
                "config": config.to_doc(),
            },
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    async def flush(self) -> None:
        """Save every group that changed (one transaction per topic, at once).
        One flush at a time: two at once would write a key with the same
        expected revision, and the second, refused, would evict the group."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        work: dict[EpochHolder, list[_Item]] = {}
        for name, bound in list(self._bound.items()):
            group = self.groups.groups.get(name)
            if group is None:
                del self._bound[name]  # deleted (GROUPS delete): nothing more to save
                continue
            if not bound.loaded or (group.version == bound.saved_version and not bound.held):
                continue
            # Saved as of this version unless a write fails (then -1 again).
            bound.saved_version = group.version
            for part in bound.parts.values():
                value = self._encode(group, part)
                if value is None or (value == part.saved and not part.held):
                    continue
                held, part.held = part.held, []
                work.setdefault(bound.owner, []).append(_Item(name, bound, part, value, held))
        if not work:
            return
        async with trio.open_nursery() as nursery:
            for owner, items in work.items():
                for start in range(0, len(items), GROUPS_PER_TXN):
                    nursery.start_soon(self._write, owner, items[start : start + GROUPS_PER_TXN])

    async def _write(self, owner: EpochHolder, items: list[_Item]) -> None:
        etcd = self.store.etcd
        compares = [Compare.create_revision(owner.own_key, "==", owner.epoch)]
        compares += [Compare.mod_revision(item.part.key, "==", item.part.mod_revision) for item in items]
        try:
            if self.before_write is not None:
                await self.before_write(owner.topic)
            with trio.fail_after(etcd.timeout * 2):
                result = await etcd.txn(compares, [Put(item.part.key, item.value) for item in items])
        except (EtcdError, TimeoutError, OSError) as exc:
            # Perhaps applied: the hand-outs stay held (not sent before their
            # counts are known to be saved); the next transaction decides.
            self.logger.warning("group state not saved", topic=owner.topic, error=repr(exc))
            for item in items:
                item.part.unsure = item.value
                item.part.held[:0] = item.held
                item.bound.saved_version = -1
            self._wake.set()
            return
        if result.succeeded:
            self.writes += 1
            sending = owner.owning
            for item in items:
                item.part.mod_revision = result.revision
                item.part.saved = item.value
                item.part.unsure = None
                if sending and self._bound.get(item.name) is item.bound:
                    for send in item.held:
                        send()
            return
        self.refused += 1
        await self._resolve_refused(owner, items)

    async def _resolve_refused(self, owner: EpochHolder, items: list[_Item]) -> None:
        """A refused transaction: fenced (another epoch, or another writer of
        a group key: its groups are evicted), or refused only because an
        earlier transaction whose answer was lost did apply (adopted: the
        changes are written again next time)."""
        etcd = self.store.etcd
        try:
            with trio.fail_after(etcd.timeout * 2):
                own = await etcd.get(owner.own_key)
                found = [await etcd.get(item.part.key) for item in items]
        except (EtcdError, TimeoutError, OSError):
            own, found = None, []
        fenced = own is None or own.create_revision != owner.epoch or not found
        for item, kv in zip(items, found or [None] * len(items)):
            part = item.part
            if not fenced and kv is not None and part.unsure is not None and kv.value == part.unsure:
                part.mod_revision = kv.mod_revision
                part.saved = kv.value
                part.unsure = None
                item.bound.saved_version = -1  # written again with what changed since
                part.held[:0] = item.held
                self._wake.set()
                continue
            why = "the owner epoch moved" if fenced else "another writer changed the group's key"
            self.logger.warning("group state refused: fenced", group=item.name, topic=part.topic, why=why)
            if self._bound.get(item.name) is item.bound:
                self._evict(item.bound, item.name, why)

    # -- ownership ----------------------------------------------------------------------

    def _evict(self, bound: _Bound, name: str, why: str) -> None:
        """Stop running group ``name`` here; its members are told NOT_OWNER."""
        if self._bound.get(name) is bound:
            del self._bound[name]
        for part in bound.parts.values():
            part.held = []  # counted (perhaps saved), never sent: redelivered by the owner
        addr = self.coordinators.where(name)[0] if has_wildcard(bound.topic) else self._owner_addr(bound.topic)

        def tell(member: Member, topic: str) -> None:
            subscriber = member.sub.subscriber
            refuse = getattr(subscriber, "refuse", None)  # a TCP session's outbox
            if refuse is None or not subscriber.accepting:
                return
            fields = {"topic": topic, "owner": addr} if addr else {"topic": topic}
            message = f"group {name!r}: this node no longer runs it ({why}); topic {topic!r} is " + (
                f"owned by {addr}" if addr else "without an owner here"
            )
            refuse(ErrorCode.NOT_OWNER, message, member.sub.sub_id, RefKind.SUBSCRIPTION, fields)

        self.groups.evict(name, tell)

    def _check(self) -> list[_Bound]:
        """The bindings whose topic this node no longer owns (or is handing over)."""
        gone = []
        manager = self.store.manager
        for name, bound in self._bound.items():
            current: EpochHolder | None
            if has_wildcard(bound.topic):
                current = self.coordinators.local(name)
            else:
                current = manager.local(*self.store.address(bound.topic)) if manager is not None else None
            if current is not bound.owner or not bound.owner.accepting:
                gone.append(bound)
        return gone

    async def _follow_ownership(self) -> None:
        while True:
            manager = self.store.manager
            with trio.move_on_after(RECHECK):
                if manager is not None:
                    await manager.changed()
                else:
                    await trio.sleep_forever()
            gone = self._check()
            if not gone:
                continue
            if any(b.owner.lost is None for b in gone):
                await self.flush()  # the last save, while the epoch may still hold
            for bound in gone:
                for name, b in list(self._bound.items()):
                    if b is bound:
                        self._evict(bound, name, "the topic's ownership moved")

    async def leave(self) -> None:
        """A graceful stop: dispatch no more and save every group once more,
        before the partitions are handed over (bounded)."""
        self._leaving = True
        with trio.move_on_after(LEAVE_TIMEOUT):
            await self.flush()
            # Another node may coordinate them at once (their state is saved).
            await self.coordinators.release_all()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = self.coordinators.nursery = nursery
            nursery.start_soon(self._follow_ownership)
            while True:
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                if any(b.held for b in self._bound.values()):
                    await trio.sleep(self.window)  # gather a window's hand-outs into one transaction
                await self.flush()
