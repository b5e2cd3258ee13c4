"""A node's commit rounds: the rounds its partitions close together become
one object and one etcd transaction (docs/cluster.md §5).

Each ``PartitionOwner`` still sequences its own partition: it hands its
closed rounds to ``RoundCommitter.submit`` in order, at most two out at
once; the second one's offsets follow the first's (``Slot.after``), its
object is PUT while the first's transaction is out, and its transaction
waits until the first is decided, so a partition's transactions go one
at a time, in order. When the first is not committed the second is
decided ``ChainBroken`` without being sent (its compare on the next
offset would be refused, which would mean the partition was lost). The
committer's runner takes every round waiting at that moment (a cluster
store commits all its topics' pending batches at once, so one sync's
rounds arrive together), one per partition and as many as one etcd
transaction may hold, and commits them as one *group*:

1. each partition's batches are laid out one run after another in one
   object ``data/{incarnation}/{round}``, PUT once with ``If-None-Match: *``;
2. one transaction compares, per partition, its epoch, its expected next
   offset and the object's tombstone, and writes its next offset, its index
   entry (naming its byte range of the object) and its msg-ids;
3. a refused transaction is read per partition: a partition whose epoch
   was replaced (or whose next offset moved, or whose object was
   tombstoned) is refused, and the others are sent again, still naming the
   same object, in a transaction without it;
4. a transaction whose answer was lost is resolved from the index: the
   transaction is atomic, so the first partition's entry at its offset
   says for all of them whether it committed (it names this object) or not
   (another object: that partition was taken over; no entry: the
   partitions whose epoch still holds are sent again).

The runner, not an owner's task, sends the group: an owner stopped
mid-commit (its partition handed over, lost) answers its round
OutcomeUnknown as before, and the other partitions' rounds go on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import attrs

from . import failpoints
from .entries import IndexEntry
from .etcd import EtcdError, EtcdUnavailable, Op, TxnResult
from .keys import object_name
from .objects import ObjectStoreError
from .outcomes import AppendError, AppendFailed, ChainBroken, OutcomeUnknown

if TYPE_CHECKING:
    from .partition import PartitionOwner, _Round

#: Tries at resolving a transaction whose outcome is unknown, and the pause
#: between them (each try is bounded by the etcd client's timeout).
RESOLVE_ATTEMPTS = 5
RESOLVE_PAUSE = 0.1
#: A round's PUT: tries in all, the pause before the second (doubling),
#: and the failures worth another try (0: unreachable or no answer).
PUT_ATTEMPTS = 3
PUT_PAUSE = 0.1
PUT_RETRY_STATUSES = frozenset({0, 409, 500, 502, 503, 504})
#: etcd bounds each of a transaction's lists (compares, success, failure)
#: at 128 operations by default (--max-txn-ops). A partition adds three
#: compares, three failure reads, and two writes plus one per msg-id.
MAX_TXN_OPS = 128
MAX_GROUP = MAX_TXN_OPS // 3
#: Bytes in one group's object beyond its first round (a round closes at
#: 8 MiB by default; this keeps an object, and a retried PUT, bounded).
MAX_GROUP_BYTES = 16 << 20
#: Named batches (``ids/`` entries, up to about 170 bytes each) in one
#: group beyond its first round, under etcd's 1.5 MiB per request.
MAX_GROUP_NAMED = 4096


class ObjectNames:
    """Names for one node's commit rounds: its incarnation (member lease
    id) and a round counter. Share one between the partitions of a node."""

    def __init__(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self.rounds = 0

    def next(self) -> str:
        self.rounds += 1
        return object_name(self.incarnation, self.rounds)


@attrs.define(eq=False)
class Slot:
    """One partition's round in a group."""

    owner: PartitionOwner
    round: _Round
    #: The partition's round before this one, when it was still out as
    #: this one was handed over: this one's offsets follow it, and its
    #: transaction waits for it to be decided.
    after: Slot | None = None
    #: The partition's round after this one, if handed over meanwhile.
    next: Slot | None = None
    entry: IndexEntry | None = None
    extra: list[Op] = attrs.field(factory=list)
    taken: bool = False
    outcome: AppendError | None = None
    decided: anyio.Event = attrs.field(factory=anyio.Event)
    #: Set once the round has its offsets (``entry``) or is decided.
    ready: anyio.Event = attrs.field(factory=anyio.Event)

    @property
    def writes(self) -> int:
        return 2 + (1 if self.round.named else 0)

    def decide(self, outcome: AppendError | None) -> None:
        if self.decided.is_set():
            return
        self.outcome = outcome
        self.decided.set()
        self.ready.set()
        self.owner.poke()
        if outcome is not None and self.next is not None:
            # Its offsets followed this round's: its compare on the next
            # offset would be refused, which would mean the partition lost.
            self.next.decide(
                ChainBroken(f"partition {self.owner.label}: not sent, the round before it was not committed ({outcome})")
            )

    def end(self) -> int | None:
        """The offset after this round while it is out (sequenced, not
        decided): where the partition's next round starts."""
        if self.decided.is_set() or self.entry is None:
            return None
        return self.entry.first + self.entry.count


