"""The nemesis suite (docs/cluster.md §11): faults against a running cluster,
judged from a history of every operation.

Three etcd members, a SeaweedFS, three ``pybroker serve --cluster``
processes on loopback (member lease ``--cluster-lease-ttl 3``). Three
publishers append unique values (each its own msg-id, flag DEDUP) to one
topic, one at a time each, following NOT_OWNER, resending after a dropped
connection or an unknown outcome, and record every append in a history
(tests/helpers/history.py): ``ok`` with its offset, ``fail`` (every attempt
certainly refused) or ``info`` (unknown). Meanwhile the nemesis injects one
kind of fault, several times; after healing, the partition is read whole
from etcd and the object store and through a subscriber on every broker
(``final`` reads), and tests/helpers/checker.py checks the history: nothing
acknowledged lost, no offset with two values, dense offsets, no value
stored twice, nothing refused stored, nothing stored that nobody sent.
A member of a consumer group reads the topic throughout (following
NOT_OWNER to the owner, acking every hand-out) and records each delivery;
etcd's saved group cursor is read every 0.1 s; the checker adds: no cursor
moving backwards or past the end, every acknowledged append delivered at
least once (at the offset it is stored at), and the cursor ends at the end.

Faults: the owner SIGKILLed under load (then restarted), the owner
SIGSTOPped past its lease and continued, the etcd leader SIGKILLed (then
restarted), and the owner cut off from etcd alone (its etcd traffic goes
through a proxy in the test that stops forwarding, as a partition drops
packets, and later delivers what it held) while clients and the object
store still reach it. And the owner SIGKILLed by itself at a failpoint
of a round (broker/cluster/failpoints.py): before its PUT, between its PUT
and its transaction, after its transaction before any acknowledgement;
each proven by the status, the failpoint's log line and what the object
store and etcd hold for that round. Each test prints the counts and the time from each
fault to the next acknowledged append.

The cluster, the publishers, the faults and the final reads are in
tests/helpers/nemesis.py, shared with the nemesis over a partitioned topic
(tests/test_cluster_nemesis_partitions.py).
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from helpers.checker import Report, check
from helpers.history import HistoryWriter, read_histories
from helpers.nemesis import (  # noqa: F401 (servers: the module's fixture)
    ATTEMPT,
    BUCKET,
    PUBLISHERS,
    TOPIC,
    TTL,
    WAIT,
    Cluster,
    Fault,
    Servers,
    final_reads,
    handshake,
    histories_in,
    kill_etcd_leader,
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
from helpers.raw import RawClient
from helpers.tcpproxy import PartitionProxy
from pybroker.protocol import (
    Ack,
    AckKind,
    Error,
    ErrorCode,
    Goodbye,
    GroupDeliver,
    Hello,
    Ping,
    Pong,
    StartKind,
    SubAck,
    Subscribe,
    decode_batch,
)

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

from pybroker.server.cluster.etcd import Etcd, EtcdError  # noqa: E402
from pybroker.server.cluster import failpoints  # noqa: E402
from pybroker.server.cluster.objects import NoSuchKey, ObjectStore  # noqa: E402
from pybroker.server.cluster.entries import IndexEntry  # noqa: E402

KEY = f"{TOPIC}/0"


GROUP = "nemesis-group"
#: A member's options: redelivery 2 s after a hand-out nobody acked.
GROUP_OPTIONS = {"group": GROUP, "max_ack_pending": "100", "ack_wait_ms": "2000"}
#: A member's pause before subscribing again where no owner is known:
#: doubling from the first to the last while it gets no SUBACK.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
#: A member that hears nothing for this long subscribes again (its node may
#: be paused, or cut off and not yet aware of it).
IDLE = 5.0


class GroupMember:
    """One member of GROUP on the topic: subscribes at the owner (following
    NOT_OWNER, reconnecting after a drop or a silence), acks every hand-out
    at once, and records each message it is handed as a ``deliver``."""

    def __init__(self, cluster: Cluster, history: HistoryWriter) -> None:
        self.cluster = cluster
        self.history = history
        self.target = ""
        #: The values handed to this member (any number of times).
        self.got: set[str] = set()
        self.subscribes = 0
        self.handed = 0
        #: Once stopped: the group's saved cursor and the partition's end.
        self.final_cursor = -1
        self.end = -1

    def next_target(self) -> None:
        self.target = self.cluster.next_addr(self.target)

    async def run(self) -> None:
        """Until cancelled."""
        key, topic = f"{self.cluster.topic}/0", self.cluster.topic
        pause = RETRY_FIRST
        while True:
            if self.target not in self.cluster.addrs():
                self.next_target()
            stream: trio.SocketStream | None = None
            owner = ""
            try:
                host, port = self.target.rsplit(":", 1)
                with trio.fail_after(ATTEMPT):
                    stream = await trio.open_tcp_stream(host, int(port))
                    raw = RawClient(stream, timeout=ATTEMPT)
                    await handshake(raw, "group-member")
                    await raw.send_event(Subscribe(1, topic, StartKind.EARLIEST, 0, options=GROUP_OPTIONS))
                    self.subscribes += 1
                while True:
                    event = await raw.next_event(IDLE)
                    if isinstance(event, GroupDeliver):
                        messages = decode_batch(event.batch)
                        for k, (payload, _headers) in enumerate(messages):
                            self.got.add(payload.decode())
                            self.handed += 1
                            self.history.observe("deliver", group=GROUP, key=key, offset=event.base_offset + k,
                                                 value=payload.decode(), deliveries=event.deliveries)
                        last = event.base_offset + len(messages) - 1
                        await raw.send_event(Ack(1, AckKind.ACK, topic, ((event.base_offset, last),)))
                    elif isinstance(event, Ping):
                        await raw.send_event(Pong(event.nonce))
                    elif isinstance(event, Error):
                        # NOT_OWNER (at subscribe, or the node lost the topic).
                        assert event.code == ErrorCode.NOT_OWNER, event
                        owner = event.fields.get("owner", "")
                        break
                    elif event is None or isinstance(event, Goodbye):
                        break  # (GOODBYE: a node stepping aside ends its connections)
                    else:
                        assert isinstance(event, SubAck), event
                        pause = RETRY_FIRST
            except (trio.TooSlowError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
            if owner and owner != self.target:
                self.target = owner
            else:
                # No owner known (a take-over waits for a lease to run out):
                # as the client library does, wait longer each time.
                self.next_target()
                await trio.sleep(pause)
                pause = min(RETRY_MAX, pause * 2)


async def watch_cursor(cluster: Cluster, history: HistoryWriter) -> None:
    """Until cancelled: the group's saved cursor, as etcd holds it, recorded
    as a ``cursor`` each time it is read (every 0.1 s; etcd may be down)."""
    key = cluster.keys.group(GROUP, cluster.topic, 0)
    async with Etcd(cluster.servers.etcd_urls) as etcd:
        while True:
            try:
                kv = await etcd.get(key)
            except EtcdError:
                kv = None
            if kv is not None:
                history.observe("cursor", group=GROUP, key=f"{cluster.topic}/0", offset=int(json.loads(kv.value)["cursor"]))
            await trio.sleep(0.1)


@asynccontextmanager
async def group_consumer(cluster: Cluster, member: HistoryWriter, cursor: HistoryWriter) -> AsyncIterator[GroupMember]:
    """A GroupMember and the cursor watcher for the body's duration; on the
    way out, once the publishers have stopped, it waits (bounded) until the
    member has been handed every acknowledged value and the saved cursor
    has reached the partition's end, then stops them (``final_cursor`` and
    ``end`` say where they got)."""
    consumer = GroupMember(cluster, member)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer.run)
        nursery.start_soon(watch_cursor, cluster, cursor)
        yield consumer
        with trio.move_on_after(WAIT):
            while not cluster.acked_values <= consumer.got:
                await trio.sleep(0.05)
            async with Etcd(cluster.servers.etcd_urls) as etcd:
                while True:
                    saved = await etcd.get(cluster.keys.group(GROUP, cluster.topic, 0))
                    next_kv = await etcd.get(cluster.keys.next(cluster.topic, 0))
                    consumer.end = int(next_kv.value) if next_kv is not None else 0
                    consumer.final_cursor = int(json.loads(saved.value)["cursor"]) if saved is not None else -1
                    if consumer.final_cursor == consumer.end:
                        break
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def group_figures(report: Report, member: GroupMember) -> str:
    group = report.groups[(GROUP, f"{member.cluster.topic}/0")]
    return (
        f"group: {group.delivered} values handed out, {member.handed} messages with redeliveries, "
        f"{member.subscribes} subscribes, {group.cursors} cursor readings, final cursor {member.final_cursor} of {member.end}, "
        f"{len(group.backwards)} backwards, {len(group.undelivered)} undelivered"
    )


async def index_levels(cluster: Cluster) -> Counter[int]:
    """How many of the partition's index entries etcd holds at each level
    (0: a round's; more: merged by compaction)."""
    prefix = cluster.keys.index_prefix(cluster.topic, 0)
    async with Etcd(cluster.servers.etcd_urls) as etcd:
        kvs = (await etcd.get_prefix(prefix)).kvs
    return Counter(IndexEntry.decode(int(kv.key[len(prefix) :]), kv.value).level for kv in kvs)


@pytest.mark.parametrize(
    ("fault", "rounds", "ttl"),
    [(kill_owner, 2, TTL), (pause_owner, 2, TTL), (kill_etcd_leader, 2, 10)],
    ids=["kill-owner", "pause-owner", "kill-etcd-leader"],
)
async def test_nemesis(
    servers: Servers, tmp_path: Path, fault: Fault, rounds: int, ttl: int, request: pytest.FixtureRequest
) -> None:
    """``ttl``: the member lease. 3 s where the fault waits for it to run
    out; the default 10 s with the etcd leader killed, where an election
    (and the restart of the member) should not cost anyone their lease."""
    name = request.node.callspec.id
    flags = node_flags(servers, name, ttl, compacting=True)
    histories = histories_in(tmp_path)
    async with nemesis_cluster(servers, tmp_path, name, [flags] * 3) as cluster:
        for broker in cluster.brokers:
            await broker.start()
        writers = [HistoryWriter(path, i) for i, path in enumerate(histories)]
        try:
            async with group_consumer(cluster, writers[PUBLISHERS + 1], writers[PUBLISHERS + 2]) as member:
                async with publishing(cluster, writers[:PUBLISHERS]):
                    recoveries = await strike_rounds(cluster, fault, rounds)
            end = await final_reads(cluster, writers[PUBLISHERS])
            levels = await index_levels(cluster)
        finally:
            for writer in writers:
                writer.close()
    ops = read_histories(histories)
    report = check(ops)
    counts = report.summary()["keys"][KEY]
    print(
        f"{name}: {rounds} faults, {end} stored, {resent(ops)} acknowledged only after a resend, counts {counts}, "
        f"seconds from each fault to the next acknowledgement {[round(r.seconds, 2) for r in recoveries]} "
        f"(to the next of an append sent once {[round(r.fresh, 2) for r in recoveries]}); {group_figures(report, member)}; "
        f"index entries by level {dict(sorted(levels.items()))}"
    )
    assert report.valid, report.summary()
    assert counts["acked"] > 0 and counts["lost"] == 0
    assert (member.final_cursor, member.end) == (end, end)
    # Compaction ran through the faults: what was read back came from merged objects too.
    assert any(level > 0 for level in levels), levels


#: The round at whose failpoint the victim dies: late enough that it dies
#: under load, with every publisher's appends in flight.
FAILPOINT_HIT = 20


async def killed_round(cluster: Cluster, marker: dict[str, Any]) -> tuple[bool, str | None]:
    """What the round the failpoint killed left behind: whether its object is
    in the object store, and which object etcd's index names at its first
    offset (None: no entry)."""
    async with (
        Etcd(cluster.servers.etcd_urls) as etcd,
        ObjectStore(cluster.servers.s3_url, BUCKET, prefix=cluster.object_prefix) as objects,
    ):
        kv = await etcd.get(cluster.keys.index(cluster.topic, 0, marker["first"]))
        try:
            await objects.get(marker["object"], 0, 0)
            present = True
        except NoSuchKey:
            present = False
    return present, (IndexEntry.decode(marker["first"], kv.value).object if kv is not None else None)


@pytest.mark.parametrize("point", failpoints.POINTS)
async def test_nemesis_failpoint(servers: Servers, tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner dies by SIGKILL at a chosen place of a round
    (broker/cluster/failpoints.py, armed on it alone through
    PYBROKER_FAILPOINTS): before the round's PUT, between the PUT and the
    transaction, or after the transaction before anything is acknowledged.
    The test proves it died there (status -SIGKILL, its ``failpoint`` log
    line, and the object store and etcd as only that place leaves them),
    restarts it disarmed, lets ownership settle under load, and checks the
    history as above."""
    name = f"fp-{point}"
    flags = node_flags(servers, name, TTL)
    histories = histories_in(tmp_path)
    async with nemesis_cluster(servers, tmp_path, name, [flags] * 3) as cluster:
        b0, b1, b2 = cluster.brokers
        await b0.start()
        await b1.start()
        monkeypatch.setenv(failpoints.ENV, f"{point}=kill@{FAILPOINT_HIT}")
        await b2.start()
        monkeypatch.delenv(failpoints.ENV)  # its restart is disarmed
        victim = b2.url.removeprefix("pybroker://")
        cluster.topic = await topic_owned_by(servers, cluster.keys, victim, name)
        writers = [HistoryWriter(path, i) for i, path in enumerate(histories)]
        try:
            async with group_consumer(cluster, writers[PUBLISHERS + 1], writers[PUBLISHERS + 2]) as member:
                async with publishing(cluster, writers[:PUBLISHERS]):
                    with trio.fail_after(WAIT * 2):
                        assert b2.proc is not None
                        await b2.proc.wait()  # by its own failpoint: nothing here kills it
                        struck = trio.current_time()
                        status = await b2.kill()  # already reaped: its status
                        markers = [r for r in b2.log_records() if r.get("event") == "failpoint"]
                        await b2.start()
                        recovery = await cluster.wait_ack_after(struck, victim)
                        fresh = await cluster.wait_ack_after(struck, victim, fresh=True)
                        await cluster.wait_owner()  # settled: the restarted node may take the topic back
                        await trio.sleep(0.5)
            end = await final_reads(cluster, writers[PUBLISHERS])
        finally:
            for writer in writers:
                writer.close()
        assert status == -signal.SIGKILL, status
        assert [(m["point"], m["hit"], m["topic"]) for m in markers] == [(point, FAILPOINT_HIT, cluster.topic)], markers
        marker = markers[0]
        present, indexed = await killed_round(cluster, marker)
    ops = read_histories(histories)
    report = check(ops)
    counts = report.summary()["keys"][f"{cluster.topic}/0"]
    # The killed round's offsets as acknowledged later: never by the victim
    # (it died first), so only after a resend (deduplicated by msg-id).
    span = range(marker["first"], marker["first"] + marker["count"])
    in_round = [op for op in ops if op["type"] == "ok" and op["f"] == "append" and op["offset"] in span]
    print(
        f"{name}: died at round {FAILPOINT_HIT} (offsets {span.start}..{span.stop - 1}, object {marker['object']}), "
        f"{end} stored, counts {counts}, seconds from the kill to the next acknowledgement {recovery:.2f} "
        f"(to the next of an append sent once {fresh:.2f}), "
        f"acknowledged appends at the killed round's offsets {len(in_round)}, "
        f"of them after a resend {sum(1 for op in in_round if op.get('resent'))}; {group_figures(report, member)}"
    )
    if point == "before-put":
        assert (present, indexed != marker["object"]) == (False, True), (present, indexed)
    elif point == "after-put":
        assert (present, indexed != marker["object"]) == (True, True), (present, indexed)
    else:
        assert (present, indexed) == (True, marker["object"]), (present, indexed)
        assert in_round and all(op.get("resent") for op in in_round), in_round
    assert report.valid, report.summary()
    assert counts["acked"] > 0 and counts["lost"] == 0
    assert (member.final_cursor, member.end) == (end, end)


async def hello_refused(addr: str) -> bool:
    """Whether the node at ``addr`` answers a HELLO with ERROR 503 (it has
    stepped aside); False on a WELCOME or no answer."""
    host, port = addr.rsplit(":", 1)
    try:
        with trio.fail_after(ATTEMPT):
            stream = await trio.open_tcp_stream(host, int(port))
            try:
                raw = RawClient(stream, timeout=ATTEMPT)
                await raw.send_event(Hello(client_name="probe", options={}))
                answer = await raw.next_event()
            finally:
                await trio.aclose_forcefully(stream)
    except (trio.TooSlowError, OSError, trio.BrokenResourceError):
        return False
    return isinstance(answer, Error) and answer.code == ErrorCode.SHUTTING_DOWN


@attrs.define
class CutOff:
    """One run of the owner cut off from etcd (a partitioning proxy in front
    of every etcd member, for the victim alone), for its fault to act on
    and its test to check."""

    cluster: Cluster
    victim: str
    proxies: list[PartitionProxy]
    struck: float = 0.0
    healed: float = 0.0
    #: The fault's own figures, for the report line.
    figures: dict[str, float] = attrs.field(factory=dict)
    member: GroupMember | None = None
    end: int = 0
    levels: Counter[int] = attrs.field(factory=Counter)
    ops: list[dict[str, Any]] = attrs.field(factory=list)

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()
        self.struck = trio.current_time()

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.heal()
        self.healed = trio.current_time()


async def cut_off_run(
    servers: Servers, tmp_path: Path, name: str, hint: str, fault: Callable[[CutOff], Awaitable[None]], *, http: bool = False
) -> CutOff:
    """Three nodes (the third reaching etcd through the proxies), a topic
    it owns, publishers and a group member recording their history; once
    the owner is settled, ``fault`` runs (bounded), then the publishers
    stop and the whole partition is read back. The history is in ``ops``."""
    histories = histories_in(tmp_path)
    proxies = [PartitionProxy("127.0.0.1", int(url.rsplit(":", 1)[1])) for url in servers.etcd_urls]
    async with trio.open_nursery() as background:
        ports = [await background.start(p.run) for p in proxies]
        through = ",".join(f"127.0.0.1:{port}" for port in ports)
        direct = node_flags(servers, name, TTL, compacting=True, http=http)
        cut = node_flags(servers, name, TTL, through, compacting=True, http=http)
        async with nemesis_cluster(servers, tmp_path, name, [direct, direct, cut]) as cluster:
            for broker in cluster.brokers:
                await broker.start()
            run = CutOff(cluster, cluster.brokers[2].url.removeprefix("pybroker://"), proxies)
            cluster.topic = await topic_owned_by(servers, cluster.keys, run.victim, hint)
            writers = [HistoryWriter(path, i) for i, path in enumerate(histories)]
            try:
                async with group_consumer(cluster, writers[PUBLISHERS + 1], writers[PUBLISHERS + 2]) as member:
                    async with publishing(cluster, writers[:PUBLISHERS]):
                        with trio.fail_after(WAIT * 2):
                            assert (await cluster.wait_owner()).addr == run.victim
                            await fault(run)
                run.member = member
                run.end = await final_reads(cluster, writers[PUBLISHERS])
                run.levels = await index_levels(cluster)
            finally:
                for writer in writers:
                    writer.close()
        background.cancel_scope.cancel()
    run.ops = read_histories(histories)
    return run


def check_cut_off(run: CutOff, name: str) -> None:
    """The checker, and what every cut-off run must show: nothing lost,
    the group's cursor at the end, nothing acknowledged by the cut-off node
    after its lease deadline."""
    report = check(run.ops)
    counts = report.summary()["keys"][f"{run.cluster.topic}/0"]
    figures = ", ".join(f"{k} {v:.2f} s" for k, v in run.figures.items())
    assert run.member is not None
    print(
        f"{name}: {run.end} stored, {resent(run.ops)} acknowledged only after a resend, counts {counts}; {figures}; "
        f"{group_figures(report, run.member)}; index entries by level {dict(sorted(run.levels.items()))}"
    )
    assert report.valid, report.summary()
    assert counts["acked"] > 0 and counts["lost"] == 0
    assert (run.member.final_cursor, run.member.end) == (run.end, run.end)
    late = [
        round(when - run.struck, 2)
        for when, addr, *_ in run.cluster.acks
        if addr == run.victim and run.struck + TTL < when < run.healed
    ]
    assert not late, late


async def test_nemesis_owner_cut_off_from_etcd(servers: Servers, tmp_path: Path) -> None:
    """The owner loses etcd (not its clients, not the object store): it must
    stop acknowledging by its lease deadline, another node takes the topic
    over once the lease has run out, and when the partition heals the
    requests it held reach etcd late and are refused (fenced). Then the
    checker, as above."""

    async def fault(run: CutOff) -> None:
        run.cut()
        run.figures["from the cut to the next acknowledgement"] = await run.cluster.wait_ack_after(run.struck, run.victim)
        await trio.sleep(max(0.0, run.struck + TTL + 2 - trio.current_time()))
        run.heal()
        await trio.sleep(2)  # the held requests arrive; the victim rejoins

    run = await cut_off_run(servers, tmp_path, "cut-off", "cut", fault)
    check_cut_off(run, "cut-off")
    assert any(level > 0 for level in run.levels), run.levels


async def test_nemesis_owner_cut_off_from_etcd_steps_aside(servers: Servers, tmp_path: Path) -> None:
    """As above, with every node serving HTTP, so the cut-off owner asks
    the others' /readyz and steps aside: it ends every connection
    (GOODBYE) and refuses HELLO (503) until it holds a lease again; the
    publishers and the group member move to the other nodes. The cut
    lasts until it has stepped aside and another acknowledgement came
    from the others, then heals, and the node takes clients again."""

    async def fault(run: CutOff) -> None:
        run.cut()
        run.figures["from the cut to the next acknowledgement"] = await run.cluster.wait_ack_after(run.struck, run.victim)
        while not await hello_refused(run.victim):
            await trio.sleep(0.2)
        run.figures["to stepping aside"] = trio.current_time() - run.struck
        # Publishing goes on at the other nodes while the victim stands aside.
        await run.cluster.wait_ack_after(trio.current_time(), run.victim)
        run.heal()
        while await hello_refused(run.victim):
            await trio.sleep(0.2)
        run.figures["from healing to taking clients again"] = trio.current_time() - run.healed

    run = await cut_off_run(servers, tmp_path, "step-aside", "aside", fault, http=True)
    check_cut_off(run, "step-aside")
