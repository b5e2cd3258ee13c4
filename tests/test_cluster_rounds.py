"""A node's commit rounds across its partitions, on real etcd and SeaweedFS
(pybroker.server.cluster.rounds; docs/cluster.md §5).

The rounds a node's partitions close together (a cluster store commits
all its topics' pending batches at once) go out as one object and one
etcd transaction; each partition's index entry names its own byte range
of the object. A partition refused in the transaction (fenced) is refused
alone and the others commit; a lost answer is resolved for all of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from helpers.cluster import Server, etcd_server, weed_server
from pybroker.protocol import check_batch, encode_batch
from pybroker.server.cluster.entries import IndexEntry
from pybroker.server.cluster.etcd import Etcd, EtcdError, EtcdUnavailable, TxnResult
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.lease import LeaseKeeper
from pybroker.server.cluster.objects import ObjectStore
from pybroker.server.cluster.outcomes import AppendFailed, ChainBroken, NotOwner, OutcomeUnknown
from pybroker.server.cluster.partition import PartitionOwner, PartitionReader
from pybroker.server.cluster.rounds import MAX_GROUP, ObjectNames, RoundCommitter

WAIT = 30.0
TOPIC = "metrics"
BUCKET = "pybroker-rounds-tests"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server, str]]:
    tmp = tmp_path_factory.mktemp("cluster")
    with etcd_server(tmp) as (etcd_url, etcd), weed_server(tmp) as (s3_url, _weed):
        yield etcd_url, etcd, s3_url


class CountsTxns(Etcd):
    """An etcd client that counts its transactions and, once ``lose`` is
    set, loses the answer to the next one: ``applied`` (etcd ran it) or
    ``unsent`` (it never reached etcd). With ``hold`` set, the next
    transaction waits for it before it is sent (``held`` is set then);
    with ``refuse`` set, the next one is refused by etcd itself (not
    applied). ``events`` records each transaction's start and end."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout=2.0)
        self.txns = 0
        self.lose = ""
        self.hold: trio.Event | None = None
        self.held = trio.Event()
        self.refuse = False
        self.events: list[str] = []

    async def txn(self, *args: Any, **kwargs: Any) -> TxnResult:
        self.txns += 1
        self.events.append(f"txn {self.txns}")
        hold, self.hold = self.hold, None
        if hold is not None:
            self.held.set()
            await hold.wait()
        if self.refuse:
            self.refuse = False
            raise EtcdError("injected: etcdserver: too many operations in txn request")
        try:
            return await self._answer(*args, **kwargs)
        finally:
            self.events.append(f"txn {self.txns} answered")

    async def _answer(self, *args: Any, **kwargs: Any) -> TxnResult:
        mode, self.lose = self.lose, ""
        if mode == "applied":
            assert (await super().txn(*args, **kwargs)).succeeded
        if mode:
            raise EtcdUnavailable(f"injected: the answer was lost ({mode})")
        return await super().txn(*args, **kwargs)


@attrs.define
class Node:
    """One node's partitions of TOPIC: owners sharing a keeper, object
    names and a RoundCommitter, as a cluster node's ownership manager
    makes them."""

    etcd: CountsTxns
    store: ObjectStore
    keys: ClusterKeys
    keeper: LeaseKeeper
    rounds: RoundCommitter = attrs.field(factory=RoundCommitter)
    owners: list[PartitionOwner] = attrs.field(factory=list)

    async def own(self, partitions: Sequence[int]) -> None:
        names = ObjectNames(self.keeper.lease)
        for p in partitions:
            owner = PartitionOwner(
                self.etcd, self.store, self.keeper, TOPIC, p, keys=self.keys, names=names, rounds=self.rounds
            )
            assert await owner.acquire()
            self.owners.append(owner)

    async def data_objects(self) -> list[str]:
        return [info.key for info in await self.store.list("data/")]

    async def entries(self, partition: int) -> list[IndexEntry]:
        prefix = self.keys.index_prefix(TOPIC, partition)
        kvs = (await self.etcd.get_prefix(prefix)).kvs
        return [IndexEntry.from_key(prefix, kv.key, kv.value) for kv in kvs]

    async def read(self, partition: int) -> list[bytes]:
        reader = PartitionReader(self.etcd, self.store, TOPIC, partition, keys=self.keys)
        return [b.batch for b in await reader.read(0)]


