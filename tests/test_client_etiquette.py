"""What a library owes the application that imports it (issue 14, item 5):
stdlib logging and no configuration on import, enums that print their
names, str payloads as UTF-8 (anything else refused), and timeouts that are
TimeoutErrors naming what timed out. Under Trio and asyncio."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

import pybroker
from pybroker.protocol import Connection, Event, Hello, Welcome
from pybroker.server.server import Server

from helpers.anybroker import pybroker_server  # noqa: F401 (the fixture, under either backend)
from helpers.collect import take
from helpers.fakebroker import serve_client

pytestmark = pytest.mark.anyio

TIMEOUT = 10.0


@asynccontextmanager
async def mute_broker(welcome: bool) -> AsyncIterator[int]:
    """A listener that reads everything and answers nothing (or only the
    handshake, with ``welcome``); yields its port."""

    async def answer(stream: anyio.abc.SocketStream, conn: Connection, event: Event) -> bool:
        if isinstance(event, Hello) and welcome:
            await stream.send(conn.send(Welcome("0", "mute", {})))
        return True

    async def handle(stream: anyio.abc.SocketStream) -> None:
        await serve_client(stream, answer, TIMEOUT)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, handle)
        yield listener.extra(SocketAttribute.local_port)
        tasks.cancel_scope.cancel()


def test_importing_the_client_configures_no_logging() -> None:
    code = (
        "import logging, sys\n"
        "import pybroker\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
        "assert not logging.getLogger('pybroker').handlers\n"
        "assert 'structlog' not in sys.modules, 'the client library loaded structlog'\n"
        "assert 'pybroker.server' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_enums_print_their_names() -> None:
    assert str(pybroker.Durability.DISK) == "DISK"
    assert f"{pybroker.Durability.OS}" == "OS"
    assert pybroker.Durability.DISK == 2 and pybroker.Durability.DISK > pybroker.Durability.OS


async def test_the_readme_line_prints_the_durability_by_name(
    pybroker_server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    async with pybroker.connect(pybroker_server.url) as c:
        ack = await c.publish("orders.eu.created", b'{"id": 1}', headers={"source": "web"})
        print("stored at offset", ack.offset, ack.durability)
    assert capsys.readouterr().out == "stored at offset 0 DISK\n"


async def test_a_client_closed_right_after_connecting_closes_at_once(pybroker_server: Server) -> None:
    """Closing waits for the broker's GOODBYE, not for the close timeout.
    The first connection's reader signalled an event made when its task
    started; a close that began before that waited on the one made in
    __init__, which nothing set: 12 of 20 such closes took the whole
    timeout (5 s by default). With a 600 s timeout, the bound below fails
    at once if even one close waits for it."""
    with anyio.fail_after(60):
        for _ in range(20):
            async with pybroker.connect(pybroker_server.url, close_timeout=600) as c:
                pass
            assert c.closed


async def test_a_str_payload_is_sent_as_utf8(pybroker_server: Server) -> None:
    async with pybroker.connect(pybroker_server.url) as c:
        async with c.subscribe("text.t") as sub:
            await c.publish("text.t", "héllo ✓")
            await c.publish_many("text.t", ["a", (b"b", None), ("ç", {"k": "v"})])
            pending = c.publish_nowait("text.t", "")
            await pending.wait()
            got = await take(sub, 5)
    assert [m.payload for m in got] == ["héllo ✓".encode(), b"a", b"b", "ç".encode(), b""]


@pytest.mark.parametrize("payload", [1, None, ["a"], {"a": 1}])
async def test_other_payload_types_are_refused_before_anything_is_queued(
    pybroker_server: Server, payload: object
) -> None:
    async with pybroker.connect(pybroker_server.url) as c:
        with pytest.raises(TypeError, match=f"bytes or str .*not {type(payload).__name__}"):
            await c.publish("typed.t", payload)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            c.publish_nowait("typed.t", payload)  # type: ignore[arg-type]
        await c.flush()
        assert [t.topic for t in await c.topics("typed.>")] == []


async def test_a_request_timeout_is_a_timeout_error_naming_the_topic(pybroker_server: Server) -> None:
    async with pybroker.connect(pybroker_server.url) as c:
        await c.subscribe("svc.mute", lambda m: None)
        with anyio.fail_after(TIMEOUT), pytest.raises(TimeoutError) as info:
            await c.request("svc.mute", b"?", timeout=0.2)
    assert isinstance(info.value, pybroker.Timeout)
    assert str(info.value) == "request on topic 'svc.mute': no reply within 0.2 s"


async def test_a_connect_timeout_names_the_broker() -> None:
    async with mute_broker(welcome=False) as port:
        with anyio.fail_after(TIMEOUT), pytest.raises(pybroker.Timeout) as info:
            async with pybroker.connect(f"pybroker://127.0.0.1:{port}", connect_timeout=0.2):
                pass
    assert str(info.value) == f"connecting to 127.0.0.1:{port}: no WELCOME within 0.2 s"
    assert isinstance(info.value, TimeoutError)


async def test_a_flush_timeout_names_the_topics_still_waiting() -> None:
    async with mute_broker(welcome=True) as port:
        async with pybroker.connect(f"pybroker://127.0.0.1:{port}", close_timeout=0.1) as c:
            c.publish_nowait("never.acked", b"x")
            c.publish_nowait("never.either", "y")
            with anyio.fail_after(TIMEOUT), pytest.raises(pybroker.Timeout) as info:
                await c.flush(timeout=0.2)
            assert str(info.value) == (
                "flush: 2 messages not acknowledged within 0.2 s (topics 'never.acked', 'never.either')"
            )


async def test_the_client_logs_through_stdlib_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A connection that breaks under a client with reconnect: the warning is
    # a stdlib record of the pybroker logger hierarchy.
    async with mute_broker(welcome=True) as port:
        fast = pybroker.Reconnect(max_attempts=1, initial_delay=0.01, max_delay=0.01)
        with caplog.at_level(logging.WARNING, logger="pybroker"):
            with anyio.fail_after(TIMEOUT):
                async with pybroker.connect(
                    f"pybroker://127.0.0.1:{port}", keepalive=0.1, reconnect=fast, close_timeout=0.1
                ) as c:
                    while not c.reconnects and not c.closed:
                        await anyio.sleep(0.01)
    records = [r for r in caplog.records if r.name.startswith("pybroker")]
    assert records, caplog.records
    assert records[0].name == "pybroker.connection"
    assert f"connection to 127.0.0.1:{port} lost; reconnecting" in records[0].getMessage()


def test_the_broker_process_formats_client_records_as_its_own() -> None:
    # pybroker sub/pub (and serve) configure structlog; the client's stdlib
    # records then come out in the same format, at the same level.
    code = (
        "import logging\n"
        "from pybroker.server.logs import configure\n"
        "configure('warning', 'json')\n"
        "log = logging.getLogger('pybroker.connection')\n"
        "log.info('below the level')\n"
        "log.warning('connection to %s lost; reconnecting: %s', 'h:1', 'boom')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["event"] == "connection to h:1 lost; reconnecting: boom"
    assert (record["level"], record["logger"]) == ("warning", "pybroker.connection")
