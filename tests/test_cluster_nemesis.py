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
"""

from __future__ import annotations

from collections import Counter

import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from helpers.checker import Report, check
from helpers.cluster import Server as Process
from helpers.cluster import etcd_cluster, restart, weed_server
from helpers.history import HistoryWriter, read_histories
from helpers.procs import BrokerProcess, broker_process
from helpers.raw import RawClient
from helpers.tcpproxy import PartitionProxy
from pybroker.protocol import (
    Ack,
    AckKind,
    Deliver,
    Error,
    ErrorCode,
    Goodbye,
    GroupDeliver,
    Hello,
    Ping,
    Pong,
    PubAck,
    Publish,
    StartKind,
    SubAck,
    Subscribe,
    Welcome,
    decode_batch,
    encode_batch,
)

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

from pybroker.server.cluster.etcd import Etcd, EtcdError  # noqa: E402
from pybroker.server.cluster.keys import ClusterKeys  # noqa: E402
from pybroker.server.cluster import failpoints  # noqa: E402
from pybroker.server.cluster.objects import NoSuchKey, ObjectStore  # noqa: E402
from pybroker.server.cluster.entries import IndexEntry  # noqa: E402
from pybroker.server.cluster.partition import PartitionReader  # noqa: E402
from pybroker.server.cluster.ranking import first  # noqa: E402

TTL = 3
TOPIC = "nemesis"
KEY = f"{TOPIC}/0"
PUBLISHERS = 3
#: Bounds: one attempt of an append, one append with its resends, the
#: wait for recovery after a fault, the final reads.
ATTEMPT = 2.0
APPEND = 40.0
RECOVERY = 40.0
WAIT = 60.0
BUCKET = "pybroker-nemesis"


@attrs.define
class Servers:
    etcd: list[tuple[str, Process]]
    s3_url: str
    tmp: Path

    @property
    def etcd_urls(self) -> list[str]:
        return [url for url, _ in self.etcd]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("nemesis")
    with etcd_cluster(tmp, 3) as members, weed_server(tmp) as (s3_url, _weed):
        state = Servers(list(members), s3_url, tmp)
        try:
            yield state
        finally:
            for _url, process in state.etcd:  # restarted ones too
                process.kill()


@attrs.define
class Cluster:
    servers: Servers
    keys: ClusterKeys
    object_prefix: str
    brokers: list[BrokerProcess]
    topic: str = TOPIC
    #: (when, from which broker, whether only after a resend) of every
    #: acknowledgement.
    acks: list[tuple[float, str, bool]] = attrs.field(factory=list)
    #: The values acknowledged.
    acked_values: set[str] = attrs.field(factory=set)

    def addrs(self) -> list[str]:
        return [b.url.removeprefix("pybroker://") for b in self.brokers if b.proc is not None]

    def broker_at(self, addr: str) -> BrokerProcess:
        for broker in self.brokers:
            if broker.url.removeprefix("pybroker://") == addr:
                return broker
        raise AssertionError(f"no broker at {addr} (brokers: {[b.url for b in self.brokers]})")

    async def owner(self) -> str | None:
        """The topic's owner's address, as etcd's ``own/`` key says, if it is
        the member ranked first (else a hand-over is due: a restarted node
        takes back what it ranks first for)."""
        async with Etcd(self.servers.etcd_urls) as etcd:
            kv = await etcd.get(self.keys.own(self.topic, 0))
            found = await etcd.get_prefix(self.keys.members_prefix)
        if kv is None:
            return None
        members = {self.keys.name_of(self.keys.members_prefix, m.key): json.loads(m.value)["addr"] for m in found.kvs}
        addr = json.loads(kv.value).get("addr")
        return addr if members and members.get(first(set(members), self.topic, 0) or "") == addr else None

    async def wait_owner(self) -> str:
        """The owner's address once it is a running broker's and the last
        acknowledgements came from it (a killed owner's key lasts until its
        lease runs out; a restarted broker listens on a new port and may be
        handed the topic back as it rejoins)."""
        with trio.fail_after(RECOVERY):
            while True:
                try:
                    found = await self.owner()
                except EtcdError:
                    found = None
                recent = [addr for _, addr, _ in self.acks[-PUBLISHERS * 2 :]]
                if found in self.addrs() and len(recent) == PUBLISHERS * 2 and set(recent) == {found}:
                    return found
                await trio.sleep(0.1)

    async def wait_ack_after(self, moment: float, victim: str = "", *, fresh: bool = False) -> float:
        """Seconds from ``moment`` to the first acknowledgement after it from
        a broker other than ``victim`` (a PUBACK the victim sent just before
        the fault may still be read after it); with ``fresh``, of an append
        sent once (a resend of a committed msg-id is answered by any node
        from its copy, without an owner)."""
        with trio.fail_after(RECOVERY):
            while True:
                for when, addr, resent in self.acks:
                    if when > moment and addr != victim and not (fresh and resent):
                        return when - moment
                await trio.sleep(0.02)


async def handshake(raw: RawClient, name: str, options: dict[str, str] | None = None) -> None:
    """HELLO, and its WELCOME; any other answer (a node stepping aside
    answers ERROR 503 SHUTTING_DOWN) is a drop, raised as OSError, for the
    caller to go to another node."""
    await raw.send_event(Hello(client_name=name, options=dict(options or {})))
    answer = await raw.next_event()
    if not isinstance(answer, Welcome):
        raise ConnectionRefusedError(f"HELLO answered {answer!r}")


class Publisher:
    """Appends ``p{n}-{i}`` values one at a time, recording each append."""

    def __init__(self, cluster: Cluster, n: int, history: HistoryWriter) -> None:
        self.cluster = cluster
        self.n = n
        self.history = history
        self.raw: RawClient | None = None
        self.stream: trio.SocketStream | None = None
        self.target = ""
        self.request_id = 0
        #: Whether the append in progress was sent again after an unknown outcome.
        self.resent = False

    async def run(self, stop: trio.Event) -> None:
        i = 0
        while not stop.is_set():
            value = f"p{self.n}-{i}"
            i += 1
            key = f"{self.cluster.topic}/0"
            op = self.history.invoke("append", key=key, value=value)
            outcome, offset = await self.append(value)
            if outcome == "ok":
                self.history.complete(op, "ok", "append", key=key, value=value, offset=offset, resent=self.resent)
                self.cluster.acks.append((trio.current_time(), self.target, self.resent))
                self.cluster.acked_values.add(value)
            else:
                self.history.complete(op, outcome, "append", key=key, value=value)
        await self.drop()

    async def drop(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
        self.raw = self.stream = None

    def next_target(self) -> None:
        addrs = self.cluster.addrs()
        if addrs:
            self.target = addrs[(addrs.index(self.target) + 1) % len(addrs)] if self.target in addrs else addrs[0]

    async def append(self, value: str) -> tuple[str, int | None]:
        """("ok", offset), ("fail", None) if every attempt was certainly
        refused, else ("info", None)."""
        batch = encode_batch([(value.encode(), {"msg-id": value})])
        unknown = False
        self.resent = False
        with trio.move_on_after(APPEND):
            while True:
                if not self.target:
                    self.next_target()
                try:
                    with trio.fail_after(ATTEMPT):
                        if self.raw is None:
                            host, port = self.target.rsplit(":", 1)
                            self.stream = await trio.open_tcp_stream(host, int(port))
                            self.raw = RawClient(self.stream, timeout=ATTEMPT)
                            await handshake(self.raw, f"publisher-{self.n}", {"error_fields": "1"})
                        self.request_id += 1
                        sent = self.request_id
                        await self.raw.send_event(Publish(sent, self.cluster.topic, batch, dedup=True))
                        event = await self.raw.next_event()
                        while not isinstance(event, (PubAck, Error)) and event is not None:
                            event = await self.raw.next_event()  # a PING, say
                except (trio.TooSlowError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    event = None
                if event is None:
                    # Dropped, or no answer in time: it may have been stored.
                    unknown = self.resent = True
                    await self.drop()
                    self.next_target()
                    await trio.sleep(0.05)
                    continue
                if isinstance(event, PubAck):
                    assert event.request_id == sent, event
                    return "ok", event.base_offset
                if event.code == ErrorCode.NOT_OWNER:
                    owner = event.fields.get("owner")  # certainly not stored
                    if owner and owner != self.target:
                        await self.drop()
                        self.target = owner
                    else:
                        await trio.sleep(0.05)  # no owner yet
                    continue
                # STORAGE_ERROR: a round failed, perhaps after its
                # transaction reached etcd: unknown, sent again.
                assert event.code == ErrorCode.STORAGE_ERROR, event
                unknown = self.resent = True
                await trio.sleep(0.05)
        await self.drop()
        return ("info" if unknown else "fail"), None


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
        addrs = self.cluster.addrs()
        if addrs:
            self.target = addrs[(addrs.index(self.target) + 1) % len(addrs)] if self.target in addrs else addrs[0]

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


async def final_reads(cluster: Cluster, history: HistoryWriter) -> int:
    """Read the whole partition from etcd and the object store, and through
    a subscriber on every broker; record each as a ``final`` read. Returns
    the partition's length."""
    topic, key = cluster.topic, f"{cluster.topic}/0"
    async with (
        Etcd(cluster.servers.etcd_urls) as etcd,
        ObjectStore(cluster.servers.s3_url, BUCKET, prefix=cluster.object_prefix) as objects,
    ):
        reader = PartitionReader(etcd, objects, topic, 0, keys=cluster.keys)
        end = await reader.next_offset()
        values: list[tuple[int, str]] = []
        with trio.fail_after(WAIT):
            while len(values) < end:
                for batch in await reader.read(len(values)):
                    values += [(batch.base_offset + k, p.decode()) for k, (p, _) in enumerate(decode_batch(batch.batch))]
    op = history.invoke("read", key=key, offset=0)
    history.complete(op, "ok", "read", key=key, offset=0, values=values, final=True, complete=True)
    for addr in cluster.addrs():
        host, port = addr.rsplit(":", 1)
        seen: list[tuple[int, str]] = []
        op = history.invoke("read", key=key, offset=0)
        with trio.fail_after(WAIT):
            while True:  # a node that stepped aside takes clients once it holds a lease again
                stream = await trio.open_tcp_stream(host, int(port))
                raw = RawClient(stream, timeout=WAIT)
                try:
                    await handshake(raw, "final-reader")
                    break
                except ConnectionRefusedError:
                    await trio.aclose_forcefully(stream)
                    await trio.sleep(0.2)
            try:
                await raw.send_event(Subscribe(1, topic, StartKind.EARLIEST, 0))
                assert await raw.next_event() == SubAck(1)
                while len(seen) < end:
                    event = await raw.next_event()
                    assert isinstance(event, Deliver), event
                    seen += [(event.base_offset + k, p.decode()) for k, (p, _) in enumerate(decode_batch(event.batch))]
            finally:
                await trio.aclose_forcefully(stream)
        history.complete(op, "ok", "read", key=key, offset=0, values=seen, final=True, complete=True)
    return end