@pytest.fixture
async def node(servers: tuple[str, Server, str], request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    etcd_url, _, s3_url = servers
    name = request.node.name
    async with CountsTxns(etcd_url) as etcd, ObjectStore(s3_url, BUCKET, prefix=f"{name}/") as store:
        with trio.fail_after(WAIT):
            await store.create_bucket()
            keeper = LeaseKeeper(etcd, 10)
            await keeper.grant()
        yield Node(etcd, store, ClusterKeys(f"/r/{name}/".encode()), keeper)


def batch_of(tag: str, count: int) -> bytes:
    return encode_batch([f"{tag}:{i}".encode() for i in range(count)])


async def append_all(
    node: Node, batches: dict[int, list[bytes]], outcomes: dict[int, int | Exception]
) -> None:
    """Run the node's committer and owners; append each partition's
    batches as one closed round, all at once (as ``ClusterStore.sync``
    does); record each partition's base offset or error."""

    async def append(owner: PartitionOwner) -> None:
        rounds = [(b, check_batch(b)[0], 0) for b in batches[owner.partition]]
        try:
            outcomes[owner.partition] = await owner.append_round(rounds)
        except Exception as exc:  # the outcome under test
            outcomes[owner.partition] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.rounds.run)
        for owner in node.owners:
            nursery.start_soon(owner.run)
        # Every loop waiting, as on a running node: the rounds then reach
        # the committer in one turn of the scheduler.
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as appenders:
            for owner in node.owners:
                if owner.partition in batches:
                    appenders.start_soon(append, owner)
        nursery.cancel_scope.cancel()


async def test_rounds_closed_together_share_one_object_and_one_transaction(node: Node) -> None:
    with trio.fail_after(WAIT):
        await node.own([0, 1, 2])
        before = node.etcd.txns
        batches = {p: [batch_of(f"p{p}b{i}", 1 + p + i) for i in range(2)] for p in range(3)}
        outcomes: dict[int, int | Exception] = {}
        await append_all(node, batches, outcomes)
        assert outcomes == {0: 0, 1: 0, 2: 0}
        assert (node.etcd.txns - before, node.rounds.groups, node.rounds.rounds) == (1, 1, 3)
        (obj,) = await node.data_objects()
        ranges = []
        for p in range(3):
            (entry,) = await node.entries(p)
            assert (entry.object, entry.first, entry.count) == (obj, 0, sum(1 + p + i for i in range(2)))
            ranges.append((entry.start, entry.size))
            assert await node.read(p) == batches[p]
            assert node.owners[p].next_offset == entry.count
        # The partitions' runs lie one after another in the object (in the
        # order their rounds reached the committer).
        ranges.sort()
        assert ranges[0][0] == 0 and all(ranges[i][0] == sum(ranges[i - 1]) for i in (1, 2))
        assert sum(ranges[-1]) == len(await node.store.get(obj))


async def test_a_fenced_partition_is_refused_alone_and_the_others_commit(node: Node) -> None:
    """Partition 1 was taken over behind the node's back (its owner key
    deleted and taken under another lease): the group's transaction is
    refused, partition 1's round with NotOwner, and the others commit in
    a second transaction naming the same object."""
    with trio.fail_after(WAIT):
        await node.own([0, 1, 2])
        await node.etcd.delete(node.keys.own(TOPIC, 1))
        other = LeaseKeeper(node.etcd, 10)
        await other.grant()
        thief = PartitionOwner(node.etcd, node.store, other, TOPIC, 1, keys=node.keys)
        assert await thief.acquire()
        before = node.etcd.txns
        batches = {p: [batch_of(f"p{p}", 2)] for p in range(3)}
        outcomes: dict[int, int | Exception] = {}
        await append_all(node, batches, outcomes)
        assert outcomes[0] == 0 == outcomes[2]
        assert isinstance(outcomes[1], NotOwner) and "fenced" in str(outcomes[1])
        assert node.owners[1].lost is not None
        assert (node.etcd.txns - before, node.rounds.groups) == (2, 1)
        (obj,) = await node.data_objects()
        assert [e.object for p in (0, 2) for e in await node.entries(p)] == [obj, obj]
        assert await node.entries(1) == []
        assert await node.read(0) == batches[0] and await node.read(2) == batches[2]


@pytest.mark.parametrize("mode", ["applied", "unsent"])
async def test_a_lost_answer_is_resolved_for_every_partition_of_the_group(node: Node, mode: str) -> None:
    """The group's transaction loses its answer: the first partition's
    index entry says whether it committed (applied: nothing is sent again)
    or not (unsent: sent again once); each partition is stored once."""
    with trio.fail_after(WAIT):
        await node.own([0, 1])
        node.etcd.lose = mode
        before = node.etcd.txns
        batches = {p: [batch_of(f"p{p}", 3)] for p in range(2)}
        outcomes: dict[int, int | Exception] = {}
        await append_all(node, batches, outcomes)
        assert outcomes == {0: 0, 1: 0}
        assert node.etcd.txns - before == (1 if mode == "applied" else 2)
        for p in range(2):
            assert [(e.first, e.count) for e in await node.entries(p)] == [(0, 3)]
            assert await node.read(p) == batches[p]
            assert node.owners[p].next_offset == 3


