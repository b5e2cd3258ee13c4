"""protocol.md, "Ordering and guarantees", and the listings that page.

Each rule a second implementation must keep is checked on the wire against
the real broker (file store, fsync ``always`` so PUBACKs really wait for a
commit round): PUBLISH answers in PUBLISH order whatever each answer is, a
PONG after the answers to every earlier PUBLISH, INFO and GROUPS listings
longer than one frame continued page by page, and a client that will not
take a batch whose CRC does not match.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import trio

import pybroker
from pybroker.server.cli import build_parser
from pybroker.server.cli.serve import config_from
from pybroker.server.config import Limits
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.server.testing import running_broker
from pybroker.protocol import (
    NEED_DATA,
    Connection,
    Credit,
    Deliver,
    Error,
    ErrorCode,
    Hello,
    Info,
    InfoReply,
    Ping,
    Pong,
    PubAck,
    Publish,
    RefKind,
    Role,
    StartKind,
    SubAck,
    Subscribe,
    Welcome,
    encode_batch,
)

from helpers.raw import RawClient, raw_client

TIMEOUT = 20

#: Small enough that a few hundred topics or groups need several replies.
SMALL_FRAME = 4096


async def send(raw: RawClient, *events: Any) -> None:
    """Several frames in one write: the broker reads them together."""
    await raw.send(b"".join(raw.conn.send(e) for e in events))


def bad_crc(batch: bytes) -> bytes:
    return batch[:4] + bytes(b ^ 0xFF for b in batch[4:8]) + batch[8:]


async def test_publish_answers_keep_publish_order_refusals_included(tmp_path: Path) -> None:
    """Durable PUBLISHes wait for their fsync; the refusals between them
    (a CRC mismatch is refused at once) still come in their place."""
    async with running_broker(data_dir=tmp_path) as server, raw_client(server, handshake="guarantees") as w:
        good = encode_batch([b"x" * 100])
        frames = [
            Publish(i, "order.a", bad_crc(good) if i % 3 == 0 else good) for i in range(1, 61)
        ]
        await send(w, *frames)
        answers = [await w.next_event() for _ in frames]
        ids = [a.request_id if isinstance(a, PubAck) else a.ref for a in answers]
        assert ids == list(range(1, 61))
        for i, a in enumerate(answers, start=1):
            if i % 3 == 0:
                assert isinstance(a, Error) and a.code == ErrorCode.CHECKSUM_MISMATCH
            else:
                assert isinstance(a, PubAck)
        offsets = [a.base_offset for a in answers if isinstance(a, PubAck)]
        assert offsets == list(range(40))


async def test_pong_comes_after_every_earlier_puback(tmp_path: Path) -> None:
    """A PING is a barrier: PONG only once every PUBLISH before it is
    answered, even though the PUBACKs wait for fsync and the PONG does not."""
    async with running_broker(data_dir=tmp_path) as server, raw_client(server, handshake="guarantees") as w:
        for round_ in range(5):
            batch = encode_batch([b"y" * 50] * 10)
            await send(w, *(Publish(100 * round_ + i, "order.pong", batch) for i in range(1, 21)), Ping(round_ + 7))
            seen = [await w.next_event() for _ in range(21)]
            assert [type(e) for e in seen] == [PubAck] * 20 + [Pong]
            assert seen[-1].nonce == round_ + 7


async def test_request_id_zero_gets_no_puback_but_its_refusal_keeps_its_place(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server, raw_client(server, handshake="guarantees") as w:
        good = encode_batch([b"z"])
        await send(w, Publish(1, "order.z", good), Publish(0, "order.z", bad_crc(good)), Publish(0, "order.z", good), Publish(2, "order.z", good))
        first, refusal, last = await w.next_event(), await w.next_event(), await w.next_event()
        assert isinstance(first, PubAck) and first.request_id == 1 and first.base_offset == 0
        assert isinstance(refusal, Error) and refusal.code == ErrorCode.CHECKSUM_MISMATCH and refusal.ref == 0
        # The unacknowledged publish was stored: offset 1 went to it.
        assert isinstance(last, PubAck) and last.request_id == 2 and last.base_offset == 2


async def test_topic_listing_longer_than_a_frame_comes_page_by_page(tmp_path: Path) -> None:
    names = sorted(f"page.{'t' * 40}.{i:04d}" for i in range(300))
    async with running_broker(data_dir=tmp_path, limits=Limits(max_frame_bytes=SMALL_FRAME)) as server:
        async with pybroker.connect(server.url) as c:
            for i in range(0, len(names), 50):
                for name in names[i : i + 50]:
                    await c.publish(name, b".")
            listed = await c.topics("page.>")
            assert [t.topic for t in listed] == names
            assert all(t.next_offset == 1 for t in listed)
        async with raw_client(server, handshake="guarantees") as w:
            pages = 0
            after = ""
            seen: list[str] = []
            while True:
                pages += 1
                assert pages < 100
                await send(w, Info(pages, "page.>", after))
                reply = await w.next_event()
                assert isinstance(reply, InfoReply) and reply.request_id == pages
                assert len(reply.topics) > 0
                seen.extend(t.topic for t in reply.topics)
                if not reply.truncated:
                    break
                after = reply.topics[-1].topic
            assert seen == names
            assert pages > 3  # each reply was bounded by the frame, not the entry count


async def test_group_listing_longer_than_a_frame_comes_page_by_page(tmp_path: Path) -> None:
    names = sorted(f"workers-{'g' * 30}-{i:03d}" for i in range(120))
    async with running_broker(data_dir=tmp_path, limits=Limits(max_frame_bytes=SMALL_FRAME)) as server:
        async with pybroker.connect(server.url) as c:
            subs = [await c.subscribe("jobs.>", group=n) for n in names]
            listing = await c.groups("list")
            assert sorted(g["group"] for g in listing["groups"]) == names
            first = await c.groups("list", names[99])  # starts after a name
            assert [g["group"] for g in first["groups"]] == names[100:]
            for s in subs:
                await s.unsubscribe()


async def test_client_refuses_a_batch_whose_crc_does_not_match() -> None:
    """A stand-in broker delivers a batch with a bad CRC: the client answers
    with a fatal MALFORMED_FRAME and the connection is over; the message is
    never handed to the application."""
    told: list[Error] = []
    done = trio.Event()

    async def lying_broker(stream: trio.SocketStream) -> None:
        conn = Connection(Role.SERVER)
        try:
            with trio.move_on_after(TIMEOUT):
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(event, Hello):
                        await stream.send_all(conn.send(Welcome("0", "liar", {})))
                    elif isinstance(event, Subscribe):
                        batch = bad_crc(encode_batch([b"tampered"]))
                        await stream.send_all(
                            conn.send(SubAck(event.sub_id, 1))
                            + conn.send(Deliver(event.sub_id, "crc.t", 0, 1, batch))
                        )
                    elif isinstance(event, Error):
                        told.append(event)
                        return
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, lying_broker, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        got: list[pybroker.Message] = []
        try:
            async with pybroker.connect(f"pybroker://127.0.0.1:{port}") as c:
                sub = await c.subscribe("crc.>")
                with trio.fail_after(TIMEOUT):
                    async for m in sub:
                        got.append(m)
        except pybroker.ConnectionClosed as exc:
            assert "CRC" in str(exc)
        with trio.fail_after(TIMEOUT):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert got == []
    assert len(told) == 1 and told[0].code == ErrorCode.MALFORMED_FRAME and told[0].fatal


async def test_memory_store_retention_follows_the_flag() -> None:
    """``--storage memory --retention-bytes N`` bounds each topic at N bytes
    (the default 64 MiB otherwise); a subscriber that lagged behind what
    was dropped is told (DATA_LOST) and gets the rest."""
    args = build_parser().parse_args(["serve", "--storage", "memory", "--retention-bytes", "20000"])
    config = config_from(args)
    assert config.memory_retention_bytes == 20000
    assert config_from(build_parser().parse_args(["serve", "--storage", "memory"])).memory_retention_bytes == 64 << 20
    async with running_broker(storage="memory", memory_retention_bytes=config.memory_retention_bytes) as server:
        async with pybroker.connect(server.url) as c, raw_client(server, handshake="guarantees") as w:
            # A window of one message: it takes offset 0 and then waits.
            await send(w, Subscribe(1, "mem.t", StartKind.NEW, 0, 1))
            assert isinstance(await w.next_event(), SubAck)
            for i in range(100):
                await c.publish("mem.t", b"%04d" % i + b"." * 996)
            first = await w.next_event()
            assert isinstance(first, Deliver) and first.base_offset == 0
            (info,) = await c.topics("mem.t")
            assert info.next_offset == 100 and 1 < info.first_offset < 100
            assert info.retained_bytes <= 20000 + 1100  # the newest batch always stays
            await send(w, Credit(1, 1000))
            lost = await w.next_event()
            assert isinstance(lost, Error) and lost.code == ErrorCode.DATA_LOST
            assert lost.ref_kind == RefKind.SUBSCRIPTION and lost.ref == 1
            rest = await w.next_event()
            assert isinstance(rest, Deliver) and rest.base_offset == info.first_offset


async def test_a_closed_connections_subscription_never_reaches_a_new_one() -> None:
    """A lagging subscriber on the memory store (DATA_LOST, deliveries
    queued and read from the log) drops its connection; a new connection
    that reuses the same sub_id for another topic gets only its own topic,
    from where it asked, with nothing left over from the old one."""
    async with running_broker(storage="memory", memory_retention_bytes=50_000) as server:
        async with pybroker.connect(server.url) as pub:
            for round_ in range(3):
                async with raw_client(server, handshake="guarantees") as old:
                    # A window of one message: it lags at once and reads from the log.
                    await send(old, Subscribe(1, "old.t", StartKind.EARLIEST, 0, 1))
                    assert isinstance(await old.next_event(), SubAck)
                    for i in range(0, 200, 20):
                        await pub.publish_many("old.t", [b"o" * 500] * 20)
                    await old.next_event()  # something is on its way to it
                # Gone without UNSUBSCRIBE; the same sub_id on a fresh connection.
                async with raw_client(server, handshake="guarantees") as new:
                    await send(new, Subscribe(1, f"new.{round_}", StartKind.NEW))
                    assert isinstance(await new.next_event(), SubAck)
                    await pub.publish(f"new.{round_}", b"mine")
                    await pub.publish("old.t", b"not yours")
                    await pub.publish(f"new.{round_}", b"mine too")
                    got = [await new.next_event(), await new.next_event()]
                    assert [type(e) for e in got] == [Deliver, Deliver]
                    assert {e.topic for e in got} == {f"new.{round_}"}
                    assert [e.base_offset for e in got] == [0, 1]
                    await send(new, Ping(99))
                    assert await new.next_event() == Pong(99)  # nothing else was queued for it


async def test_answers_keep_order_across_reads_and_fsync_settings(tmp_path: Path) -> None:
    """Frames in separate writes (so separate reads), to a topic whose
    PUBACKs wait for fsync and one whose do not, and refusals between them:
    every answer in PUBLISH order. (An answer that needs no fsync once
    overtook one that was waiting for it.)"""
    settings = SettingsResolver.from_specs(TopicSettings(fsync="always"), ["fast.>:fsync=never"])
    async with running_broker(data_dir=tmp_path, topic_settings=settings) as server:
        async with raw_client(server, handshake="guarantees") as w:
            good = encode_batch([b"m" * 200])
            kinds = []
            for i in range(1, 91):
                kind = ("slow", "fast", "refused")[i % 3]
                topic = "fast.t" if kind == "fast" else "slow.t"
                batch = bad_crc(good) if kind == "refused" else good
                await w.send_event(Publish(i, topic, batch))
                kinds.append(kind)
            answers = [await w.next_event() for _ in kinds]
        ids = [a.request_id if isinstance(a, PubAck) else a.ref for a in answers]
        assert ids == list(range(1, 91))
        assert [isinstance(a, Error) for a in answers] == [k == "refused" for k in kinds]
