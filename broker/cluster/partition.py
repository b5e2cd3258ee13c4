"""One partition's append path (its owner) and read path (any node).

docs/cluster.md §4-§7. The owner creates ``own/{topic}/{partition}`` only
if absent, under its member lease; the create revision is its **epoch**.
Appends arriving within one commit window become one round, which the
node's RoundCommitter (rounds.py) commits with the rounds its other
partitions closed at the same time (a partition's next round may be PUT
while its last one's transaction is out; the transactions go in order):

1. the rounds' batches, in the single-node log's stored format (header
   with CRC, then the wire batch with its own CRC), become ONE immutable
   object ``data/{incarnation:016x}/{round:012d}``, written with
   ``If-None-Match: *``;
2. ONE etcd transaction compares, per partition, the epoch, the expected
   next offset and the object's tombstone (``gone/{object}`` absent), and
   writes the new next offset and the index entry
   ``idx/{t}/{p}/{first:020d}`` naming the partition's byte range;
3. only then, and only while the lease is certainly held
   (``LeaseKeeper.held()``), are the offsets returned.

A refused transaction means the partition is no longer this owner's: the
round acknowledges nothing and its object is garbage for the janitor
(§9). Reads need no owner: the index in etcd names each object's byte
range, fetched with a ranged GET.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs

from pybroker.protocol import RemoteProtocolError, check_batch
from pybroker.server.storage.base import StoredBatch
from pybroker.server.storage.errors import DataLoss
from pybroker.server.storage.scan import HEADER_SIZE

from .dedup import DEFAULT_DEDUP_WINDOW, WindowLeases, encode_ids
from .entries import IndexEntry, decode_stored, encode_stored
from .etcd import Compare, Delete, Etcd, EtcdError, Get, KeyValue, Op, Put, TxnResult, prefix_end
from .keys import ClusterKeys
from .lease import LeaseKeeper
from .objects import NoSuchKey, ObjectStore
from .outcomes import AppendError, AppendFailed, NotOwner, OutcomeUnknown
from .rounds import ObjectNames, RoundCommitter, Slot

#: docs/cluster.md §5: the commit window and the size that closes a round early.
DEFAULT_WINDOW = 0.005
DEFAULT_MAX_ROUND_BYTES = 8 << 20
#: A round's transaction is never sent later than this after its PUT (G/6
#: with the janitor's default grace period G of one hour, §5 and §9).
DEFAULT_MAX_COMMIT_DELAY = 600.0
#: Rounds closed and waiting for their commit, beyond which appends wait.
MAX_QUEUED_ROUNDS = 4
#: A partition's rounds out at once (docs/cluster.md §5): the next one's
#: PUT goes while the last one's transaction is out; the transactions
#: still go one at a time, in order.
DEFAULT_PIPELINE = 2
#: How long a hand-over waits for the rounds already gathered to commit.
DEFAULT_HAND_OVER_TIMEOUT = 10.0



@attrs.define(eq=False)
class _Pending:
    batch: bytes
    count: int
    timestamp: int
    base: int = -1
    #: The batch's msg-id as the broker names it (``append_round``): kept in
    #: the round's ``ids/`` key for the exactly-once window of a next owner.
    named: str | None = None


@attrs.define(eq=False)
class _Round:
    opened: float
    #: Where its appender put its batches (``submit_round``): it is sent
    #: only at that offset.
    expected: int | None = None
    items: list[_Pending] = attrs.field(factory=list)
    size: int = 0
    #: Batches with a broker msg-id (all in one ``ids/`` put).
    named: int = 0
    closed: bool = False
    full: anyio.Event = attrs.field(factory=anyio.Event)
    done: anyio.Event = attrs.field(factory=anyio.Event)
    error: AppendError | None = None

    def finish(self, error: AppendError | None = None) -> None:
        self.closed = True
        self.error = error
        self.done.set()


class PartitionOwner:
    """Sequences and commits the appends of one partition while it owns it.

    ``acquire`` takes ownership; ``run`` (in a task group, for as long as
    the node owns the partition) commits its rounds, each window's
    appends one round, up to ``pipeline`` of them out at once; ``append``
    waits for its round and returns its base offset. Once the partition is
    lost (refused transaction, lease gone or past its deadline) ``lost``
    says why and every append raises NotOwner.
    """

    def __init__(
        self,
        etcd: Etcd,
        store: ObjectStore,
        keeper: LeaseKeeper,
        topic: str,
        partition: int,
        *,
        keys: ClusterKeys | None = None,
        node: str = "",
        addr: str = "",
        names: ObjectNames | None = None,
        rounds: RoundCommitter | None = None,
        window: float = DEFAULT_WINDOW,
        max_round_bytes: int = DEFAULT_MAX_ROUND_BYTES,
        max_commit_delay: float = DEFAULT_MAX_COMMIT_DELAY,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        windows: WindowLeases | None = None,
        on_written: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.etcd = etcd
        self.store = store
        self.keeper = keeper
        self.topic = topic
        self.partition = partition
        self.keys = keys or ClusterKeys()
        self.node = node
        self.addr = addr
        self.names = names
        #: Commits this owner's rounds: the node's (shared by its partitions,
        #: run by the ownership manager) or, without one, this owner's own,
        #: which ``run`` runs.
        self.rounds = rounds if rounds is not None else RoundCommitter()
        self._runs_rounds = rounds is None
        self.window = window
        #: Rounds out at once (DEFAULT_PIPELINE; 1: each decided before the next).
        self.pipeline = DEFAULT_PIPELINE
        self.max_round_bytes = max_round_bytes
        self.max_commit_delay = max_commit_delay
        #: The create revision of our owner key; 0 until acquired.
        self.epoch = 0
        #: The offset the next committed message gets, as this owner knows it.
        self.next_offset = 0
        #: Why this owner stopped owning, or None while it owns (or before acquire).
        self.lost: str | None = None
        #: Who holds the partition when ``acquire`` found it taken.
        self.holder: dict[str, Any] | None = None
        #: Called with the object's name after its PUT and before the
        #: transaction: a fault hook (raise to simulate a crash in between).
        self.before_commit: Callable[[str], Awaitable[None]] | None = None
        #: Awaited by ``hand_over`` once the rounds gathered are decided and
        #: before the owner key goes (within its timeout): the last save of
        #: what else the owner keeps for the partition (its consumer groups,
        #: whose saves are fenced on this epoch and refused once it is gone).
        self.before_release: Callable[[], Awaitable[None]] | None = None
        #: Called with each round's object name and bytes once its PUT
        #: succeeded (a node's read cache keeps them, so its own tail reads
        #: them from memory instead of GETting back what it just wrote).
        self.on_written = on_written
        self._next_exists = False
        #: After an unresolved outcome: re-read the next offset before committing.
        self._stale = False
        #: Set once ``lost`` is: the partition is no longer this owner's.
        self.ended = anyio.Event()
        #: Handing over: new appends are refused, queued rounds still commit.
        self._handing_over = False
        self._rounds: deque[_Round] = deque()
        self._wake = anyio.Event()
        self._space = anyio.Event()
        self._own = self.keys.own(topic, partition)
        #: The exactly-once window (docs/cluster.md §3): a round's ``ids/``
        #: key lives under a lease of about this long (``windows``).
        self.dedup_window = dedup_window
        self.windows = windows
        self._next = self.keys.next(topic, partition)
        #: Rounds this owner committed; ``wait_commits`` wakes on each (the
        #: index compactor runs after every so many).
        self.commits = 0
        self._commit_event = anyio.Event()

    # -- ownership --------------------------------------------------------

    @property
    def owning(self) -> bool:
        return self.epoch != 0 and self.lost is None and self.keeper.held()

    async def acquire(self) -> bool:
        """Create the owner key if absent, under the keeper's lease. True if
        this owner now holds the partition (``epoch`` set, ``next_offset``
        read in the same transaction, so no commit of a former owner can
        come between), False if another holds it (``holder``)."""
        if self.epoch:
            raise RuntimeError("acquire once per owner: a lost partition is taken again by a new PartitionOwner")
        if not self.keeper.held():
            raise NotOwner(f"lease {self.keeper.lease:x} is not held")
        value = json.dumps({"node": self.node, "addr": self.addr}).encode()
        result = await self.etcd.txn(
            [Compare.create_revision(self._own, "==", 0)],
            [Put(self._own, value, self.keeper.lease), Get(self._next)],
            [Get(self._own)],
        )
        if not result.succeeded:
            holder = _kvs(result, 0)
            self.holder = _json_object(holder[0].value) if holder else None
            return False
        self.epoch = result.revision
        self._set_next(_kvs(result, 1))
        if self.names is None:
            self.names = ObjectNames(self.keeper.lease)
        return True

    async def release(self) -> bool:
        """Hand the partition over: stop appending and delete the owner key
        (fenced on the epoch). False if it was no longer ours anyway."""
        self.stop("released")
        if not self.epoch:
            return False
        result = await self.etcd.txn([Compare.create_revision(self._own, "==", self.epoch)], [Delete(self._own)])
        return result.succeeded

    async def hand_over(self, timeout: float = DEFAULT_HAND_OVER_TIMEOUT) -> bool:
        """Give the partition up in order (docs/cluster.md §4): refuse new
        appends (NotOwner: nothing of them is committed), let the rounds
        already gathered commit and be acknowledged and ``before_release``
        save what else it keeps (for at most ``timeout`` seconds), then
        ``release``. Rounds still not decided
        then are refused by etcd (the owner key is gone) or, if their
        transaction was already applied, stay committed: no acknowledged
        append is lost either way. True if the fenced delete succeeded."""
        self._handing_over = True
        with anyio.move_on_after(timeout):
            while self._rounds and self.lost is None:
                await self._space.wait()
            if self.before_release is not None and self.lost is None:
                await self.before_release()
        return await self.release()

    def stop(self, why: str) -> None:
        """Stop owning (appends get NotOwner from now on) without touching
        etcd; ``lost`` says ``why`` unless it already said something."""
        if self.lost is None:
            self.lost = why
            self.ended.set()

    def lose(self, why: str) -> NotOwner:
        self.stop(why)
        return NotOwner(f"partition {self.topic}[{self.partition}]: {self.lost}")

    def _check_owning(self) -> None:
        if not self.epoch:
            raise NotOwner(f"partition {self.topic}[{self.partition}] is not acquired")
        if self.lost is not None:
            raise self.lose(self.lost)
        if self._handing_over:
            raise NotOwner(f"partition {self.topic}[{self.partition}] is being handed over")
        if not self.keeper.held():
            raise self.lose(f"lease {self.keeper.lease:x} is past its deadline")

    def _set_next(self, kvs: list[KeyValue]) -> None:
        self._next_exists = bool(kvs)
        self.next_offset = int(kvs[0].value) if kvs else 0

    # -- appending ---------------------------------------------------------

    async def append(self, batch: bytes, timestamp: int | None = None) -> int:
        """Commit one wire batch; its base offset once acknowledged (its
        messages have offsets base..base+count-1). ValueError for a batch
        that does not check; AppendError when it is not acknowledged."""
        count = _checked_count(batch)
        self._check_owning()
        return await self._enqueue(_Pending(batch, count, time.time_ns() // 1000 if timestamp is None else timestamp))

    @property
    def accepting(self) -> bool:
        """Whether an append now would be taken (owning, not handing over)."""
        return self.owning and not self._handing_over

    @property
    def stale(self) -> bool:
        """A round's outcome was not learned: ``next_offset`` may be behind
        etcd's until :meth:`refresh` (or the next round) re-reads it."""
        return self._stale

    async def refresh(self) -> bool:
        """Re-read the next offset after an unknown outcome, fenced on the
        epoch; False (and the partition dropped) if it is no longer ours."""
        try:
            if await self._refresh():
                return True
        except EtcdError:
            return False  # still stale: asked again later
        self.lose(f"epoch {self.epoch} no longer holds the partition")
        return False

    async def append_round(
        self, batches: list[tuple[bytes, int, int]], names: Sequence[str | None] | None = None
    ) -> int:
        """Commit ``(batch, count, timestamp)`` checked batches as one round
        of their own, in order, all or none (a cluster broker's group
        commit, which has done its own batching); the first one's base
        offset once acknowledged, else the round's AppendError. ``names``
        are the batches' msg-ids (None: none), written with the round as
        one ``ids/`` key under the dedup window's lease."""
        self._check_owning()
        with anyio.fail_after(self.max_commit_delay):
            while len(self._rounds) > MAX_QUEUED_ROUNDS:
                await self._space.wait()
        return await self.round_outcome(self.submit_round(batches, names))

    def submit_round(
        self, batches: list[tuple[bytes, int, int]], names: Sequence[str | None] | None = None, base: int | None = None
    ) -> _Round:
        """``append_round``'s first half, without waiting: the round is
        queued behind every round submitted before it (NotOwner when this
        owner takes none); ``round_outcome`` waits for it. A cluster store
        submits all of a sync's rounds at once, so that a later sync's
        cannot come between them. With ``base`` (the offset the appender
        gave its first batch) it is committed there or not at all: after a
        round before it failed, its offsets would move, and it fails
        unsent instead (AppendFailed)."""
        self._check_owning()
        round_ = _Round(anyio.current_time(), base)
        round_.items = [_Pending(batch, count, timestamp) for batch, count, timestamp in batches]
        if names is not None:
            for item, name in zip(round_.items, names, strict=True):
                item.named = name
            round_.named = sum(1 for name in names if name is not None)
        round_.size = sum(HEADER_SIZE + len(batch) for batch, _, _ in batches)
        round_.closed = True
        round_.full.set()
        self._rounds.append(round_)
        self._wake.set()
        return round_

    async def round_outcome(self, round_: _Round) -> int:
        """The first base offset of a submitted round once acknowledged,
        else its AppendError (TimeoutError past ``max_commit_delay``)."""
        with anyio.fail_after(self.max_commit_delay):
            await round_.done.wait()
        if round_.error is not None:
            raise round_.error
        return round_.items[0].base

    async def _enqueue(self, item: _Pending) -> int:
        """Put ``item`` into the open round (opening one); its base offset
        once the round is acknowledged, else the round's error."""
        with anyio.fail_after(self.max_commit_delay):  # a bound: the round gives up well before
            while len(self._rounds) > MAX_QUEUED_ROUNDS:
                await self._space.wait()
            self._check_owning()
            current = self._rounds[-1] if self._rounds and not self._rounds[-1].closed else None
            if current is None:
                current = _Round(anyio.current_time())
                self._rounds.append(current)
                self._wake.set()
            current.items.append(item)
            current.size += HEADER_SIZE + len(item.batch)
            if current.size >= self.max_round_bytes:
                current.closed = True
                current.full.set()
                self._wake.set()
            await current.done.wait()
        if current.error is not None:
            raise current.error
        return item.base

    async def run(self) -> None:
        """Commit rounds until cancelled; then fail every round not committed.
        Runs this owner's own RoundCommitter too when it was given none."""
        if not self._runs_rounds:
            await self._run()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.rounds.run)
            try:
                await self._run()
            finally:
                tg.cancel_scope.cancel()

    async def _run(self) -> None:
        # Rounds handed to the committer and not yet answered, in order: at
        # most ``pipeline``; each one's offsets follow the one before it.
        out: deque[tuple[_Round, Slot]] = deque()
        try:
            while True:
                while out and out[0][1].decided.is_set():  # answered in order
                    round_, slot = out.popleft()
                    round_.finish(slot.outcome)
                    self._rounds.popleft()
                    self._space.set()
                    self._space = anyio.Event()
                wait = math.inf
                while len(out) < self.pipeline and len(self._rounds) > len(out):
                    head = self._rounds[len(out)]
                    if not head.closed:
                        left = head.opened + self.window - anyio.current_time()
                        if left > 0:
                            wait = left  # its window is still open
                            break
                        head.closed = True
                    out.append((head, self.rounds.submit(self, head, out[-1][1] if out else None)))
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = anyio.Event()
        finally:
            self.stop("the owner's commit loop stopped")
            for round_, slot in out:
                if slot.decided.is_set():
                    round_.finish(slot.outcome)
                elif self.rounds.withdraw(slot):
                    not_sent = AppendFailed(f"partition {self.label}: the owner stopped")
                    slot.decide(not_sent)
                    round_.finish(not_sent)
                else:
                    # Stopped during its PUT or transaction: it may have committed.
                    round_.finish(OutcomeUnknown(f"partition {self.label}: the owner stopped mid-commit"))
            for pending in self._rounds:
                if not pending.done.is_set():
                    pending.finish(AppendFailed(f"partition {self.label}: the owner stopped"))
            self._rounds.clear()
            self._space.set()

    # -- what the RoundCommitter asks of the partition (rounds.py) --------------

    @property
    def label(self) -> str:
        return f"{self.topic}[{self.partition}]"

    @property
    def own_key(self) -> bytes:
        """The owner key whose create revision is the epoch."""
        return self._own

    def poke(self) -> None:
        """One of this owner's rounds was decided: its loop looks again."""
        self._wake.set()

    def mark_stale(self) -> None:
        """A round's outcome was not learned: re-read the next offset first."""
        self._stale = True

    async def sequence(self, round_: _Round, after: int | None = None) -> bytes | AppendError:
        """Give the round's batches their offsets, from ``after`` (the end
        of the partition's round before it, still out) or else from the
        next one this owner knows (re-read first after an unknown outcome):
        the round's bytes in the stored format, else why it cannot be
        committed."""
        if self.lost is not None or not self.keeper.held():
            return self.lose(self.lost or f"lease {self.keeper.lease:x} is past its deadline")
        if after is not None:
            base = after  # (an unknown outcome of that round breaks this one's chain)
        elif self._stale:
            try:
                if not await self._refresh():
                    return self.lose(f"epoch {self.epoch} no longer holds the partition")
            except EtcdError as exc:
                return AppendFailed(f"could not re-read the next offset: {exc}")
        if after is None:
            base = self.next_offset
        if round_.expected is not None and base != round_.expected:
            return AppendFailed(
                f"partition {self.label}: not sent: its offsets would start at {base}, "
                f"not at {round_.expected} where they were appended (a round before it failed)"
            )
        parts = []
        for item in round_.items:
            item.base = base
            parts.append(encode_stored(base, item.count, item.timestamp, item.batch))
            base += item.count
        return b"".join(parts)

    def entry_for(self, round_: _Round, name: str, start: int, size: int) -> IndexEntry:
        """The index entry of a sequenced round written at bytes
        ``[start, start+size)`` of object ``name``."""
        first, last = round_.items[0], round_.items[-1]
        return IndexEntry(first.base, name, start, size, last.base + last.count - first.base, first.timestamp)

    async def ids_writes(self, round_: _Round) -> list[Op]:
        """The round's ``ids/`` key (its named batches' msg-ids, offsets,
        counts and times) as a put under the current window lease, for the
        exactly-once window of a next owner (EtcdError when no lease can be
        granted); nothing for a round without msg-ids."""
        if not round_.named:
            return []
        if self.windows is None:
            self.windows = WindowLeases(self.etcd, self.dedup_window)
        lease = await self.windows.current()
        named = [(i.named, i.base, i.count, i.timestamp) for i in round_.items if i.named is not None]
        return [Put(self.keys.ids(self.topic, self.partition, round_.items[0].base), encode_ids(named), lease)]

    def round_txn(self, entry: IndexEntry, extra: list[Op] | None = None) -> tuple[list[Compare], list[Op], list[Op]]:
        """This partition's part of a round's transaction: three compares,
        its writes, and three reads for when it is refused (``refusal``)."""
        gone = self.keys.gone(entry.object)
        compare = [
            Compare.create_revision(self._own, "==", self.epoch),
            Compare.value(self._next, "==", str(entry.first).encode())
            if self._next_exists
            else Compare.create_revision(self._next, "==", 0),
            Compare.create_revision(gone, "==", 0),
        ]
        success: list[Op] = [
            Put(self._next, str(entry.first + entry.count).encode()),
            Put(self.keys.index(self.topic, self.partition, entry.first), entry.encode()),
            *(extra or []),
        ]
        return compare, success, [Get(self._own), Get(self._next), Get(gone)]

    async def indexed_at(self, first: int) -> str | None:
        """The object the index entry at ``first`` names ("?" when it is
        not an entry), None when there is none."""
        found = await self.etcd.get(self.keys.index(self.topic, self.partition, first))
        if found is None:
            return None
        try:
            return IndexEntry.decode(first, found.value).object
        except ValueError:
            return "?"

    async def epoch_holds(self) -> bool:
        own = await self.etcd.get(self._own)
        return own is not None and own.create_revision == self.epoch

    async def wait_commits(self, count: int) -> None:
        """Return once this owner has committed ``count`` rounds."""
        while self.commits < count:  # each wake-up is one more commit
            await self._commit_event.wait()

    def committed(self, entry: IndexEntry) -> AppendError | None:
        """A round's transaction committed: None when it may be acknowledged."""
        self.next_offset = entry.first + entry.count
        self._next_exists = True
        self._stale = False
        self.commits += 1
        self._commit_event.set()
        self._commit_event = anyio.Event()
        if not self.keeper.held():
            # Committed, but acknowledgements stop at the lease's deadline
            # (docs/cluster.md §6): the publisher resends (deduplicated by msg-id).
            self.lose(f"lease {self.keeper.lease:x} passed its deadline during the commit")
            return OutcomeUnknown(
                f"partition {self.label}: committed at {entry.first} but not acknowledged: the lease passed its deadline"
            )
        return None

    def refusal(self, entry: IndexEntry, result: TxnResult, at: int = 0) -> NotOwner | None:
        """After a refused transaction, from this partition's reads at
        ``at``: NotOwner (the partition lost) when its own compares fail,
        None when they held (another partition's refused it)."""
        own, nxt, gone = _kvs(result, at), _kvs(result, at + 1), _kvs(result, at + 2)
        expected = [str(entry.first).encode()] if self._next_exists else []
        if own and own[0].create_revision == self.epoch and not gone and [kv.value for kv in nxt] == expected:
            return None
        return self.refused(entry, result, at)

    def refused(self, entry: IndexEntry, result: TxnResult, at: int = 0) -> NotOwner:
        own, nxt, gone = _kvs(result, at), _kvs(result, at + 1), _kvs(result, at + 2)
        if not own or own[0].create_revision != self.epoch:
            now = f"epoch {own[0].create_revision}" if own else "no owner"
            return self.lose(f"fenced: epoch {self.epoch} was replaced ({now})")
        if gone:
            return self.lose(f"object {entry.object} was tombstoned before its commit")
        return self.lose(
            f"next offset moved: expected {entry.first}, etcd has {nxt[0].value.decode() if nxt else 'none'}"
        )

    async def _refresh(self) -> bool:
        """Re-read the next offset, fenced on the epoch; False if lost."""
        result = await self.etcd.txn([Compare.create_revision(self._own, "==", self.epoch)], [Get(self._next)])
        if result.succeeded:
            self._set_next(_kvs(result, 0))
            self._stale = False
        return result.succeeded


