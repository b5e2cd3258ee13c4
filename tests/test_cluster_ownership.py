"""The ownership manager on real etcd and SeaweedFS
(pybroker.server.cluster.ownership; docs/cluster.md §4).

Nodes each have their own etcd client, object store client and member
lease; they register under ``members/``, read ``topics/`` and keep
``own/`` matching the rendezvous ranking of the live members. Appends go
through whichever node owns the partition (a Publisher that follows
ownership as a client following NOT_OWNER would) and every outcome is
recorded; the checker reads each partition back from etcd and the store.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from helpers.cluster import Server, etcd_server, weed_server
from helpers.cluster_nodes import (
    ClusterConfig,
    ClusterNode,
    Outcome,
    Publisher,
    batch_of,
    check_partition,
    settled,
    wait_until,
)
from helpers.procs import spawn_argv
from pybroker.protocol import check_batch
from pybroker.server.cluster.etcd import Etcd
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.objects import ObjectStore
from pybroker.server.cluster.partition import PartitionReader
from pybroker.server.cluster.ranking import first, rank, weight
from pybroker.server.cluster.topics import TopicRegistry

WAIT = 60.0
TOPIC = "events/eu"
PARTITIONS = 12
BUCKET = "pybroker-ownership-tests"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server, str]]:
    tmp = tmp_path_factory.mktemp("cluster")
    with etcd_server(tmp) as (etcd_url, etcd), weed_server(tmp) as (s3_url, _weed):
        yield etcd_url, etcd, s3_url


@pytest.fixture
async def config(servers: tuple[str, Server, str], request: pytest.FixtureRequest) -> AsyncIterator[ClusterConfig]:
    etcd_url, _etcd, s3_url = servers
    name = request.node.name
    cfg = ClusterConfig(etcd_url, s3_url, BUCKET, f"{name}/", ClusterKeys(f"/t/{name}/".encode()))
    async with ObjectStore(s3_url, BUCKET, prefix=cfg.object_prefix) as store, Etcd(etcd_url) as etcd:
        with trio.fail_after(WAIT):
            await store.create_bucket()
            await TopicRegistry(etcd, keys=cfg.keys).create(TOPIC, PARTITIONS)
    yield cfg


async def start(nursery: trio.Nursery, config: ClusterConfig, names: list[str], **kwargs: bool) -> list[ClusterNode]:
    nodes = [ClusterNode(config, name, **kwargs) for name in names]
    for node in nodes:
        await nursery.start(node.run)
    return nodes


async def check_all(config: ClusterConfig, publisher: Publisher | _Recorded) -> dict[int, int]:
    """Every partition read back and checked; {partition: end offset}."""
    ends = {}
    async with Etcd(config.etcd_url) as etcd, ObjectStore(config.s3_url, BUCKET, prefix=config.object_prefix) as store:
        for p in range(PARTITIONS):
            reader = PartitionReader(etcd, store, TOPIC, p, keys=config.keys)
            ends[p] = await check_partition(reader, publisher.history, p)
    return ends


def holders(nodes: list[ClusterNode]) -> dict[int, tuple[str, int]]:
    """{partition: (owner node, epoch)} as the first running node sees it."""
    manager = next(n.manager for n in nodes if n.manager is not None and not n.ended.is_set())
    assert manager is not None
    out = {}
    for p in range(PARTITIONS):
        info = manager.owner_of(TOPIC, p)
        assert info is not None
        out[p] = (info.node, info.epoch)
    return out


def ranked_first(joiner: str) -> set[int]:
    """The partitions ``joiner`` ranks first for beside n1, n2 and n3."""
    return {p for p in range(PARTITIONS) if first(["n1", "n2", "n3", joiner], TOPIC, p) == joiner}


def test_ranking_is_stable_and_moves_only_what_it_must() -> None:
    # A fixed value: the same in every process (not Python's salted hash()).
    assert weight("a", "t", 0) == weight("a", "t", 0) == int.from_bytes(
        __import__("hashlib").blake2b(b'["a","t",0]', digest_size=8).digest(), "big"
    )
    three, four = ["n1", "n2", "n3"], ["n1", "n2", "n3", "n4"]
    moved = 0
    for p in range(200):
        assert rank(three, "t", p)[0] == first(three, "t", p)
        before, after = first(three, "t", p), first(four, "t", p)
        if after != before:
            assert after == "n4"  # a joining node takes partitions only for itself
            moved += 1
        assert first(["n1", "n3"], "t", p) == [n for n in rank(three, "t", p) if n != "n2"][0]
    assert 20 < moved < 90  # about a quarter of 200 (a spread, not a constant)
    assert first([], "t", 0) is None


async def test_every_partition_has_one_owner_the_ranking_picks(config: ClusterConfig) -> None:
    """Three nodes, a 12-partition topic: each partition is held by exactly
    the node ranked first, every node agrees on every owner, and appends
    through the owners get dense offsets that read back."""
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nodes = await start(nursery, config, ["n1", "n2", "n3"])
            await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
            owned = holders(nodes)
            assert {owner for owner, _ in owned.values()} == {"n1", "n2", "n3"}  # a spread over 12 partitions
            for node in nodes:
                assert node.manager is not None
                mine = {p for p in range(PARTITIONS) if node.manager.local(TOPIC, p) is not None}
                assert mine == {p for p, (owner, _) in owned.items() if owner == node.name}
                info = node.manager.owner_of(TOPIC, 0)
                assert info is not None and info.addr == f"addr-{info.node}"
            publisher = Publisher(nodes, TOPIC)
            async with trio.open_nursery() as publishers:
                for p in range(PARTITIONS):
                    for i in range(3):
                        publishers.start_soon(publisher.append, p, batch_of(f"p{p}.{i}", 2))
            assert all(o.result == "ok" for o in publisher.history), publisher.history
            assert holders(nodes) == owned  # nothing moved
            nursery.cancel_scope.cancel()
        assert await check_all(config, publisher) == {p: 6 for p in range(PARTITIONS)}


async def test_a_graceful_stop_hands_partitions_over_without_loss(config: ClusterConfig) -> None:
    """Appends stream into every partition while a node leaves: its
    partitions move to the nodes ranked next, the others stay where they
    were, no append is lost or of unknown outcome, and offsets continue
    densely across the hand-over."""
    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            nodes = await start(nursery, config, ["n1", "n2", "n3"])
            await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
            before = holders(nodes)
            publisher = Publisher(nodes, TOPIC)
            stop = trio.Event()
            async with trio.open_nursery() as publishers:
                for p in range(PARTITIONS):
                    publishers.start_soon(publisher.stream, p, "s", stop)
                await wait_until(nodes, lambda: all(len(publisher.acked(p)) >= 3 for p in range(PARTITIONS)), WAIT)
                leaving = nodes[1]
                assert leaving.manager is not None
                handed_over = leaving.manager.handed_over  # during the start, as nodes joined
                await leaving.leave()
                assert leaving.manager.handed_over - handed_over == sum(1 for owner, _ in before.values() if owner == "n2")
                await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
                marks = {p: len(publisher.acked(p)) for p in range(PARTITIONS)}
                await wait_until(
                    nodes, lambda: all(len(publisher.acked(p)) >= marks[p] + 3 for p in range(PARTITIONS)), WAIT
                )
                stop.set()
            after = holders(nodes)
            nursery.cancel_scope.cancel()
        for p, (owner, epoch) in before.items():
            if owner == "n2":
                assert after[p][0] == first(["n1", "n3"], TOPIC, p) and after[p][1] > epoch
            else:
                assert after[p] == (owner, epoch)  # not moved, not even re-acquired
        assert [o for o in publisher.history if o.result == "unknown"] == []
        moved = [p for p, (owner, _) in before.items() if owner == "n2"]
        for p in moved:  # the new owner continued where the old one stopped
            acked = publisher.acked(p)
            assert {o.node for o in acked} == {"n2", after[p][0]}
        ends = await check_all(config, publisher)
        assert all(ends[p] == sum(check_batch(o.batch)[0] for o in publisher.acked(p)) for p in range(PARTITIONS))


async def test_a_node_whose_lease_is_revoked_loses_its_partitions(config: ClusterConfig) -> None:
    """A node's lease is revoked behind its back (as if it were cut off from
    etcd past its TTL) while appends stream: its owner keys vanish, the
    nodes ranked next take its partitions and continue the offsets; none
    of its appends is acknowledged after it was fenced (every acknowledged
    batch reads back at its offset; the rest are refused or unknown)."""
    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            nodes = await start(nursery, config, ["n1", "n2", "n3"], rejoin=False)
            await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
            before = holders(nodes)
            victim = nodes[2]
            assert victim.keeper is not None
            publisher = Publisher(nodes, TOPIC)
            stop = trio.Event()
            async with trio.open_nursery() as publishers:
                for p in range(PARTITIONS):
                    publishers.start_soon(publisher.stream, p, "r", stop)
                await wait_until(nodes, lambda: all(len(publisher.acked(p)) >= 3 for p in range(PARTITIONS)), WAIT)
                victims = {config.keys.own(TOPIC, p) for p, (owner, _) in before.items() if owner == "n3"}
                async with Etcd(config.etcd_url) as etcd, etcd.watch(config.keys.own_prefix, prefix=True) as watch:
                    await etcd.revoke(victim.keeper.lease)
                    revoked_at = trio.current_time()
                    fenced_at = 0  # the revision at which etcd deleted its owner keys
                    while not fenced_at:
                        batch = await watch.__anext__()
                        fenced_at = next((e.kv.mod_revision for e in batch.events if e.kv.key in victims), 0)
                assert victim.keeper.held()  # it does not know yet
                await victim.ended.wait()  # it finds out at its next renewal, and stops
                assert victim.lease_lost.is_set()
                await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
                marks = {p: len(publisher.acked(p)) for p in range(PARTITIONS)}
                await wait_until(
                    nodes, lambda: all(len(publisher.acked(p)) >= marks[p] + 3 for p in range(PARTITIONS)), WAIT
                )
                stop.set()
            after = holders(nodes)
            nursery.cancel_scope.cancel()
        for p, (owner, epoch) in before.items():
            if owner == "n3":
                assert after[p][0] == first(["n1", "n2"], TOPIC, p) and after[p][1] > epoch
            else:
                assert after[p] == (owner, epoch)
        await check_all(config, publisher)
        # What it acknowledged, even when the answer came after the
        # revocation, had been committed before its keys were deleted.
        async with Etcd(config.etcd_url) as etcd:
            for o in publisher.history:
                if o.node == "n3" and o.result == "ok":
                    below = await etcd.range(
                        config.keys.index_prefix(TOPIC, o.partition),
                        config.keys.index(TOPIC, o.partition, o.offset) + b"\x00",
                        limit=1,
                        descending=True,
                    )
                    assert below.kvs[0].create_revision < fenced_at, (o, fenced_at)
        late = [o.result for o in publisher.history if o.node == "n3" and o.at > revoked_at]
        print(f"\nrevoked: n3's outcomes answered after the revocation: {sorted(Counter(late).items())}")


async def test_a_member_key_deleted_behind_a_nodes_back_is_written_again(config: ClusterConfig) -> None:
    """Someone deletes a live node's member key (its lease lives on): the
    node writes it again, and the ownership it held does not move."""
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nodes = await start(nursery, config, ["n1", "n2"])
            await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
            before = holders(nodes)
            async with Etcd(config.etcd_url) as etcd:
                assert await etcd.delete(config.keys.member("n1")) == 1
                with trio.fail_after(WAIT):
                    while (kv := await etcd.get(config.keys.member("n1"))) is None:
                        await trio.sleep(0.05)
                assert nodes[0].keeper is not None and kv.lease == nodes[0].keeper.lease
            await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
            after = holders(nodes)
            nursery.cancel_scope.cancel()
        # The other node may have ranked without n1 meanwhile, but no owner
        # key was free, so nothing moved.
        assert after == before


async def test_a_joining_node_takes_exactly_the_partitions_it_ranks_first_for(config: ClusterConfig) -> None:
    """A fourth node joins three settled ones: it ends up holding exactly
    the partitions it ranks first for, handed over by their owners, and
    every other partition keeps its owner and epoch; offsets continue."""
    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            nodes = await start(nursery, config, ["n1", "n2", "n3"])
            await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
            before = holders(nodes)
            publisher = Publisher(nodes, TOPIC)
            for p in range(PARTITIONS):
                await publisher.append(p, batch_of(f"before.{p}", 2))
            joiner = next(name for name in (f"n{i}" for i in range(4, 100)) if 2 <= len(ranked_first(name)) <= 6)
            expected = ranked_first(joiner)
            nodes += await start(nursery, config, [joiner])
            await wait_until(nodes, lambda: settled(nodes, TOPIC, PARTITIONS), WAIT)
            after = holders(nodes)
            assert {p for p, (owner, _) in after.items() if owner == joiner} == expected
            new = nodes[3].manager
            assert new is not None and new.acquired == len(expected)
            for p in range(PARTITIONS):
                if p in expected:
                    assert after[p][1] > before[p][1]
                else:
                    assert after[p] == before[p]
            for p in range(PARTITIONS):
                outcome = await publisher.append(p, batch_of(f"after.{p}", 1))
                assert outcome.result == "ok" and outcome.offset == 2
                assert outcome.node == after[p][0]
            nursery.cancel_scope.cancel()
        assert await check_all(config, publisher) == {p: 3 for p in range(PARTITIONS)}


RUNNER = Path(__file__).parent / "helpers" / "cluster_node_runner.py"


async def etcd_view(etcd: Etcd, keys: ClusterKeys) -> tuple[dict[str, int], dict[int, tuple[str, int]]]:
    """({member: lease}, {partition: (owner node, lease)}) as etcd has them now."""
    members = {
        keys.name_of(keys.members_prefix, kv.key): kv.lease for kv in (await etcd.get_prefix(keys.members_prefix)).kvs
    }
    owners = {}
    for kv in (await etcd.get_prefix(keys.own_prefix)).kvs:
        topic, partition = keys.partition_of(kv.key)
        if topic == TOPIC:
            owners[partition] = (json.loads(kv.value)["node"], kv.lease)
    return members, owners


async def settled_in_etcd(etcd: Etcd, keys: ClusterKeys, names: set[str], timeout: float = WAIT) -> dict[str, int]:
    """Poll etcd (bounded) until exactly ``names`` are members and each
    partition is owned, under its owner's current lease, by the node the
    ranking puts first among them; the members' leases."""
    with trio.fail_after(timeout):
        while True:
            members, owners = await etcd_view(etcd, keys)
            if set(members) == names and all(
                owners.get(p) == (top, members[top]) for p in range(PARTITIONS) if (top := first(names, TOPIC, p))
            ):
                return members
            await trio.sleep(0.1)


