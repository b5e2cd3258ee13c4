"""Declared consumer groups (issue 15, item 3): GROUPS action 3 "create"
makes a durable group before any member exists, so jobs published before
the first worker wait for it. Through the client library, raw frames, a
restart, the permission rules and ``pybroker groups create``.

A real broker on loopback with the file store; every wait is bounded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pybroker as client
from pybroker.server.server import Server
from pybroker import Message
from pybroker.protocol import Error, ErrorCode, Groups, GroupsAction, GroupsReply, RefKind, StartKind

from helpers.anybroker import serving
from helpers.auth import user_entry, write_users
from helpers.inproc import wait_until
from helpers.procs import run
from helpers.raw import expect_request_error, raw_client

#: The tests that go through the client alone run under Trio and asyncio;
#: those using the raw Trio peer, HTTP or subprocess helpers, pytest-trio.
both = pytest.mark.anyio

TIMEOUT = 10.0


@asynccontextmanager
async def file_broker(data: Path, **overrides: Any) -> AsyncIterator[Server]:
    async with serving(data_dir=data, http_port=None, **overrides) as server:
        yield server


async def take(c: client.Client, pattern: str, group: str, n: int) -> list[Message]:
    """Join ``group`` as a worker holding up to ``n``, take ``n`` messages, ack them."""
    got: list[Message] = []
    async with c.subscribe(pattern, group=group, auto_ack=False, max_ack_pending=n) as sub:
        with anyio.fail_after(TIMEOUT):
            async for msg in sub:
                got.append(msg)
                await msg.ack()
                if len(got) == n:
                    break
    return got


async def nothing_more(c: client.Client, pattern: str, group: str) -> None:
    async with c.subscribe(pattern, group=group, auto_ack=False) as sub:
        with anyio.move_on_after(0.3):
            extra = await sub.__anext__()
            raise AssertionError(f"unexpected {extra!r}")


@both
async def test_jobs_published_before_the_first_worker_wait_for_it(tmp_path: Path) -> None:
    async with file_broker(tmp_path / "data") as server, client.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT):
            await c.publish_many("jobs.mail", [b"old-1", b"old-2"])  # before the group: not its work
            doc = await c.create_group("mailers", "jobs.>", max_deliver=3, backoff=[1, 5])
        assert doc["created"] is True and doc["members"] == 0 and doc["pending"] == 0
        assert doc["topics"] == {"jobs.mail": {"cursor": 2, "pending": 0, "backlog": 0}}
        assert doc["config"]["max_deliver"] == 3 and doc["config"]["backoff_ms"] == [1000, 5000]
        with anyio.fail_after(TIMEOUT):
            await c.publish_many("jobs.mail", [b"a", b"b"])
            await c.publish("jobs.sms", b"c")  # a topic created after the group: all of it
        got = await take(c, "jobs.>", "mailers", 3)
        assert sorted((m.topic, m.payload, m.deliveries) for m in got) == [
            ("jobs.mail", b"a", 1), ("jobs.mail", b"b", 1), ("jobs.sms", b"c", 1),
        ]
        await nothing_more(c, "jobs.>", "mailers")
        # Declared again: left as it is; with another pattern: refused.
        with anyio.fail_after(TIMEOUT):
            again = await c.create_group("mailers", "jobs.>", max_deliver=9)
            assert again["created"] is False and again["config"]["max_deliver"] == 3
            assert again["acked"] == 3
            with pytest.raises(client.BrokerError) as refused:
                await c.create_group("mailers", "jobs.mail")
        assert refused.value.error_code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("start", ["earliest", "offset", "time"])
@both
async def test_create_from_earliest_offset_or_time(tmp_path: Path, start: str) -> None:
    async with file_broker(tmp_path / "data") as server, client.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT):
            first = await c.publish_many("q", [b"0", b"1"])
            await anyio.sleep(0.01)  # the next batch has a later timestamp
            later = await c.publish_many("q", [b"2", b"3"])
            where: Any = {
                "earliest": "earliest",
                "offset": 1,
                "time": dt.datetime.fromtimestamp(later[0].timestamp, dt.timezone.utc),
            }[start]
            await c.create_group("g", "q", start=where)
        expected = {"earliest": [0, 1, 2, 3], "offset": [1, 2, 3], "time": [2, 3]}[start]
        assert first[0].offset == 0
        got = await take(c, "q", "g", len(expected))
        assert sorted(m.offset for m in got) == expected
        await nothing_more(c, "q", "g")


@both
async def test_a_declared_group_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with file_broker(data) as server, client.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT):
            await c.create_group("g", "jobs", start="new", ack_wait=7)
            await c.publish_many("jobs", [b"x", b"y"])
    async with file_broker(data) as server, client.connect(server.url) as c:
        group = server.broker.groups.groups["g"]
        assert group.config.ack_wait == 7 and not group.members
        with anyio.fail_after(TIMEOUT):
            await c.publish("jobs", b"z")
        got = await take(c, "jobs", "g", 3)
        assert [m.payload for m in got] == [b"x", b"y", b"z"]


async def test_bad_create_requests_are_refused_not_fatal(tmp_path: Path) -> None:
    async with file_broker(tmp_path / "data") as server, raw_client(server, handshake="raw-create") as raw:
        cases: list[tuple[Groups, ErrorCode]] = [
            (Groups(1, GroupsAction.CREATE, "g", "jobs..x"), ErrorCode.BAD_PATTERN),
            (Groups(2, GroupsAction.CREATE, "a.b", "jobs"), ErrorCode.BAD_REQUEST),
            (Groups(3, GroupsAction.CREATE, "g", "jobs.*", StartKind.OFFSET, 4), ErrorCode.BAD_REQUEST),
            (Groups(4, GroupsAction.CREATE, "g", "jobs", 9, 0), ErrorCode.BAD_REQUEST),  # type: ignore[arg-type]
            (Groups(5, GroupsAction.CREATE, "g", "jobs", options={"colour": "blue"}), ErrorCode.BAD_REQUEST),
            (Groups(6, GroupsAction.CREATE, "g", "jobs", options={"ack_wait_ms": "0"}), ErrorCode.BAD_REQUEST),
            (Groups(7, GroupsAction.CREATE, "g", "jobs", options={"group": "h"}), ErrorCode.BAD_REQUEST),
            (Groups(8, GroupsAction.CREATE, "g", "_inbox.x"), ErrorCode.BAD_REQUEST),
        ]
        for request, code in cases:
            await raw.send_event(request)
            expect_request_error(await raw.next_event(), code, request.request_id, RefKind.REQUEST)
        assert server.broker.groups.groups == {}
        await raw.send_event(Groups(9, GroupsAction.CREATE, "g", "jobs", StartKind.EARLIEST, 0, {"max_deliver": "2"}))
        reply = await raw.expect(GroupsReply)
        assert reply.request_id == 9 and '"created": true' in reply.document
        await raw.ping(1)
        assert not any(isinstance(e, Error) for e in raw.backlog)


@both
async def test_creating_needs_subscribe_and_dead_letter_publish_rights(tmp_path: Path) -> None:
    users = {
        "worker": user_entry(token="worker-token-0123456789", publish=["dlq.>"], subscribe=["jobs.*"]),
        "reader": user_entry(token="reader-token-0123456789", subscribe=["jobs.*"]),
    }
    async with file_broker(tmp_path / "data", auth_file=write_users(tmp_path, users)) as server:
        async with (
            client.connect(server.url, token="worker-token-0123456789") as worker,
            client.connect(server.url, token="reader-token-0123456789") as reader,
        ):
            with anyio.fail_after(TIMEOUT):
                with pytest.raises(client.PermissionDenied):
                    await worker.create_group("g", "secret.*")
                with pytest.raises(client.PermissionDenied) as denied:
                    await reader.create_group("g", "jobs.*")  # would dead-letter into dlq.g
                assert "dlq.g" in denied.value.message
                assert (await reader.create_group("g", "jobs.*", max_deliver=0))["created"] is True
                assert (await worker.create_group("w", "jobs.*"))["created"] is True
        assert sorted(server.broker.groups.groups) == ["g", "w"]


async def test_pybroker_groups_create_cli(pybroker_server: Server) -> None:
    async def cli(*args: str) -> tuple[int, str, str]:
        result = await run(["groups", *args, "--url", pybroker_server.url], timeout=30)
        return result.returncode, result.stdout.decode(), result.stderr.decode()

    async with client.connect(pybroker_server.url) as c:
        await c.publish_many("cli.jobs", [b"before-0", b"before-1"])
        code, out, err = await cli("create", "workers", "--topic", "cli.jobs", "--from", "1", "--max-deliver", "4")
        assert code == 0, err
        assert out.strip() == "created group workers  pattern=cli.jobs  (cli.jobs from offset 1)"
        code, out, _ = await cli("create", "workers", "--topic", "cli.jobs")
        assert code == 0 and out.startswith("group exists (settings unchanged): workers")
        code, _, err = await cli("create", "late", "--topic", "cli.jobs", "--from", "yesterday")
        assert code == 1 and "ISO 8601" in err
        code, _, err = await cli("create", "other")
        assert code == 2 and "--topic" in err
        group = pybroker_server.broker.groups.groups["workers"]
        assert group.config.max_deliver == 4
        got = await take(c, "cli.jobs", "workers", 1)
        assert [m.payload for m in got] == [b"before-1"]
        await wait_until(lambda: group.acked == 1)