class PartitionReader:
    """Reads one partition's committed batches, on any node: the index
    entry holding an offset from etcd (one range read), its bytes from the
    object store (one ranged GET per entry)."""

    def __init__(
        self,
        etcd: Etcd,
        store: ObjectStore,
        topic: str,
        partition: int,
        *,
        keys: ClusterKeys | None = None,
        max_entries: int = 64,
    ) -> None:
        self.etcd = etcd
        self.store = store
        self.topic = topic
        self.partition = partition
        self.keys = keys or ClusterKeys()
        self.max_entries = max_entries
        self._prefix = self.keys.index_prefix(topic, partition)

    async def next_offset(self) -> int:
        """The offset the next committed message will get (0 when empty)."""
        kv = await self.etcd.get(self.keys.next(self.topic, self.partition))
        return int(kv.value) if kv is not None else 0

    async def read(self, offset: int, max_bytes: int = 1 << 20) -> list[StoredBatch]:
        """Batches from the one holding ``offset`` on, in order, up to about
        ``max_bytes`` (at least one batch while ``offset`` is committed);
        empty at or past the end. Every batch is checked (both CRCs, dense
        offsets); DataLoss when the data cannot be served."""
        name = f"{self.topic}[{self.partition}]"
        end = prefix_end(self._prefix)
        below = await self.etcd.range(
            self._prefix, self.keys.index(self.topic, self.partition, offset) + b"\x00", limit=1, descending=True
        )
        start = below.kvs[0].key if below.kvs else self._prefix  # below the first entry: from the first
        found = await self.etcd.range(start, end, limit=self.max_entries)
        out: list[StoredBatch] = []
        size = 0
        expected: int | None = None
        for kv in found.kvs:
            try:
                entry = IndexEntry.decode(int(kv.key[len(self._prefix) :]), kv.value)
            except ValueError:
                raise DataLoss(name, expected if expected is not None else offset, offset, "damaged") from None
            if expected is not None and entry.first != expected:
                raise DataLoss(name, expected, entry.first - 1, "missing")
            expected = entry.first + entry.count
            if expected <= offset:
                continue  # the entry below ends before the offset: offset is past the end
            try:
                data = await self.store.get(entry.object, entry.start, entry.start + entry.size - 1)
            except NoSuchKey:
                raise DataLoss(name, entry.first, expected - 1, "missing") from None
            if len(data) != entry.size:
                raise DataLoss(name, entry.first, expected - 1, "damaged")
            batches = [b for b in decode_stored(data, entry.first, entry.count, name) if b.next_offset > offset]
            out.extend(batches)
            size += sum(len(b.batch) for b in batches)
            if size >= max_bytes:
                break
        return out


def _kvs(result: TxnResult, index: int) -> list[KeyValue]:
    response = result.responses[index] if index < len(result.responses) else None
    return response if isinstance(response, list) else []


def _json_object(value: bytes) -> dict[str, Any] | None:
    try:
        decoded = json.loads(value)
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


def _checked_count(batch: bytes) -> int:
    """A wire batch's message count; ValueError when it does not check."""
    try:
        count, crc_ok = check_batch(batch)
    except RemoteProtocolError as exc:
        raise ValueError(str(exc)) from None
    if not crc_ok:
        raise ValueError("batch CRC mismatch")
    return count
