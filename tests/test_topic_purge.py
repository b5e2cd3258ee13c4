"""Purging a topic (protocol.md, "TOPICS"): the messages before the batch
holding an offset go (whole segments, durably), offsets go on, subscribers
behind are told what they missed, groups move on; over TCP, HTTP and the
CLI, on the file store and in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.protocol import Credit, Deliver, Error, ErrorCode, StartKind, SubAck, Subscribe
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.server.testing import running_broker

from helpers.http import assert_error, request
from helpers.procs import run, serve
from helpers.raw import raw_client

TIMEOUT = 20.0
#: Small segments: thirty one-message publishes fill several.
SMALL = SettingsResolver.from_specs(TopicSettings(fsync="always", segment_bytes=1024), [])


def segment_files(data_dir: Path, topic: str) -> list[str]:
    return sorted(p.name for p in (data_dir / "topics" / topic).glob("*.log"))


async def read_all(c: pybroker.Client, topic: str, upto: int) -> list[int]:
    offsets: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with c.subscribe(topic, start="earliest") as sub:
            async for m in sub:
                offsets.append(m.offset)
                if m.offset == upto:
                    return offsets
    return offsets


async def test_purge_removes_whole_segments_durably_and_offsets_go_on(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path, topic_settings=SMALL) as server:
        async with pybroker.connect(server.url) as c:
            for i in range(30):
                await c.publish("p.t", b"message %02d " % i + b"." * 200)
            before = segment_files(tmp_path, "p.t")
            assert len(before) > 3
            result = await c.purge_topic("p.t", 15)
            assert result == {"topic": "p.t", "first_offset": 15, "next_offset": 30, "purged": 15}
            assert len(segment_files(tmp_path, "p.t")) < len(before)
            assert await read_all(c, "p.t", 29) == list(range(15, 30))
            assert (await c.publish("p.t", b"after")).offset == 30
            (info,) = await c.topics("p.t")
            assert (info.first_offset, info.next_offset) == (15, 31)
            # Nothing before the first offset, and a second purge lower does nothing.
            assert (await c.purge_topic("p.t", 3))["purged"] == 0
    async with running_broker(data_dir=tmp_path, topic_settings=SMALL) as server:
        async with pybroker.connect(server.url) as c:
            (info,) = await c.topics("p.t")
            assert (info.first_offset, info.next_offset) == (15, 31)
            assert await read_all(c, "p.t", 30) == list(range(15, 31))


async def test_batches_are_not_split_and_purging_all_keeps_the_offsets(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            await c.publish_many("b.t", [b"%d" % i for i in range(10)])  # one batch, 0..9
            await c.publish_many("b.t", [b"%d" % i for i in range(10, 20)])  # 10..19
            assert (await c.purge_topic("b.t", 5))["first_offset"] == 0  # inside the first batch
            assert (await c.purge_topic("b.t", 15))["first_offset"] == 10
            everything = await c.purge_topic("b.t")
            assert everything == {"topic": "b.t", "first_offset": 20, "next_offset": 20, "purged": 10}
            assert (await c.publish("b.t", b"next")).offset == 20
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            (info,) = await c.topics("b.t")
            assert (info.first_offset, info.next_offset) == (20, 21)


async def test_a_subscriber_behind_is_told_and_a_group_moves_on(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c, raw_client(server, handshake="slow") as raw:
            await c.create_group("g", "s.>", start="earliest")
            await raw.send_event(Subscribe(1, "s.t", StartKind.EARLIEST, 0, 1))  # one message at a time
            assert isinstance(await raw.expect(SubAck), SubAck)
            for i in range(20):
                await c.publish("s.t", b"%d" % i)
            first = await raw.expect(Deliver)
            assert first.base_offset == 0
            await c.purge_topic("s.t", 12)
            await raw.send_event(Credit(1, 100))
            lost = await raw.expect(Error)
            assert lost.code == ErrorCode.DATA_LOST and not lost.fatal
            assert (await raw.expect(Deliver)).base_offset == 12
            async with c.subscribe("s.>", group="g") as sub:
                with trio.fail_after(TIMEOUT):
                    async for m in sub:
                        assert m.offset == 12  # the group's cursor moved to the first offset
                        await m.ack()
                        break


async def test_purge_in_memory(tmp_path: Path) -> None:
    async with running_broker(storage="memory") as server:
        async with pybroker.connect(server.url) as c:
            for i in range(10):
                await c.publish("m.t", b"%d" % i)
            assert (await c.purge_topic("m.t", 4))["first_offset"] == 4
            assert await read_all(c, "m.t", 9) == list(range(4, 10))
            with pytest.raises(pybroker.BrokerError) as missing:
                await c.purge_topic("m.none")
            assert missing.value.code == ErrorCode.UNKNOWN_TOPIC


async def test_purge_over_http_and_the_cli(tmp_path: Path) -> None:
    async with serve(tmp_path) as broker:
        async with pybroker.connect(broker.url) as c:
            for i in range(5):
                await c.publish("cli.p", b"%d" % i)
        result = await run(["topics", "purge", "cli.p", "--keep-from", "3", "--url", broker.url])
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().strip() == "purged 3 messages of cli.p: it now holds offsets 3..4"
        bad = await run(["topics", "delete", "cli.p", "--keep-from", "3", "--url", broker.url])
        assert bad.returncode == 2
    async with running_broker(data_dir=tmp_path / "in-process") as server:
        async with pybroker.connect(server.url) as c:
            for i in range(5):
                await c.publish("h.p", b"%d" % i)
        assert server.http_port is not None
        some = await request(server.http_port, "DELETE", "/v1/topics/h.p/messages?keep_from=2")
        assert some.status == 200 and some.json()["first_offset"] == 2
        rest = await request(server.http_port, "DELETE", "/v1/topics/h.p/messages")
        assert rest.json() == {"topic": "h.p", "first_offset": 5, "next_offset": 5, "purged": 3}
        assert_error(await request(server.http_port, "DELETE", "/v1/topics/h.p/messages?keep_from=x"), 400)
        assert_error(await request(server.http_port, "DELETE", "/v1/topics/nope/messages"), 404, "topic_not_found")
