"""Request/reply over pub/sub, and the NEEDS_RECEIVER flag under it."""

from __future__ import annotations

import anyio
import pytest

import pybroker as client
from pybroker.server.server import Server
from pybroker.protocol import ErrorCode

from helpers.anybroker import pybroker_server  # noqa: F401 (the fixture, under either backend)

#: Every test here runs under Trio and under asyncio.
pytestmark = pytest.mark.anyio


async def test_request_gets_the_reply(pybroker_server: Server) -> None:
    async with client.connect(pybroker_server.url) as responder, client.connect(
        pybroker_server.url
    ) as requester:

        async def echo(msg: client.Message) -> None:
            await responder.respond(msg, msg.payload.upper(), {"served-by": "echo"})

        await responder.subscribe("svc.echo", echo)
        with anyio.fail_after(10):
            replies = [await requester.request("svc.echo", b"hi %d" % i) for i in range(5)]
        assert [r.payload for r in replies] == [b"HI %d" % i for i in range(5)]
        assert all(r.headers["served-by"] == "echo" for r in replies)


async def test_concurrent_requests_are_matched_to_their_replies(pybroker_server: Server) -> None:
    async with client.connect(pybroker_server.url) as responder, client.connect(
        pybroker_server.url
    ) as requester:

        async def slow_echo(msg: client.Message) -> None:
            # Later requests answer first: replies arrive out of order.
            await anyio.sleep(0.01 * (10 - int(msg.payload)))
            await responder.respond(msg, msg.payload)

        await responder.subscribe("svc.slow", slow_echo, concurrency=10)
        results: dict[int, bytes] = {}

        async def ask(i: int) -> None:
            results[i] = (await requester.request("svc.slow", b"%d" % i)).payload

        with anyio.fail_after(10):
            async with anyio.create_task_group() as nursery:
                for i in range(10):
                    nursery.start_soon(ask, i)
        assert results == {i: b"%d" % i for i in range(10)}


async def test_request_with_nobody_listening_fails_at_once(pybroker_server: Server) -> None:
    async with client.connect(pybroker_server.url) as c:
        with anyio.fail_after(5), pytest.raises(client.NoReceivers) as info:
            await c.request("svc.nobody", b"?", timeout=60)
        assert info.value.code == ErrorCode.NO_RECEIVERS
        # Nothing was stored for the refused request.
        assert [t.topic for t in await c.topics("svc.>")] == []


async def test_a_wildcard_subscriber_or_a_group_counts_as_a_receiver(
    pybroker_server: Server,
) -> None:
    async with client.connect(pybroker_server.url) as responder, client.connect(
        pybroker_server.url
    ) as requester:

        async def answer(msg: client.Message) -> None:
            await responder.respond(msg, b"ok")

        await responder.subscribe("wild.*", answer)
        await responder.subscribe("work.q", answer, group="workers")
        with anyio.fail_after(10):
            assert (await requester.request("wild.x", b"")).payload == b"ok"
            assert (await requester.request("work.q", b"")).payload == b"ok"


async def test_request_times_out_when_the_receiver_never_answers(
    pybroker_server: Server,
) -> None:
    async with client.connect(pybroker_server.url) as c:
        await c.subscribe("svc.silent", lambda m: None)
        with pytest.raises(client.Timeout, match="request on topic 'svc.silent': no reply within 0.3 s"):
            await c.request("svc.silent", b"?", timeout=0.3)


async def test_respond_needs_a_request(pybroker_server: Server) -> None:
    async with client.connect(pybroker_server.url) as c:
        got: list[client.Message] = []
        await c.subscribe("plain", got.append)
        await c.publish("plain", b"x")
        with anyio.fail_after(10):
            while not got:
                await anyio.sleep(0.01)
        with pytest.raises(ValueError, match="not a request"):
            await c.respond(got[0], b"y")
