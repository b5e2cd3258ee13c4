"""Brokers in cluster mode (``--cluster`` / ``--object-store``), in process,
against a real etcd and a real SeaweedFS on loopback (docs/cluster.md §5,
§7, §8): a topic's owner takes its publishes and acknowledges them once the
round is in the object store and committed in etcd; every other node answers
NOT_OWNER naming the owner; subscribers on any node get what the owner
committed, in order; when the owner stops, another node takes the topic
over where the committed log ends.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pybroker
import trio
from prometheus_client.parser import text_string_to_metric_families

from helpers.cluster_broker import (  # noqa: F401 (servers, urls: fixtures)
    WAIT,
    cluster_node,
    cluster_processes,
    hello,
    publish_to_owner,
    servers,
    settled_owner,
    stop_gracefully,
    store_of,
    tune,
    urls,
    wait_for,
)
from helpers.http import assert_error, in_thread, post_json, request
from helpers.procs import PYBROKER, child_env
from helpers.raw import RawClient, raw_client
from pybroker.protocol import (
    Deliver,
    Durability,
    Error,
    ErrorCode,
    PubAck,
    Publish,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    decode_batch,
    encode_batch,
)
from pybroker.server.cluster.cache import RangeCache
from pybroker.server.cluster.compaction import CompactionSettings
from pybroker.server.cluster.janitor import Janitor
from pybroker.server.cluster.objects import ObjectStoreError
from pybroker.server.cluster.entries import IndexEntry
from pybroker.server.cluster.etcd import Etcd
from pybroker.server.cluster.partition import PartitionReader
from pybroker.server.cluster.store import parse_cluster_urls
from pybroker.server.server import Server
from pybroker.server.storage.settings import SettingsResolver, TopicSettings

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")


async def offsets_and_payloads(sub: RawClient, count: int) -> list[tuple[int, bytes]]:
    """The next ``count`` messages DELIVERed to ``sub``, with their offsets."""
    seen: list[tuple[int, bytes]] = []
    with trio.fail_after(WAIT):
        while len(seen) < count:
            event = await sub.next_event()
            assert isinstance(event, Deliver), event
            seen += [(event.base_offset + k, p) for k, (p, _) in enumerate(decode_batch(event.batch))]
    return seen


async def committed_payloads(node: Server, topic: str) -> list[bytes]:
    """What the cluster holds for ``topic``, read back from etcd and the object store."""
    store = store_of(node)
    reader = PartitionReader(store.etcd, store.objects, topic, 0, keys=store.settings.keys)
    return [p for b in await reader.read(0) for p, _ in decode_batch(b.batch)]


async def test_owner_acknowledges_others_redirect_and_every_node_delivers(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        # The first publish creates the topic; until an owner has it the
        # answer is NOT_OWNER without an address.
        ack, _ = await publish_to_owner(nodes, "orders", [b"first"], "creator")
        assert (ack.base_offset, ack.count, ack.durability) == (0, 1, Durability.DISK)
        owner = await settled_owner(nodes, "orders")
        other = b if owner is a else a
        # The other node names the owner, and stores nothing.
        async with raw_client(other) as raw:
            await hello(raw, "misdirected")
            await raw.send_event(Publish(7, "orders", encode_batch([b"lost?"])))
            refused = await raw.next_event()
        assert isinstance(refused, Error) and refused.code == ErrorCode.NOT_OWNER, refused
        owner_url = f"http://127.0.0.1:{owner.http_port}"  # its HTTP side, as it registered it
        assert refused.fields == {"topic": "orders", "owner": f"127.0.0.1:{owner.port}", "owner_url": owner_url}
        assert refused.ref == 7 and not refused.fatal
        # The HTTP side says so too: 421, naming the owner and its URL.
        reply = await post_json(other.http_port, "/v1/topics/orders/messages", {"payload": "lost?"})
        body = assert_error(reply, 421, "not_owner")
        assert (body["owner"], body["owner_url"]) == (f"127.0.0.1:{owner.port}", owner_url), body

        # A subscriber on each node, from the start of the topic.
        async with raw_client(a) as sub_a, raw_client(b) as sub_b, raw_client(owner) as pub:
            for raw, name in ((sub_a, "sub-a"), (sub_b, "sub-b")):
                await hello(raw, name)
                await raw.send_event(Subscribe(1, "orders", StartKind.EARLIEST, 0))
                assert await raw.next_event() == SubAck(1)
            await hello(pub, "publisher")
            for i in range(1, 40):
                await pub.send_event(Publish(i, "orders", encode_batch([f"m{i}.{j}".encode() for j in range(3)])))
            expected_offset = 1
            for i in range(1, 40):
                got = await pub.next_event()
                assert isinstance(got, PubAck), got
                assert (got.request_id, got.base_offset, got.count) == (i, expected_offset, 3)
                expected_offset += 3
            want = [b"first"] + [f"m{i}.{j}".encode() for i in range(1, 40) for j in range(3)]
            for raw in (sub_a, sub_b):
                assert await offsets_and_payloads(raw, len(want)) == list(enumerate(want))

        # What was acknowledged is in the object store, dense, at its offsets.
        store = store_of(a)
        reader = PartitionReader(store.etcd, store.objects, "orders", 0, keys=store.settings.keys)
        batches = await reader.read(0, 1 << 20)
        stored = [p for batch in batches for p, _ in decode_batch(batch.batch)]
        while len(stored) < len(want):
            more = await reader.read(batches[-1].next_offset, 1 << 20)
            assert more, (len(stored), len(want))
            batches += more
            stored += [p for batch in more for p, _ in decode_batch(batch.batch)]
        assert stored == want
        # One of the two is the janitor, and it has swept (nothing to delete).
        await wait_for(lambda: store_of(a).janitor.sweeps + store_of(b).janitor.sweeps >= 1)
        sweeping = [n for n in nodes if store_of(n).janitor.sweeps]
        assert len(sweeping) == 1, [store_of(n).janitor.sweeps for n in nodes]
        last = store_of(sweeping[0]).janitor.last
        assert last is not None and last.deleted == 0


async def test_takeover_continues_where_the_committed_log_ends(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        for i in range(10):
            ack, _ = await publish_to_owner(nodes, "jobs", [f"before-{i}".encode()], "p")
            assert ack.base_offset == i
        owner = await settled_owner(nodes, "jobs")
        survivor = b if owner is a else a
        # The owner stops (gracefully: it hands the topic over); the
        # survivor takes it where the committed log ends.
        await stop_gracefully(owner)
        for i in range(10, 20):
            ack, _ = await publish_to_owner([survivor], "jobs", [f"after-{i}".encode()], "p")
            assert ack.base_offset == i
        assert await settled_owner([survivor], "jobs") is survivor
        async with raw_client(survivor) as raw:
            await hello(raw, "reader")
            await raw.send_event(Subscribe(1, "jobs", StartKind.EARLIEST, 0))
            assert await raw.next_event() == SubAck(1)
            seen: list[bytes] = []
            with trio.fail_after(WAIT):
                while len(seen) < 20:
                    event = await raw.next_event()
                    assert isinstance(event, Deliver), event
                    seen += [p for p, _ in decode_batch(event.batch)]
        assert seen == [f"before-{i}".encode() for i in range(10)] + [f"after-{i}".encode() for i in range(10, 20)]


async def test_a_client_given_several_nodes_outlives_the_one_it_was_on(urls: dict[str, str], tmp_path: Path) -> None:
    """A URL listing the cluster's nodes: the node a publisher and a
    subscriber were connected to stops; they reconnect to the next one
    listed and go on there, the subscriber with no gap and no repeat."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "moving", [b"m0"], "creator")
        owner = await settled_owner(nodes, "moving")
        survivor = b if owner is a else a
        url = f"pybroker://127.0.0.1:{owner.port},127.0.0.1:{survivor.port}"
        reconnect = pybroker.Reconnect(max_attempts=200, initial_delay=0.05, max_delay=0.5)
        async with pybroker.connect(url, reconnect=reconnect) as client:
            async with client.subscribe("moving", start="earliest") as sub:
                for i in range(1, 10):
                    await client.publish("moving", f"m{i}".encode())
                await stop_gracefully(owner)
                for i in range(10, 20):
                    with trio.fail_after(WAIT):
                        await client.publish("moving", f"m{i}".encode())
                got: list[tuple[int, bytes]] = []
                with trio.fail_after(WAIT):
                    async for message in sub:
                        got.append((message.offset, message.payload))
                        if len(got) == 20:
                            break
            assert client.reconnects >= 1
        assert got == [(i, f"m{i}".encode()) for i in range(20)]
        assert await settled_owner([survivor], "moving") is survivor


