"""The nemesis's pieces (docs/cluster.md §11), shared by the suites that
use them (tests/test_cluster_nemesis.py: one partition;
tests/test_cluster_nemesis_partitions.py: a partitioned topic).

- ``servers``: a module's own three etcd members and SeaweedFS (the faults
  kill and restart etcd members, so no other module may share them);
- ``nemesis_cluster``: broker processes of one test, with its own etcd and
  object prefixes, in a ``Cluster`` that knows its topic, its partitions,
  each partition's owner and every acknowledgement;
- ``Publisher`` and ``publishing``: clients appending unique values with
  msg-ids, one at a time each, resending until answered, recording every
  append in a history (tests/helpers/history.py);
- faults (``kill_owner``, ``pause_owner``, ``kill_etcd_leader``) and
  ``strike_rounds``, which injects one several times under load and
  measures the time to the next acknowledgement after each;
- ``final_reads``: a partition read whole after healing, from etcd and the
  object store and through a subscriber on every broker.
"""

from __future__ import annotations

import json
import signal
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from helpers.cluster import Server as Process
from helpers.cluster import etcd_cluster, restart, weed_server
from helpers.cluster_broker import ranked_owners
from helpers.history import HistoryWriter
from helpers.procs import BrokerProcess, broker_process
from helpers.raw import RawClient
from pybroker.protocol import (
    Deliver,
    Error,
    ErrorCode,
    Hello,
    PubAck,
    Publish,
    StartKind,
    SubAck,
    Subscribe,
    Welcome,
    decode_batch,
    encode_batch,
    partition_topic,
)

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

from pybroker.server.cluster.entries import IndexEntry  # noqa: E402
from pybroker.server.cluster.etcd import Etcd, EtcdError, prefix_end  # noqa: E402
from pybroker.server.cluster.keys import ClusterKeys  # noqa: E402
from pybroker.server.cluster.objects import ObjectStore  # noqa: E402
from pybroker.server.cluster.partition import PartitionReader  # noqa: E402
from pybroker.server.cluster.ranking import first  # noqa: E402

TTL = 3
TOPIC = "nemesis"
PUBLISHERS = 3
#: A partition's owner counts as settled once this many of its last
#: acknowledgements came from it.
RECENT = PUBLISHERS * 2
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


@attrs.frozen
class Owner:
    """A broker owning some of the topic's partitions: its address, its
    member lease (its incarnation: it names its objects
    ``data/{incarnation:016x}/...``) and the partitions it owns."""

    addr: str
    incarnation: int
    partitions: tuple[int, ...]


@attrs.frozen
class Strike:
    """A fault as struck: when (trio time), and the owner it struck (None:
    no broker, e.g. an etcd member)."""

    when: float
    victim: Owner | None = None


