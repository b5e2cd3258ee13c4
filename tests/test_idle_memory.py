"""Idle connections: what they cost, and that parking them changes nothing a
client can see (broker/session/parking.py).

- an idle subscriber's connection costs a bounded number of bytes of
  Python objects, measured with tracemalloc over hundreds of real
  connections opened by another process;
- a parked subscriber gets live deliveries without a task, and its task
  comes back for its own frames (PING), for output the socket does not take
  at once (in order, every message), for the idle timeout and for shutdown
  (GOODBYE);
- connections that end while parked leave no descriptor and no task behind;
- connections over TLS are never parked (their writes go through their
  writer task).
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import trio

import pybroker
from pybroker.protocol import (
    Deliver,
    ErrorCode,
    Goodbye,
    Hello,
    Ping,
    Pong,
    StartKind,
    SubAck,
    Subscribe,
    decode_batch,
    encode_event,
)
from pybroker.server.server import Server
from pybroker.server.session import Session
from pybroker.server.testing import running_broker

from helpers.certs import Certs
from helpers.frames import good_batch, publish_frame
from helpers.inproc import session_named, wait_sessions, wait_until
from helpers.raw import RawClient, expect_fatal, raw_client

#: Bound on any single wait for the broker.
TIMEOUT = 10.0
#: Idle subscriber connections measured with tracemalloc.
MEASURED = 300
#: Bytes of Python objects an idle subscriber's connection may cost (a
#: session, its outbox, acknowledgements and codec state, the socket
#: objects, one subscription). Measured 3,150-3,160 B here with parking and
#: slots; 10.7 KB before (a task, its frames, a nursery, cancel scopes and
#: events per connection); 4,525 B with a dict instead of the session's
#: slots. The bound leaves room for small additions, not for those.
BYTES_PER_IDLE_CONNECTION = 4000

# The child opens ``count`` connections, each with a HELLO and a SUBSCRIBE
# written at once, says "ready" and holds them until its stdin closes. In a
# process of its own so that its sockets are not counted as the broker's.
_CLIENT = r"""
import socket, sys
host, port, count, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
held = []
for _ in range(count):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(frames)
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def quick_parking(server: Server) -> None:
    """Park readers after 50 ms of silence (1 s by default), looking every 20 ms."""
    server.lot.park_after = 0.05
    server.lot.sweep = 0.02


def parked(server: Server, session: Session) -> bool:
    return session in server.lot.parked.values()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def trio_tasks() -> int:
    """Every task of this run, found from the root task's nurseries."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def settle(check: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll until ``check`` holds, at most ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.02)
        return True
    return False


async def subscriber(server: Server, name: str, pattern: str) -> tuple[RawClient, trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    raw = RawClient(stream, timeout=TIMEOUT, receive_bytes=256 * 1024)
    await raw.handshake(name)
    await raw.send_event(Subscribe(1, pattern, StartKind.NEW, 0))
    assert await raw.next_event() == SubAck(1)
    return raw, stream


async def open_idle_subscribers(server: Server, count: int) -> trio.Process:
    frames = encode_event(Hello("idle")) + encode_event(Subscribe(1, "idle.memory"))
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CLIENT, "127.0.0.1", str(server.port), str(count), frames.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    said = b""
    with trio.fail_after(60):
        while b"ready" not in said:
            chunk = await child.stdout.receive_some(64)
            assert chunk, "the client process ended early"
            said += chunk
        # Every connection subscribed and parked, its answers written.
        while len(server.lot.parked) < count or any(s.outbox.queued_bytes for s in server.sessions):
            await trio.sleep(0.02)
    assert all(len(s.subs) == 1 for s in server.sessions)
    return child


async def close_idle_subscribers(server: Server, child: trio.Process) -> None:
    assert child.stdin is not None and child.stdout is not None
    await child.stdin.aclose()
    await child.stdout.aclose()
    with trio.fail_after(30):
        await child.wait()
        while server.sessions:
            await trio.sleep(0.02)


async def test_idle_subscriber_connection_costs_bounded_bytes(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path, idle_timeout=3600) as server:
        quick_parking(server)
        # Warm up (first-use allocations: the topic's pattern index, the
        # lot's table, structlog's caches), then the baseline.
        await close_idle_subscribers(server, await open_idle_subscribers(server, 20))
        tracemalloc.start(1)
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            child = await open_idle_subscribers(server, MEASURED)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        await close_idle_subscribers(server, child)
    per_connection = (after - before) / MEASURED
    print(f"\n{MEASURED} idle subscriber connections: {per_connection:,.0f} B of Python objects each")
    assert per_connection <= BYTES_PER_IDLE_CONNECTION, per_connection


async def test_parked_subscriber_gets_live_deliveries_and_its_task_back_for_a_ping(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        quick_parking(server)
        raw, _ = await subscriber(server, "parked-sub", "park.live")
        session = session_named(server, "parked-sub")
        await wait_until(lambda: parked(server, session))
        async with raw_client(server, handshake="publisher") as pub:
            for i in range(3):
                await pub.send(publish_frame(0, b"park.live", good_batch(b"m%d" % i)))
                event = await raw.next_event()
                assert isinstance(event, Deliver), event
                assert [p for p, _ in decode_batch(event.batch)] == [b"m%d" % i]
                assert event.base_offset == i
                # Written directly: still parked, no task was needed.
                assert parked(server, session)
        # Its own frame: a task again, the PONG, then parked again.
        await raw.ping(7)
        await wait_until(lambda: parked(server, session))
        await raw.ping(8)
        await trio.aclose_forcefully(raw.stream)
        await wait_sessions(server, 0)


async def test_parked_subscriber_that_falls_behind_gets_everything_in_order(tmp_path: Path) -> None:
    """More than the sockets hold, sent to a parked subscriber that does not
    read: the outbox needs its writer task, which needs the session's task."""
    async with running_broker(data_dir=tmp_path, outbound_queue_bytes=64 * 1024) as server:
        quick_parking(server)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        raw = RawClient(stream, timeout=TIMEOUT, receive_bytes=256 * 1024)
        await raw.handshake("slow")
        await raw.send_event(Subscribe(1, "park.slow", StartKind.NEW, 0))
        assert await raw.next_event() == SubAck(1)
        session = session_named(server, "slow")
        session.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        await wait_until(lambda: parked(server, session))
        payload = bytes(1000)
        total = 600  # ~600 KB: far more than both sockets and the outbound queue
        async with raw_client(server, handshake="publisher") as pub:
            for i in range(0, total, 20):
                await pub.send(b"".join(publish_frame(0, b"park.slow", good_batch(payload)) for _ in range(20)))
            await pub.ping(1)  # every PUBLISH handled
        # Delivered once their fsync is done, by the flusher task: the rest
        # needs the writer task, hence the session's.
        await wait_until(lambda: not parked(server, session))
        offsets: list[int] = []
        with trio.fail_after(30):
            while len(offsets) < total:
                event = await raw.next_event()
                assert isinstance(event, Deliver), event
                offsets.extend(event.base_offset + i for i, _ in enumerate(decode_batch(event.batch)))
        assert offsets == list(range(total))
        # Caught up and silent again: parked again.
        await wait_until(lambda: parked(server, session))
        await trio.aclose_forcefully(stream)
        await wait_sessions(server, 0)


