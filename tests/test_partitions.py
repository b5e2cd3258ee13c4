"""Partitioned topics (protocol.md, "Partitioned topics") on one broker:
TOPICS create makes ``orders~0`` .. ``orders~N-1``; a publish to ``orders``
is refused with PARTITIONED, which the client follows by publishing each
message to its key's partition; a subscription to ``orders`` reads every
partition, each in order; the count outlives a restart; delete, set and
purge act on the topic whole or are refused with a reason; over TCP, HTTP
and the CLI."""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.protocol import (
    ERROR_FIELDS_OPTION,
    Error,
    ErrorCode,
    PubAck,
    Publish,
    encode_batch,
    partition_of,
    partition_topic,
    tokens_match,
)
from pybroker.server.testing import running_broker

from helpers.http import assert_error, request
from helpers.procs import run
from helpers.raw import raw_client

TIMEOUT = 20.0


def test_partition_names_and_matching() -> None:
    assert partition_of("orders~3") == ("orders", 3)
    assert partition_of("a.b~4095") == ("a.b", 4095)
    for plain in ("orders", "~3", "a.~3", "a~03", "a~4096", "a~b", "a~", "a~-1", "a~３"):
        assert partition_of(plain) is None, plain
    assert partition_topic("orders", 7) == "orders~7"
    # What matches the topic matches its partitions; the partition's own
    # name matches it too; nothing else does.
    for pattern in ("orders", "orders~3", ">", "*"):
        assert tokens_match(pattern.split("."), ["orders~3"]), pattern
    for pattern in ("orders~2", "order", "orders.>"):
        assert not tokens_match(pattern.split("."), ["orders~3"]), pattern
    assert tokens_match(["eu", "orders"], ["eu", "orders~0"])
    assert tokens_match(["eu", ">"], ["eu", "orders~0"])
    assert not tokens_match(["orders"], ["eu", "orders~0"])