@attrs.define
class Cluster:
    servers: Servers
    keys: ClusterKeys
    object_prefix: str
    brokers: list[BrokerProcess]
    topic: str = TOPIC
    #: The topic's partition count: 1, a plain topic addressed by its name
    #: (partition 0 of itself); more, partition ``p`` addressed ``topic~p``.
    partitions: int = 1
    #: (when, from which broker, whether only after a resend, partition)
    #: of every acknowledgement.
    acks: list[tuple[float, str, bool, int]] = attrs.field(factory=list)
    #: The values acknowledged.
    acked_values: set[str] = attrs.field(factory=set)
    #: Whether faults wait to strike the owner of the most partitions until
    #: its newest rounds of two of them went out as one object (a group of
    #: rounds, docs/cluster.md §5), so that they strike the grouped path.
    grouped: bool = False

    def wire(self, partition: int) -> str:
        """The topic a client names for ``partition``."""
        return self.topic if self.partitions == 1 else partition_topic(self.topic, partition)

    def key(self, partition: int) -> str:
        """The partition's key in a history ("topic/partition")."""
        return f"{self.topic}/{partition}"

    def addrs(self) -> list[str]:
        return [b.url.removeprefix("pybroker://") for b in self.brokers if b.proc is not None]

    def next_addr(self, current: str) -> str:
        """The running broker after ``current`` (the first if it is not
        running; ``current`` if none is)."""
        addrs = self.addrs()
        if not addrs:
            return current
        return addrs[(addrs.index(current) + 1) % len(addrs)] if current in addrs else addrs[0]

    def broker_at(self, addr: str) -> BrokerProcess:
        for broker in self.brokers:
            if broker.url.removeprefix("pybroker://") == addr:
                return broker
        raise AssertionError(f"no broker at {addr} (brokers: {[b.url for b in self.brokers]})")

    async def owners(self) -> list[tuple[str, int] | None]:
        """Each partition's owner, (address, member lease), as etcd's
        ``own/`` key says, where it is the member ranked first (else None:
        a hand-over is due; a restarted node takes back what it ranks first
        for)."""
        async with Etcd(self.servers.etcd_urls) as etcd:
            return await ranked_owners(etcd, self.keys, self.topic, self.partitions)

    def settled(self, partition: int, owner: tuple[str, int] | None) -> bool:
        """Whether ``owner`` is a running broker's and the partition's last
        acknowledgements came from it (a killed owner's key lasts until its
        lease runs out; a restarted broker listens on a new port and may be
        handed partitions back as it rejoins)."""
        recent = [addr for _, addr, _, p in self.acks if p == partition][-RECENT:]
        return owner is not None and owner[0] in self.addrs() and len(recent) == RECENT and set(recent) == {owner[0]}

    async def newest_objects(self) -> list[str | None]:
        """The object each partition's newest index entry names (None
        before its first round)."""
        newest: list[str | None] = []
        async with Etcd(self.servers.etcd_urls) as etcd:
            for p in range(self.partitions):
                prefix = self.keys.index_prefix(self.topic, p)
                kvs = (await etcd.range(prefix, prefix_end(prefix), limit=1, descending=True)).kvs
                newest.append(IndexEntry.from_key(prefix, kvs[0].key, kvs[0].value).object if kvs else None)
        return newest

    async def settled_owner(self) -> Owner | None:
        """Once every partition's owner is settled: the broker owning the
        most of them (with ``grouped``, once its newest rounds of two went
        out together); else None."""
        owned: dict[tuple[str, int], list[int]] = defaultdict(list)
        for p, owner in enumerate(await self.owners()):
            if owner is not None and self.settled(p, owner):
                owned[owner].append(p)
        if sum(len(ps) for ps in owned.values()) < self.partitions:
            return None
        (addr, lease), partitions = max(owned.items(), key=lambda item: len(item[1]))
        if self.grouped:
            newest = await self.newest_objects()
            objects = [newest[p] for p in partitions if newest[p] is not None]
            if len(set(objects)) == len(objects):
                return None
        return Owner(addr, lease, tuple(partitions))

    async def wait_owner(self) -> Owner:
        """The settled owner (of the most partitions), once there is one."""
        with trio.fail_after(RECOVERY):
            while True:
                try:
                    found = await self.settled_owner()
                except EtcdError:
                    found = None
                if found is not None:
                    return found
                await trio.sleep(0.1)

    async def wait_ack_after(
        self, moment: float, victim: str = "", *, fresh: bool = False, partitions: Collection[int] = ()
    ) -> float:
        """Seconds from ``moment`` to the first acknowledgement after it from
        a broker other than ``victim`` (a PUBACK the victim sent just before
        the fault may still be read after it), of one of ``partitions`` (of
        any if none are given: the others' owners go on acknowledging);
        with ``fresh``, of an append sent once (a resend of a committed
        msg-id is answered by any node from its copy, without an owner)."""
        with trio.fail_after(RECOVERY):
            while True:
                for when, addr, resent, p in self.acks:
                    if when > moment and addr != victim and not (fresh and resent) and (not partitions or p in partitions):
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
    """Appends ``p{n}-{i}`` values to one partition, one at a time,
    recording each append."""

    def __init__(self, cluster: Cluster, n: int, history: HistoryWriter, partition: int = 0) -> None:
        self.cluster = cluster
        self.n = n
        self.history = history
        self.partition = partition
        self.raw: RawClient | None = None
        self.stream: trio.SocketStream | None = None
        self.target = ""
        self.request_id = 0
        #: Whether the append in progress was sent again after an unknown outcome.
        self.resent = False

    async def run(self, stop: trio.Event) -> None:
        i = 0
        key = self.cluster.key(self.partition)
        while not stop.is_set():
            value = f"p{self.n}-{i}"
            i += 1
            op = self.history.invoke("append", key=key, value=value)
            outcome, offset = await self.append(value)
            if outcome == "ok":
                self.history.complete(op, "ok", "append", key=key, value=value, offset=offset, resent=self.resent)
                self.cluster.acks.append((trio.current_time(), self.target, self.resent, self.partition))
                self.cluster.acked_values.add(value)
            else:
                self.history.complete(op, outcome, "append", key=key, value=value)
        await self.drop()

    async def drop(self) -> None:
        if self.stream is not None:
            await trio.aclose_forcefully(self.stream)
        self.raw = self.stream = None

    def next_target(self) -> None:
        self.target = self.cluster.next_addr(self.target)

    async def append(self, value: str) -> tuple[str, int | None]:
        """("ok", offset), ("fail", None) if every attempt was certainly
        refused, else ("info", None)."""
        batch = encode_batch([(value.encode(), {"msg-id": value})])
        topic = self.cluster.wire(self.partition)
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
                        await self.raw.send_event(Publish(sent, topic, batch, dedup=True))
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