async def test_a_node_joining_after_index_compaction_delivers_every_message(urls: dict[str, str], tmp_path: Path) -> None:
    """The owner compacts the index as rounds come (docs/cluster.md §13):
    the etcd index stays small, the janitor takes the objects merged away,
    and a node that joins afterwards delivers every message from the start,
    read from the merged objects."""
    small = CompactionSettings(keep=5, fan_in=4, max_object_bytes=1 << 20)
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        for node in nodes:
            tune(node, compaction=small)
        await publish_to_owner(nodes, "history", [b"m0"], "p")
        owner = await settled_owner(nodes, "history")
        async with raw_client(owner) as pub:
            await hello(pub, "publisher")
            for i in range(1, 40):  # one round each: 40 index entries before compaction
                await pub.send_event(Publish(i, "history", encode_batch([f"m{i}".encode()])))
                ack = await pub.next_event()
                assert isinstance(ack, PubAck) and ack.base_offset == i, ack
        manager = store_of(owner).manager
        assert manager is not None
        # 40 entries, the newest 5 kept: eight runs of 4 at level 0, two at
        # level 1; 10 entries remain.
        await wait_for(lambda: manager.compaction_stats().merges >= 10)
        store = store_of(owner)
        index = (await store.etcd.get_prefix(store.settings.keys.index_prefix("history", 0))).kvs
        assert len(index) == 10, [kv.key for kv in index]
        swept = await Janitor(store.etcd, store.objects, keys=store.settings.keys, grace=0).sweep()
        # 40 rounds' objects and 10 merged: 32 + 8 level-1 ones were merged away.
        assert (swept.listed, swept.deleted) == (50, 40)
        want = [(i, f"m{i}".encode()) for i in range(40)]
        async with cluster_node(urls, "c", tmp_path) as c, raw_client(c) as sub:
            await hello(sub, "late-reader")
            await sub.send_event(Subscribe(1, "history", StartKind.EARLIEST, 0))
            assert await sub.next_event() == SubAck(1)
            assert await offsets_and_payloads(sub, 40) == want


