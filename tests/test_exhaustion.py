"""Resource exhaustion: what hostile or broken clients cost the broker.

- thousands of connections opened and dropped (at every stage of a
  connection's life) leave no file descriptor and no task behind, counted
  in this process (the broker runs in it);
- a subscriber that never reads costs a bounded number of queued bytes,
  and the other subscribers get everything;
- a client that drips its HELLO a byte at a time is cut off by the
  handshake timeout;
- a publisher that never reads its PUBACKs costs a bounded number of queued
  bytes, then the broker stops reading it (backpressure), while the other
  clients go on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import trio

import pybroker as client
from pybroker.server.server import Server
from pybroker.server.session import Session
from pybroker.server.testing import running_broker
from pybroker.protocol import (
    ErrorCode,
    Goodbye,
    Hello,
    PubAck,
    Subscribe,
    Welcome,
    encode_event,
)

from helpers.frames import HELLO_FRAME, good_batch, publish_frame, subscribe_frame
from helpers.inproc import session_named, wait_sessions
from helpers.raw import RawClient, check_raw_healthy, expect_fatal, raw_client

#: Bound on any single wait for the broker.
TIMEOUT = 10.0
#: Connections opened and dropped by the leak test, and how many at once.
CONNECTIONS = 2000
CONCURRENCY = 50


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


def small_buffers(sock: trio.socket.SocketType) -> None:
    """Shrink the kernel's buffers so a stalled peer shows with little data."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def stalled_connection(server: Server) -> RawClient:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    small_buffers(sock)
    with trio.fail_after(TIMEOUT):
        await sock.connect(("127.0.0.1", server.port))
    return RawClient(trio.SocketStream(sock))


# -- thousands of connections ----------------------------------------------------