@asynccontextmanager
async def publishing(cluster: Cluster, writers: Sequence[HistoryWriter]) -> AsyncIterator[None]:
    """A Publisher per writer for the body's duration, publisher ``n`` on
    partition ``n`` modulo the topic's count; once the body is done each
    finishes the append it has in progress (bounded) and stops."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        for n, writer in enumerate(writers):
            nursery.start_soon(Publisher(cluster, n, writer, n % cluster.partitions).run, stop)
        yield
        stop.set()


@asynccontextmanager
async def nemesis_cluster(servers: Servers, tmp_path: Path, name: str, flags: Sequence[Sequence[str]]) -> AsyncIterator[Cluster]:
    """A BrokerProcess per entry of ``flags`` (its ``pybroker serve``
    flags; not started: the test starts them), each with its own data and
    log directories, in a Cluster under the test's etcd prefix
    /nemesis/NAME/ and object prefix NAME/ (as node_flags gives them);
    every one killed on the way out."""
    async with AsyncExitStack() as stack:
        brokers = [
            await stack.enter_async_context(broker_process(tmp_path / f"d{i}", workdir(tmp_path, i), *args))
            for i, args in enumerate(flags)
        ]
        yield Cluster(servers, ClusterKeys(f"/nemesis/{name}/".encode()), f"{name}/", brokers)


async def final_reads(cluster: Cluster, history: HistoryWriter, partition: int = 0) -> int:
    """Read the whole partition from etcd and the object store, and through
    a subscriber on every broker; record each as a ``final`` read. Returns
    the partition's length."""
    topic, key = cluster.wire(partition), cluster.key(partition)
    async with (
        Etcd(cluster.servers.etcd_urls) as etcd,
        ObjectStore(cluster.servers.s3_url, BUCKET, prefix=cluster.object_prefix) as objects,
    ):
        reader = PartitionReader(etcd, objects, cluster.topic, partition, keys=cluster.keys)
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


