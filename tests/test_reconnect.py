"""Clients that reconnect by themselves and resume where they stopped.

The broker is stopped (gracefully, or with SIGKILL) and started again on the
same data directory and port while clients are connected; a client made with
``reconnect=`` must come back and miss nothing: plain subscriptions resume
every topic from its position (wildcards included, and topics first written
while the client was away), group members get their unacknowledged jobs
again, and publishes sent but not acknowledged are sent again.
"""

from __future__ import annotations

import itertools
from functools import partial
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

import pybroker as client
from pybroker import Message, Reconnect
from pybroker.protocol import (
    Connection,
    Deliver,
    Error,
    ErrorCode,
    Event,
    Hello,
    StartKind,
    SubAck,
    Subscribe,
    Welcome,
)

from helpers.auth import user_entry, write_users
from helpers.anybroker import pybroker_server, serving, trio_only  # noqa: F401 (a fixture)
from helpers.certs import Certs
from helpers.collect import Collector
from helpers.fakebroker import serve_client
from helpers.procs import broker_process
from helpers.raw import raw_client
from helpers.restarts import FAST, batch, free_port, publish_all, publish_one_batch, serve_until

TIMEOUT = 30.0


# ---------------------------------------------------------------------------
# The policy


def test_delays_grow_to_the_cap_and_are_bounded_in_number() -> None:
    policy = Reconnect(max_attempts=8, initial_delay=0.1, max_delay=1.0, multiplier=2.0, jitter=0)
    assert list(policy.delays()) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_jitter_draws_within_the_delay() -> None:
    policy = Reconnect(max_attempts=200, initial_delay=1.0, max_delay=1.0, jitter=0.5)
    delays = list(policy.delays())
    assert len(delays) == 200
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 1  # drawn, not constant


def test_unbounded_policy_never_overflows() -> None:
    delays = Reconnect(max_attempts=None, initial_delay=0.5, max_delay=30.0, jitter=0).delays()
    assert list(itertools.islice(delays, 5000))[-1] == 30.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_delay": -1},
        {"initial_delay": 10.0, "max_delay": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Reconnect(**kwargs)  # type: ignore[arg-type]


#: The client tests here run under Trio and under asyncio.
pytestmark = pytest.mark.anyio


# ---------------------------------------------------------------------------
# A broker restarted on the same data directory and port


async def test_reconnecting_subscriber_misses_nothing(tmp_path: Path) -> None:
    """A wildcard subscription started with "new" rides over two restarts.

    While the subscriber is away a second broker (another port, the same
    data) takes messages for a topic it had seen and for one it had never
    seen; after it reconnects it receives exactly those, in order, then the
    live ones: no gap, no repeat.
    """
    data, port = tmp_path / "data", free_port()
    got = Collector(TIMEOUT)
    async with anyio.create_task_group() as nursery:
        async with serving(data_dir=data, port=port) as first:
            url = first.url
            c = await nursery.start(_subscriber, url, "orders.>", got)
            await publish_all(url, "orders.a", batch("a1", 50))
            await publish_all(url, "orders.b", batch("b1", 20))
            await got.wait_for({"orders.a": 50, "orders.b": 20})
        # Away: the subscriber retries a port that refuses it.
        async with serving(data_dir=data) as elsewhere:
            await publish_all(elsewhere.url, "orders.a", batch("a2", 30))
            await publish_all(elsewhere.url, "orders.c", batch("c2", 10))
            assert not c.connected
        async with serving(data_dir=data, port=port) as back:
            await got.wait_for({"orders.a": 80, "orders.c": 10})
            assert c.connected and c.reconnects == 1
            await publish_all(back.url, "orders.b", batch("b3", 5))
            await publish_all(back.url, "orders.d", batch("d3", 5))
            await got.wait_for({"orders.b": 25, "orders.d": 5})
            nursery.cancel_scope.cancel()
    assert got.payloads("orders.a") == batch("a1", 50) + batch("a2", 30)
    assert got.payloads("orders.b") == batch("b1", 20) + batch("b3", 5)
    assert got.payloads("orders.c") == batch("c2", 10)
    assert got.payloads("orders.d") == batch("d3", 5)
    for msgs in got.by_topic.values():
        offsets = [m.offset for m in msgs]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))


