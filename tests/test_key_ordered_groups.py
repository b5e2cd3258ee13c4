"""Key-ordered consumer groups (protocol.md, "Key-ordered groups"): the
messages of one key go to one member at a time, in offset order, the next
only once the one before it is settled; different keys spread across
members; a member leaving hands its keys over without breaking order, and
so does a restart."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import pybroker

from helpers.anybroker import serving

#: The tests that go through the client run under Trio and asyncio.
both = pytest.mark.anyio

TIMEOUT = 30.0


def jobs(keys: int, per_key: int) -> list[tuple[bytes, dict[str, str]]]:
    """Interleaved: k0-0, k1-0, ..., k0-1, k1-1, ... (and a few keyless)."""
    out: list[tuple[bytes, dict[str, str]]] = []
    for i in range(per_key):
        for k in range(keys):
            out.append((b"k%d-%d" % (k, i), {"key": f"k{k}"}))
        out.append((b"free-%d" % i, {}))
    return out


@both
async def test_one_key_at_a_time_in_order_and_keys_spread(tmp_path: Path) -> None:
    keys, per_key = 6, 12
    messages = jobs(keys, per_key)
    rng = random.Random(7)
    done: dict[str, list[int]] = defaultdict(list)  # key -> offsets, in completion order
    active: dict[str, str] = {}  # key -> worker working on it
    overlaps: list[tuple[str, str, str]] = []
    by_worker: dict[str, int] = defaultdict(int)
    finished = anyio.Event()
    total = len(messages)

    def worker(name: str):  # type: ignore[no-untyped-def]
        async def handle(msg: pybroker.Message) -> None:
            key = msg.headers.get("key")
            if key is not None:
                if key in active:
                    overlaps.append((key, active[key], name))
                active[key] = name
            await anyio.sleep(rng.random() * 0.01)  # uneven work
            if key is not None:
                del active[key]
                done[key].append(msg.offset)
            by_worker[name] += 1
            if sum(by_worker.values()) == total:
                finished.set()

        return handle

    async with serving(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            for name in ("w1", "w2", "w3"):
                await c.subscribe("orders.>", worker(name), group="by-customer", ordering="key", concurrency=2)
            # One batch: all of it stored together, then handed out by key.
            await c.publish_many("orders.eu", messages)
            with anyio.fail_after(TIMEOUT):
                await finished.wait()
            summary = await c.groups("inspect", "by-customer")
    assert overlaps == []
    for k in range(keys):
        offsets = done[f"k{k}"]
        assert offsets == sorted(offsets) and len(offsets) == per_key, (k, offsets)
    assert sum(1 for n in by_worker.values() if n > 0) >= 2, by_worker  # keys spread
    assert summary["config"]["ordering"] == "key" and summary["pending"] == 0


@both
async def test_a_member_that_leaves_hands_its_key_over_in_order(tmp_path: Path) -> None:
    async with serving(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            await c.create_group("by-key", "k.>", ordering="key")
            await c.publish_many("k.t", [(b"a0", {"key": "a"}), (b"a1", {"key": "a"}), (b"b0", {"key": "b"})])
            got: list[tuple[str, bytes, int]] = []
            async with pybroker.connect(server.url) as first:
                async with first.subscribe("k.>", group="by-key", max_ack_pending=10) as sub:
                    with anyio.fail_after(TIMEOUT):
                        async for m in sub:
                            got.append(("first", m.payload, m.deliveries))
                            if len(got) == 2:
                                break
            # a0 and b0 went out unsettled; a1 waited behind a0. The member left.
            assert sorted(p for _, p, _ in got) == [b"a0", b"b0"]
            second: list[tuple[bytes, int]] = []
            async with c.subscribe("k.>", group="by-key", max_ack_pending=10) as sub:
                with anyio.fail_after(TIMEOUT):
                    async for m in sub:
                        second.append((m.payload, m.deliveries))
                        await m.ack()
                        if len(second) == 3:
                            break
    a_order = [p for p, _ in second if p.startswith(b"a")]
    assert a_order == [b"a0", b"a1"]  # a1 only after a0, though a0 came back
    assert dict(second)[b"a0"] == 2 and dict(second)[b"a1"] == 1


@pytest.mark.parametrize("prefetch", [1, 2], ids=["one-out", "one-handed-out-ahead"])
@both
async def test_a_restart_keeps_a_busy_key_busy(tmp_path: Path, prefetch: int) -> None:
    """With prefetch 2 the first broker also hands out y0, past x1 that
    waits for x0: a pending message past the group's cursor, saved and
    restored."""
    async with serving(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            await c.create_group("by-key", "r.>", ordering="key")
            await c.publish_many("r.t", [(b"x0", {"key": "x"}), (b"x1", {"key": "x"}), (b"y0", {"key": "y"})])
            async with c.subscribe("r.>", group="by-key", max_ack_pending=prefetch) as sub:
                with anyio.fail_after(TIMEOUT):
                    seen = []
                    async for m in sub:
                        seen.append(m.payload)  # handed out, never settled
                        if len(seen) == prefetch:
                            break
                assert seen == [b"x0", b"y0"][:prefetch]
    async with serving(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            held: list[pybroker.Message] = []
            async with c.subscribe("r.>", group="by-key", max_ack_pending=10) as sub:
                with anyio.fail_after(TIMEOUT):
                    async for m in sub:
                        held.append(m)
                        if len(held) == 2:
                            break
                # x0 again (it was pending) and y0; x1 waits behind x0, though
                # the member has room for eight more.
                assert sorted(m.payload for m in held) == [b"x0", b"y0"]
                summary = await c.groups("inspect", "by-key")
                assert summary["in_flight"] == 2 and summary["pending"] == 2
                for m in held:
                    await m.ack()
                with anyio.fail_after(TIMEOUT):
                    async for m in sub:
                        assert m.payload == b"x1"
                        await m.ack()
                        break
            summary = await c.groups("inspect", "by-key")
    assert summary["pending"] == 0 and summary["config"]["ordering"] == "key"


@both
async def test_an_unknown_ordering_is_refused(tmp_path: Path) -> None:
    async with serving(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            with pytest.raises(ValueError):
                c.subscribe("o.>", group="g", ordering="fifo")
            with pytest.raises(ValueError):
                c.subscribe("o.>", ordering="key")  # needs group=