async def test_the_owner_reads_its_own_rounds_from_memory(urls: dict[str, str], tmp_path: Path) -> None:
    """Every node tails every committed round, the owner too (its copy
    already has them): it keeps each object it commits in its read cache,
    so it never GETs back what it just wrote; the other node GETs each."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "echo", [b"m0"], "p")
        owner = await settled_owner(nodes, "echo")
        other = b if owner is a else a
        mine, theirs = store_of(owner).cache, store_of(other).cache

        def reads(cache: RangeCache) -> int:
            stats = cache.statistics()
            return stats.hits + stats.fetches

        # The first round may have been another node's (before ownership
        # settled): the owner's tail reads it from the store.
        await wait_for(lambda: reads(mine) >= 1)
        before = mine.statistics()
        async with raw_client(owner) as pub:
            await hello(pub, "publisher")
            for i in range(1, 21):  # one round each
                await pub.send_event(Publish(i, "echo", encode_batch([f"m{i}".encode()])))
                ack = await pub.next_event()
                assert isinstance(ack, PubAck) and ack.base_offset == i, ack
        await wait_for(lambda: reads(mine) >= before.hits + before.fetches + 20 and reads(theirs) >= 21)
        after = mine.statistics()
        assert after.fetches == before.fetches and after.hits >= before.hits + 20
        assert theirs.statistics().fetches >= 20


async def test_metrics_show_the_cluster_side(urls: dict[str, str], tmp_path: Path) -> None:
    """/metrics on a cluster node: its membership and ownership, its commit
    rounds, index compaction, the read cache; parsed by prometheus_client
    and checked by promtool."""
    async with cluster_node(urls, "a", tmp_path) as a:
        tune(a, compaction=CompactionSettings(keep=5, fan_in=4))
        for i in range(12):  # one round each
            ack, _ = await publish_to_owner([a], "measured", [f"m{i}".encode()], "p")
            assert ack.base_offset == i
        manager = store_of(a).manager
        assert manager is not None
        await wait_for(lambda: manager.compaction_stats().merges >= 1)
        port = a.http_port
        assert port is not None
        reply = await request(port, "GET", "/metrics")
        assert reply.status == 200
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.body.decode())
            for s in family.samples
        }
    assert found[("pybroker_cluster_member", ())] == 1
    assert found[("pybroker_cluster_members", ())] == 1
    assert found[("pybroker_cluster_owned_partitions", ())] == 1
    assert found[("pybroker_cluster_commit_rounds_total", ())] >= 12
    # 12 entries, the newest 5 kept: one run of 4 merged.
    assert found[("pybroker_cluster_index_merges_total", ())] == 1
    assert found[("pybroker_cluster_index_entries_merged_total", ())] == 4
    assert found[("pybroker_cluster_index_merged_bytes_total", ())] > 0
    assert found[("pybroker_cluster_index_merges_not_taken_total", (("why", "refused"),))] == 0
    assert found[("pybroker_cluster_hand_offs_sent_total", ())] == found[("pybroker_cluster_hand_offs_taken_total", ())] == 0
    # The owner's tail and the merge read its own rounds from the cache.
    assert found[("pybroker_cluster_cache_requests_total", (("result", "hit"),))] >= 12
    assert found[("pybroker_cluster_cache_requests_total", (("result", "fetch"),))] == 0
    promtool = shutil.which("promtool")
    if promtool is not None:  # (the single-node metrics test says when it is missing)
        with trio.fail_after(30):
            checked = await trio.run_process(
                [promtool, "check", "metrics"], stdin=reply.body, capture_stdout=True, capture_stderr=True, check=False
            )
        output = (checked.stdout + checked.stderr).decode()
        assert checked.returncode == 0 and output.strip() == "", output


async def one_round_each(nodes: list[Server], topic: str, payloads: list[bytes]) -> Server:
    """Publish ``payloads`` to ``topic``, each alone (one round, so one index
    entry, each) and acknowledged at its offset; the owner."""
    await publish_to_owner(nodes, topic, [payloads[0]], "p")
    owner = await settled_owner(nodes, topic)
    async with raw_client(owner) as pub:
        await hello(pub, "publisher")
        for i in range(1, len(payloads)):
            await pub.send_event(Publish(i, topic, encode_batch([payloads[i]])))
            ack = await pub.next_event()
            assert isinstance(ack, PubAck) and ack.base_offset == i, ack
    return owner


async def test_retention_cuts_the_oldest_messages_in_cluster_mode(urls: dict[str, str], tmp_path: Path) -> None:
    """``--retention-bytes`` in cluster mode: the owner cuts the oldest index
    entries past the limit; a node that joins then starts ``earliest``
    subscribers, and those from an offset below it, at the first message
    kept, as a single node does."""
    limit = 10_000
    resolver = SettingsResolver(TopicSettings(retention_bytes=limit))
    often = CompactionSettings(retention_every=0.2)
    async with (
        cluster_node(urls, "a", tmp_path, topic_settings=resolver) as a,
        cluster_node(urls, "b", tmp_path, topic_settings=resolver) as b,
    ):
        nodes = [a, b]
        for node in nodes:
            tune(node, compaction=often)
        payloads = [b"%04d" % i + b"x" * 996 for i in range(40)]
        owner = await one_round_each(nodes, "kept", payloads)
        store = store_of(owner)
        prefix = store.settings.keys.index_prefix("kept", 0)
        size = IndexEntry.decode(39, (await store.etcd.get(prefix + b"%020d" % 39)).value).size  # type: ignore[union-attr]
        first = 40 - limit // size  # the newest entries that fit in the limit stay
        manager = store.manager
        assert manager is not None and 20 < first < 40
        await wait_for(lambda: manager.compaction_stats().retention_cut >= first)
        index = (await store.etcd.get_prefix(prefix)).kvs
        assert [int(kv.key[len(prefix) :]) for kv in index] == list(range(first, 40))
        async with cluster_node(urls, "c", tmp_path, topic_settings=resolver) as c:
            async with raw_client(c) as sub:
                await hello(sub, "earliest")
                await sub.send_event(Subscribe(1, "kept", StartKind.EARLIEST, 0))
                assert await sub.next_event() == SubAck(1)
                assert await offsets_and_payloads(sub, 40 - first) == list(enumerate(payloads))[first:]
            async with raw_client(c) as sub:
                await hello(sub, "from-zero")
                await sub.send_event(Subscribe(1, "kept", StartKind.OFFSET, 0))
                assert await sub.next_event() == SubAck(1)
                # Below the first retained offset: from there (protocol.md, SUBSCRIBE).
                assert await offsets_and_payloads(sub, 40 - first) == list(enumerate(payloads))[first:]


async def test_retention_set_at_run_time_applies_on_every_node(urls: dict[str, str], tmp_path: Path) -> None:
    """TOPICS set on any node: the limit goes into the topic's record in
    etcd, the owner cuts by it from its next pass, and the other node's
    floor follows; lifting it stops the cuts. What means nothing in cluster
    mode (segment_bytes) is refused, and so is an unknown topic."""
    limit = 10_000
    often = CompactionSettings(retention_every=0.2)
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        for node in nodes:
            tune(node, compaction=often)
        payloads = [b"%04d" % i + b"x" * 996 for i in range(40)]
        owner = await one_round_each(nodes, "later", payloads)
        other = b if owner is a else a
        manager = store_of(owner).manager
        assert manager is not None and manager.compaction_stats().retention_cut == 0
        async with pybroker.connect(other.url) as client:
            answer = await client.set_topic("later", retention_bytes=limit)
            assert answer["topic"] == "later" and answer["settings"]["retention_bytes"] == limit
            with pytest.raises(pybroker.BrokerError) as refused:
                await client.set_topic("later", segment_bytes=1 << 20)
            assert refused.value.code == ErrorCode.BAD_REQUEST and "cluster mode" in str(refused.value)
            with pytest.raises(pybroker.BrokerError) as missing:
                await client.set_topic("never.published", retention_bytes=1)
            assert missing.value.code == ErrorCode.UNKNOWN_TOPIC
        store = store_of(owner)
        prefix = store.settings.keys.index_prefix("later", 0)
        size = IndexEntry.decode(39, (await store.etcd.get(prefix + b"%020d" % 39)).value).size  # type: ignore[union-attr]
        first = 40 - limit // size
        await wait_for(lambda: manager.compaction_stats().retention_cut >= first)
        assert [int(kv.key[len(prefix) :]) for kv in (await store.etcd.get_prefix(prefix)).kvs] == list(range(first, 40))
        await wait_for(lambda: store_of(other).topic("later").floor == first)
        record = json.loads((await store.etcd.get(store.settings.keys.topic("later"))).value)  # type: ignore[union-attr]
        assert record["settings"] == {"retention_bytes": limit}
        # Lifted: no node has a limit for it any more.
        async with pybroker.connect(owner.url) as client:
            lifted = await client.set_topic("later", retention_bytes=None)
        assert lifted["settings"]["retention_bytes"] is None
        await wait_for(lambda: not any(store_of(n).retention_of("later").active for n in nodes))


async def earliest(node: Server, topic: str, n: int) -> list[tuple[int, bytes]]:
    """The first ``n`` messages a subscriber from ``earliest`` gets on ``node``."""
    got: list[tuple[int, bytes]] = []
    async with pybroker.connect(node.url) as client:
        async with client.subscribe(topic, start="earliest") as sub:
            with trio.fail_after(WAIT):
                async for message in sub:
                    got.append((message.offset, message.payload))
                    if len(got) == n:
                        break
    return got


async def test_a_purge_on_any_node_drops_the_messages_before_it_everywhere(urls: dict[str, str], tmp_path: Path) -> None:
    """TOPICS purge on the node that does not own the topic: the index
    entries before the one holding ``keep_from`` go from etcd, both nodes'
    copies drop them, subscribers from ``earliest`` on either node start at
    the first kept; a purge of everything leaves offsets going on."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        payloads = [b"m%d" % i for i in range(10)]
        owner = await one_round_each(nodes, "purged", payloads)
        other = b if owner is a else a
        await wait_for(lambda: all(store_of(n).topic("purged").next_offset == 10 for n in nodes))
        async with pybroker.connect(other.url) as client:
            answer = await client.purge_topic("purged", keep_from=6)
        assert answer == {"topic": "purged", "first_offset": 6, "next_offset": 10, "purged": 6}
        store = store_of(owner)
        prefix = store.settings.keys.index_prefix("purged", 0)
        assert [int(kv.key[len(prefix) :]) for kv in (await store.etcd.get_prefix(prefix)).kvs] == [6, 7, 8, 9]
        await wait_for(lambda: all(store_of(n).topic("purged").first_offset == 6 for n in nodes))
        for node in nodes:
            assert await earliest(node, "purged", 4) == list(enumerate(payloads))[6:]
        # Everything: offsets go on where they were.
        async with pybroker.connect(owner.url) as client:
            answer = await client.purge_topic("purged")
        assert (answer["first_offset"], answer["next_offset"]) == (10, 10)
        assert (await store.etcd.get_prefix(prefix)).kvs == []
        ack, _ = await publish_to_owner(nodes, "purged", [b"after"], "p")
        assert ack.base_offset == 10
        await wait_for(lambda: all(store_of(n).topic("purged").first_offset == 10 for n in nodes))
        for node in nodes:
            assert await earliest(node, "purged", 1) == [(10, b"after")]


