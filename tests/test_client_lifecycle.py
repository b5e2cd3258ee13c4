"""The client's context manager: errors in the body, close, callbacks."""

from __future__ import annotations

import anyio
import pytest

import pybroker as client
from pybroker.server.server import Server

from helpers.anybroker import pybroker_server  # noqa: F401 (the fixture, under either backend)

#: Every test here runs under Trio and under asyncio.
pytestmark = pytest.mark.anyio


async def test_exception_in_body_propagates_unchanged(pybroker_server: Server) -> None:
    with pytest.raises(KeyError, match="boom"):
        async with client.connect(pybroker_server.url):
            raise KeyError("boom")


async def test_client_side_validation_error_propagates(pybroker_server: Server) -> None:
    with pytest.raises(ValueError):
        async with client.connect(pybroker_server.url) as c:
            await c.topics("bad..pattern")
    with pytest.raises(ValueError):
        async with client.connect(pybroker_server.url) as c:
            await c.publish("no spaces allowed", b"x")


async def test_exception_after_subscribing_propagates(pybroker_server: Server) -> None:
    with pytest.raises(RuntimeError, match="after subscribe"):
        async with client.connect(pybroker_server.url) as c:
            await c.subscribe("t", lambda m: None)
            async with c.subscribe("u"):
                raise RuntimeError("after subscribe")


async def test_callback_exception_propagates_out_of_connect(pybroker_server: Server) -> None:
    def explode(msg: client.Message) -> None:
        raise ZeroDivisionError(f"bad message at {msg.offset}")

    with anyio.fail_after(10), pytest.raises(ZeroDivisionError, match="message at 0"):
        async with client.connect(pybroker_server.url) as c:
            await c.subscribe("t", explode)
            await c.publish("t", b"x")
            await anyio.sleep_forever()


async def test_cancelling_the_body_is_not_an_error(pybroker_server: Server) -> None:
    with anyio.move_on_after(0.2) as scope:
        async with client.connect(pybroker_server.url) as c:
            await c.subscribe("t", lambda m: None)
            await anyio.sleep_forever()
    assert scope.cancelled_caught


async def test_topics_lists_offsets(pybroker_server: Server) -> None:
    async with client.connect(pybroker_server.url) as c:
        await c.publish_many("a.x", [b"1", b"2", b"3"])
        await c.publish("a.y", b"1")
        await c.publish("b", b"1")
        async with c.subscribe("a.*"):
            infos = await c.topics("a.>")
        assert [(i.topic, i.first_offset, i.next_offset, i.subscriptions) for i in infos] == [
            ("a.x", 0, 3, 1),
            ("a.y", 0, 1, 1),
        ]
        assert all(i.retained_bytes > 0 for i in infos)
        assert [i.topic for i in await c.topics()] == ["a.x", "a.y", "b"]
        assert await c.topics("nothing.here") == []


async def test_each_backend_really_runs_the_test(pybroker_server: Server, anyio_backend: str) -> None:
    # pytest-trio's trio_mode must not take over the asyncio runs (conftest.py).
    import sniffio

    assert sniffio.current_async_library() == anyio_backend
    async with client.connect(pybroker_server.url) as c:
        assert (await c.publish("backend.check", anyio_backend)).offset == 0


async def test_send_is_a_cancellation_point(pybroker_server: Server) -> None:
    # send() does not yield unless it waits for room, but a cancelled
    # scope still stops it before it queues anything (under both backends;
    # the cancel check is looked up once per client for speed).
    async with client.connect(pybroker_server.url) as c:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await c.send("cancel.t", b"never")
            raise AssertionError("send() went on in a cancelled scope")
        assert scope.cancelled_caught
        await c.flush()
        assert await c.topics("cancel.>") == []