def node_flags(
    servers: Servers, name: str, ttl: int, hosts: str | None = None, *, compacting: bool = False, http: bool = False
) -> tuple[str, ...]:
    """``pybroker serve`` flags of a node of the test ``name``: its own etcd
    key prefix (/nemesis/NAME) and object prefix, the member lease ``ttl``;
    ``hosts`` the etcd members it is given (all of them by default);
    ``compacting``: the owner merges index entries all the time (the newest
    8 kept, 4 at a time), so compaction runs through the faults; ``http``:
    an HTTP side on a free port (members probe each other's /readyz to
    step aside: broker/cluster/stepaside.py), else none."""
    if hosts is None:
        hosts = ",".join(u.removeprefix("http://") for u in servers.etcd_urls)
    return (
        "--cluster", f"etcd://{hosts}/nemesis/{name}",
        "--object-store", f"s3://{servers.s3_url.removeprefix('http://')}/{BUCKET}/{name}",
        "--cluster-lease-ttl", str(ttl), *(("--http-port", "0") if http else ("--no-http",)),
        *(("--cluster-index-keep", "8", "--cluster-index-fan-in", "4") if compacting else ()),
    )  # fmt: skip


async def index_levels(cluster: Cluster) -> Counter[int]:
    """How many of the partition's index entries etcd holds at each level
    (0: a round's; more: merged by compaction)."""
    prefix = cluster.keys.index_prefix(cluster.topic, 0)
    async with Etcd(cluster.servers.etcd_urls) as etcd:
        kvs = (await etcd.get_prefix(prefix)).kvs
    return Counter(IndexEntry.decode(int(kv.key[len(prefix) :]), kv.value).level for kv in kvs)


