"""Listing, inspecting and deleting consumer groups (GROUPS frame, CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.server.server import Server
from pybroker.protocol import AckKind, ErrorCode

from helpers.inproc import wait_until
from helpers.procs import run


async def test_list_inspect_delete(pybroker_server: Server) -> None:
    async with pybroker.connect(pybroker_server.url) as c, pybroker.connect(pybroker_server.url) as w:
        assert await c.groups() == {"groups": []}
        held: list[pybroker.Message] = []
        async with w.subscribe(
            "jobs.*", group="workers", max_ack_pending=3, ack_wait=60, auto_ack=False
        ) as sub:
            await c.publish_many("jobs.a", [b"1", b"2", b"3", b"4", b"5"])

            async def take() -> None:
                async for msg in sub:
                    held.append(msg)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                await wait_until(lambda: len(held) == 3)
                await held[0].ack()
                await wait_until(lambda: len(held) == 4)
                nursery.cancel_scope.cancel()

            listed = await c.groups("list")
            assert [g["group"] for g in listed["groups"]] == ["workers"]
            info = await c.groups("inspect", "workers")
            assert info["pattern"] == "jobs.*"
            assert info["members"] == 1
            assert info["pending"] == 3
            assert info["delivered"] == 4 and info["acked"] == 1
            assert info["topics"] == {"jobs.a": {"cursor": 4, "pending": 3}}
            assert info["config"]["max_ack_pending"] == 3
            assert info["config"]["ack_wait_ms"] == 60000
            assert info["config"]["dead_letter"] == "dlq.workers"
            # A group with members is not deleted.
            with pytest.raises(pybroker.BrokerError) as refused:
                await c.groups("delete", "workers")
            assert refused.value.code == ErrorCode.BAD_REQUEST
        # The member left: its messages wait, the group keeps its position.
        info = await c.groups("inspect", "workers")
        assert info["members"] == 0 and info["pending"] == 3
        assert await c.groups("delete", "workers") == {"deleted": "workers"}
        assert await c.groups() == {"groups": []}
        with pytest.raises(pybroker.BrokerError) as unknown:
            await c.groups("inspect", "workers")
        assert unknown.value.code == ErrorCode.UNKNOWN_GROUP
        with pytest.raises(ValueError):
            await c.groups("explode")
        # A deleted group starts afresh when joined again (from new messages).
        got: list[int] = []
        await w.subscribe("jobs.*", lambda m: got.append(m.offset), group="workers")
        await c.publish("jobs.a", b"6")
        await wait_until(lambda: got == [5])


async def test_pybroker_groups_cli(pybroker_server: Server, tmp_path: Path) -> None:
    async with pybroker.connect(pybroker_server.url) as c:
        await c.subscribe("cli.q", lambda m: None, group="cli-group")
        await c.publish("cli.q", b"x")
        await wait_until(lambda: pybroker_server.broker.groups.groups["cli-group"].acked == 1)

        async def cli(*args: str) -> tuple[int, str, str]:
            result = await run(["groups", *args, "--url", pybroker_server.url], timeout=30)
            return result.returncode, result.stdout.decode(), result.stderr.decode()

        code, out, _ = await cli()
        assert code == 0 and out.startswith("cli-group  pattern=cli.q  members=1")
        code, out, _ = await cli("inspect", "cli-group")
        assert code == 0 and "cli.q: next offset 1, pending 0" in out
        code, _, err = await cli("inspect", "nope")
        assert code == 1 and "UNKNOWN_GROUP" in err
        code, _, err = await cli("delete")
        assert code == 2 and "NAME" in err


async def test_acks_right_before_leaving_are_not_lost(pybroker_server: Server) -> None:
    """Acks queued just before UNSUBSCRIBE and GOODBYE reach the broker
    first; otherwise the member leaves first and they come back."""
    async with pybroker.connect(pybroker_server.url) as pub:
        await pub.publish_many("acked.q", [b"%d" % i for i in range(5)])
    async with pybroker.connect(pybroker_server.url) as w:
        async with w.subscribe("acked.q", group="g", start="earliest", auto_ack=False) as sub:
            seen = 0
            with trio.fail_after(10):
                async for msg in sub:
                    seen += 1
                    if seen == 5:
                        # Queue the last ack with no checkpoint before leaving,
                        # as the auto-ack callback path does: nothing lets the
                        # writer send it before the UNSUBSCRIBE is queued.
                        msg._settle(AckKind.ACK)
                        break
                    await msg.ack()
    async with pybroker.connect(pybroker_server.url) as c:
        info = await c.groups("inspect", "g")
    assert (info["acked"], info["pending"], info["redelivered"]) == (5, 0, 0)