async def test_a_round_that_fails_is_refused_and_the_next_takes_its_offsets(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a:
        ack, _ = await publish_to_owner([a], "faults", [b"zero"], "p")
        assert ack.base_offset == 0
        owner = store_of(a).manager.local("faults", 0)  # type: ignore[union-attr]
        assert owner is not None
        failures = 0

        async def crash_once(name: str) -> None:
            # After the object's PUT, before its etcd transaction: the
            # commit never happens, and the owner cannot know that.
            nonlocal failures
            failures += 1
            owner.before_commit = None
            raise RuntimeError(f"injected: crash between PUT {name} and the transaction")

        owner.before_commit = crash_once
        async with raw_client(a) as sub, raw_client(a) as pub:
            await hello(sub, "sub")
            await sub.send_event(Subscribe(1, "faults", StartKind.EARLIEST, 0))
            assert await sub.next_event() == SubAck(1)
            await hello(pub, "pub")
            await pub.send_event(Publish(5, "faults", encode_batch([b"refused"])))
            refused = await pub.next_event()
            assert isinstance(refused, Error) and refused.code == ErrorCode.STORAGE_ERROR, refused
            assert refused.ref == 5 and "unknown" in refused.message, refused
            assert failures == 1
            # The next publish gets the refused batch's offset.
            ack, _ = await publish_to_owner([a], "faults", [b"one"], "p")
            assert ack.base_offset == 1
            assert await offsets_and_payloads(sub, 2) == [(0, b"zero"), (1, b"one")]
        assert await committed_payloads(a, "faults") == [b"zero", b"one"]


async def test_kill_9_of_the_owner_process_loses_no_acknowledged_message(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """Two ``pybroker serve --cluster`` processes; the topic's owner is
    SIGKILLed (its lease then runs out: 3 s here, 10 s by default); the survivor takes the topic
    over and serves every acknowledged message, and publishing goes on at
    the next offset."""
    async with cluster_processes(urls, tmp_path) as started:
        procs = {proc.url.removeprefix("pybroker://"): proc for proc in started}
        addrs = list(procs)
        acked: list[int] = []
        for i in range(20):
            ack, _ = await publish_to_owner(addrs, "kill9", [f"m{i}".encode()], "p")
            acked.append(ack.base_offset)
        assert acked == list(range(20))
        # Whoever answers without a redirect is the owner.
        ack, redirects = await publish_to_owner(addrs, "kill9", [b"m20"], "p")
        owner = addrs[0] if redirects == 0 else addrs[1]
        survivor = addrs[1] if owner == addrs[0] else addrs[0]
        await procs[owner].kill()
        killed_at = trio.current_time()
        ack, _ = await publish_to_owner([survivor], "kill9", [b"m21"], "p")
        took = trio.current_time() - killed_at
        assert ack.base_offset == 21
        async with raw_client(f"pybroker://{survivor}") as raw:
            await hello(raw, "reader")
            await raw.send_event(Subscribe(1, "kill9", StartKind.EARLIEST, 0))
            assert await raw.next_event() == SubAck(1)
            seen: list[bytes] = []
            with trio.fail_after(WAIT):
                while len(seen) < 22:
                    event = await raw.next_event()
                    assert isinstance(event, Deliver), event
                    seen += [p for p, _ in decode_batch(event.batch)]
        assert seen == [f"m{i}".encode() for i in range(22)]
        print(f"the survivor took the topic over {took:.1f} s after the owner's SIGKILL")


async def test_the_client_follows_not_owner_to_the_owner(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "clients", [b"created"], "creator")
        owner = await settled_owner(nodes, "clients")
        other = b if owner is a else a
        # Reconnecting off: NOT_OWNER is the caller's, with the owner's address.
        async with pybroker.connect(f"pybroker://127.0.0.1:{other.port}", name="stays") as client:
            with pytest.raises(pybroker.NotOwner) as refused:
                await client.publish("clients", b"not followed")
            assert refused.value.fields["owner"] == f"127.0.0.1:{owner.port}"
        # Reconnecting on: the client publishes at the owner over one more
        # connection, to the owner it names; its subscription stays on the
        # other node, which delivers what the owner committed.
        async with pybroker.connect(f"pybroker://127.0.0.1:{other.port}", name="follows", reconnect=True) as client:
            async with client.subscribe("clients", start="earliest") as sub:
                acks = [await client.publish("clients", f"followed-{i}".encode()) for i in range(5)]
                assert [ack.offset for ack in acks] == [1, 2, 3, 4, 5]
                assert client.reconnects == 0
                assert client._owners is not None and list(client._owners.peers) == [f"127.0.0.1:{owner.port}"]
                got: list[bytes] = []
                with trio.fail_after(WAIT):
                    async for message in sub:
                        got.append(message.payload)
                        if len(got) == 6:
                            break
        assert got == [b"created"] + [f"followed-{i}".encode() for i in range(5)]


def named(msg_id: str, payload: bytes) -> bytes:
    return encode_batch([(payload, {"msg-id": msg_id})])


async def send_once(node: Server, topic: str, batch: bytes) -> PubAck | Error:
    """One DEDUP publish of ``batch`` on a connection of its own: its answer."""
    async with raw_client(node) as raw:
        await hello(raw, "exactly-once")
        await raw.send_event(Publish(3, topic, batch, dedup=True))
        event = await raw.next_event()
    assert isinstance(event, (PubAck, Error)), event
    return event


async def resend_until_taken(node: Server, topic: str, batch: bytes) -> PubAck:
    """Send ``batch`` to ``node`` until it takes it (NOT_OWNER while it is
    taking the topic over): its PUBACK."""
    with trio.fail_after(WAIT):
        while True:
            again = await send_once(node, topic, batch)
            if isinstance(again, PubAck):
                return again
            assert again.code == ErrorCode.NOT_OWNER, again
            await trio.sleep(0.05)


async def test_a_resend_to_the_next_owner_is_not_stored_twice(urls: dict[str, str], tmp_path: Path) -> None:
    """Exactly-once across owners: a DEDUP batch acknowledged by one owner
    and sent again to the next (the publisher never saw the PUBACK, say)
    gets its original offset there, and nothing is stored again."""

    async def send(node: Server, batch: bytes) -> PubAck | Error:
        return await send_once(node, "once", batch)

    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        await publish_to_owner([a, b], "once", [b"zero"], "p")
        owner = await settled_owner([a, b], "once")
        other = b if owner is a else a
        # A DEDUP publish to the other node first: refused, and its msg-ids
        # for the topic are now in memory there (what it learns later must
        # be added to them).
        early = await send(other, named("early", b"early"))
        assert isinstance(early, Error) and early.code == ErrorCode.NOT_OWNER, early
        first = await send(owner, named("order-17", b"the order"))
        assert isinstance(first, PubAck) and first.base_offset == 1, first
        await stop_gracefully(owner)  # the owner stops; the other takes the topic over
        again = await resend_until_taken(other, "once", named("order-17", b"the order"))
        assert (again.base_offset, again.count) == (1, 1), again
        ack, _ = await publish_to_owner([other], "once", [b"two"], "p")
        assert ack.base_offset == 2
        store = store_of(other)
        reader = PartitionReader(store.etcd, store.objects, "once", 0, keys=store.settings.keys)
        assert [p for batch in await reader.read(0) for p, _ in decode_batch(batch.batch)] == [b"zero", b"the order", b"two"]


async def test_a_resend_older_than_the_next_owners_copy_is_not_stored_twice(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """Exactly-once across owners beyond the next owner's copy: that node
    keeps only the newest 4 KiB of the topic in memory, so the resent
    batch's msg-id is not in its copy. Taking the topic over, it reads the
    window's msg-ids from the rounds' ``ids/`` keys in etcd (below its
    copy), and the resend gets its original offset. (Before those keys,
    it was stored again at a new offset: the test fails without them.)"""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        for node in (a, b):
            tune(node, copy_bytes=4096)
        await publish_to_owner([a, b], "deep", [b"zero"], "p")
        owner = await settled_owner([a, b], "deep")
        other = b if owner is a else a
        first = await send_once(owner, "deep", named("order-1", b"the order"))
        assert isinstance(first, PubAck) and first.base_offset == 1, first
        fillers = [named(f"filler-{i}", b"x" * 200) for i in range(60)]
        async with raw_client(owner) as raw:
            await hello(raw, "fillers")
            for i, batch in enumerate(fillers):  # one at a time: a round each
                await raw.send_event(Publish(10 + i, "deep", batch, dedup=True))
                ack = await raw.next_event()
                assert isinstance(ack, PubAck) and ack.base_offset == 2 + i, ack
        copy = store_of(other).topic("deep").copy
        await wait_for(lambda: copy.next_offset == 62)
        assert copy.first_offset > 2  # "order-1" is only in the object store now
        await stop_gracefully(owner)  # the owner stops; the other takes the topic over
        again = await resend_until_taken(other, "deep", named("order-1", b"the order"))
        assert (again.base_offset, again.count) == (1, 1), again
        newest = await send_once(other, "deep", fillers[-1])  # in the copy: known as before
        assert isinstance(newest, PubAck) and newest.base_offset == 61, newest
        ack, _ = await publish_to_owner([other], "deep", [b"after"], "p")
        assert ack.base_offset == 62
        store = store_of(other)
        reader = PartitionReader(store.etcd, store.objects, "deep", 0, keys=store.settings.keys)
        payloads: list[bytes] = []
        offset = 0
        for _ in range(100):  # bounded: each read returns at least one batch
            batches = await reader.read(offset)
            if not batches:
                break
            payloads += [p for batch in batches for p, _ in decode_batch(batch.batch)]
            offset = batches[-1].next_offset
        assert payloads == [b"zero", b"the order"] + [b"x" * 200] * 60 + [b"after"]


async def test_a_round_after_a_failed_one_is_refused_with_it(urls: dict[str, str], tmp_path: Path) -> None:
    """Two syncs out at once (docs/cluster.md §5): the first one's PUT is
    held, and a publish arriving meanwhile gets a sync and a PUT of its
    own, its offset after the first's. The held PUT then fails (507): the
    first publish is refused, and so is the second, whose round is never
    committed (its offsets followed a round that was not); neither is
    delivered, and the next publish takes the first's offset. (One sync
    at a time, the second PUT waits for the first sync: the test fails so.)"""
    async with cluster_node(urls, "a", tmp_path) as a:
        ack, _ = await publish_to_owner([a], "chain", [b"zero"], "p")
        assert ack.base_offset == 0
        objects = store_of(a).objects
        real_put = objects.put_if_absent
        gate, first_put = trio.Event(), trio.Event()
        puts: list[str] = []

        async def held_then_full(key: str, data: bytes) -> bool:
            puts.append(key)
            if len(puts) == 1:
                first_put.set()
                await gate.wait()
                raise ObjectStoreError(f"put {key}: InsufficientStorage", 507, "InsufficientStorage")
            return await real_put(key, data)

        objects.put_if_absent = held_then_full  # type: ignore[method-assign]
        async with raw_client(a) as sub, raw_client(a) as first, raw_client(a) as second:
            await hello(sub, "sub")
            await sub.send_event(Subscribe(1, "chain", StartKind.EARLIEST, 0))
            assert await sub.next_event() == SubAck(1)
            assert await offsets_and_payloads(sub, 1) == [(0, b"zero")]
            for raw, name in ((first, "first"), (second, "second")):
                await hello(raw, name)
            await first.send_event(Publish(1, "chain", encode_batch([b"first"])))
            with trio.fail_after(WAIT):
                await first_put.wait()
            await second.send_event(Publish(2, "chain", encode_batch([b"second"])))
            await wait_for(lambda: len(puts) == 2)  # its PUT went while the first's is held
            gate.set()
            for raw, ref in ((first, 1), (second, 2)):
                with trio.fail_after(WAIT):
                    refused = await raw.next_event()
                assert isinstance(refused, Error) and refused.code == ErrorCode.STORAGE_ERROR, refused
                assert refused.ref == ref, refused
            objects.put_if_absent = real_put  # type: ignore[method-assign]
            ack, _ = await publish_to_owner([a], "chain", [b"third"], "p")
            assert ack.base_offset == 1
            assert await offsets_and_payloads(sub, 1) == [(1, b"third")]
        assert await committed_payloads(a, "chain") == [b"zero", b"third"]


async def test_two_rounds_out_when_the_owner_stops_are_refused_and_the_node_goes_on(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """Two syncs out at once when the owner stops: the first round's
    transaction is held, the second round's object is PUT and waits for
    it; the node's lease is revoked behind its back, so the owner stops
    with both out and answers both "outcome unknown". Each sync reports
    its own failure, the second's past the first's cut; the node goes on
    (it used to cut its copy a second time, past its end, and crash), joins
    again, and the topic continues from what etcd holds."""
    async with cluster_node(urls, "a", tmp_path) as a:
        ack, _ = await publish_to_owner([a], "stopped", [b"zero"], "p")
        assert ack.base_offset == 0
        store = store_of(a)
        etcd, objects = store.etcd, store.objects
        real_txn, real_put = etcd.txn, objects.put_if_absent
        gate, held = trio.Event(), trio.Event()
        puts: list[str] = []

        async def held_txn(*args: Any, **kwargs: Any) -> Any:
            if puts and not held.is_set():  # the first commit after arming
                held.set()
                await gate.wait()
            return await real_txn(*args, **kwargs)

        async def counted_put(key: str, data: bytes) -> bool:
            puts.append(key)
            return await real_put(key, data)

        etcd.txn = held_txn  # type: ignore[method-assign]
        objects.put_if_absent = counted_put  # type: ignore[method-assign]
        manager = store.manager
        assert manager is not None
        async with raw_client(a) as first, raw_client(a) as second:
            for raw, name in ((first, "first"), (second, "second")):
                await hello(raw, name)
            await first.send_event(Publish(1, "stopped", encode_batch([b"first"])))
            with trio.fail_after(WAIT):
                await held.wait()
            await second.send_event(Publish(2, "stopped", encode_batch([b"second"])))
            await wait_for(lambda: len(puts) == 2)
            async with Etcd(parse_cluster_urls(urls["cluster"], urls["object_store"]).etcd) as other:
                await other.revoke(manager.keeper.lease)
            await wait_for(lambda: store.manager is not manager)  # it stopped, and joins again
            gate.set()
            for raw, ref in ((first, 1), (second, 2)):
                with trio.fail_after(WAIT):
                    refused = await raw.next_event()
                assert isinstance(refused, Error) and refused.ref == ref, refused
        etcd.txn, objects.put_if_absent = real_txn, real_put  # type: ignore[method-assign]
        ack, _ = await publish_to_owner([a], "stopped", [b"after"], "p")
        assert ack.base_offset == 1  # the held round was refused: its owner key went with the lease
        assert await committed_payloads(a, "stopped") == [b"zero", b"after"]


async def test_a_put_the_object_store_refuses_is_refused_to_the_publisher(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """A storage shim fails the owner's next PUT as a full store would
    (507 InsufficientStorage): that publish gets STORAGE_ERROR, nothing of it
    is stored or delivered, and the next publish takes its offset."""
    async with cluster_node(urls, "a", tmp_path) as a:
        ack, _ = await publish_to_owner([a], "full", [b"zero"], "p")
        assert ack.base_offset == 0
        objects = store_of(a).objects
        real_put = objects.put_if_absent
        failures: list[str] = []

        async def full_once(key: str, data: bytes) -> bool:
            if not failures:
                failures.append(key)
                raise ObjectStoreError(f"put {key}: InsufficientStorage", 507, "InsufficientStorage")
            return await real_put(key, data)

        objects.put_if_absent = full_once  # type: ignore[method-assign]
        async with raw_client(a) as sub, raw_client(a) as pub:
            await hello(sub, "sub")
            await sub.send_event(Subscribe(1, "full", StartKind.EARLIEST, 0))
            assert await sub.next_event() == SubAck(1)
            await hello(pub, "pub")
            await pub.send_event(Publish(4, "full", encode_batch([b"refused"])))
            refused = await pub.next_event()
            assert isinstance(refused, Error) and refused.code == ErrorCode.STORAGE_ERROR, refused
            assert refused.ref == 4 and refused.fields == {"topic": "full"}, refused
            assert len(failures) == 1
            ack, _ = await publish_to_owner([a], "full", [b"one"], "p")
            assert ack.base_offset == 1
            assert await offsets_and_payloads(sub, 2) == [(0, b"zero"), (1, b"one")]
        assert await committed_payloads(a, "full") == [b"zero", b"one"]


async def test_a_group_made_through_another_node_is_made_at_the_owner(urls: dict[str, str], tmp_path: Path) -> None:
    """create_group on a node that does not own the topic: the client
    follows NOT_OWNER to the owner (reconnecting on) and the group is made
    there, holding what was published before its first member joins."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        await publish_to_owner([a, b], "jobs", [b"job-0"], "creator")
        owner = await settled_owner([a, b], "jobs")
        other = b if owner is a else a
        async with pybroker.connect(other.url, reconnect=True) as client:
            summary = await client.create_group("workers", "jobs", start="earliest")
            assert summary["created"] is True, summary
            assert client.reconnects == 1  # moved to the owner once
            async with client.subscribe("jobs", group="workers") as members:
                with trio.fail_after(WAIT):
                    message = await members.__anext__()
                assert message.payload == b"job-0"
                await message.ack()


async def test_kombu_hands_an_eta_to_a_cluster_node_which_holds_the_task(urls: dict[str, str], tmp_path: Path) -> None:
    """A cluster node keeps delayed messages (max_delay_ms in its WELCOME):
    the kombu transport hands it a task's eta, and the task comes when due,
    not before. The queue is declared before anything was published to it:
    its group registers the topic and waits for an owner."""
    kombu = pytest.importorskip("kombu")
    import pybroker.contrib.kombu  # noqa: F401 (registers pybroker://)

    due = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
    async with cluster_node(urls, "a", tmp_path) as a:

        def send_and_get() -> tuple[dict[str, Any], Any, datetime.datetime]:
            with kombu.Connection(f"pybroker://127.0.0.1:{a.port}") as conn:
                queue = conn.SimpleQueue("later")
                try:
                    queue.put({"task": "x"}, headers={"eta": due.isoformat()})
                    message = queue.get(timeout=WAIT)
                    arrived = datetime.datetime.now(datetime.timezone.utc)
                    message.ack()
                    return dict(message.headers), message.payload, arrived
                finally:
                    queue.close()

        headers, payload, arrived = await in_thread(send_and_get)
        assert a.broker.schedule.released == 1
    assert payload == {"task": "x"} and arrived >= due, (arrived, due)


async def test_a_cluster_node_takes_delayed_messages_over_tcp_and_http(urls: dict[str, str], tmp_path: Path) -> None:
    """A cluster node announces max_delay_ms and keeps a DELAYED publish
    not yet due in the cluster (tests/test_cluster_delayed.py has the
    rest); one already due is published at once, as on a single node; so
    is HTTP's ?delay=."""
    async with cluster_node(urls, "a", tmp_path) as a:
        async with raw_client(a) as raw:
            welcome = await raw.handshake("delays", {"error_fields": "1"})
            assert "max_delay_ms" in welcome.limits and "dedup_window_ms" in welcome.limits
        # Already due: published now (following NOT_OWNER until an owner has it).
        due = str(int(time.time() * 1000) - 1)
        ack, _ = await publish_to_owner([a], "timers", [(b"due", {"deliver-at": due})], "due", delayed=True)
        assert (ack.base_offset, ack.count) == (0, 1), ack
        reply = await post_json(a.http_port, "/v1/topics/timers/messages?delay=1", {"payload": "later"})
        assert reply.status == 200 and reply.json()["scheduled"] is True, reply
        async with pybroker.connect(a.url) as c:
            sub = await c.subscribe("timers", start="earliest")
            with trio.fail_after(WAIT):
                got = [m.payload async for m in _first(sub, 2)]
        assert got == [b"due", b"later"]


async def _first(sub: pybroker.Subscription, count: int) -> Any:
    n = 0
    async for message in sub:
        yield message
        n += 1
        if n == count:
            return


@pytest.mark.parametrize("publisher", ["fast", "client"])
async def test_pybroker_bench_runs_against_a_cluster_node(
    urls: dict[str, str], tmp_path: Path, publisher: str
) -> None:
    """``pybroker bench durable --url`` at a cluster node: its publisher
    finds the topic's owner without publishing (a group made and deleted:
    NOT_OWNER names the owner, or none until the new topic has one) and
    every message is acknowledged in order, verified."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path):
        out, workdir = tmp_path / "bench.json", tmp_path / "bench"
        workdir.mkdir()
        done = await trio.run_process(
            [
                *PYBROKER, "bench", "durable", "--url", a.url, "--messages", "2000", "--policies", "always",
                "--publisher", publisher, "--json", str(out), "--workdir", str(workdir), "--quiet",
            ],  # fmt: skip
            stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True, check=False, env=child_env(),
        )  # fmt: skip
        text = done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 0 and "NOT VERIFIED" not in text, text
        data = json.loads(out.read_text())
        assert data["verified"] is True and data["problems"] == []
        (row,) = data["scenarios"]["durable"]["rows"]
        assert row["acked"] == 2000 and row["ack_durability"] == {"DISK": 2000}