class RoundCommitter:
    """Commits the rounds of a node's partitions, those waiting together as
    one group (one object, one transaction). ``run`` must be running (in a
    task group) for ``commit`` to return. ``groups`` and ``rounds`` count
    what was committed: their ratio is the rounds each object carried."""

    def __init__(self) -> None:
        self._waiting: list[Slot] = []
        self._wake = anyio.Event()
        #: Groups sent (one PUT each), rounds in them, PUTs tried again.
        self.groups = 0
        self.rounds = 0
        self.put_retries = 0

    def submit(self, owner: PartitionOwner, round_: _Round, after: Slot | None = None) -> Slot:
        """Hand ``owner``'s closed round over, to be committed with whatever
        else is waiting; ``after`` is the partition's round before it if
        that one is still out. The slot's ``decided`` is set once it is
        (``outcome`` None: acknowledged)."""
        slot = Slot(owner, round_, after)
        if after is not None:
            after.next = slot
            if after.decided.is_set() and after.outcome is not None:
                slot.decide(ChainBroken(f"partition {owner.label}: not sent, the round before it was not committed"))
                return slot
        self._waiting.append(slot)
        self._wake.set()
        return slot

    def withdraw(self, slot: Slot) -> bool:
        """Take a slot back that no group has taken yet: True if it was."""
        if slot.taken or slot not in self._waiting:
            return False
        self._waiting.remove(slot)
        return True

    async def commit(self, owner: PartitionOwner, round_: _Round) -> AppendError | None:
        """Commit ``owner``'s closed round with whatever else is waiting:
        None once acknowledged, else why not. Cancelled before its group
        is taken, the round is withdrawn; after, its group goes on."""
        slot = self.submit(owner, round_)
        try:
            await slot.decided.wait()
        finally:
            self.withdraw(slot)
        return slot.outcome

    async def run(self) -> None:
        """Send the waiting rounds as groups until cancelled; a group in
        flight then answers its rounds OutcomeUnknown, a round not yet
        sent AppendFailed."""
        try:
            async with anyio.create_task_group() as tg:
                while True:
                    while not self._waiting:
                        await self._wake.wait()
                        self._wake = anyio.Event()
                    # One more turn of the scheduler: the other owners woken by
                    # the same store sync reach ``commit`` and join this group.
                    await anyio.sleep(0)
                    tg.start_soon(self._commit_group, self._take())
        finally:
            waiting, self._waiting = self._waiting, []
            for slot in waiting:
                slot.taken = True  # (so that its owner does not look for it)
                slot.decide(AppendFailed(f"partition {slot.owner.label}: the node's committer stopped"))

    def _take(self) -> list[Slot]:
        """The first waiting round and those after it that still fit one
        transaction and the group's bytes, one per partition (a partition's
        later round goes in a later group); the rest wait for the next."""
        group: list[Slot] = []
        writes = size = named = 0
        seen: set[int] = set()  # owners with a round in this group, or one left waiting
        for slot in self._waiting:
            if slot.decided.is_set():
                slot.taken = True  # (decided while waiting: a broken chain) dropped
                continue
            if id(slot.owner) in seen:
                continue
            seen.add(id(slot.owner))
            if group and (
                len(group) == MAX_GROUP
                or writes + slot.writes > MAX_TXN_OPS
                or size + slot.round.size > MAX_GROUP_BYTES + group[0].round.size
                or named + slot.round.named > MAX_GROUP_NAMED + group[0].round.named
            ):
                continue
            group.append(slot)
            writes += slot.writes
            size += slot.round.size
            named += slot.round.named
            slot.taken = True
        self._waiting = [slot for slot in self._waiting if not slot.taken]
        return group

    async def _commit_group(self, group: list[Slot]) -> None:
        try:
            await self._write_and_commit(group)
        except Exception as exc:  # a fault between PUT and commit, or a bug: fail the rounds, go on
            for slot in group:
                if not slot.decided.is_set():
                    slot.owner.mark_stale()
                    unknown = OutcomeUnknown(f"commit round failed: {exc!r}")
                    unknown.__cause__ = exc
                    slot.decide(unknown)
        finally:
            for slot in group:
                if not slot.decided.is_set():  # cancelled during its PUT or transaction: it may have committed
                    slot.owner.mark_stale()
                    slot.decide(OutcomeUnknown(f"partition {slot.owner.label}: the node stopped mid-commit"))

    async def _write_and_commit(self, group: list[Slot]) -> None:
        live: list[Slot] = []
        parts: list[bytes] = []
        for slot in group:
            if slot.after is not None:
                await slot.after.ready.wait()  # sequenced (or decided) before this one
            if slot.decided.is_set():
                continue  # its chain broke meanwhile
            sequenced = await slot.owner.sequence(slot.round, slot.after.end() if slot.after is not None else None)
            if isinstance(sequenced, AppendError):
                slot.decide(sequenced)
            else:
                live.append(slot)
                parts.append(sequenced)
        if not live:
            return
        leader = live[0].owner
        names = leader.names
        assert names is not None  # set by acquire
        name = names.next()
        start = 0
        for slot, data in zip(live, parts, strict=True):
            slot.entry = slot.owner.entry_for(slot.round, name, start, len(data))
            slot.ready.set()
            start += len(data)
        if failpoints.ARMED:  # a test facility (failpoints.py): once per partition's round
            for slot in live:
                _hit("before-put", slot)
        data = b"".join(parts)
        try:
            if not await self._put(leader, name, data):
                failed = f"object {name} already exists: another writer holds this node's name"
                for slot in live:
                    slot.decide(AppendFailed(failed))
                return
        except ObjectStoreError as exc:
            for slot in live:
                slot.decide(AppendFailed(f"PUT {name}: {exc}"))
            return
        put_at = anyio.current_time()
        self.groups += 1
        self.rounds += len(live)
        if failpoints.ARMED:
            for slot in live:
                _hit("after-put", slot)
        for slot in live:
            if slot.owner.before_commit is not None:
                await slot.owner.before_commit(name)
        for slot in live:
            try:
                slot.extra = await slot.owner.ids_writes(slot.round)
            except EtcdError as exc:
                slot.decide(AppendFailed(f"could not grant a dedup window lease: {exc}"))
        # A partition's transactions go in order: this one's compare on the
        # next offset holds only once the round before it has committed.
        for slot in live:
            if slot.after is not None:
                await slot.after.decided.wait()
        live = [slot for slot in live if not slot.decided.is_set()]
        # Before the transaction: etcd's watch may tell this node's tail of
        # the entries before the transaction's own answer is read here. (If
        # it is refused, nothing names the object and it ages out.)
        written: list[Callable[[str, bytes], None]] = []
        for slot in live:
            if slot.owner.on_written is not None and slot.owner.on_written not in written:
                written.append(slot.owner.on_written)
                slot.owner.on_written(name, data)
        await self._transact(live, put_at, leader.max_commit_delay)
        if failpoints.ARMED:
            # Committed; the owners hand their rounds back to their appenders
            # (and ClusterStore.sync to the committer, which acknowledges)
            # only after this returns.
            for slot in live:
                if slot.decided.is_set() and slot.outcome is None:
                    _hit("after-commit", slot)

    async def _put(self, owner: PartitionOwner, name: str, data: bytes) -> bool:
        """PUT a group's object (``If-None-Match: *``); True once it is
        there. A failure that may pass (the store unreachable or its
        answer lost, 500/502/503/504, 409 for a conditional write still in
        flight) is tried again, ``PUT_ATTEMPTS`` in all, while the lease
        holds. On a retry a 412 means an earlier try created it (the name
        is this node's alone), which a read-back confirms (anyone else's
        bytes under our name: False, the group is abandoned). Any other
        failure is raised at once."""
        for attempt in range(PUT_ATTEMPTS):
            try:
                if await owner.store.put_if_absent(name, data):
                    return True
            except ObjectStoreError as exc:
                if exc.status not in PUT_RETRY_STATUSES or attempt + 1 == PUT_ATTEMPTS or not owner.keeper.held():
                    raise
                self.put_retries += 1
                await anyio.sleep(PUT_PAUSE * 2**attempt)
                continue
            return attempt > 0 and await owner.store.get(name) == data
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _transact(self, live: list[Slot], put_at: float, max_delay: float) -> None:
        """Send the group's transaction until every round in it is decided:
        committed, refused (its partition lost), or, past the tries or the
        deadline after the PUT, OutcomeUnknown."""
        pending = live
        lost_answer = False
        for _ in range(RESOLVE_ATTEMPTS + 1 + len(live)):  # each refusal decides one round at least
            if not pending or anyio.current_time() - put_at > max_delay:
                break
            if lost_answer:
                try:
                    await anyio.sleep(RESOLVE_PAUSE)
                    pending = await self._resolve(pending)
                except EtcdUnavailable:
                    continue
                if not pending:
                    return
            etcd = pending[0].owner.etcd
            compare, success, failure = [], [], []
            for slot in pending:
                assert slot.entry is not None
                c, s, f = slot.owner.round_txn(slot.entry, slot.extra)
                compare += c
                success += s
                failure += f
            try:
                result = await etcd.txn(compare, success, failure)
            except EtcdUnavailable:
                lost_answer = True
                continue
            except EtcdError as exc:  # etcd refused the request itself: not applied
                for slot in pending:
                    slot.decide(AppendFailed(f"etcd refused the commit of {slot.entry.object if slot.entry else '?'}: {exc}"))
                return
            lost_answer = False
            if result.succeeded:
                for slot in pending:
                    assert slot.entry is not None
                    slot.decide(slot.owner.committed(slot.entry))
                return
            pending = _refused(pending, result)
        for slot in pending:
            assert slot.entry is not None
            slot.owner.mark_stale()
            slot.decide(
                OutcomeUnknown(
                    f"partition {slot.owner.label}: the commit of {slot.entry.object} "
                    f"(offsets {slot.entry.first}..{slot.entry.first + slot.entry.count - 1}) could not be confirmed"
                )
            )

    async def _resolve(self, pending: list[Slot]) -> list[Slot]:
        """After a lost answer: the rounds to send again (none when the
        transaction committed, or every round is decided otherwise)."""
        first = pending[0]
        assert first.entry is not None
        named = await first.owner.indexed_at(first.entry.first)
        if named == first.entry.object:  # atomic: committed for every partition in it
            for slot in pending:
                assert slot.entry is not None
                slot.decide(slot.owner.committed(slot.entry))
            return []
        if named is not None:
            first.decide(first.owner.lose(f"offset {first.entry.first} was committed by {named}, not by this owner"))
        again = []
        for slot in pending:
            if slot.decided.is_set():
                continue
            if await slot.owner.epoch_holds():
                again.append(slot)
            else:
                slot.decide(slot.owner.lose(f"epoch {slot.owner.epoch} no longer holds the partition"))
        return again


def _refused(pending: list[Slot], result: TxnResult) -> list[Slot]:
    """After a refused transaction: each round whose partition's compares
    failed is refused (its partition lost); the others, to send again. A
    refusal none of the reads explains refuses them all."""
    again: list[Slot] = []
    for i, slot in enumerate(pending):
        assert slot.entry is not None
        refusal = slot.owner.refusal(slot.entry, result, 3 * i)
        if refusal is None:
            again.append(slot)
        else:
            slot.decide(refusal)
    if len(again) == len(pending):
        for i, slot in enumerate(pending):
            assert slot.entry is not None
            slot.decide(slot.owner.refused(slot.entry, result, 3 * i))
        return []
    return again


def _hit(point: str, slot: Slot) -> None:
    entry = slot.entry
    assert entry is not None
    failpoints.hit(point, topic=slot.owner.topic, object=entry.object, first=entry.first, count=entry.count)
