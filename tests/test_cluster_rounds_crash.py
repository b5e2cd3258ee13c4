"""A node SIGKILLed in the middle of a group of rounds spanning several
partitions (docs/cluster.md §5 "As built: a node's rounds together"), on
real etcd and SeaweedFS with a real ``pybroker serve --cluster`` process:
between the group's PUT and its transaction, nothing of it is committed in
any partition; after its transaction, before any acknowledgement, it is
committed in every partition it spans (one transaction). Restarted, the
node takes its partitions again, the client resends what was not
acknowledged (with its msg-ids, so the committed group is not stored
twice), and every partition holds each message exactly once, at dense
offsets."""

from __future__ import annotations

import zlib
from collections import defaultdict
from pathlib import Path

import pytest
import pybroker
import trio

from helpers.cluster_broker import WAIT, servers, urls  # noqa: F401 (fixtures)
from helpers.procs import broker_process, read_json_lines
from helpers.restarts import free_port
from pybroker.protocol import decode_batch, partition_topic
from pybroker.server.cluster import failpoints
from pybroker.server.cluster.entries import IndexEntry
from pybroker.server.cluster.etcd import Etcd
from pybroker.server.cluster.objects import ObjectStore
from pybroker.server.cluster.partition import PartitionReader
from pybroker.server.cluster.store import parse_cluster_urls
from pybroker.server.storage.scan import HEADER, HEADER_SIZE

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

PARTITIONS = 4
MESSAGES = 400
IN_FLIGHT = 64
#: The partition round whose after-put kills the node: late enough that
#: rounds of every partition are flowing.
HIT = 24


def payloads_by_partition(data: bytes) -> dict[int, list[bytes]]:
    """The payloads of an object's stored batches (runs of several
    partitions one after another), by the partition their key sends them to."""
    out: dict[int, list[bytes]] = defaultdict(list)
    pos = 0
    while pos < len(data):
        _base, _count, length, _first, _last, _crc = HEADER.unpack_from(data, pos)
        for payload, headers in decode_batch(data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]):
            out[zlib.crc32(headers["key"].encode()) % PARTITIONS].append(payload)
        pos += HEADER_SIZE + length
    return out


@pytest.mark.parametrize("point", ["after-put", "after-commit"])
async def test_a_kill_in_a_group_of_rounds_loses_and_doubles_nothing(
    urls: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    settings = parse_cluster_urls(urls["cluster"], urls["object_store"])
    port = free_port()
    flags = ("--cluster", urls["cluster"], "--object-store", urls["object_store"], "--no-http",
             "--cluster-lease-ttl", "3", "--port", str(port))  # fmt: skip
    acked: dict[str, tuple[str, int]] = {}
    async with broker_process(tmp_path / "data", tmp_path, *flags) as node:
        monkeypatch.setenv(failpoints.ENV, f"{point}=kill@{HIT}")
        url = await node.start()
        monkeypatch.delenv(failpoints.ENV)  # its restart is disarmed
        async with pybroker.connect(url) as admin:
            await admin.create_topic("crash", partitions=PARTITIONS)
        sent = iter(range(MESSAGES))
        restarted = trio.Event()

        async def publisher(client: pybroker.Client) -> None:
            for i in sent:
                value = f"m{i}"
                ack = await client.publish("crash", value.encode(), {"key": f"k{i % 13}"})
                acked[value] = (ack.topic, ack.offset)

        async def restart() -> None:
            assert node.proc is not None
            await node.proc.wait()  # by its own failpoint
            status = await node.kill()  # reaped: its status
            assert status == -9, status
            await node.start()
            restarted.set()

        with trio.fail_after(WAIT * 2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart)
                async with pybroker.connect(url, name="publisher", reconnect=True) as client:
                    async with trio.open_nursery() as publishers:
                        for _ in range(IN_FLIGHT):
                            publishers.start_soon(publisher, client)
                assert restarted.is_set()  # the publishes went on after the restart

        markers = [r for r in read_json_lines(tmp_path / "broker-0.log") if r.get("event") == "failpoint"]
        assert [(m["point"], m["hit"]) for m in markers] == [(point, HIT)], markers
        killed = markers[0]["object"]

        assert len(acked) == MESSAGES
        async with Etcd(settings.etcd) as etcd, ObjectStore(
            settings.object_endpoint, settings.bucket, prefix=settings.object_prefix
        ) as objects:
            # The killed group's object was written and spans several
            # partitions; after its PUT no partition's index names it,
            # after its transaction every one of them does.
            spanned = payloads_by_partition(await objects.get(killed))
            assert len(spanned) >= 2, spanned
            stored: dict[int, list[bytes]] = {}
            for p in range(PARTITIONS):
                prefix = settings.keys.index_prefix("crash", p)
                named = [IndexEntry.from_key(prefix, kv.key, kv.value).object for kv in (await etcd.get_prefix(prefix)).kvs]
                assert (killed in named) == (point == "after-commit" and p in spanned), (p, point)
                reader = PartitionReader(etcd, objects, "crash", p, keys=settings.keys)
                stored[p] = []
                offset = 0
                for _ in range(MESSAGES):  # bounded: each read returns a batch at least
                    batches = await reader.read(offset)
                    if not batches:
                        break
                    assert batches[0].base_offset == offset
                    stored[p] += [payload for b in batches for payload, _ in decode_batch(b.batch)]
                    offset = batches[-1].next_offset
        # Each message exactly once, in its key's partition, at the offset
        # its acknowledgement named.
        everything = [payload for p in stored for payload in stored[p]]
        assert sorted(everything) == sorted(value.encode() for value in acked)
        for value, (topic, offset) in acked.items():
            p = int(topic.rpartition("~")[2])
            assert topic == partition_topic("crash", p)
            assert stored[p][offset] == value.encode(), (value, topic, offset)
