"""The nemesis (docs/cluster.md §11) over a partitioned topic: faults that
strike a node while it commits the rounds of several partitions together
(§5 "As built: a node's rounds together": one object and one etcd
transaction per group, per-partition compares, a partition refused
alone, a lost answer resolved for the whole group).

Three etcd members, a SeaweedFS, three ``pybroker serve --cluster``
processes (member lease ``--cluster-lease-ttl 3``), and a topic created
with 4 partitions, named so that one node ranks first for two of them and
the others for one each. Eight publishers, two per partition (addressed
``topic~p``), append unique values (each its own msg-id, flag DEDUP) one
at a time each, following NOT_OWNER and resending after a dropped
connection or an unknown outcome, and record every append in a history
under its partition's key (``topic/p``). With two publishers on each of
its partitions, the node owning two commits their rounds together. One
kind of fault strikes twice, each time the node owning the most
partitions once every partition's ownership has settled (first the one
chosen above; after a restart, the ranking changes with the node's new
name, and with 4 partitions on 3 nodes one of them owns two or more): it
is SIGKILLed and restarted, or SIGSTOPped past its lease and continued
(its group in flight then meets other owners' epochs). After healing,
every partition is read whole from etcd and the object store and through
a subscriber on every broker, and tests/helpers/checker.py checks each
partition on its own: nothing acknowledged lost, no offset with two
values, dense offsets, no value stored twice, nothing refused stored,
nothing stored that nobody sent to that partition.

That the faults struck the grouped path is checked as well: among the
objects the struck incarnation (its member lease, which names its
objects) left indexed, some are named by the index entries of two
partitions or more. The test prints, per run, each partition's counts,
the acknowledgements that came only after a resend, the seconds from each
fault to the next acknowledgement of the struck node's partitions from
another node (and to the next of an append sent once), and the struck
node's grouped objects.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pybroker
import pytest

from helpers.checker import check
from helpers.history import HistoryWriter, read_histories
from helpers.nemesis import (  # noqa: F401 (servers: the module's fixture)
    TTL,
    Cluster,
    Fault,
    Recovery,
    Servers,
    final_reads,
    histories_in,
    kill_owner,
    nemesis_cluster,
    node_flags,
    pause_owner,
    publishing,
    resent,
    servers,
    strike_rounds,
    topic_owned_by,
)

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

from pybroker.server.cluster.entries import IndexEntry  # noqa: E402
from pybroker.server.cluster.etcd import Etcd  # noqa: E402

PARTITIONS = 4
#: Two on each partition: a node owning two partitions has appends of
#: both in flight at once, which its committer sends as one group.
PUBLISHERS = 2 * PARTITIONS


async def partitions_of_objects(cluster: Cluster) -> dict[str, set[int]]:
    """For each object etcd's index names: the partitions whose entries
    name it (an object of a group of rounds: each of its partitions)."""
    named: dict[str, set[int]] = defaultdict(set)
    async with Etcd(cluster.servers.etcd_urls) as etcd:
        for p in range(cluster.partitions):
            prefix = cluster.keys.index_prefix(cluster.topic, p)
            for kv in (await etcd.get_prefix(prefix)).kvs:
                named[IndexEntry.from_key(prefix, kv.key, kv.value).object].add(p)
    return named


def incarnation_of(name: str) -> int:
    """The incarnation in an object's name, ``data/{incarnation:016x}/{round:012d}``."""
    return int(name.split("/")[-2], 16)


def grouped_by(recovery: Recovery, named: dict[str, set[int]]) -> tuple[int, int]:
    """Of the objects the struck incarnation left indexed: how many are
    named by two partitions or more, of how many."""
    victim = recovery.strike.victim
    assert victim is not None
    mine = [partitions for name, partitions in named.items() if incarnation_of(name) == victim.incarnation]
    return sum(1 for partitions in mine if len(partitions) >= 2), len(mine)


@pytest.mark.parametrize(("fault", "rounds"), [(kill_owner, 2), (pause_owner, 2)], ids=["kill-owner", "pause-owner"])
async def test_nemesis_partitions(
    servers: Servers, tmp_path: Path, fault: Fault, rounds: int, request: pytest.FixtureRequest
) -> None:
    name = f"partitions-{request.node.callspec.id}"
    histories = histories_in(tmp_path, PUBLISHERS)
    # Compaction kept off (the newest 100000 entries left as they are):
    # what the index names at the end is what each round wrote.
    flags = (*node_flags(servers, name, TTL), "--cluster-index-keep", "100000")
    async with nemesis_cluster(servers, tmp_path, name, [flags] * 3) as cluster:
        for broker in cluster.brokers:
            await broker.start()
        victim = cluster.brokers[2].url.removeprefix("pybroker://")
        cluster.topic = await topic_owned_by(servers, cluster.keys, victim, "orders", PARTITIONS, owns=2)
        cluster.partitions = PARTITIONS
        cluster.grouped = True
        async with pybroker.connect(cluster.brokers[0].url) as admin:
            assert (await admin.create_topic(cluster.topic, partitions=PARTITIONS))["created"]
        writers = [HistoryWriter(path, i) for i, path in enumerate(histories)]
        try:
            async with publishing(cluster, writers[:PUBLISHERS]):
                recoveries = await strike_rounds(cluster, fault, rounds)
            ends = [await final_reads(cluster, writers[PUBLISHERS], p) for p in range(PARTITIONS)]
            named = await partitions_of_objects(cluster)
        finally:
            for writer in writers:
                writer.close()
    ops = read_histories(histories)
    report = check(ops)
    counts = {cluster.key(p): report.summary()["keys"].get(cluster.key(p), {}) for p in range(PARTITIONS)}
    brief = ("acked", "unknown", "lost", "conflicts", "gaps", "duplicates")
    struck = [r.strike.victim.partitions if r.strike.victim is not None else () for r in recoveries]
    grouped = [grouped_by(r, named) for r in recoveries]
    print(
        f"{name}: {rounds} faults, each on the owner of partitions {struck}; stored per partition {ends}, "
        f"{resent(ops)} acknowledged only after a resend; {'/'.join(brief)} per partition "
        f"{ {p: '/'.join(str(c.get(k, '-')) for k in brief) for p, c in counts.items()} }; "
        f"seconds from each fault to the next acknowledgement of its partitions {[round(r.seconds, 2) for r in recoveries]} "
        f"(to the next of an append sent once {[round(r.fresh, 2) for r in recoveries]}); "
        f"the struck incarnations' indexed objects spanning 2+ partitions, of all theirs: {grouped}"
    )
    assert report.valid, report.summary()
    for p in range(PARTITIONS):
        assert counts[cluster.key(p)]["acked"] > 0 and counts[cluster.key(p)]["lost"] == 0, (p, counts)
        assert counts[cluster.key(p)]["stored"] == ends[p], (p, counts, ends)
    # Each fault struck a node committing several partitions' rounds
    # together: one it owned two of at least, and which grouped them.
    assert all(len(partitions) >= 2 for partitions in struck), struck
    assert all(together > 0 for together, _ in grouped), grouped