async def _subscriber(
    url: str,
    pattern: str,
    got: Collector,
    *,
    task_status: anyio.abc.TaskStatus[client.Client] = anyio.TASK_STATUS_IGNORED,
    **subscribe: object,
) -> None:
    async with client.connect(url, reconnect=FAST) as c:
        await c.subscribe(pattern, got, **subscribe)  # type: ignore[arg-type]
        task_status.started(c)
        await anyio.sleep_forever()


async def _one(sub: client.Subscription) -> Message:
    with anyio.fail_after(TIMEOUT):
        async for msg in sub:
            return msg
    raise AssertionError("subscription ended")


async def test_group_workers_finish_every_job_across_a_restart(tmp_path: Path) -> None:
    """Three reconnecting workers; the broker restarts halfway: every job is
    done at least once, and none is lost."""
    data, port = tmp_path / "data", free_port()
    jobs = batch("job", 300)
    done: list[bytes] = []
    progressed = anyio.Event()

    async def work(msg: Message) -> None:
        done.append(msg.payload)
        if len(set(done)) >= 100:
            progressed.set()
        await anyio.sleep(0.001)

    async def worker(url: str, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with client.connect(url, reconnect=FAST) as c:
            await c.subscribe("jobs", work, group="workers", max_ack_pending=20)
            task_status.started()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as nursery:
        async with serving(data_dir=data, port=port) as first:
            for _ in range(3):
                await nursery.start(worker, first.url)
            async with client.connect(first.url) as pub:
                await pub.publish_many("jobs", jobs)
            with anyio.fail_after(TIMEOUT):
                await progressed.wait()
        async with serving(data_dir=data, port=port):
            with anyio.fail_after(TIMEOUT):
                while set(done) != set(jobs):
                    await anyio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert set(done) == set(jobs)


async def test_publishes_made_while_away_are_sent_once_back(tmp_path: Path) -> None:
    """Messages published while the broker is down wait in the client and
    are stored once it is back: each exactly once, in order."""
    data, port = tmp_path / "data", free_port()
    async with anyio.create_task_group() as nursery:
        async with serving(data_dir=data, port=port) as first:
            c = await nursery.start(_publisher, first.url)
            await c.publish("away.t", b"before")
        with anyio.fail_after(TIMEOUT):
            while c.connected:  # the broker's GOODBYE has arrived
                await anyio.sleep(0.01)
        pendings = [await c.send("away.t", p) for p in batch("away", 50)]
        assert not any(p.done() for p in pendings)
        async with serving(data_dir=data, port=port) as back:
            with anyio.fail_after(TIMEOUT):
                acks = [await p.wait() for p in pendings]
            assert [a.offset for a in acks] == list(range(1, 51))
            async with client.connect(back.url) as reader:
                async with reader.subscribe("away.t", start="earliest") as sub:
                    stored = [(await _one(sub)).payload for _ in range(51)]
            assert stored == [b"before"] + batch("away", 50)
            nursery.cancel_scope.cancel()


async def _publisher(
    url: str, task_status: anyio.abc.TaskStatus[client.Client] = anyio.TASK_STATUS_IGNORED
) -> None:
    async with client.connect(url, reconnect=FAST) as c:
        task_status.started(c)
        await anyio.sleep_forever()


async def test_giving_up_fails_everything_waiting(tmp_path: Path) -> None:
    """After max_attempts the client closes: iteration raises, publishes fail."""
    policy = Reconnect(max_attempts=3, initial_delay=0.01, max_delay=0.02)
    stop = anyio.Event()
    async with anyio.create_task_group() as nursery:
        server = await nursery.start(serve_until, stop)
        async with client.connect(server.url, reconnect=policy) as c:
            sub = await c.subscribe("gone.>")
            stop.set()
            with anyio.fail_after(TIMEOUT):
                with pytest.raises(client.ConnectionClosed, match="gave up reconnecting after 3 attempts"):
                    async for _ in sub:
                        pass
            assert c.closed and c.reconnects == 0
            with pytest.raises(client.ConnectionClosed):
                await c.publish("gone.t", b"x")


async def test_without_reconnect_a_lost_connection_is_final(tmp_path: Path) -> None:
    stop = anyio.Event()
    async with anyio.create_task_group() as nursery:
        server = await nursery.start(serve_until, stop)
        async with client.connect(server.url) as c:
            sub = await c.subscribe("final.>")
            stop.set()
            with anyio.fail_after(TIMEOUT):
                with pytest.raises(client.ConnectionClosed):
                    async for _ in sub:
                        pass
            assert c.closed and c.reconnects == 0


async def test_sigkill_mid_publish_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """The broker (a subprocess, fsync always) is SIGKILLed while a
    reconnecting publisher pipelines into two topics and a reconnecting
    wildcard subscriber reads them; it restarts on the same port. Every
    acknowledged message reaches the subscriber, offsets have no gaps, and
    the only repeats are publishes resent after the kill (at-least-once)."""
    data, port = tmp_path / "data", free_port()
    work = tmp_path / "work"
    work.mkdir()
    got = Collector(TIMEOUT)
    acked: set[bytes] = set()
    sent = 0
    async with broker_process(data, work, "--port", str(port), "--http-port", "-1") as broker:
        url = await broker.start()
        async with anyio.create_task_group() as nursery:
            subscriber = await nursery.start(_subscriber, url, "crash.>", got)
            reconnects: list[int] = []

            async def publish(task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
                nonlocal sent
                async with client.connect(url, reconnect=FAST) as c:
                    task_status.started()
                    pendings = []
                    for i in range(3000):
                        payload = f"m-{i}".encode()
                        pendings.append((payload, await c.send(f"crash.t{i % 2}", payload)))
                        sent += 1
                        if i % 50 == 49:
                            await anyio.sleep(0.005)  # spread over the kill
                    for payload, pending in pendings:
                        await pending.wait()  # raises if any publish failed
                        acked.add(payload)
                    reconnects.append(c.reconnects)

            await nursery.start(publish)
            with anyio.fail_after(TIMEOUT):
                while sent < 1000:
                    await anyio.sleep(0.005)
            await broker.kill()
            sent_at_kill = sent
            await broker.start()
            with anyio.fail_after(TIMEOUT * 2):
                while len(acked) < 3000 or not _covers(got, acked):
                    await anyio.sleep(0.05)
            assert subscriber.reconnects == 1
            nursery.cancel_scope.cancel()
    assert sent_at_kill < 3000 and reconnects == [1]  # the kill came mid-stream
    assert len(acked) == 3000
    for topic, msgs in got.by_topic.items():
        offsets = [m.offset for m in msgs]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), topic
    received = [m.payload for msgs in got.by_topic.values() for m in msgs]
    assert set(received) == acked
    assert len(received) - len(set(received)) < 3000  # repeats: resent ones only


def _covers(got: Collector, acked: set[bytes]) -> bool:
    return acked <= {m.payload for msgs in got.by_topic.values() for m in msgs}


# ---------------------------------------------------------------------------
# The resume option on the wire
@trio_only  # a raw client on the wire: the broker's behaviour, not the client's
async def test_resume_position_inside_a_batch_replays_that_batch(tmp_path: Path) -> None:
    async with serving(data_dir=tmp_path / "data") as server:
        await publish_one_batch(server.url, "wire.t", batch("x", 10))
        async with raw_client(server.url, handshake="raw", timeout=TIMEOUT) as raw:
            await raw.send_event(Subscribe(1, "wire.>", StartKind.NEW, 0, 1000, {"resume:wire.t": "4"}))
            assert await raw.next_event() == SubAck(1)
            got = await raw.next_event()
            assert isinstance(got, Deliver) and got.base_offset == 0 and got.topic == "wire.t"
        # The client library drops the part it already had.
        async with client.connect(server.url) as c:
            async with c.subscribe("wire.t", start=4) as sub:
                first = await _one(sub)
                assert (first.offset, first.payload) == (4, b"x-4")


@trio_only  # a raw client on the wire: the broker's behaviour, not the client's
@pytest.mark.parametrize(("start", "first_base"), [(StartKind.EARLIEST, 0), (StartKind.NEW, 3)])
async def test_resume_position_past_the_end_falls_back_to_the_start_rule(
    tmp_path: Path, start: StartKind, first_base: int
) -> None:
    """A position past the topic's end means the log is not the one the
    client read (reset, or an unsynced tail lost): the start rule decides."""
    async with serving(data_dir=tmp_path / "data") as server:
        await publish_all(server.url, "wire.end", batch("old", 3))
        async with raw_client(server.url, handshake="raw", timeout=TIMEOUT) as raw:
            await raw.send_event(Subscribe(1, "wire.end", start, 0, 1000, {"resume:wire.end": "99"}))
            assert await raw.next_event() == SubAck(1)
            await publish_all(server.url, "wire.end", [b"new"])
            got = await raw.next_event()
            assert isinstance(got, Deliver) and got.base_offset == first_base
@trio_only  # a raw client on the wire: the broker's behaviour, not the client's
async def test_resume_position_below_retention_reports_data_lost(tmp_path: Path) -> None:
    async with serving(storage="memory", memory_retention_bytes=1) as server:
        for i in range(5):  # each publish its own batch; retention keeps the last
            await publish_all(server.url, "wire.gone", [f"g-{i}".encode()])
        async with raw_client(server.url, handshake="raw", timeout=TIMEOUT) as raw:
            await raw.send_event(Subscribe(1, "wire.gone", StartKind.NEW, 0, 1000, {"resume:wire.gone": "0"}))
            assert await raw.next_event() == SubAck(1)
            lost = await raw.next_event()
            assert isinstance(lost, Error) and lost.code == ErrorCode.DATA_LOST and lost.ref == 1
            got = await raw.next_event()
            assert isinstance(got, Deliver) and got.base_offset > 0
@trio_only  # a raw client on the wire: the broker's behaviour, not the client's
async def test_suback_carries_the_registration_time(tmp_path: Path) -> None:
    async with serving(storage="memory") as server:
        async with raw_client(server.url, handshake="raw", timeout=TIMEOUT) as raw:
            before = time.time_ns() // 1000
            await raw.send_event(Subscribe(1, "wire.time"))
            ack = await raw.next_event()
            after = time.time_ns() // 1000
            assert isinstance(ack, SubAck) and before <= ack.timestamp <= after


@trio_only  # a raw client on the wire: the broker's behaviour, not the client's
@pytest.mark.parametrize(
    ("pattern", "options", "why"),
    [
        ("wire.a", {"resume:wire.b": "1"}, "does not match"),
        ("wire.*", {"resume:wire.a.b": "1"}, "does not match"),
        ("wire.>", {"resume:wire..x": "1"}, "invalid topic"),
        ("wire.>", {"resume:wire.a": "-1"}, "not an offset"),
        ("wire.>", {"resume:wire.a": "1e3"}, "not an offset"),
        ("wire.>", {"resume:wire.a": "\u0661"}, "not an offset"),
        ("wire.>", {"resume:wire.a": "1" * 21}, "not an offset"),
        ("wire.>", {"resume:wire.a": "1", "group": "g"}, "plain subscriptions"),
        ("wire.>", {"resume": "1"}, "unknown option"),
    ],
)
async def test_bad_resume_options_are_bad_requests(pattern: str, options: dict[str, str], why: str) -> None:
    async with serving(storage="memory") as server:
        async with raw_client(server.url, handshake="raw", timeout=TIMEOUT) as raw:
            await raw.send_event(Subscribe(7, pattern, StartKind.NEW, 0, 100, options))
            err = await raw.next_event()
            assert isinstance(err, Error) and err.code == ErrorCode.BAD_REQUEST and err.ref == 7
            assert why in err.message
            # Not fatal: the connection goes on.
            await raw.send_event(Subscribe(8, "wire.ok"))
            assert await raw.next_event() == SubAck(8)


async def test_reconnect_sends_the_credentials_again(tmp_path: Path) -> None:
    """Against a broker with a users file the client authenticates again on
    every new connection, and its resumed subscription is checked again."""
    users = write_users(
        tmp_path,
        {"svc": user_entry(password="pw-svc", publish=["auth.>"], subscribe=["auth.>"])},
    )
    data, port = tmp_path / "data", free_port()
    got = Collector(TIMEOUT)
    async with anyio.create_task_group() as nursery:
        async with serving(data_dir=data, port=port, auth_file=users) as first:
            url = first.url.replace("pybroker://", "pybroker://svc:pw-svc@")
            c = await nursery.start(_subscriber, url, "auth.>", got)
            async with client.connect(url) as pub:
                await pub.publish("auth.a", b"one")
            await got.wait_for({"auth.a": 1})
        async with serving(data_dir=data, port=port, auth_file=users):
            async with client.connect(url) as pub:
                await pub.publish("auth.a", b"two")
            await got.wait_for({"auth.a": 2})
            assert c.reconnects == 1
            nursery.cancel_scope.cancel()
    assert got.payloads("auth.a") == [b"one", b"two"]


async def test_reconnect_refused_by_the_broker_gives_up_at_once(tmp_path: Path) -> None:
    """Credentials the restarted broker no longer accepts: no retry loop, the
    client closes with the reason."""
    data, port = tmp_path / "data", free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    before = write_users(tmp_path / "a", {"svc": user_entry(token="t" * 20, subscribe=[">"])})
    after = write_users(tmp_path / "b", {"svc": user_entry(token="u" * 20, subscribe=[">"])})
    stop_first, stop_second, first_stopped = anyio.Event(), anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as nursery:
        first = await nursery.start(
            partial(serve_until, stop_first, stopped=first_stopped, data_dir=data, port=port, auth_file=before)
        )
        async with client.connect(first.url, token="t" * 20, reconnect=FAST) as c:
            sub = await c.subscribe("refused.>")
            stop_first.set()
            await first_stopped.wait()
            await nursery.start(
                partial(serve_until, stop_second, data_dir=data, port=port, auth_file=after)
            )
            with anyio.fail_after(TIMEOUT):
                with pytest.raises(client.ConnectionClosed, match="refused"):
                    async for _ in sub:
                        pass
            assert c.closed and c.reconnects == 0
        stop_second.set()


async def test_reconnect_over_tls(tmp_path: Path, certs: Certs) -> None:
    """A pybrokers:// client reconnects over TLS, verifying the broker again."""
    tls = {"tls_cert": certs.cert_file, "tls_key": certs.key_file}
    data, port = tmp_path / "data", free_port()
    got = Collector(TIMEOUT)
    stop_first, stop_second, first_stopped = anyio.Event(), anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as nursery:
        first = await nursery.start(
            partial(serve_until, stop_first, stopped=first_stopped, data_dir=data, port=port, **tls)
        )
        assert first.url.startswith("pybrokers://")
        async with client.connect(first.url, ca_file=certs.ca_file, reconnect=FAST) as c:
            await c.subscribe("tls.>", got)
            async with client.connect(first.url, ca_file=certs.ca_file) as pub:
                await pub.publish("tls.a", b"one")
            await got.wait_for({"tls.a": 1})
            stop_first.set()
            await first_stopped.wait()
            second = await nursery.start(
                partial(serve_until, stop_second, data_dir=data, port=port, **tls)
            )
            async with client.connect(second.url, ca_file=certs.ca_file) as pub:
                await pub.publish("tls.a", b"two")
            await got.wait_for({"tls.a": 2})
            assert c.reconnects == 1
        stop_second.set()
    assert got.payloads("tls.a") == [b"one", b"two"]


async def test_keepalive_notices_a_silent_broker_and_reconnects() -> None:
    """A 'broker' that completes the handshake and then never answers
    anything: keepalive= gives the connection up and reconnect= opens a new
    one (the stand-in counts them)."""
    connections = 0
    second = anyio.Event()

    async def silent_broker(stream: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        if connections == 2:
            second.set()
        await serve_client(stream, _silent, TIMEOUT)

    async def _silent(stream: anyio.abc.SocketStream, conn: Connection, event: Event) -> bool:
        if isinstance(event, Hello):
            await stream.send(conn.send(Welcome("0", "silent", {})))
        return True  # anything else: no answer, ever

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as nursery:
        nursery.start_soon(listener.serve, silent_broker)
        port = listener.extra(SocketAttribute.local_port)
        async with client.connect(
            f"pybroker://127.0.0.1:{port}", keepalive=0.1, reconnect=FAST
        ) as c:
            with anyio.fail_after(TIMEOUT):
                await second.wait()
                while not c.reconnects:
                    await anyio.sleep(0.01)
            assert connections >= 2 and not c.closed
            nursery.cancel_scope.cancel()