def histories_in(tmp_path: Path) -> list[Path]:
    """One history file per publisher, and for the group member and the readers."""
    return [tmp_path / f"history-{i}.jsonl" for i in range(PUBLISHERS + 3)]


def workdir(tmp_path: Path, n: int) -> Path:
    """Broker ``n``'s own directory for its log files (broker-{start}.log)."""
    path = tmp_path / f"w{n}"
    path.mkdir(exist_ok=True)
    return path


async def topic_owned_by(servers: Servers, keys: ClusterKeys, victim: str, stem: str) -> str:
    """A topic name the broker at ``victim`` ranks first for once all three
    brokers are members, so that it will own the topic."""
    with trio.fail_after(WAIT):
        while True:
            async with Etcd(servers.etcd_urls) as etcd:
                found = await etcd.get_prefix(keys.members_prefix)
            members = {keys.name_of(keys.members_prefix, kv.key): json.loads(kv.value)["addr"] for kv in found.kvs}
            if len(members) == 3:
                break
            await trio.sleep(0.1)
    victim_node = next(node for node, addr in members.items() if addr == victim)
    return next(t for t in (f"{stem}-{i}" for i in range(1000)) if first(set(members), t, 0) == victim_node)


#: A fault: injects itself, heals, and returns when it struck (trio time)
#: and the broker it struck ("" for none).
Fault = Callable[[Cluster], Awaitable[tuple[float, str]]]


