"""Deleting a topic (protocol.md, "TOPICS"): its messages and files go, its
subscribers and groups are told, the name starts afresh at offset 0, a
restart does not bring it back; admins and users with a ``manage``
permission may, others may not; over TCP, HTTP and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.protocol import Error, ErrorCode, RefKind, StartKind, SubAck, Subscribe
from pybroker.server.testing import running_broker

from helpers.auth import user_entry, write_users
from helpers.http import assert_error, request
from helpers.procs import run, serve
from helpers.raw import raw_client

TIMEOUT = 20.0


def topic_dirs(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "topics").iterdir())


async def test_delete_tells_subscribers_and_groups_and_the_name_starts_afresh(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c, raw_client(server, handshake="watcher") as raw:
            await raw.send_event(Subscribe(1, "t.>", StartKind.EARLIEST))
            assert isinstance(await raw.expect(SubAck), SubAck)
            await c.create_group("g", "t.>", start="earliest")
            await c.publish_many("t.a", [b"%d" % i for i in range(10)])
            await c.publish("t.b", b"kept")
            assert topic_dirs(tmp_path) == ["t.a", "t.b"]
            assert (await c.groups("inspect", "g"))["topics"]["t.a"]["cursor"] == 0

            assert await c.delete_topic("t.a") == {"deleted": "t.a", "messages": 10}

            notice = await raw.expect(Error)
            assert notice.code == ErrorCode.TOPIC_DELETED and not notice.fatal
            assert (notice.ref_kind, notice.ref) == (RefKind.SUBSCRIPTION, 1)
            assert [t.topic for t in await c.topics("t.>")] == ["t.b"]
            assert topic_dirs(tmp_path) == ["t.b"]
            assert "t.a" not in (await c.groups("inspect", "g"))["topics"]
            with pytest.raises(pybroker.BrokerError) as missing:
                await c.delete_topic("t.a")
            assert missing.value.code == ErrorCode.UNKNOWN_TOPIC

            # The name again: a new topic from offset 0, delivered to the
            # subscription that was told.
            sub = await c.subscribe("t.a", start="earliest")
            ack = await c.publish("t.a", b"new")
            assert ack.offset == 0
            with trio.fail_after(TIMEOUT):
                async for m in sub:
                    assert (m.offset, m.payload) == (0, b"new")
                    break
    # A restart does not bring the old topic back, nor leave its files.
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            infos = {t.topic: t for t in await c.topics("t.>")}
            assert sorted(infos) == ["t.a", "t.b"] and infos["t.a"].next_offset == 1
    assert not (tmp_path / "trash").exists() or list((tmp_path / "trash").iterdir()) == []


async def test_publishes_before_the_delete_are_acknowledged_first(tmp_path: Path) -> None:
    """Pipelined publishes waiting for their fsync when the delete comes:
    each is acknowledged (none refused), then the topic goes with all of them."""
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as pub, pybroker.connect(server.url) as admin:
            pendings = [await pub.send("d.t", b"m%d" % i) for i in range(2000)]
            result = await admin.delete_topic("d.t") if await _wait_some(pendings) else None
            acks = [await p.wait() for p in pendings]
    assert result is not None and result["deleted"] == "d.t"
    # Whatever was stored before the delete was acknowledged and counted.
    assert result["messages"] <= len(acks)


async def _wait_some(pendings: list[pybroker.PendingAck]) -> bool:
    with trio.fail_after(TIMEOUT):
        await pendings[0].wait()
    return True


async def test_only_admins_and_managers_may_delete(tmp_path: Path) -> None:
    users = {
        "root": user_entry(token="root-token-0123456789", publish=[">"], subscribe=[">"], admin=True),
        "ops": user_entry(token="ops-token-0123456789", publish=[">"], subscribe=[">"], manage=["jobs.>"]),
        "dev": user_entry(token="dev-token-0123456789", publish=[">"], subscribe=[">"]),
    }
    async with running_broker(data_dir=tmp_path, auth_file=write_users(tmp_path, users)) as server:
        async with pybroker.connect(server.url, token="root-token-0123456789") as root:
            for topic in ("jobs.a", "jobs.b", "logs.a"):
                await root.publish(topic, b"x")
        async with pybroker.connect(server.url, token="dev-token-0123456789") as dev:
            with pytest.raises(pybroker.PermissionDenied):
                await dev.delete_topic("jobs.a")
        async with pybroker.connect(server.url, token="ops-token-0123456789") as ops:
            assert (await ops.delete_topic("jobs.a"))["deleted"] == "jobs.a"
            with pytest.raises(pybroker.PermissionDenied):
                await ops.delete_topic("logs.a")
        async with pybroker.connect(server.url, token="root-token-0123456789") as root:
            assert (await root.delete_topic("logs.a"))["deleted"] == "logs.a"
            assert [t.topic for t in await root.topics()] == ["jobs.b"]


async def test_delete_over_http_and_the_cli(tmp_path: Path) -> None:
    async with serve(tmp_path, "--http-port", "0") as broker:
        async with pybroker.connect(broker.url) as c:
            await c.publish("cli.t", b"y")
        result = await run(["topics", "delete", "cli.t", "--url", broker.url])
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().strip() == "deleted topic cli.t (1 messages)"
        again = await run(["topics", "delete", "cli.t", "--url", broker.url])
        assert again.returncode == 1 and b"no topic 'cli.t'" in again.stderr
    async with running_broker(data_dir=tmp_path / "in-process") as server:
        async with pybroker.connect(server.url) as c:
            await c.publish("h.t", b"x")
        assert server.http_port is not None
        deleted = await request(server.http_port, "DELETE", "/v1/topics/h.t")
        assert deleted.status == 200 and deleted.json() == {"deleted": "h.t", "messages": 1}
        assert_error(await request(server.http_port, "DELETE", "/v1/topics/h.t"), 404, "topic_not_found")
        assert_error(await request(server.http_port, "DELETE", "/v1/topics/_inbox.x"), 400)