def histories_in(tmp_path: Path, publishers: int = PUBLISHERS) -> list[Path]:
    """One history file per publisher, then one each for a group member,
    a cursor watcher and the final readers."""
    return [tmp_path / f"history-{i}.jsonl" for i in range(publishers + 3)]


def workdir(tmp_path: Path, n: int) -> Path:
    """Broker ``n``'s own directory for its log files (broker-{start}.log)."""
    path = tmp_path / f"w{n}"
    path.mkdir(exist_ok=True)
    return path


async def topic_owned_by(
    servers: Servers, keys: ClusterKeys, victim: str, stem: str, partitions: int = 1, owns: int = 1
) -> str:
    """A topic name for which, once all three brokers are members, the
    broker at ``victim`` ranks first for ``owns`` of its ``partitions``,
    and every other broker for fewer, so that it will own them."""
    with trio.fail_after(WAIT):
        while True:
            async with Etcd(servers.etcd_urls) as etcd:
                found = await etcd.get_prefix(keys.members_prefix)
            members = {keys.name_of(keys.members_prefix, kv.key): json.loads(kv.value)["addr"] for kv in found.kvs}
            if len(members) == 3:
                break
            await trio.sleep(0.1)
    victim_node = next(node for node, addr in members.items() if addr == victim)

    def fits(topic: str) -> bool:
        firsts = Counter(first(set(members), topic, p) for p in range(partitions))
        return firsts[victim_node] == owns and all(n < owns for node, n in firsts.items() if node != victim_node)

    return next(t for t in (f"{stem}-{i}" for i in range(1000)) if fits(t))


#: A fault: injects itself, heals, and says when it struck and whom.
Fault = Callable[[Cluster], Awaitable[Strike]]


async def kill_owner(cluster: Cluster) -> Strike:
    """SIGKILL the owner (of the most partitions) under load, then start
    it again (same flags)."""
    victim = await cluster.wait_owner()
    broker = cluster.broker_at(victim.addr)
    await broker.kill()
    struck = trio.current_time()
    await broker.start()
    return Strike(struck, victim)


async def pause_owner(cluster: Cluster) -> Strike:
    """SIGSTOP the owner (of the most partitions) until its lease has run
    out, then SIGCONT."""
    victim = await cluster.wait_owner()
    broker = cluster.broker_at(victim.addr)
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)
    struck = trio.current_time()
    try:
        await trio.sleep(TTL + 2)
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    return Strike(struck, victim)


async def kill_etcd_leader(cluster: Cluster) -> Strike:
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
                return Strike(struck)
    raise AssertionError("no etcd member is the leader")


@attrs.frozen
class Recovery:
    """One fault as struck, and the seconds from it to the next
    acknowledgement (of the victim's partitions, from another broker),
    and to the next of an append sent once."""

    strike: Strike
    seconds: float
    fresh: float


async def strike_rounds(cluster: Cluster, fault: Fault, rounds: int) -> list[Recovery]:
    """Once the topic takes appends: ``rounds`` times, under load, the
    fault and the wait for the next acknowledgements after it (all
    bounded)."""
    recoveries = []
    with trio.fail_after(WAIT * (rounds + 1)):
        await cluster.wait_ack_after(-1.0)  # the topic exists and takes appends
        for _ in range(rounds):
            await trio.sleep(0.5)  # under load
            strike = await fault(cluster)
            victim = strike.victim.addr if strike.victim is not None else ""
            partitions = strike.victim.partitions if strike.victim is not None else ()
            seconds = await cluster.wait_ack_after(strike.when, victim, partitions=partitions)
            fresh = await cluster.wait_ack_after(strike.when, victim, fresh=True, partitions=partitions)
            recoveries.append(Recovery(strike, seconds, fresh))
        await trio.sleep(0.5)
    return recoveries


def resent(ops: Sequence[dict[str, Any]]) -> int:
    """How many appends of a history were acknowledged only after a resend."""
    return sum(1 for op in ops if op["type"] == "ok" and op["f"] == "append" and op.get("resent"))
