"""The client's hot paths keep the slow paths' behaviour.

send() inlines publish_nowait() and checks for cancellation by reading the
event loop's state (pybroker/_cancel.py); PendingAcks point into runs of
messages that PUBACKs settle a frame at a time (pybroker/_publishing.py);
callback subscriptions are fed a batch at a time (Subscription._for_each). Each is checked here against what
the plain path does, under Trio and asyncio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

import pybroker as client
from pybroker._cancel import _always, cancel_check
from pybroker.server.config import Limits
from pybroker.server.server import Server

from helpers.anybroker import pybroker_server, serving  # noqa: F401 (the fixture, under either backend)

pytestmark = pytest.mark.anyio

#: (payload, headers) covering each branch of the record encoding.
CASES: list[tuple[bytes | str, dict[str, str] | None]] = [
    (b"plain", None),
    (b"", None),
    ("text \u00e9", None),
    (bytearray(b"bytes-like"), None),
    (b"with headers", {"k": "v", "\u00fc": "w"}),
    (b"empty headers", {}),
]


async def _replay(url: str, topic: str, count: int) -> list[client.Message]:
    got: list[client.Message] = []
    async with client.connect(url) as c:
        async with c.subscribe(topic, start=0) as sub:
            with anyio.fail_after(10):
                async for msg in sub:
                    got.append(msg)
                    if len(got) == count:
                        break
    return got


async def test_publish_paths_agree(pybroker_server: Server) -> None:
    # The same messages through send() and publish_nowait() are stored alike.
    async with client.connect(pybroker_server.url) as c:
        by_send = [await c.send("paths.send", p, h) for p, h in CASES]  # type: ignore[arg-type]
        by_nowait = [c.publish_nowait("paths.nowait", p, h) for p, h in CASES]  # type: ignore[arg-type]
        await c.flush()
    assert [p.result().offset for p in by_send] == list(range(len(CASES)))
    assert [p.result().offset for p in by_nowait] == list(range(len(CASES)))
    sent = await _replay(pybroker_server.url, "paths.send", len(CASES))
    nowait = await _replay(pybroker_server.url, "paths.nowait", len(CASES))
    assert [(m.payload, dict(m.headers)) for m in sent] == [(m.payload, dict(m.headers)) for m in nowait]
    assert [m.payload for m in sent] == [bytes(p) if not isinstance(p, str) else p.encode() for p, _ in CASES]


async def test_publish_paths_refuse_alike(pybroker_server: Server) -> None:
    async with client.connect(pybroker_server.url, max_pending=1) as c:
        limit = c.server.limits["max_frame_bytes"] if c.server else 0
        for make in (c.send, c.publish_nowait):
            call: Callable[..., object] = make

            async def attempt(*args: object) -> None:
                result = call(*args)
                if isinstance(result, Awaitable):
                    await result

            with pytest.raises(ValueError):
                await attempt("bad..topic", b"x")
            with pytest.raises(TypeError):
                await attempt("paths.refuse", 12)
            with pytest.raises(client.MessageTooLarge):
                await attempt("paths.refuse", b"x" * limit)
        # Nothing refused was queued: the one slot is free for publish_nowait.
        c.publish_nowait("paths.refuse", b"one")
        with pytest.raises(anyio.WouldBlock):
            c.publish_nowait("paths.refuse", b"two")
        await c.flush()
        assert [t.topic for t in await c.topics("paths.>")] == ["paths.refuse"]


async def test_cancel_check_reads_the_loops_state() -> None:
    # The fast check is in use under both backends (a Trio or anyio release
    # that moved the state it reads makes it fall back to always awaiting
    # the real check: still right, slower; this says so).
    requested, _ = cancel_check()
    assert requested is not _always
    assert requested() is False
    with anyio.CancelScope() as scope:
        scope.cancel()
        assert requested() is True
        with anyio.CancelScope(shield=True):
            assert requested() is False
            with anyio.CancelScope() as inner:
                assert requested() is False
                inner.cancel()
                assert requested() is True
    with anyio.move_on_after(0):
        assert requested() is True


async def test_send_cancelled_by_a_deadline_or_through_nesting(pybroker_server: Server) -> None:
    async with client.connect(pybroker_server.url) as c:
        with anyio.move_on_after(0) as expired:
            await c.send("cancel.deadline", b"never")
        assert expired.cancelled_caught
        with anyio.CancelScope() as outer:
            outer.cancel()
            with anyio.CancelScope():
                await c.send("cancel.nested", b"never")
        assert outer.cancelled_caught
        with anyio.CancelScope() as outer:
            outer.cancel()
            with anyio.CancelScope(shield=True):
                # Shielded: not a cancellation point for the outer scope.
                shielded = await c.send("cancel.shielded", b"sent")
        await c.flush()
        assert shielded.result().offset == 0

        # From another task than the one that sent last (the check keeps
        # the last task's state).
        async def send_in_cancelled_scope() -> None:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await c.send("cancel.other-task", b"never")
            assert scope.cancelled_caught

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send_in_cancelled_scope)
        await c.flush()
        assert [t.topic for t in await c.topics("cancel.>")] == ["cancel.shielded"]


async def test_callback_sees_the_iteration_state(pybroker_server: Server) -> None:
    # Counters move before each callback, as they do before __anext__ returns;
    # async and sync callbacks are both awaited/called in order.
    n = 50
    async with client.connect(pybroker_server.url) as c:
        for i in range(n):
            c.publish_nowait("cb.state", b"%d" % i)
        await c.flush()
        seen: list[tuple[int, int, int]] = []
        done = anyio.Event()
        sub: client.Subscription | None = None

        async def on_message(msg: client.Message) -> None:
            assert sub is not None
            stats = sub.statistics()
            seen.append((msg.offset, stats.delivered_messages, stats.pending_messages))
            if msg.offset % 7 == 0:
                await anyio.lowlevel.checkpoint()  # a callback that yields
            if len(seen) == n:
                done.set()

        sub = await c.subscribe("cb.state", on_message, start=0)
        with anyio.fail_after(10):
            await done.wait()
    assert [offset for offset, _, _ in seen] == list(range(n))
    assert [delivered for _, delivered, _ in seen] == list(range(1, n + 1))
    # What is still buffered never counts the message being handled.
    assert all(pending <= n - delivered for _, delivered, pending in seen)
    assert seen[-1][2] == 0


async def test_acks_of_runs_cut_into_frames_and_left_over() -> None:
    # The broker takes 3 messages per PUBLISH and the client keeps one frame
    # in flight: a run of sends is cut into many frames, most of them left
    # for later takes (out of room). Another client's message lands between
    # two of them. Every PendingAck still names its own message's offset.
    async with serving(limits=Limits(max_batch_messages=3)) as server:
        async with client.connect(server.url, max_inflight_batches=1, max_pending=64) as c:
            pendings = []
            for i in range(40):
                pendings.append(await c.send("cut.a", b"a%d" % i))
                if i % 4 == 0:
                    pendings.append(await c.send("cut.b", b"b%d" % i))
            first = await pendings[0].wait()
            # One frame acknowledged, a dozen still to go one round trip
            # each: the last message is not settled yet.
            assert not pendings[-2].done() and pendings[-2].offset == -1
            async with client.connect(server.url) as other:
                await other.publish("cut.a", b"other")
            await c.flush()
            assert first.offset == 0
            for topic in ("cut.a", "cut.b"):
                mine = [p for p in pendings if p.topic == topic]
                offsets = [p.result().offset for p in mine]
                assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
                assert all(p.done() and p.error is None and p.timestamp_us > 0 for p in mine)
        got = await _replay(server.url, "cut.a", 41)
    payloads = {m.offset: m.payload for m in got}
    mine = [p for p in pendings if p.topic == "cut.a"]
    assert [payloads[p.offset] for p in mine] == [b"a%d" % i for i in range(40)]
    assert b"other" in payloads.values()


async def test_pending_acks_fail_with_the_connection(pybroker_server: Server) -> None:
    # Unsent, in-flight and acknowledged messages when the client closes
    # without flushing: the acknowledged keep their offsets, the others fail.
    async with client.connect(pybroker_server.url) as c:
        done = await c.send("fail.t", b"acked")
        await c.flush()
        queued = [await c.send("fail.t", b"%d" % i) for i in range(1000)]
        await c.aclose(graceful=False)
    assert done.result().offset == 0
    assert all(p.done() for p in queued)
    failed = [p for p in queued if p.error is not None]
    assert all(isinstance(p.error, client.ConnectionClosed) for p in failed)
    for p in failed:
        with pytest.raises(client.ConnectionClosed):
            p.result()
        with pytest.raises(client.ConnectionClosed):
            await p.wait()
