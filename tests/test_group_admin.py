"""Listing, inspecting and deleting consumer groups (GROUPS frame, CLI)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.server.server import Server
from pybroker.protocol import AckKind, ErrorCode

from helpers.inproc import wait_until
from helpers.procs import run


async def test_list_inspect_delete(pybroker_server: Server) -> None:
    async with pybroker.connect(pybroker_server.url) as c, pybroker.connect(pybroker_server.url, name="w1") as w:
        assert await c.groups() == {"groups": []}
        held: list[pybroker.Message] = []
        async with w.subscribe(
            "jobs.*", group="workers", max_ack_pending=3, ack_wait=60, auto_ack=False
        ) as sub:
            published_at = time.time()
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
            inspected_at = time.time()
            assert info["topics"] == {"jobs.a": {"cursor": 4, "pending": 3, "backlog": 1}}
            assert info["backlog"] == 1  # the 5th: published, not handed out yet
            # The oldest unsettled message is the 2nd, published with the rest.
            age = info["oldest_unacked_age_ms"] / 1000
            assert 0 <= age <= inspected_at - published_at + 0.002, (age, inspected_at - published_at)
            (member,) = info["member_list"]
            assert member["client"] == "w1" and member["peer"].startswith("127.0.0.1:")
            assert (member["in_flight"], member["prefetch"], member["delivered"], member["acked"]) == (3, 3, 4, 1)
            assert info["members_omitted"] == 0
            # The list gives the summary only, the age included.
            assert "member_list" not in listed["groups"][0]
            assert listed["groups"][0]["oldest_unacked_age_ms"] is not None
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
        assert code == 0 and "cli.q: next offset 1, pending 0, backlog 0" in out
        assert "oldest_unacked=-" in out  # everything settled
        assert re.search(r"  member \(unnamed\) 127\.0\.0\.1:\d+ sub \d+: in_flight 0/1, delivered 1, acked 1", out), out
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


def test_an_inspection_too_big_for_a_frame_lists_the_members_that_fit() -> None:
    import json

    from pybroker.server.core import _bounded

    members = [
        {"client": "w" * 64, "peer": f"127.0.0.1:{40000 + i}", "sub_id": i, "in_flight": 0,
         "prefetch": 1, "delivered": i, "acked": i}
        for i in range(100)
    ]
    doc = {"group": "g", "pattern": "jobs.>", "topics": {"jobs.a": {"cursor": 1, "pending": 0, "backlog": 0}},
           "member_list": members, "members_omitted": 7}
    bounded = _bounded(doc, 4000)
    assert len(json.dumps(bounded).encode()) <= 4000
    kept = bounded["member_list"]
    assert 0 < len(kept) < 100 and kept == members[: len(kept)]
    assert bounded["members_omitted"] == 7 + 100 - len(kept)
    assert bounded["topics"] == doc["topics"]  # the topics stay when the members make room
    assert _bounded(doc, 10**6) is doc