async def one_connection(server: Server, kind: int) -> None:
    """Open a connection, take it to some stage of its life, drop it."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    try:
        if kind == 0:
            return  # connected, said nothing
        if kind == 1:
            await stream.send_all(HELLO_FRAME[:7])  # mid-handshake
            return
        raw = RawClient(stream)
        if kind == 2:
            await raw.send(HELLO_FRAME)  # HELLO, gone before reading WELCOME
            return
        await raw.handshake()
        await raw.send(subscribe_frame(1, b"churn.>"))
        if kind == 3:
            return  # subscribed (SUBACK unread)
        await raw.send(publish_frame(1, b"churn.t", good_batch(b"bye")))
        if kind == 4:
            # An abortive close (RST) with a PUBLISH just sent.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return
        await raw.send(encode_event(Goodbye()))  # kind 5: a clean close
        with trio.fail_after(TIMEOUT):
            while await raw.next_event() is not None:
                pass
    finally:
        await trio.aclose_forcefully(stream)


async def test_thousands_of_connections_leak_no_fds_or_tasks() -> None:
    async with running_broker(handshake_timeout=5.0) as server:
        # Warm up (lazy imports, first-use allocations), then the baseline.
        for kind in range(6):
            await one_connection(server, kind)
        assert await settle(lambda: not server.sessions)
        await trio.sleep(0.2)
        fds_before, tasks_before = open_fds(), trio_tasks()

        limiter = trio.CapacityLimiter(CONCURRENCY)

        async def limited(i: int) -> None:
            async with limiter:
                await one_connection(server, i % 6)

        total_before = server.connections_total
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(CONNECTIONS):
                    nursery.start_soon(limited, i)
        assert server.connections_total - total_before == CONNECTIONS

        settled = await settle(
            lambda: not server.sessions
            and open_fds() == fds_before
            and trio_tasks() == tasks_before
        )
        fds_after, tasks_after = open_fds(), trio_tasks()
        print(
            f"\n{CONNECTIONS} connections: fds {fds_before} -> {fds_after}, "
            f"tasks {tasks_before} -> {tasks_after}, sessions left {len(server.sessions)}"
        )
        assert settled, (fds_before, fds_after, tasks_before, tasks_after, len(server.sessions))
        # Still serving.
        async with raw_client(server) as raw:
            await raw.handshake()
            await check_raw_healthy(raw, "churn.after")


async def test_refused_connections_leak_no_fds_or_tasks() -> None:
    """At max_connections: a flood of refused connections (some say HELLO,
    some say nothing, some reset) costs nothing once it is over."""
    flood = 600
    async with running_broker(max_connections=1) as server:
        async with raw_client(server) as inside:
            await inside.handshake()
            async with raw_client(server) as warm_up:
                await expect_fatal(warm_up, ErrorCode.TOO_MANY_CONNECTIONS)
            assert await settle(lambda: server._refusing == 0)
            await trio.sleep(0.2)
            fds_before, tasks_before = open_fds(), trio_tasks()
            limiter = trio.CapacityLimiter(CONCURRENCY * 2)

            async def knock(i: int) -> None:
                async with limiter:
                    with trio.fail_after(TIMEOUT):
                        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                    try:
                        if i % 3 == 1:
                            await stream.send_all(HELLO_FRAME)
                        elif i % 3 == 2:
                            stream.socket.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                            )
                    except trio.BrokenResourceError:
                        pass  # already closed by the broker
                    finally:
                        await trio.aclose_forcefully(stream)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(flood):
                        nursery.start_soon(knock, i)
            settled = await settle(
                lambda: server._refusing == 0
                and open_fds() == fds_before
                and trio_tasks() == tasks_before
            )
            fds_after, tasks_after = open_fds(), trio_tasks()
            print(
                f"\n{flood} refused connections: fds {fds_before} -> {fds_after}, "
                f"tasks {tasks_before} -> {tasks_after}, refused {server.connections_refused}"
            )
            assert settled, (fds_before, fds_after, tasks_before, tasks_after)
            assert server.connections_refused == flood + 1
            assert len(server.sessions) == 1
            await check_raw_healthy(inside, "refused.after")


# -- a subscriber that never reads ---------------------------------------------------


async def test_subscriber_that_never_reads_costs_bounded_memory() -> None:
    queue = 32 * 1024
    per_batch = 5
    frame = publish_frame(0, b"flood.t", good_batch(*[b"s" * 200] * per_batch))  # ~1 KiB
    batches = 3000  # about 3 MiB in all, a hundred times the queue bound
    total = batches * per_batch
    async with running_broker(outbound_queue_bytes=queue, memory_retention_bytes=64 << 20) as server:
        stalled = await stalled_connection(server)
        try:
            await stalled.send_event(Hello(client_name="stalled"))
            assert await stalled.request(encode_event(Subscribe(1, "flood.>"))) is not None
            session = session_named(server, "stalled")
            peak = 0
            received = 0

            async def read_all(sub: client.Subscription) -> None:
                nonlocal received
                async for msg in sub:
                    assert msg.offset == received, (msg.offset, received)
                    received += 1
                    if received == total:
                        return

            async def sample(stop: trio.Event) -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, session.outbox.queued_bytes + session.outbox.sending)
                    await trio.sleep(0.001)

            async with client.connect(server.url, name="reader") as reader:
                async with reader.subscribe("flood.>", window=total) as sub:
                    async with raw_client(server) as publisher:
                        await publisher.handshake()
                        stop = trio.Event()
                        with trio.fail_after(60):
                            async with trio.open_nursery() as nursery:
                                nursery.start_soon(sample, stop)
                                for _ in range(batches // 100):
                                    await publisher.send(frame * 100)
                                    await trio.sleep(0)
                                await read_all(sub)
                                stop.set()
            print(f"\nstalled subscriber: peak queued+sending {peak} bytes, bound {queue}")
            # The others got everything, in order (read_all checked); what the
            # stalled one costs meanwhile is bounded: its queue plus what the
            # writer is sending, each under the bound plus one batch.
            assert received == total
            assert 0 < peak <= 2 * (queue + len(frame))
            assert server.broker.router.topics["flood.t"].log.next_offset == total
            assert session.subs[1].lag, "the stalled subscription should be reading from the log"
        finally:
            await trio.aclose_forcefully(stalled.stream)


# -- a client that drips its HELLO -------------------------------------------------


async def test_hello_one_byte_at_a_time_is_cut_off_by_the_handshake_timeout() -> None:
    async with running_broker(handshake_timeout=0.5) as server:
        async with raw_client(server) as raw:
            raw.stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw.drip, HELLO_FRAME, 0.2)
                await expect_fatal(raw, ErrorCode.HANDSHAKE_REQUIRED)
                nursery.cancel_scope.cancel()
            # It never got to finish its HELLO: dripping does not extend the deadline.
            assert 0 < raw.dripped < len(HELLO_FRAME)
        await wait_sessions(server, 0)


# -- a publisher that never reads its PUBACKs ----------------------------------------


async def test_publisher_that_never_reads_pubacks_is_bounded_then_backpressured() -> None:
    queue = 16 * 1024
    total = 10_000
    chunk = 250
    async with running_broker(outbound_queue_bytes=queue) as server:
        raw = await stalled_connection(server)
        try:
            await raw.send_event(Hello(client_name="deaf"))
            with trio.fail_after(TIMEOUT):
                while session_of_or_none(server, "deaf") is None:
                    await trio.sleep(0.01)
            session = session_named(server, "deaf")
            small_buffers(session.stream.socket)  # so the stall shows sooner
            sent = 0
            peak = 0

            async def push() -> None:
                nonlocal sent
                for start in range(1, total + 1, chunk):
                    data = b"".join(
                        publish_frame(r, b"deaf.t", good_batch(b"x")) for r in range(start, start + chunk)
                    )
                    await raw.stream.send_all(data)
                    sent += chunk

            def stored() -> int:
                topic = server.broker.router.topics.get("deaf.t")
                return 0 if topic is None else topic.log.next_offset

            async with trio.open_nursery() as nursery:
                nursery.start_soon(push)
                # The broker reads until its queue for this connection is
                # full, then stops: what it stored stops growing.
                with trio.fail_after(30):
                    while True:
                        before = stored()
                        for _ in range(30):
                            peak = max(peak, session.outbox.queued_bytes)
                            await trio.sleep(0.01)
                        if stored() == before and session.reading_paused:
                            break
                paused_at = stored()
                print(f"\ndeaf publisher: broker stopped reading after {paused_at} of {total} "
                      f"(client pushed {sent}); peak queued {peak} bytes, bound {queue}")
                assert 0 < paused_at < total
                # The bound plus at most max_inflight_publishes (1,024) PUBACKs
                # of 35 bytes, flushed when the reader pauses.
                assert peak <= queue + 1024 * 35
                # Everyone else is served meanwhile.
                async with client.connect(server.url, name="other") as other:
                    async with other.subscribe("other.>") as sub:
                        acks = await other.publish_many("other.t", [b"a", b"b", b"c"])
                        with trio.fail_after(TIMEOUT):
                            got = [await anext(sub) for _ in range(3)]
                    assert [m.offset for m in got] == [a.offset for a in acks]
                assert stored() == paused_at
                # Now it reads: every PUBACK arrives, in order, and the
                # broker reads the rest.
                acked = 0
                with trio.fail_after(60):
                    welcome = await raw.next_event()
                    assert isinstance(welcome, Welcome), welcome
                    while acked < total:
                        event = await raw.next_event()
                        assert isinstance(event, PubAck), event
                        acked += 1
                        assert event.request_id == acked and event.base_offset == acked - 1
            assert stored() == total
            assert not session.reading_paused
            await check_raw_healthy(raw, "deaf.after")
        finally:
            await trio.aclose_forcefully(raw.stream)


def session_of_or_none(server: Server, name: str) -> Session | None:
    for s in server.sessions:
        if s.client_name == name:
            return s
    return None

