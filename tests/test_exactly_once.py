"""Exactly-once publishing (protocol.md, "Publishing exactly once"): a
batch named by a msg-id is stored once, whoever resends it and whenever
within the window, across connections, restarts and kill -9."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pybroker
from pybroker.protocol import (
    MSG_ID_HEADER,
    Error,
    ErrorCode,
    PubAck,
    Publish,
    encode_batch,
    encode_batch_from_records,
    encode_record,
    first_msg_id,
    with_msg_id,
)
from pybroker.server.dedup import DedupWindow, Stored

from helpers.anybroker import serving
from helpers.http import assert_error, get_json, post_json, request
from helpers.procs import broker_process
from helpers.raw import raw_client
from helpers.restarts import FAST, free_port

#: The tests that go through the client alone run under Trio and asyncio;
#: those using the raw Trio peer, HTTP or subprocess helpers, pytest-trio.
both = pytest.mark.anyio

TIMEOUT = 20.0


def named(msg_id: str, *payloads: bytes) -> bytes:
    records = [encode_record(p) for p in payloads]
    records[0] = with_msg_id(records[0], msg_id)
    return encode_batch_from_records(records)


async def answer(url_or_server: Any, *frames: Publish) -> list[Any]:
    async with raw_client(url_or_server, handshake="exactly-once") as raw:
        for f in frames:
            await raw.send_event(f)
        return [await raw.next_event() for _ in frames]


def test_a_msg_id_is_spliced_into_the_first_record_and_read_back() -> None:
    record = encode_record(b"payload", {"trace": "7f"})
    batch = encode_batch_from_records([with_msg_id(record, "p.1"), encode_record(b"two")])
    assert first_msg_id(batch) == "p.1"
    assert first_msg_id(encode_batch([b"no", b"ids"])) is None
    # The other headers and the payload are untouched.
    from pybroker.protocol import decode_batch

    assert decode_batch(batch) == [(b"payload", {"trace": "7f", MSG_ID_HEADER: "p.1"}), (b"two", {})]
    with pytest.raises(ValueError):
        with_msg_id(encode_record(b"x", {"h": "v" * 65530}), "p.2")


async def test_a_resent_batch_gets_the_original_offsets_and_is_stored_once(tmp_path: Path) -> None:
    async with serving(data_dir=tmp_path) as server:
        first, other = await answer(server, Publish(1, "eo.t", named("a.1", b"x", b"y"), dedup=True),
                                    Publish(2, "eo.t", named("a.2", b"z"), dedup=True))
        # The same bytes again, on another connection (a reconnect), twice.
        again = await answer(server, Publish(7, "eo.t", named("a.1", b"x", b"y"), dedup=True),
                             Publish(8, "eo.t", named("a.1", b"x", b"y"), dedup=True))
        assert isinstance(first, PubAck) and (first.base_offset, first.count) == (0, 2)
        assert isinstance(other, PubAck) and other.base_offset == 2
        for a, request_id in zip(again, (7, 8), strict=True):
            assert isinstance(a, PubAck) and a.request_id == request_id
            assert (a.base_offset, a.count, a.timestamp) == (0, 2, first.timestamp)
        stored = server.broker.store.topic("eo.t").read(0, 1 << 20)
        assert [(b.base_offset, b.count) for b in stored] == [(0, 2), (2, 1)]
        assert server.broker.dedup.duplicates == 2
        # Without the flag the same bytes are a new batch (at-least-once).
        (plain,) = await answer(server, Publish(9, "eo.t", named("a.1", b"x", b"y")))
        assert isinstance(plain, PubAck) and plain.base_offset == 3


async def test_a_subscriber_sees_a_resent_batch_once_and_its_msg_id_apart(tmp_path: Path) -> None:
    async with serving(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            sub = await c.subscribe("eo.s")
            await answer(server, Publish(1, "eo.s", named("s.1", b"one"), dedup=True))
            await answer(server, Publish(1, "eo.s", named("s.1", b"one"), dedup=True))
            await c.publish("eo.s", b"two")
            got = []
            with anyio.fail_after(TIMEOUT):
                async for m in sub:
                    got.append(m)
                    if len(got) == 2:
                        break
        assert [(m.offset, m.payload, dict(m.headers)) for m in got] == [(0, b"one", {}), (1, b"two", {})]
        assert got[0].msg_id == "s.1"
        assert got[1].msg_id is not None and got[1].msg_id != "s.1"  # the client named its own batch


async def test_a_msg_id_naming_a_different_batch_or_none_is_refused(tmp_path: Path) -> None:
    async with serving(data_dir=tmp_path) as server:
        ok, conflict, missing, long = await answer(
            server,
            Publish(1, "eo.c", named("c.1", b"a", b"b"), dedup=True),
            Publish(2, "eo.c", named("c.1", b"a"), dedup=True),
            Publish(3, "eo.c", encode_batch([b"no id"]), dedup=True),
            Publish(4, "eo.c", named("x" * 129, b"a"), dedup=True),
        )
        assert isinstance(ok, PubAck)
        for refused, request_id in ((conflict, 2), (missing, 3), (long, 4)):
            assert isinstance(refused, Error) and refused.code == ErrorCode.BAD_REQUEST
            assert refused.ref == request_id and not refused.fatal
        assert "already names a batch of 2 messages at offset 0" in conflict.message
        assert server.broker.store.topic("eo.c").next_offset == 2


async def test_msg_ids_survive_a_restart(tmp_path: Path) -> None:
    """Read back from the log: after a restart the resend of a stored batch
    is still recognised."""
    async with serving(data_dir=tmp_path) as server:
        (first,) = await answer(server, Publish(1, "eo.r", named("r.1", b"kept"), dedup=True))
    async with serving(data_dir=tmp_path) as server:
        (again,) = await answer(server, Publish(1, "eo.r", named("r.1", b"kept"), dedup=True))
        (new,) = await answer(server, Publish(2, "eo.r", named("r.2", b"new"), dedup=True))
        assert isinstance(again, PubAck) and (again.base_offset, again.timestamp) == (0, first.timestamp)
        assert isinstance(new, PubAck) and new.base_offset == 1
        assert server.broker.store.topic("eo.r").next_offset == 2


@both
async def test_the_window_bounds_time_and_count(tmp_path: Path) -> None:
    """Explicit clocks: no waiting for time to pass."""
    async with serving(data_dir=tmp_path) as server:
        topic = server.broker.router.topic("eo.w")
        window = DedupWindow(window_seconds=2.0, max_ids=3)
        t0 = 1_000_000_000_000
        for i in range(4):
            window.remember(topic, f"w.{i}", Stored(i, 1, t0 + i, None))
        assert window.find(topic, "w.0", t0 + 4) is None  # the oldest of four, beyond 3
        assert window.find(topic, "w.1", t0 + 4) is not None
        assert window.find(topic, "w.3", t0 + 2_000_003) is not None  # 2 s after w.3: still in
        assert window.find(topic, "w.3", t0 + 2_000_004) is None  # older than the window


async def kill_while_publishing(tmp_path: Path, idempotent: bool, rounds: int = 6, per_round: int = 1500) -> list[bytes]:
    """Publish ``rounds`` rounds of small pipelined batches; in each, kill
    -9 the broker once the round's first PUBACK is back (the rest in
    flight) and start it again; the client reconnects and resends what it
    has no PUBACK for. Returns every payload stored, in offset order."""
    port = free_port()
    async with broker_process(tmp_path / "data", tmp_path, "--port", str(port), "--no-http") as broker:
        url = await broker.start()
        with anyio.fail_after(120):
            async with pybroker.connect(url, reconnect=FAST, idempotent=idempotent) as c:
                for r in range(rounds):
                    pendings = []
                    for i in range(per_round):
                        pendings.append(await c.send("eo.kill", b"%02d-%05d" % (r, i)))
                        await anyio.lowlevel.checkpoint()  # the writer runs: many small frames
                    await pendings[0].wait()
                    await broker.kill()
                    await broker.start()
                    for p in pendings:
                        await p.wait()
        with anyio.fail_after(TIMEOUT):
            async with pybroker.connect(url) as c:
                (info,) = await c.topics("eo.kill")
                payloads = []
                async with c.subscribe("eo.kill", start="earliest") as sub:
                    async for m in sub:
                        payloads.append(m.payload)
                        if m.offset == info.next_offset - 1:
                            break
    return payloads


@both
async def test_kill_9_with_reconnecting_publishers_stores_nothing_twice(tmp_path: Path) -> None:
    """The case the feature is for: a publisher pipelining while the broker
    is killed again and again resends what it has no PUBACK for; every
    message is stored exactly once (with idempotent=False the same run
    stores some twice: see the commit that added this test)."""
    rounds, per_round = 6, 1500
    payloads = await kill_while_publishing(tmp_path, idempotent=True, rounds=rounds, per_round=per_round)
    expected = sorted(b"%02d-%05d" % (r, i) for r in range(rounds) for i in range(per_round))
    assert len(payloads) - len(set(payloads)) == 0  # duplicates
    assert sorted(payloads) == expected  # nothing lost, nothing twice


async def test_an_http_request_with_a_msg_id_is_published_once(tmp_path: Path) -> None:
    async with serving(data_dir=tmp_path) as server:
        port = server.http_port
        path = "/v1/topics/eo.http/messages"
        message = {"payload": "order", "headers": {"msg-id": "order-17", "k": "v"}}
        first = await post_json(port, path, message)
        again = await post_json(port, path, message)
        assert first.status == again.status == 200, (first, again)
        assert again.json()["base_offset"] == first.json()["base_offset"] == 0
        raw_headers = {"content-type": "application/octet-stream", "x-pybroker-header-msg-id": "blob-1"}
        blob = await request(port, "POST", path, b"\x00\xff", raw_headers)
        blob_again = await request(port, "POST", path, b"\x00\xff", raw_headers)
        assert blob.json()["base_offset"] == blob_again.json()["base_offset"] == 1
        conflict = await post_json(port, path, {"messages": [message, {"payload": "more"}]})
        assert_error(conflict, 400, "bad_request")
        assert server.broker.store.topic("eo.http").next_offset == 2
        read = await get_json(port, "/v1/topics/eo.http/messages?from=0")
        first_read = read["messages"][0] if isinstance(read, dict) else read[0]
        assert first_read["msg_id"] == "order-17" and first_read["headers"] == {"k": "v"}