def read_history(paths: list[Path]) -> list[dict[str, Any]]:
    events = []
    for path in paths:
        if path.exists():
            events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return events


async def progress(paths: list[Path], more: int, timeout: float = WAIT) -> None:
    """Poll the histories (bounded) until every partition has ``more``
    acknowledgements beyond those it has now."""

    def acked() -> dict[int, int]:
        counts = dict.fromkeys(range(PARTITIONS), 0)
        for event in read_history(paths):
            if event["e"] == "ok":
                counts[event["p"]] += 1
        return counts

    start = acked()
    with trio.fail_after(timeout):
        while any(n < start[p] + more for p, n in acked().items()):
            await trio.sleep(0.1)


def outcomes(events: list[dict[str, Any]]) -> list[Outcome]:
    """The histories as outcomes: an invocation with no answer (its process
    was killed) is unknown."""
    answered = {e["tag"] for e in events if e["e"] != "invoke"}
    out = []
    for e in events:
        if e["e"] == "invoke":
            if e["tag"] not in answered:
                out.append(Outcome(e["p"], batch_of(e["tag"], 2), "unknown", node=e["tag"].split(".")[0]))
            continue
        out.append(Outcome(e["p"], batch_of(e["tag"], 2), e["e"], e.get("offset", -1), e["tag"].split(".")[0]))
    return out