async def test_a_group_holds_no_more_partitions_than_one_transaction_may(node: Node) -> None:
    """More partitions than one transaction's compares allow (etcd's 128
    operations): the rounds go out in two groups, every one committed."""
    with trio.fail_after(WAIT * 2):
        count = MAX_GROUP + 3
        await node.own(range(count))
        batches = {p: [batch_of(f"p{p}", 1)] for p in range(count)}
        outcomes: dict[int, int | Exception] = {}
        await append_all(node, batches, outcomes)
        assert outcomes == dict.fromkeys(range(count), 0)
        assert (node.rounds.groups, node.rounds.rounds) == (2, count)
        assert len(await node.data_objects()) == 2
        for p in (0, count - 1):
            assert await node.read(p) == batches[p]


async def test_an_owner_stopped_mid_commit_leaves_the_rest_of_its_group_to_commit(node: Node) -> None:
    """The group is sent by the committer's runner, not by an owner's task:
    partition 0's owner is stopped (handed over, say) while the group's
    object is written; its round is answered OutcomeUnknown (it may have
    committed: here it did), and partition 1's round commits as if
    nothing happened."""
    with trio.fail_after(WAIT):
        await node.own([0, 1])
        written = trio.Event()
        go_on = trio.Event()

        async def pause(name: str) -> None:
            written.set()
            await go_on.wait()

        node.owners[0].before_commit = pause
        outcomes: dict[int, int | Exception] = {}

        async def append(owner: PartitionOwner) -> None:
            try:
                outcomes[owner.partition] = await owner.append_round([(batch_of(f"p{owner.partition}", 2), 2, 0)])
            except Exception as exc:  # the outcome under test
                outcomes[owner.partition] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.rounds.run)
            scopes = [trio.CancelScope(), trio.CancelScope()]

            async def run(owner: PartitionOwner, scope: trio.CancelScope) -> None:
                with scope:
                    await owner.run()

            for owner, scope in zip(node.owners, scopes):
                nursery.start_soon(run, owner, scope)
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as appenders:
                for owner in node.owners:
                    appenders.start_soon(append, owner)
                await written.wait()
                scopes[0].cancel()  # partition 0's owner stops mid-commit
                await trio.testing.wait_all_tasks_blocked()
                go_on.set()
            nursery.cancel_scope.cancel()
        assert isinstance(outcomes[0], OutcomeUnknown) and "mid-commit" in str(outcomes[0]), outcomes
        assert outcomes[1] == 0
        assert node.rounds.groups == 1
        assert [(e.first, e.count) for e in await node.entries(1)] == [(0, 2)]
        assert [(e.first, e.count) for e in await node.entries(0)] == [(0, 2)]  # it did commit


async def test_a_round_waiting_when_the_committer_stops_is_refused_not_left_waiting(node: Node) -> None:
    """The runner stops (the node's incarnation ends) with a round waiting
    to be taken: the round is answered AppendFailed (nothing was sent),
    rather than leaving its owner waiting for ever."""
    with trio.fail_after(WAIT):
        await node.own([0])
        owner = node.owners[0]
        outcome: list[int | Exception] = []

        async def append() -> None:
            try:
                outcome.append(await owner.append_round([(batch_of("p0", 1), 1, 0)]))
            except Exception as exc:  # the outcome under test
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner.run)
            nursery.start_soon(append)
            await trio.testing.wait_all_tasks_blocked()  # the round waits: no runner yet
            async with trio.open_nursery() as runner:
                runner.start_soon(node.rounds.run)
                runner.cancel_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert len(outcome) == 1 and isinstance(outcome[0], AppendFailed), outcome
        assert "committer stopped" in str(outcome[0])
        assert await node.data_objects() == [] and await node.entries(0) == []


def recording_puts(node: Node) -> None:
    """Record each PUT of the node's object store in ``node.etcd.events``
    (one timeline with the transactions)."""
    real = node.store.put_if_absent

    async def put(key: str, data: bytes) -> bool:
        node.etcd.events.append(f"put {key}")
        return await real(key, data)

    node.store.put_if_absent = put  # type: ignore[method-assign]


