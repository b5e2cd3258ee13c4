"""The ownership manager: which node owns which partition (docs/cluster.md §4).

Every node mirrors ``members/``, ``topics/`` and ``own/`` (range read, then
watch). For each partition without an owner key, the live member ranked
first by rendezvous hashing (``ranking``) takes it with
``PartitionOwner.acquire()`` (created only if absent, under its member
lease) and runs its commit loop. When the ranking changes (a node joins),
the owner hands the partition over: it refuses new appends, lets the rounds
in flight commit, and deletes its key fenced on its epoch; the node now
ranked first then acquires it. When a node dies its lease ends, its keys
vanish, and the next in each ranking acquires; ``acquire`` reads the next
offset in its own transaction, so the new owner continues where the
committed log ends.

Every node knows each partition's owner and address from ``own/``
(``owner_of``), which is what a ``NOT_OWNER`` answer will name.

Bounds: partitions owned by one node (``max_owned``), acquisitions and
hand-overs in progress at once (``max_concurrent``), every etcd call and
hand-over under a timeout, failed acquisitions retried with a doubling
backoff, and a periodic re-check (``resync``) besides the watch events.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio
import attrs

from ..logs import get_logger
from .cache import RangeCache
from .compaction import CompactionSettings, CompactionStats, IndexCompactor
from .dedup import DEFAULT_DEDUP_WINDOW, WindowLeases
from .etcd import Compare, Delete, Etcd, EtcdError
from .keys import ClusterKeys
from .lease import LeaseKeeper, LeaseLost
from .members import Membership
from .mirror import PrefixMirror
from .objects import ObjectStore
from .outcomes import NotOwner
from .partition import DEFAULT_HAND_OVER_TIMEOUT, PartitionOwner
from .rounds import ObjectNames, RoundCommitter
from .ranking import first
from .retention import Retention
from .topics import TopicRegistry

Partition = tuple[str, int]

#: Bounds (docs/cluster.md §4): partitions one node owns, owner keys mirrored,
#: acquisitions/hand-overs at once.
DEFAULT_MAX_OWNED = 10_000
MAX_OWNER_KEYS = 1_000_000
DEFAULT_MAX_CONCURRENT = 16
#: Re-check ownership this often even without a watch event (a refused
#: commit, a backoff that ended).
DEFAULT_RESYNC = 1.0
#: Backoff of a failed acquisition or release: doubles from MIN to MAX.
RETRY_MIN = 0.1
RETRY_MAX = 5.0


@attrs.frozen
class OwnerInfo:
    """A partition's owner as ``own/{topic}/{partition}`` says: its node,
    its address, its epoch (the key's create revision) and its lease."""

    node: str
    addr: str
    epoch: int
    lease: int


@attrs.define(eq=False)
class _Held:
    owner: PartitionOwner
    scope: anyio.CancelScope
    handing_over: bool = False
    compactor: IndexCompactor | None = None


class OwnershipManager:
    """Acquires, serves and hands over this node's partitions.

    ``run`` (in a task group, for the node's life) runs the membership,
    topic and owner mirrors and keeps ownership matching the ranking; it
    raises LeaseLost when the member lease is gone (the node then starts
    again with a new lease, as a new incarnation). ``leave`` hands every
    partition over and deregisters, for a graceful stop.
    """

    def __init__(
        self,
        etcd: Etcd,
        store: ObjectStore,
        keeper: LeaseKeeper,
        membership: Membership,
        topics: TopicRegistry,
        *,
        keys: ClusterKeys | None = None,
        max_owned: int = DEFAULT_MAX_OWNED,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        resync: float = DEFAULT_RESYNC,
        hand_over_timeout: float = DEFAULT_HAND_OVER_TIMEOUT,
        owner_options: dict[str, Any] | None = None,
        compaction: CompactionSettings | None = None,
        retention: Callable[[str], Retention] | None = None,
        cache: RangeCache | None = None,
    ) -> None:
        self.etcd = etcd
        self.store = store
        self.keeper = keeper
        self.membership = membership
        self.topics = topics
        self.keys = keys or ClusterKeys()
        self.node = membership.node
        self.addr = membership.me.addr
        self.max_owned = max_owned
        self.resync = resync
        self.hand_over_timeout = hand_over_timeout
        #: Passed to every PartitionOwner (window, max_round_bytes, ...).
        self.owner_options = dict(owner_options or {})
        #: Index compaction of the partitions this node owns (compaction.py;
        #: None: none), one merge at a time on this node, and what the
        #: compactors of partitions no longer held did.
        self.compaction = compaction
        #: Each topic's retention limits, cut by its compactor (retention.py).
        self.retention = retention
        #: The node's read cache, which compaction reads through when it holds a range.
        self.cache = cache
        self._compacting = anyio.CapacityLimiter(1)
        self._compacted = CompactionStats()
        self.owners = PrefixMirror(etcd, self.keys.own_prefix, max_keys=MAX_OWNER_KEYS, name="own")
        self.leaving = False
        #: Counts changes of this node's view or holdings (``changed()`` wakes on each).
        self.version = 0
        #: Acquisitions won and partitions handed over, for the record.
        self.acquired = 0
        self.handed_over = 0
        self._held: dict[Partition, _Held] = {}
        self._busy: set[Partition] = set()
        self._retry: dict[Partition, tuple[float, float]] = {}  # partition -> (not before, backoff)
        self._limiter = anyio.CapacityLimiter(max_concurrent)
        self._names: ObjectNames | None = None
        self._windows: WindowLeases | None = None
        #: One committer for all of this node's partitions: the rounds they
        #: close together go out as one object and one transaction.
        self.rounds = RoundCommitter()
        self._wake = anyio.Event()
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._full_logged = False
        self._registering = False
        self._log = get_logger(component="cluster-ownership", node=self.node)

    # -- what every node knows ------------------------------------------------

    def owner_of(self, topic: str, partition: int) -> OwnerInfo | None:
        """The partition's owner as this node's mirror of ``own/`` has it
        (None while it has none)."""
        kv = self.owners.kvs.get(self.keys.own(topic, partition))
        if kv is None:
            return None
        try:
            raw = json.loads(kv.value)
        except ValueError:
            raw = None
        if not isinstance(raw, dict):
            return OwnerInfo("", "", kv.create_revision, kv.lease)
        return OwnerInfo(str(raw.get("node", "")), str(raw.get("addr", "")), kv.create_revision, kv.lease)

    def local(self, topic: str, partition: int) -> PartitionOwner | None:
        """The PartitionOwner this node holds for the partition, or None."""
        held = self._held.get((topic, partition))
        if held is None or held.owner.lost is not None:
            return None
        return held.owner

    def compaction_stats(self) -> CompactionStats:
        """What index compaction did on this node, summed over its partitions."""
        total = self._compacted
        for held in self._held.values():
            if held.compactor is not None:
                total = _sum_stats(total, held.compactor.stats)
        return total

    def held(self) -> list[Partition]:
        """The partitions this node holds now (handing over included)."""
        return sorted(tp for tp, h in self._held.items() if h.owner.lost is None)

    def first_choice(self, topic: str, partition: int) -> str | None:
        """The live member ranked first for the partition, as this node sees it."""
        return first(self._ranked(self.membership.members), topic, partition)

    def _ranked(self, members: dict[str, Any]) -> set[str]:
        """The members this node ranks: itself included until it leaves,
        whether or not its mirror shows its key yet, so that it never hands
        over for want of itself (its lease decides whether it lives: once
        it is lost the node stops altogether)."""
        ranked = set(members)
        if self.leaving:
            ranked.discard(self.node)
        else:
            ranked.add(self.node)
        return ranked

    async def changed(self) -> None:
        """Wait for the next change of this node's view or holdings."""
        await self._changed.wait()

    def _poke(self) -> None:
        self.version += 1
        self._wake.set()
        self._changed.set()
        self._changed = anyio.Event()

    # -- running ----------------------------------------------------------------

    async def run(self) -> None:
        """Register, mirror, and keep ownership right until cancelled.
        Raises LeaseLost when the member lease is gone; every partition this
        node held is stopped first (its appends get NotOwner or, for a
        round in flight, OutcomeUnknown)."""
        if not self.keeper.held():
            raise LeaseLost(f"lease {self.keeper.lease:x} is not held")
        self._names = ObjectNames(self.keeper.lease)
        # One set of window leases for all of this node's partitions.
        window = float(self.owner_options.get("dedup_window", DEFAULT_DEDUP_WINDOW))
        self._windows = WindowLeases(self.etcd, window)
        lease_lost = False

        async def watch_lease() -> None:
            nonlocal lease_lost
            await self.keeper.lost.wait()
            lease_lost = True
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for mirror in (self.membership.mirror, self.topics.mirror, self.owners):
                    tg.start_soon(mirror.run)
                    tg.start_soon(self._forward, mirror)
                tg.start_soon(watch_lease)
                tg.start_soon(self.rounds.run)
                if not await self._register():
                    lease_lost = True
                    tg.cancel_scope.cancel()
                for mirror in (self.membership.mirror, self.topics.mirror, self.owners):
                    await mirror.synced.wait()
                while True:
                    self._reconcile()
                    with anyio.move_on_after(self.resync):
                        await self._wake.wait()
                    self._wake = anyio.Event()
        finally:
            self._tg = None
            self._held.clear()
            self._busy.clear()
        if lease_lost:
            raise LeaseLost(f"node {self.node}: member lease {self.keeper.lease:x} is lost")

    async def _register(self) -> bool:
        """Write the member key, retrying (with a backoff) while the lease
        holds; False once it does not (LeaseLost, or past its deadline)."""
        pause = RETRY_MIN
        while True:
            try:
                with anyio.fail_after(self.etcd.timeout * 2):
                    await self.membership.register()
                return True
            except LeaseLost:
                return False
            except (EtcdError, TimeoutError) as exc:
                if not self.keeper.held():
                    return False
                self._log.info("registering failed", error=repr(exc), retry_in=pause)
                await anyio.sleep(pause)
                pause = min(RETRY_MAX, pause * 2)

    async def _reregister(self) -> None:
        try:
            await self._register()
        finally:
            self._registering = False

    async def _forward(self, mirror: PrefixMirror) -> None:
        while True:
            await mirror.changed()
            self._poke()

    async def leave(self, timeout: float = 30.0) -> None:
        """Graceful stop: acquire nothing more, deregister (so the others
        rank without this node), hand every partition over, and return
        once none is held (TimeoutError after ``timeout``). The lease is
        the caller's to revoke afterwards."""
        self.leaving = True
        with anyio.fail_after(timeout):
            await self.membership.leave()
            self._poke()
            while self._held or self._busy:
                await self.changed()

    # -- keeping ownership right -----------------------------------------------

    def _reconcile(self) -> None:
        """Compare holdings with the ranking and start what differs: an
        acquisition, a hand-over, dropping a partition lost, or deleting an
        owner key of ours that nothing serves. Starts tasks, never waits."""
        assert self._tg is not None
        now = anyio.current_time()
        members = self.membership.members
        if self.node not in members and not self.leaving and not self._registering and self.keeper.held():
            # Our member key went while the lease lives (deleted by hand, or
            # the mirror read just before our put): write it again.
            self._registering = True
            self._tg.start_soon(self._reregister)
        ranked = self._ranked(members)
        topics = self.topics.topics
        wanted: set[Partition] = set()
        for topic, record in topics.items():
            for partition in range(record.partitions):
                wanted.add((topic, partition))
        for tp in list(self._held):
            if tp not in wanted:
                wanted.add(tp)  # a topic that vanished: hand its partitions over below
        for tp in sorted(wanted):  # sorted: acquisitions start in a stable order
            if tp in self._busy:
                continue
            topic, partition = tp
            held = self._held.get(tp)
            owner = self.owner_of(topic, partition)
            info = topics.get(topic)
            listed = info is not None and partition < info.partitions
            top = first(ranked, topic, partition) if listed else None
            if held is not None:
                self._check_held(tp, held, owner, top, listed)
                continue
            if owner is not None:
                if owner.node == self.node and owner.lease == self.keeper.lease:
                    # Ours, by this lease, yet not served (an acquisition whose
                    # answer was lost, or a release that failed): delete it, fenced.
                    self._start(tp, self._drop_key, tp, owner.epoch)
                continue
            if self.leaving or top != self.node or not self.keeper.held():
                continue
            if len(self._held) + len(self._busy) >= self.max_owned:
                if not self._full_logged:
                    self._log.warning("owning no more partitions", max_owned=self.max_owned)
                    self._full_logged = True
                continue
            not_before, _ = self._retry.get(tp, (0.0, 0.0))
            if now < not_before:
                continue
            self._start(tp, self._acquire, tp)

    def _check_held(self, tp: Partition, held: _Held, owner: OwnerInfo | None, top: str | None, listed: bool) -> None:
        partition_owner = held.owner
        if partition_owner.lost is not None:
            held.scope.cancel()
            return
        if self.owners.revision >= partition_owner.epoch and (owner is None or owner.epoch != partition_owner.epoch):
            # The mirror has seen our acquisition and the key is gone or
            # another's: fenced already (its commits would be refused).
            partition_owner.stop(f"the owner key changed (now {owner.node + ' epoch ' + str(owner.epoch) if owner else 'absent'})")
            held.scope.cancel()
            return
        if held.handing_over:
            return
        if self.leaving or not listed or (top is not None and top != self.node):
            held.handing_over = True
            self._start(tp, self._hand_over, tp, held)

    def _start(self, tp: Partition, job: Callable[..., Awaitable[None]], *args: Any) -> None:
        # The job is called in its task, not here: a coroutine made now
        # would never be awaited if the task group ended first.
        assert self._tg is not None
        self._busy.add(tp)
        self._tg.start_soon(self._job, tp, job, *args)

    async def _job(self, tp: Partition, job: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            async with self._limiter:
                await job(*args)
        finally:
            self._busy.discard(tp)
            self._poke()

    def _failed(self, tp: Partition, what: str, exc: BaseException) -> None:
        _, backoff = self._retry.get(tp, (0.0, 0.0))
        backoff = min(RETRY_MAX, max(RETRY_MIN, backoff * 2))
        self._retry[tp] = (anyio.current_time() + backoff, backoff)
        self._log.info(f"{what} failed", topic=tp[0], partition=tp[1], error=repr(exc), retry_in=backoff)

    async def _acquire(self, tp: Partition) -> None:
        topic, partition = tp
        owner = PartitionOwner(
            self.etcd, self.store, self.keeper, topic, partition,
            keys=self.keys, node=self.node, addr=self.addr, names=self._names, windows=self._windows,
            rounds=self.rounds, **self.owner_options,
        )  # fmt: skip
        try:
            with anyio.fail_after(self.etcd.timeout * 2):
                won = await owner.acquire()
        except (EtcdError, NotOwner, TimeoutError) as exc:
            self._failed(tp, "acquisition", exc)
            return
        self._retry.pop(tp, None)
        if not won:
            return  # another node raced us and holds it: the mirror will show it
        assert self._tg is not None
        scope = anyio.CancelScope()
        self._held[tp] = _Held(owner, scope)
        self.acquired += 1
        self._log.info("acquired", topic=topic, partition=partition, epoch=owner.epoch, next=owner.next_offset)
        self._tg.start_soon(self._serve, tp, self._held[tp])

    async def _serve(self, tp: Partition, held: _Held) -> None:
        try:
            with held.scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(held.owner.run)
                    if self.compaction is not None:
                        # Asked at each pass: TOPICS set may change it meanwhile.
                        retention = partial(self.retention, tp[0]) if self.retention is not None else None
                        held.compactor = IndexCompactor(
                            held.owner, self.compaction, limiter=self._compacting, retention=retention, cache=self.cache
                        )
                        tg.start_soon(held.compactor.run)
                    await held.owner.ended.wait()
                    # Lost (fenced, refused, released): let run() fail what is
                    # queued, now, rather than at the next window.
                    tg.cancel_scope.cancel()
        finally:
            held.owner.stop("the node stopped serving the partition")
            if held.compactor is not None:
                self._compacted = _sum_stats(self._compacted, held.compactor.stats)
            if self._held.get(tp) is held:
                del self._held[tp]
            self._poke()

    async def _hand_over(self, tp: Partition, held: _Held) -> None:
        try:
            with anyio.fail_after(self.hand_over_timeout + 2 * self.etcd.timeout):
                released = await held.owner.hand_over(self.hand_over_timeout)
            self.handed_over += 1
            self._log.info("handed over", topic=tp[0], partition=tp[1], epoch=held.owner.epoch, released=released)
        except (EtcdError, TimeoutError) as exc:
            # The key may still be there: the next check finds it ours and
            # unserved, and deletes it (fenced) with a backoff.
            self._failed(tp, "hand-over", exc)
        finally:
            held.scope.cancel()

    async def _drop_key(self, tp: Partition, epoch: int) -> None:
        not_before, _ = self._retry.get(tp, (0.0, 0.0))
        if anyio.current_time() < not_before:
            await anyio.sleep(not_before - anyio.current_time())  # a backoff, bounded by RETRY_MAX
        own = self.keys.own(*tp)
        try:
            with anyio.fail_after(self.etcd.timeout * 2):
                await self.etcd.txn([Compare.create_revision(own, "==", epoch)], [Delete(own)])
        except (EtcdError, TimeoutError) as exc:
            self._failed(tp, "deleting an unserved owner key", exc)
            return
        self._retry.pop(tp, None)


def _sum_stats(a: CompactionStats, b: CompactionStats) -> CompactionStats:
    return CompactionStats(*(x + y for x, y in zip(attrs.astuple(a), attrs.astuple(b), strict=True)))
