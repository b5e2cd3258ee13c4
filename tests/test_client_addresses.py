"""A URL that lists several brokers: ``pybroker://h1:7420,h2:7421``.

The first connection tries the addresses in order; a reconnect that cannot
reach the broker it was on tries the next one. (A cluster's nodes share
one log, so that is how a client outlives the node it was connected to:
tests/test_cluster_broker.py. Here one broker's data moves to another
port, which is the same thing as far as the client can tell.)
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

import pybroker
from pybroker import sync
from pybroker.protocol import Connection, Error, ErrorCode, Event, Hello

from helpers.anybroker import serving
from helpers.collect import Collector
from helpers.fakebroker import serve_client
from helpers.restarts import FAST, batch, free_port, publish_all, serve_until

pytestmark = pytest.mark.anyio

TIMEOUT = 30.0


@pytest.mark.parametrize(
    ("url", "addresses"),
    [
        ("pybroker://a:1,b:2", [("a", 1), ("b", 2)]),
        ("pybroker://user:pw@A.example,[::1]:9,c:7420", [("a.example", 7420), ("::1", 9), ("c", 7420)]),
        ("pybrokers://one", [("one", 7420)]),
    ],
)
def test_a_url_names_its_addresses_in_order(url: str, addresses: list[tuple[str, int]]) -> None:
    assert pybroker.parse_urls(url) == addresses
    assert pybroker.parse_url(url) == addresses[0]


@pytest.mark.parametrize(
    "url",
    [
        "pybroker://a:1,,b:2",  # an empty address
        "pybroker://a:0",
        "pybroker://a:65536",
        "pybroker://a:x",
        "pybroker://::1:9",  # IPv6 without brackets
        "pybroker://[::1]x",
        "pybroker://",
        "pybroker://" + ",".join(["a"] * 65),  # over MAX_ADDRESSES
        "http://a:1,b:2",
    ],
)
def test_a_bad_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        pybroker.parse_urls(url)


def test_user_info_is_read_from_a_url_of_several_addresses() -> None:
    assert pybroker.url_credentials("pybroker://me:s%40cret@a:1,b:2") == {"user": "me", "password": "s@cret"}


async def test_the_first_connection_tries_each_address_in_turn(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    async with serving(data_dir=tmp_path / "data") as server:
        url = f"pybroker://127.0.0.1:{closed},127.0.0.1:{server.port}"
        async with pybroker.connect(url) as c:
            ack = await c.publish("t", b"through the second")
        assert ack.offset == 0
        with pytest.raises(OSError):
            async with pybroker.connect(f"pybroker://127.0.0.1:{closed},127.0.0.1:{free_port()}"):
                pass  # pragma: no cover (neither answers)


async def test_the_first_connection_moves_past_a_broker_that_refuses_the_hello(tmp_path: Path) -> None:
    """A broker that answers HELLO with a retryable refusal (503, as a
    cluster node cut off from the cluster does): the next address is tried;
    a refusal that is not retryable (AUTH_FAILED) is the caller's at once."""
    hellos: list[int] = []

    async def refuse(code: ErrorCode, stream: anyio.abc.SocketStream, conn: Connection, event: Event) -> bool:
        if isinstance(event, Hello):
            hellos.append(int(code))
            await stream.send(conn.send(Error(int(code), "not here", fatal=True)))
            return False
        return True

    async def refusing(code: ErrorCode, stream: anyio.abc.SocketStream) -> None:
        await serve_client(stream, partial(refuse, code), TIMEOUT)

    stopping = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    denying = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with stopping, denying, anyio.create_task_group() as nursery, serving(data_dir=tmp_path / "d") as server:
        nursery.start_soon(stopping.serve, partial(refusing, ErrorCode.SHUTTING_DOWN))
        nursery.start_soon(denying.serve, partial(refusing, ErrorCode.AUTH_FAILED))
        stopping_port = stopping.extra(SocketAttribute.local_port)
        denying_port = denying.extra(SocketAttribute.local_port)
        async with pybroker.connect(f"pybroker://127.0.0.1:{stopping_port},127.0.0.1:{server.port}") as c:
            assert (await c.publish("t", b"past the refusal")).offset == 0
        assert hellos == [ErrorCode.SHUTTING_DOWN]
        with pytest.raises(pybroker.AuthenticationError):
            async with pybroker.connect(f"pybroker://127.0.0.1:{denying_port},127.0.0.1:{server.port}"):
                pass  # pragma: no cover (refused)
        assert hellos == [ErrorCode.SHUTTING_DOWN, ErrorCode.AUTH_FAILED]
        nursery.cancel_scope.cancel()


def test_the_blocking_client_takes_the_same_urls(tmp_path: Path, no_sync_client_left_behind: None) -> None:
    closed = free_port()
    with anyio.from_thread.start_blocking_portal(backend="trio") as portal:
        context = portal.wrap_async_context_manager(serving(data_dir=tmp_path / "data"))
        with context as server:
            with sync.connect(f"pybroker://127.0.0.1:{closed},127.0.0.1:{server.port}") as c:
                assert c.publish("t", b"blocking").offset == 0


async def test_a_reconnect_goes_on_to_the_next_address(tmp_path: Path) -> None:
    """The broker a subscriber was on goes away and comes back on the second
    address (the same data): the subscriber resumes there, no gap, no repeat."""
    data, first_port, second_port = tmp_path / "data", free_port(), free_port()
    url = f"pybroker://127.0.0.1:{first_port},127.0.0.1:{second_port}"
    got = Collector(TIMEOUT)
    async with anyio.create_task_group() as nursery:
        stop_first, first_stopped = anyio.Event(), anyio.Event()
        first = await nursery.start(
            partial(serve_until, stop_first, stopped=first_stopped, data_dir=data, port=first_port)
        )
        c = await nursery.start(_subscriber, url, got)
        await publish_all(first.url, "jobs", batch("before", 20))
        await got.wait_for({"jobs": 20})
        stop_first.set()
        with anyio.fail_after(TIMEOUT):
            await first_stopped.wait()  # the client retries a port that refuses it meanwhile
        async with serving(data_dir=data, port=second_port) as second:
            await publish_all(second.url, "jobs", batch("after", 20))
            await got.wait_for({"jobs": 40})
            assert c.connected and c.reconnects == 1
        nursery.cancel_scope.cancel()
    assert got.payloads("jobs") == batch("before", 20) + batch("after", 20)
    assert [m.offset for m in got.by_topic["jobs"]] == list(range(40))


async def _subscriber(
    url: str, got: Collector, *, task_status: anyio.abc.TaskStatus[pybroker.Client] = anyio.TASK_STATUS_IGNORED
) -> None:
    async with pybroker.connect(url, reconnect=FAST) as c:
        await c.subscribe("jobs", got, start="earliest")
        task_status.started(c)
        await anyio.sleep_forever()