async def test_a_partitions_next_round_is_put_while_its_last_transaction_is_out(node: Node) -> None:
    """Two rounds of one partition handed over back to back (two store
    syncs overlapping): the second's object is PUT while the first's
    transaction is held; its own transaction goes only once the first has
    committed, and its offsets follow the first's. (With the owner's
    ``pipeline`` at 1 the second PUT waits for the first transaction: the
    test fails so.)"""
    with trio.fail_after(WAIT):
        await node.own([0])
        owner = node.owners[0]
        recording_puts(node)
        first, second = [batch_of("first", 3)], [batch_of("second", 2)]
        gate = trio.Event()
        node.etcd.hold = gate
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.rounds.run)
            nursery.start_soon(owner.run)
            await trio.testing.wait_all_tasks_blocked()
            rounds = [owner.submit_round([(b, check_batch(b)[0], 0) for b in batches]) for batches in (first, second)]
            await node.etcd.held.wait()  # the first round's transaction is out
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            bases = [await owner.round_outcome(r) for r in rounds]
            nursery.cancel_scope.cancel()
        assert bases == [0, 3]
        timeline = node.etcd.events[2:]  # after the acquisition's transaction
        puts = [i for i, e in enumerate(timeline) if e.startswith("put")]
        assert len(puts) == 2 and puts[1] < timeline.index("txn 2 answered"), timeline
        assert [e for e in timeline if e.startswith("txn")] == ["txn 2", "txn 2 answered", "txn 3", "txn 3 answered"]
        entries = await node.entries(0)
        assert [(e.first, e.count) for e in entries] == [(0, 3), (3, 2)]
        assert entries[0].object != entries[1].object
        assert await node.read(0) == first + second
        assert owner.next_offset == 5


async def test_a_round_after_one_not_committed_is_not_sent(node: Node) -> None:
    """The first of two rounds out at once is refused by etcd (not
    applied) while the second's object is already PUT: the second is
    ChainBroken without its transaction being sent (its offsets followed
    the first's), the partition stays owned, and the next round commits
    at offset 0."""
    with trio.fail_after(WAIT):
        await node.own([0])
        owner = node.owners[0]
        recording_puts(node)
        before = node.etcd.txns
        gate = trio.Event()
        node.etcd.hold = gate
        node.etcd.refuse = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.rounds.run)
            nursery.start_soon(owner.run)
            await trio.testing.wait_all_tasks_blocked()
            batches = [batch_of("refused", 3), batch_of("after", 2)]
            rounds = [owner.submit_round([(b, check_batch(b)[0], 0)]) for b in batches]
            await node.etcd.held.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert len([e for e in node.etcd.events if e.startswith("put")]) == 2, node.etcd.events
            gate.set()
            with pytest.raises(AppendFailed, match="etcd refused"):
                await owner.round_outcome(rounds[0])
            with pytest.raises(ChainBroken, match="the round before it was not committed"):
                await owner.round_outcome(rounds[1])
            assert node.etcd.txns - before == 1  # the second round's was never sent
            again = batch_of("again", 1)
            assert await owner.append_round([(again, 1, 0)]) == 0
            assert owner.lost is None  # still the partition's owner
            nursery.cancel_scope.cancel()
        assert [(e.first, e.count) for e in await node.entries(0)] == [(0, 1)]
        assert await node.read(0) == [again]


async def test_a_round_queued_behind_a_failed_one_is_not_sent_at_other_offsets(node: Node) -> None:
    """Three rounds of one sync, appended at offsets 0, 3 and 5: two are
    out at once, the third waits. The first is refused by etcd: the second
    is ChainBroken, and the third, handed over only then, would start at 0,
    not where it was appended: it fails unsent rather than be stored at
    offsets its appender never gave it (whose publishers the store refuses
    with the first). A round appended at 0 then commits there."""
    with trio.fail_after(WAIT):
        await node.own([0])
        owner = node.owners[0]
        before = node.etcd.txns
        gate = trio.Event()
        node.etcd.hold = gate
        node.etcd.refuse = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.rounds.run)
            nursery.start_soon(owner.run)
            await trio.testing.wait_all_tasks_blocked()
            batches = [batch_of("a", 3), batch_of("b", 2), batch_of("c", 1)]
            rounds = [
                owner.submit_round([(b, check_batch(b)[0], 0)], base=base) for b, base in zip(batches, (0, 3, 5), strict=True)
            ]
            await node.etcd.held.wait()
            gate.set()
            with pytest.raises(AppendFailed, match="etcd refused"):
                await owner.round_outcome(rounds[0])
            with pytest.raises(ChainBroken):
                await owner.round_outcome(rounds[1])
            with pytest.raises(AppendFailed, match="would start at 0, not at 5"):
                await owner.round_outcome(rounds[2])
            assert node.etcd.txns - before == 1  # only the refused one was sent
            again = batch_of("again", 1)
            assert await owner.round_outcome(owner.submit_round([(again, 1, 0)], base=0)) == 0
            nursery.cancel_scope.cancel()
        assert await node.read(0) == [again]