async def test_keys_go_to_one_partition_each_and_a_subscription_reads_them_all(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as admin:
            assert await admin.create_topic("orders", partitions=4) == {
                "topic": "orders",
                "partitions": 4,
                "created": True,
            }
            assert await admin.create_topic("orders", partitions=4) == {
                "topic": "orders",
                "partitions": 4,
                "created": False,
            }
            assert sorted(t.topic for t in await admin.topics("orders")) == [f"orders~{p}" for p in range(4)]
        # A client that never created it learns the count from the refusal
        # of its first publishes, pipelined, and moves every one of them.
        async with pybroker.connect(server.url) as sub_client, pybroker.connect(server.url) as pub:
            sub = await sub_client.subscribe("orders", start="earliest")
            keys = [f"customer-{i % 10}" for i in range(300)]
            pendings = [await pub.send("orders", b"%d" % i, {"key": key}) for i, key in enumerate(keys)]
            acks = [await p.wait() for p in pendings]
            for key, ack in zip(keys, acks):
                assert ack.topic == partition_topic("orders", zlib.crc32(key.encode()) % 4)
            # Offsets are dense per partition, in the order sent.
            by_partition: dict[str, list[int]] = defaultdict(list)
            for ack in acks:
                by_partition[ack.topic].append(ack.offset)
            for offsets in by_partition.values():
                assert offsets == list(range(len(offsets)))
            assert len(by_partition) > 1
            # Every message once; each key's messages in the order published.
            got: dict[str, list[int]] = defaultdict(list)
            with trio.fail_after(TIMEOUT):
                async for m in sub:
                    assert m.partition == partition_of(m.topic)[1]  # type: ignore[index]
                    got[m.headers["key"]].append(int(m.payload))
                    if sum(map(len, got.values())) == len(keys):
                        break
            for key in set(keys):
                assert got[key] == [i for i, k in enumerate(keys) if k == key]
            # Keyless messages spread too, in runs to one partition.
            keyless = [await pub.publish("orders", b"x") for _ in range(600)]
            assert len({a.topic for a in keyless}) > 1
    # The partition count outlives a restart: a new client is refused again
    # and follows.
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as pub:
            ack = await pub.publish("orders", b"after", {"key": "customer-1"})
            assert ack.topic == partition_topic("orders", zlib.crc32(b"customer-1") % 4)
            with pytest.raises(pybroker.BrokerError) as other:
                await pub.create_topic("orders", partitions=2)
            assert other.value.code == ErrorCode.BAD_REQUEST and "4 partitions" in str(other.value)


async def test_what_the_broker_refuses(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c, raw_client(server) as raw:
            await raw.handshake("raw", {ERROR_FIELDS_OPTION: "1"})
            await c.create_topic("p", partitions=3)
            await c.publish("plain", b"1")
            batch = encode_batch([(b"m", None)])
            # The topic itself: PARTITIONED, with the count, nothing stored.
            await raw.send_event(Publish(1, "p", batch))
            refused = await raw.expect(Error)
            assert (refused.code, refused.ref, refused.fatal) == (ErrorCode.PARTITIONED, 1, False)
            assert refused.fields["partitions"] == "3" and refused.fields["topic"] == "p"
            # A partition it does not have, and one of a plain topic.
            for rid, name in ((2, "p~3"), (3, "plain~0"), (4, "nothing~0")):
                await raw.send_event(Publish(rid, name, batch))
                bad = await raw.expect(Error)
                assert (bad.code, bad.ref) == (ErrorCode.BAD_TOPIC, rid), name
            # A partition by its name is an ordinary topic.
            await raw.send_event(Publish(5, "p~2", batch))
            ack = await raw.expect(PubAck)
            assert (ack.request_id, ack.base_offset) == (5, 0)
            assert {t.topic: t.next_offset for t in await c.topics("p")} == {"p~0": 0, "p~1": 0, "p~2": 1}

            with pytest.raises(pybroker.BrokerError) as exists:
                await c.create_topic("plain", partitions=2)
            assert exists.value.code == ErrorCode.BAD_REQUEST and "1 partition" in str(exists.value)
            assert (await c.create_topic("plain"))["created"] is False
            with pytest.raises(pybroker.BrokerError) as a_partition:
                await c.create_topic("p~1", partitions=2)
            assert a_partition.value.code == ErrorCode.BAD_TOPIC
            for name, partitions in (("a.*", 2), ("q", 4097), ("q", 0)):
                with pytest.raises(ValueError):
                    await c.create_topic(name, partitions=partitions)
            # One partition alone is not set or deleted; offsets are per
            # partition, so the topic whole is not purged.
            for call in (c.delete_topic("p~1"), c.set_topic("p~1", retention_bytes=10_000), c.purge_topic("p")):
                with pytest.raises(pybroker.BrokerError) as whole:
                    await call
                assert whole.value.code == ErrorCode.BAD_REQUEST
            assert (await c.purge_topic("p~2"))["first_offset"] == 1


async def test_set_and_delete_act_on_every_partition(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            await c.create_topic("d", partitions=2)
            sub = await c.subscribe("d", start="earliest")
            for i in range(4):
                await c.publish("d", b"%d" % i, {"key": str(i)})
            answer = await c.set_topic("d", retention_bytes=1_000_000)
            assert answer["settings"]["retention_bytes"] == 1_000_000
            saved = json.loads((tmp_path / "topic-settings.json").read_text())
            assert {name: value["retention_bytes"] for name, value in saved.items()} == {"d~0": 1_000_000, "d~1": 1_000_000}
            assert await c.delete_topic("d") == {"deleted": "d", "messages": 4, "partitions": 2}
            assert await c.topics("d") == []
            assert not [p for p in (tmp_path / "topics").iterdir() if p.name.startswith("d")]
            # The name is free again: a plain topic now.
            assert (await c.publish("d", b"plain")).topic == "d"
            with trio.fail_after(TIMEOUT):
                async for m in sub:
                    if m.topic == "d":
                        assert m.payload == b"plain" and m.partition is None
                        break
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            assert [t.topic for t in await c.topics("d")] == ["d"]


async def test_http_and_cli(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        created = await request(port, "PUT", "/v1/topics/web", '{"partitions": 2}')
        assert created.status == 201 and created.json() == {"topic": "web", "partitions": 2, "created": True}
        again = await request(port, "PUT", "/v1/topics/web", '{"partitions": 2}')
        assert again.status == 200 and again.json()["created"] is False
        refused = await request(port, "POST", "/v1/topics/web/messages", '{"payload": "x"}')
        assert assert_error(refused, 409, "partitioned")["partitions"] == 2
        ok = await request(port, "POST", "/v1/topics/web~1/messages", '{"payload": "x"}')
        assert ok.status == 200 and ok.json()["topic"] == "web~1"
        assert (await request(port, "PUT", "/v1/topics/web2", '{"partitions": "2"}')).status == 422

        result = await run(["topics", "create", "cli", "--partitions", "3", "--url", server.url])
        assert result.returncode == 0, result.stderr
        assert b"created topic cli with 3 partitions" in result.stdout
        result = await run(["topics", "--url", server.url, "cli"])
        assert result.returncode == 0 and all(b"cli~%d" % p in result.stdout for p in range(3)), result.stdout
        result = await run(["pub", "--url", server.url, "cli", "hello"])
        assert result.returncode == 0, result.stderr


async def test_dead_letters_to_a_partitioned_topic_go_to_its_first_partition(tmp_path: Path) -> None:
    """One place for them, so that a restart finds what it dead-lettered
    where it looks; never a log of the partitioned topic's own name."""
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            await c.create_topic("dead", partitions=3)
            await c.publish("jobs", b"poison")
            async with c.subscribe("dead", start="earliest") as letters:
                async with c.subscribe(
                    "jobs", group="workers", start="earliest", auto_ack=False, max_deliver=2, dead_letter="dead"
                ) as sub:
                    deliveries = 0
                    with trio.fail_after(TIMEOUT):
                        async for message in sub:
                            deliveries += 1
                            await message.nak(0)
                            if deliveries == 2:
                                break
                    with trio.fail_after(TIMEOUT):
                        async for letter in letters:
                            break
            assert (letter.topic, letter.partition, letter.payload) == ("dead~0", 0, b"poison")
            assert sorted(t.topic for t in await c.topics("dead")) == ["dead~0", "dead~1", "dead~2"]


async def test_a_consumer_group_reads_every_partition_with_each_key_in_order(tmp_path: Path) -> None:
    """On one broker a group over a partitioned topic reads all its
    partitions (its pattern matches them), and ordering=key keeps each
    key's messages in order across two members."""
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as c:
            await c.create_topic("work", partitions=3)
            await c.create_group("workers", "work", start="earliest", ordering="key")
            keys = [f"k{i % 7}" for i in range(90)]
            for i, key in enumerate(keys):
                await c.publish("work", b"%d" % i, {"key": key})
            got: dict[str, list[int]] = defaultdict(list)
            partitions = set()

            async def member(name: str) -> None:
                async with pybroker.connect(server.url, name=name) as m:
                    async with m.subscribe("work", group="workers", auto_ack=False, max_ack_pending=5) as sub:
                        async for message in sub:
                            got[message.headers["key"]].append(int(message.payload))
                            partitions.add(message.partition)
                            await message.ack()
                            if sum(map(len, got.values())) == len(keys):
                                nursery.cancel_scope.cancel()

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(member, "one")
                    nursery.start_soon(member, "two")
            assert partitions == {0, 1, 2}
            for key in set(keys):
                assert got[key] == [i for i, k in enumerate(keys) if k == key]


async def test_a_request_to_a_partitioned_topic_goes_to_a_partition_and_keeps_its_receiver_check(
    tmp_path: Path,
) -> None:
    """A request is a PUBLISH flagged NEEDS_RECEIVER, which a move to a
    partition would lose: refused with the count, it is asked again,
    routed, flag and all."""
    async with running_broker(data_dir=tmp_path) as server:
        async with pybroker.connect(server.url) as admin:
            await admin.create_topic("svc", partitions=2)
            await admin.create_topic("nobody", partitions=2)
        async with pybroker.connect(server.url) as responder, pybroker.connect(server.url) as asker:

            async def answer(message: pybroker.Message) -> None:
                await responder.respond(message, b"re:" + message.payload)

            async with responder.subscribe("svc", answer):
                reply = await asker.request("svc", b"ping", {"key": "k"}, timeout=TIMEOUT)
                assert reply.payload == b"re:ping"
                with pytest.raises(pybroker.NoReceivers):
                    await asker.request("nobody", b"anyone?", timeout=TIMEOUT)