async def kill_owner(cluster: Cluster) -> tuple[float, str]:
    """SIGKILL the owner under load, then start it again (same flags)."""
    victim = await cluster.wait_owner()
    broker = cluster.broker_at(victim)
    await broker.kill()
    struck = trio.current_time()
    await broker.start()
    return struck, victim


async def pause_owner(cluster: Cluster) -> tuple[float, str]:
    """SIGSTOP the owner until its lease has run out, then SIGCONT."""
    victim = await cluster.wait_owner()
    broker = cluster.broker_at(victim)
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)
    struck = trio.current_time()
    try:
        await trio.sleep(TTL + 2)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    return struck, victim


async def kill_etcd_leader(cluster: Cluster) -> tuple[float, str]:
    """SIGKILL the etcd leader, then start it again on its data."""
    servers = cluster.servers
    async with Etcd(servers.etcd_urls) as etcd:
        _me, leader = await etcd.status()
    for i, (url, process) in enumerate(servers.etcd):
        async with Etcd(url) as one:
            if (await one.status())[0] == leader:
                process.kill()
                struck = trio.current_time()
                again = await trio.to_thread.run_sync(restart, process, servers.tmp)
                servers.etcd[i] = (url, again)
                return struck, ""
    raise AssertionError("no etcd member is the leader")


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
    prefix = f"/nemesis/{name}/"
    flags = node_flags(servers, name, ttl, compacting=True)
    histories = histories_in(tmp_path)
    async with (
        broker_process(tmp_path / "d0", workdir(tmp_path, 0), *flags) as b0,
        broker_process(tmp_path / "d1", workdir(tmp_path, 1), *flags) as b1,
        broker_process(tmp_path / "d2", workdir(tmp_path, 2), *flags) as b2,
    ):
        cluster = Cluster(servers, ClusterKeys(prefix.encode()), f"{name}/", [b0, b1, b2])
        for broker in cluster.brokers:
            await broker.start()
        stop = trio.Event()
        recoveries: list[float] = []
        fresh: list[float] = []
        writers = [HistoryWriter(path, i) for i, path in enumerate(histories)]
        try:
            async with group_consumer(cluster, writers[PUBLISHERS + 1], writers[PUBLISHERS + 2]) as member:
                async with trio.open_nursery() as nursery:
                    for i in range(PUBLISHERS):
                        nursery.start_soon(Publisher(cluster, i, writers[i]).run, stop)
                    with trio.fail_after(WAIT * (rounds + 1)):
                        await cluster.wait_ack_after(-1.0)  # the topic exists and takes appends
                        for _ in range(rounds):
                            await trio.sleep(0.5)  # under load
                            struck, victim = await fault(cluster)
                            recoveries.append(await cluster.wait_ack_after(struck, victim))
                            fresh.append(await cluster.wait_ack_after(struck, victim, fresh=True))
                        await trio.sleep(0.5)
                    stop.set()
            end = await final_reads(cluster, writers[PUBLISHERS])
            levels = await index_levels(cluster)
        finally:
            for writer in writers:
                writer.close()
    ops = read_histories(histories)
    report = check(ops)
    counts = report.summary()["keys"][KEY]
    resent = sum(1 for op in ops if op["type"] == "ok" and op["f"] == "append" and op.get("resent"))
    print(
        f"{name}: {rounds} faults, {end} stored, {resent} acknowledged only after a resend, counts {counts}, "
        f"seconds from each fault to the next acknowledgement {[round(r, 2) for r in recoveries]} "
        f"(to the next of an append sent once {[round(r, 2) for r in fresh]}); {group_figures(report, member)}; "
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
    prefix = f"/nemesis/{name}/"
    flags = node_flags(servers, name, TTL)
    histories = histories_in(tmp_path)
    async with (
        broker_process(tmp_path / "d0", workdir(tmp_path, 0), *flags) as b0,
        broker_process(tmp_path / "d1", workdir(tmp_path, 1), *flags) as b1,
        broker_process(tmp_path / "d2", workdir(tmp_path, 2), *flags) as b2,
    ):
        keys = ClusterKeys(prefix.encode())
        cluster = Cluster(servers, keys, f"{name}/", [b0, b1, b2])
        await b0.start()
        await b1.start()
        monkeypatch.setenv(failpoints.ENV, f"{point}=kill@{FAILPOINT_HIT}")
        await b2.start()
        monkeypatch.delenv(failpoints.ENV)  # its restart is disarmed
        victim = b2.url.removeprefix("pybroker://")
        cluster.topic = await topic_owned_by(servers, keys, victim, name)
        stop = trio.Event()
        writers = [HistoryWriter(path, i) for i, path in enumerate(histories)]
        try:
            async with group_consumer(cluster, writers[PUBLISHERS + 1], writers[PUBLISHERS + 2]) as member:
                async with trio.open_nursery() as nursery:
                    for i in range(PUBLISHERS):
                        nursery.start_soon(Publisher(cluster, i, writers[i]).run, stop)
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
                    stop.set()
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
        flags = {"compacting": True, "http": http}
        async with (
            broker_process(tmp_path / "d0", workdir(tmp_path, 0), *node_flags(servers, name, TTL, **flags)) as b0,
            broker_process(tmp_path / "d1", workdir(tmp_path, 1), *node_flags(servers, name, TTL, **flags)) as b1,
            broker_process(tmp_path / "d2", workdir(tmp_path, 2), *node_flags(servers, name, TTL, through, **flags)) as b2,
        ):
            keys = ClusterKeys(f"/nemesis/{name}/".encode())
            cluster = Cluster(servers, keys, f"{name}/", [b0, b1, b2])
            for broker in cluster.brokers:
                await broker.start()
            run = CutOff(cluster, b2.url.removeprefix("pybroker://"), proxies)
            cluster.topic = await topic_owned_by(servers, keys, run.victim, hint)
            stop = trio.Event()
            writers = [HistoryWriter(path, i) for i, path in enumerate(histories)]
            try:
                async with group_consumer(cluster, writers[PUBLISHERS + 1], writers[PUBLISHERS + 2]) as member:
                    async with trio.open_nursery() as nursery:
                        for i in range(PUBLISHERS):
                            nursery.start_soon(Publisher(cluster, i, writers[i]).run, stop)
                        with trio.fail_after(WAIT * 2):
                            assert await cluster.wait_owner() == run.victim
                            await fault(run)
                        stop.set()
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
    resent = sum(1 for op in run.ops if op["type"] == "ok" and op["f"] == "append" and op.get("resent"))
    figures = ", ".join(f"{k} {v:.2f} s" for k, v in run.figures.items())
    assert run.member is not None
    print(
        f"{name}: {run.end} stored, {resent} acknowledged only after a resend, counts {counts}; {figures}; "
        f"{group_figures(report, run.member)}; index entries by level {dict(sorted(run.levels.items()))}"
    )
    assert report.valid, report.summary()
    assert counts["acked"] > 0 and counts["lost"] == 0
    assert (run.member.final_cursor, run.member.end) == (run.end, run.end)
    late = [
        round(when - run.struck, 2)
        for when, addr, _ in run.cluster.acks
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