async def test_parked_connection_gets_ping_then_idle_timeout() -> None:
    async with running_broker(idle_timeout=0.4) as server:
        quick_parking(server)
        async with raw_client(server, handshake="silent") as raw:
            session = session_named(server, "silent")
            await wait_until(lambda: parked(server, session))
            ping = await raw.next_event(timeout=5)
            assert isinstance(ping, Ping), ping
            # Not answered: ERROR 107, then the end of the stream.
            await expect_fatal(raw, ErrorCode.IDLE_TIMEOUT, timeout=5)
        await wait_sessions(server, 0)


async def test_shutdown_resumes_parked_connections_with_goodbye() -> None:
    clients: list[RawClient] = []
    async with trio.open_nursery() as nursery:
        async with running_broker() as server:
            quick_parking(server)
            for i in range(20):
                raw, _ = await subscriber(server, f"idle-{i}", "park.shutdown")
                clients.append(raw)
            await wait_until(lambda: len(server.lot.parked) == 20)
            server.shutdown()
            with trio.fail_after(TIMEOUT):
                await server.wait_stopped()
        for raw in clients:
            assert await raw.next_event() == Goodbye()
            assert await raw.next_event() is None
            await trio.aclose_forcefully(raw.stream)
        nursery.cancel_scope.cancel()


async def test_connections_that_end_while_parked_leave_no_fds_or_tasks(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path, idle_timeout=3600) as server:
        quick_parking(server)
        await close_idle_subscribers(server, await open_idle_subscribers(server, 10))
        assert await settle(lambda: not server.sessions)
        await trio.sleep(0.2)
        fds_before, tasks_before = open_fds(), trio_tasks()
        child = await open_idle_subscribers(server, 200)
        try:
            assert len(server.lot.parked) == 200
            # Parked: no task per connection. A session counts as parked just
            # before its task returns, so wait (bounded) for the last ones to
            # end; 200 tasks left behind would never settle.
            settled = await settle(lambda: trio_tasks() == tasks_before)
            assert settled, (tasks_before, trio_tasks())
        finally:
            await close_idle_subscribers(server, child)
        settled = await settle(lambda: not server.lot.parked and open_fds() == fds_before and trio_tasks() == tasks_before)
        assert settled, (fds_before, open_fds(), tasks_before, trio_tasks(), len(server.lot.parked))
        async with raw_client(server, handshake="after") as raw:
            await raw.ping(1)


async def test_tls_connections_are_not_parked(certs: Certs) -> None:
    async with running_broker(tls_cert=certs.cert_file, tls_key=certs.key_file) as server:
        quick_parking(server)
        async with pybroker.connect(server.url, ca_file=certs.ca_file, name="tls-idle") as c:
            async with c.subscribe("park.tls") as sub:
                session = session_named(server, "tls-idle")
                # Silent for ten of the lot's sweeps, 4 times park_after:
                # a plain connection would have been parked.
                sweeps: list[float] = []
                sweep = server.lot._sweep

                def counted(now: float) -> None:
                    sweeps.append(now)
                    sweep(now)

                server.lot._sweep = counted  # type: ignore[method-assign]
                await wait_until(lambda: len(sweeps) >= 10)
                assert sweeps[-1] - sweeps[0] >= 3 * server.lot.park_after
                assert not server.lot.parked
                assert session not in server.lot.active  # not even a candidate
                await c.publish("park.tls", b"still served")
                with trio.fail_after(TIMEOUT):
                    message = await anext(sub)
                assert message.payload == b"still served"