async def test_nodes_as_processes_killed_and_paused_past_their_lease(config: ClusterConfig, tmp_path: Path) -> None:
    """Three node processes append to the partitions they own. One is
    SIGKILLed: the others take its partitions once its lease ends. Another
    is SIGSTOPped until etcd has expired its lease and the last node owns
    everything, then SIGCONTed: it acknowledges nothing under its old
    lease after waking, rejoins with a new lease and takes back the
    partitions it ranks first for. Every acknowledged append reads back at
    its offset, offsets are dense, an unanswered one is stored at most once."""
    ttl = 3
    histories = {name: tmp_path / f"{name}.jsonl" for name in ("n1", "n2", "n3")}
    args = [
        "--etcd", config.etcd_url, "--s3", config.s3_url, "--bucket", BUCKET,
        "--object-prefix", config.object_prefix, "--key-prefix", config.keys.prefix.decode(),
        "--topic", TOPIC, "--partitions", str(PARTITIONS), "--ttl", str(ttl),
    ]  # fmt: skip
    paths = list(histories.values())
    with trio.fail_after(WAIT * 4):
        async with Etcd(config.etcd_url) as etcd, AsyncExitStack() as stack:
            children = {}
            for name, history in histories.items():
                argv = [sys.executable, str(RUNNER), *args, "--node", name, "--history", str(history)]
                children[name] = await stack.enter_async_context(spawn_argv(argv, name))
            for name, child in children.items():
                await child.stdout.wait_for(lambda lines, n=name: n if any('"ready"' in line for line in lines) else None, WAIT)
            leases = await settled_in_etcd(etcd, config.keys, {"n1", "n2", "n3"})
            await progress(paths, 3)

            children["n1"].process.kill()  # SIGKILL
            await settled_in_etcd(etcd, config.keys, {"n2", "n3"})
            await progress(paths, 3)

            paused = children["n2"].process
            async with etcd.watch(config.keys.member("n2")) as watch:
                os.kill(paused.pid, signal.SIGSTOP)
                try:
                    expired_at = 0  # the revision at which etcd expired n2's lease, deleting its keys
                    while not expired_at:
                        batch = await watch.__anext__()
                        expired_at = next((e.kv.mod_revision for e in batch.events if e.type == "DELETE"), 0)
                    assert await etcd.time_to_live(leases["n2"]) == -1
                    await settled_in_etcd(etcd, config.keys, {"n3"})
                    await progress([histories["n3"]], 3)
                    resumed_at = time.time()  # anything n2 writes from here on, it wrote after waking
                finally:
                    os.kill(paused.pid, signal.SIGCONT)
            rejoined = await settled_in_etcd(etcd, config.keys, {"n2", "n3"})
            assert rejoined["n2"] != leases["n2"]  # a new incarnation
            await progress(paths, 3)
            for child in children.values():
                if child.returncode is None:
                    child.process.kill()
            for name, child in children.items():
                await child.wait()
                assert "Traceback" not in child.stderr.text(), (name, child.stderr.text()[-3000:])
    events = read_history(paths)
    old_lease = [e for e in events if e["tag"].startswith("n2.") and e["lease"] == leases["n2"]]
    late = [e for e in old_lease if e["wall"] >= resumed_at and e["e"] != "invoke"]
    # No append it started after waking was acknowledged under the old lease.
    started_late = {e["tag"] for e in old_lease if e["e"] == "invoke" and e["wall"] >= resumed_at}
    assert [e for e in late if e["e"] == "ok" and e["tag"] in started_late] == []
    # An acknowledgement it wrote down after waking had been decided before
    # the pause (at most one per partition was in flight); like every one it
    # made under that lease, its commit came before etcd expired the lease.
    assert sum(1 for e in late if e["e"] == "ok") <= PARTITIONS
    async with Etcd(config.etcd_url) as etcd:
        for e in old_lease:
            if e["e"] == "ok":
                below = await etcd.range(
                    config.keys.index_prefix(TOPIC, e["p"]),
                    config.keys.index(TOPIC, e["p"], e["offset"]) + b"\x00",
                    limit=1,
                    descending=True,
                )
                assert below.kvs[0].create_revision < expired_at, (e, expired_at)
    new_lease = [e for e in events if e["tag"].startswith("n2.") and e["lease"] == rejoined["n2"] and e["e"] == "ok"]
    assert new_lease  # it took partitions back and acknowledges again
    history = outcomes(events)
    await check_all(config, _Recorded(history))
    counts = Counter((o.node, o.result) for o in history)
    print(f"\nmulti-process history: {sorted(counts.items())}; n2 after waking, old lease: {Counter(e['e'] for e in late)}")


@attrs.frozen
class _Recorded:
    history: list[Outcome]
