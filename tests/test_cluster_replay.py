"""Reads older than a node's in-memory copy of a topic, in cluster mode
(docs/cluster.md §7): brokers in process on a real etcd and a real
SeaweedFS, each node's copy made small (``tune``) so that most of a topic
is only in the object store. Subscribers on the owner and on another node
replay it from offset 0, by ``earliest`` and by time, and so does a new
consumer group; a missing or damaged object in the old range is DATA_LOST
for exactly its range; below the partition's first index entry stays lost;
the fetches are single flight and bounded in number and bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from helpers.cluster_broker import (  # noqa: F401 (servers, urls: fixtures)
    WAIT,
    cluster_node,
    hello,
    publish_to_owner,
    servers,
    settled_owner,
    store_of,
    tune,
    urls,
    wait_for,
)
from helpers.http import get_json
from helpers.raw import RawClient, raw_client
from helpers.sse import events, stream
from pybroker.protocol import (
    Ack,
    AckKind,
    Deliver,
    GroupDeliver,
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
from pybroker.server.cluster.index import PartitionIndex
from pybroker.server.cluster.objects import ObjectStoreError
from pybroker.server.cluster.entries import decode_stored
from pybroker.server.cluster.tail import IndexedReader
from pybroker.server.server import Server
from pybroker.server.storage.errors import DataLoss, ReadPending

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

#: Small enough that a few hundred small batches overflow them many times.
SMALL = {"copy_bytes": 4096, "replay_bytes": 16384, "replay_fetches": 2}


async def publish_all(owner: Server, topic: str, batches: list[list[bytes]], *, at_once: int) -> None:
    """Publish ``batches`` to the owner, ``at_once`` in flight at a time
    (fewer means more rounds, so more index entries and objects)."""
    async with raw_client(owner) as pub:
        await hello(pub, "publisher")
        request = 0
        for start in range(0, len(batches), at_once):
            group = batches[start : start + at_once]
            for payloads in group:
                request += 1
                await pub.send_event(Publish(request, topic, encode_batch(payloads)))
            for _ in group:
                with trio.fail_after(WAIT):
                    ack = await pub.next_event()
                assert isinstance(ack, PubAck), ack


async def collect(raw: RawClient, sub_id: int, until: int) -> tuple[list[tuple[int, bytes, int]], list[Error]]:
    """What a subscription gets until it has gone past ``until - 1``: each
    message as (offset, payload, its batch's timestamp), and the DATA_LOST
    errors (a delivery or a loss moves the position on; nothing else may come)."""
    seen: list[tuple[int, bytes, int]] = []
    lost: list[Error] = []
    position = None
    with trio.fail_after(WAIT):
        while position is None or position < until:
            event = await raw.next_event()
            if isinstance(event, Deliver):
                assert event.sub_id == sub_id, event
                payloads = [p for p, _ in decode_batch(event.batch)]
                seen += [(event.base_offset + k, p, event.timestamp) for k, p in enumerate(payloads)]
                position = event.base_offset + len(payloads)
            else:
                assert isinstance(event, Error) and event.code == ErrorCode.DATA_LOST, event
                assert event.ref == sub_id and event.ref_kind is RefKind.SUBSCRIPTION and not event.fatal, event
                lost.append(event)
                position = int(event.fields["last"]) + 1
    return seen, lost


async def subscribe(raw: RawClient, name: str, topic: str, start: StartKind, value: int = 0) -> None:
    await hello(raw, name)
    await raw.send_event(Subscribe(1, topic, start, value))
    with trio.fail_after(WAIT):
        assert await raw.next_event() == SubAck(1)


async def with_history(
    a: Server, b: Server, topic: str, batches: list[list[bytes]], *, at_once: int, **settings: Any
) -> tuple[Server, Server, list[bytes]]:
    """Both nodes tuned (``SMALL`` and ``settings``), ``topic`` made by a
    first message ``m0``, then ``batches`` published at its owner; (the
    owner, the other node, every payload in order)."""
    for node in (a, b):
        tune(node, **{**SMALL, **settings})
    await publish_to_owner([a, b], topic, [b"m0"], "creator")
    owner = await settled_owner([a, b], topic)
    await publish_all(owner, topic, batches, at_once=at_once)
    return owner, (b if owner is a else a), [b"m0"] + [p for batch in batches for p in batch]


async def caught_up(node: Server, topic: str, end: int, floor: int = 0) -> None:
    """``node``'s copy of ``topic`` holds up to ``end``, knows the partition
    starts at ``floor``, and no longer holds it (it is only in the object store)."""
    store = store_of(node)

    def done() -> bool:
        log = store.topic(topic)
        return log.next_offset == end and log.floor == floor and log.copy.first_offset > floor

    await wait_for(done)


def check_bounds(node: Server) -> None:
    stats = store_of(node).replay.statistics()
    assert stats.fetches >= 1, stats
    assert 1 <= stats.peak_fetches <= store_of(node).replay.max_fetches, stats
    assert stats.peak_bytes <= stats.max_bytes, stats
    assert stats.in_flight == 0, stats


async def test_subscribers_on_the_owner_and_another_node_replay_from_zero(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        batches = [[f"m{i}.{j}-".encode() + b"x" * 90 for j in range(3)] for i in range(1, 151)]
        owner, other, want = await with_history(a, b, "old", batches, at_once=5)
        for node in (a, b):
            await caught_up(node, "old", len(want))
            assert store_of(node).topic("old").first_offset == 0

        async with raw_client(other) as sub_other, raw_client(owner) as sub_owner, raw_client(other) as sub_earliest:
            await subscribe(sub_other, "from-zero", "old", StartKind.OFFSET, 0)
            await subscribe(sub_owner, "from-zero", "old", StartKind.OFFSET, 0)
            await subscribe(sub_earliest, "earliest", "old", StartKind.EARLIEST)
            for raw in (sub_other, sub_owner, sub_earliest):
                seen, lost = await collect(raw, 1, len(want))
                assert lost == []
                assert [(offset, payload) for offset, payload, _ in seen] == list(enumerate(want))
        for node in (a, b):
            check_bounds(node)
        # The other node read everything below its copy from the object store,
        # in more than one fetch: its copy and its replay cache are far smaller
        # than the topic.
        stats = store_of(other).replay.statistics()
        assert stats.fetches > 2 and stats.pending >= stats.fetches, stats

        # By time: the timestamp of a batch far below the copy starts the
        # subscription at or before that batch (an index entry's first
        # batch carries the time), never after it.
        target = seen[200]
        async with raw_client(other) as sub_time:
            await subscribe(sub_time, "by-time", "old", StartKind.TIME, target[2])
            got, lost = await collect(sub_time, 1, len(want))
        assert lost == []
        first = got[0][0]
        assert first <= min(o for o, _, ts in seen if ts == target[2]), (first, target)
        assert [(offset, payload) for offset, payload, _ in got] == list(enumerate(want))[first:]


async def test_http_fetch_and_event_streams_wait_for_what_is_below_the_copy(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """``GET .../messages?from=0`` and ``GET .../events?from=0`` on a node
    whose copy holds only the newest messages: the rest is in the object
    store, so they wait for the node's fetches rather than report it lost."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        batches = [[f"m{i}.{j}-".encode() + b"x" * 90 for j in range(3)] for i in range(1, 101)]
        owner, other, want = await with_history(a, b, "web", batches, at_once=5)
        await caught_up(other, "web", len(want))
        port = other.http_port
        assert port is not None
        expected = [(i, p.decode()) for i, p in enumerate(want)]
        fetched = await get_json(port, f"/v1/topics/web/messages?from=0&limit={len(want)}")
        assert "missing" not in fetched, fetched.get("missing")
        assert [(m["offset"], m["payload"]) for m in fetched["messages"]] == expected
        assert fetched["next_offset"] == len(want)
        async with stream(port, "/v1/topics/web/events?from=0") as reader:
            got = await events(reader, len(want))
        assert {e["event"] for e in got} == {"message"}, [e for e in got if e["event"] != "message"][:1]
        assert [(e["data"]["offset"], e["data"]["payload"]) for e in got] == expected
        assert store_of(other).replay.statistics().pending >= 2


async def test_a_fetch_the_object_store_fails_is_retried_and_nothing_is_lost(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """A storage shim fails the other node's next four GETs (unreachable,
    as a store that is down would): its replay retries with a pause, the
    subscriber from offset 0 waits meanwhile, and gets every message,
    with no DATA_LOST."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        batches = [[f"m{i}.{j}-".encode() + b"x" * 90 for j in range(3)] for i in range(1, 61)]
        # A small read cache: the replay GETs rather than finding the ranges there.
        owner, other, want = await with_history(a, b, "flaky", batches, at_once=5, cache_bytes=4096)
        await caught_up(other, "flaky", len(want))
        objects = store_of(other).objects
        real_get = objects.get
        failed: list[str] = []

        async def down_for_four(key: str, start: int | None = None, end: int | None = None) -> bytes:
            if len(failed) < 4:
                failed.append(key)
                raise ObjectStoreError(f"injected: the store is unreachable for get {key}")
            return await real_get(key, start, end)

        objects.get = down_for_four  # type: ignore[method-assign]
        async with raw_client(other) as sub:
            await subscribe(sub, "from-zero", "flaky", StartKind.OFFSET, 0)
            seen, lost = await collect(sub, 1, len(want))
        assert lost == []
        assert [(offset, payload) for offset, payload, _ in seen] == list(enumerate(want))
        assert len(failed) == 4
        assert store_of(other).replay.statistics().retries >= 4


async def test_a_missing_or_damaged_object_below_the_copy_is_lost_for_its_range_only(
    urls: dict[str, str], tmp_path: Path
) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        batches = [[f"m{i}.{j}-".encode() + b"y" * 90 for j in range(2)] for i in range(1, 91)]
        owner, _other, want = await with_history(a, b, "holey", batches, at_once=3)
        # An object in the lower third of the topic goes from the store; a
        # later one gets a byte flipped in its range (its CRC fails).
        objects = store_of(owner).objects
        entries = store_of(owner).topic("holey").reader.index.entries()  # type: ignore[union-attr]
        assert len(entries) > 10, entries
        gone = next(e for e in entries if e.first >= len(want) // 4)
        await objects.delete(gone.object)
        gone_range = range(gone.first, gone.first + gone.count)
        # (An entry of several batches: a round that took more than one publish.)
        bad = next(e for e in entries if e.first >= gone.first + gone.count + 10 and e.count > 2)
        data = bytearray(await objects.get(bad.object))
        # The entry's last batch is damaged: only its offsets are lost (the
        # intact batches before it in the entry are served).
        last_batch = decode_stored(bytes(data[bad.start : bad.start + bad.size]), bad.first, bad.count, "holey")[-1]
        data[bad.start + bad.size - 2] ^= 0xFF
        await objects.delete(bad.object)
        assert await objects.put_if_absent(bad.object, bytes(data))
        bad_range = range(last_batch.base_offset, last_batch.next_offset)

        # A node that has never read it (its range cache is cold).
        async with cluster_node(urls, "c", tmp_path) as c:
            store = tune(c, **SMALL)
            # One more publish: the copies evict to their new bound as it comes.
            await publish_all(owner, "holey", [[b"last"]], at_once=1)
            want.append(b"last")
            await caught_up(c, "holey", len(want))
            assert store.topic("holey").copy.first_offset > bad_range[-1] > gone_range[-1]
            async with raw_client(c) as raw:
                await subscribe(raw, "replay", "holey", StartKind.OFFSET, 0)
                seen, lost = await collect(raw, 1, len(want))
            assert [e.fields for e in lost] == [
                {"topic": "holey", "first": str(gone_range[0]), "last": str(gone_range[-1]), "reason": "missing"},
                {"topic": "holey", "first": str(bad_range[0]), "last": str(bad_range[-1]), "reason": "damaged"},
            ]
            assert [(o, p) for o, p, _ in seen] == [
                (o, p) for o, p in enumerate(want) if o not in gone_range and o not in bad_range
            ]
            check_bounds(c)
            stats = store.replay.statistics()
            assert stats.lost == 2, stats  # each found once: the reader went on past it, no fetch again
            # A read in the lost range says so again, for its range from there.
            with pytest.raises(DataLoss) as again:
                store.topic("holey").read(gone_range[-1], 1 << 20)
            assert not isinstance(again.value, ReadPending)
            found = (again.value.first, again.value.last, again.value.reason)
            assert found == (gone_range[-1], gone_range[-1], "missing")


async def test_below_the_first_index_entry_stays_lost(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        batches = [[f"m{i}-".encode() + b"v" * 150] for i in range(1, 61)]
        owner, other, want = await with_history(a, b, "cut", batches, at_once=3)
        for node in (a, b):
            await caught_up(node, "cut", len(want))
        # The partition's first entry goes from etcd, as retention would cut it.
        store = store_of(owner)
        assert await store.etcd.delete(store.settings.keys.index("cut", 0, 0)) == 1

        async with cluster_node(urls, "c", tmp_path) as c:
            fresh = tune(c, **SMALL)
            await publish_all(owner, "cut", [[b"last"]], at_once=1)
            want.append(b"last")
            await caught_up(c, "cut", len(want), floor=1)
            log = fresh.topic("cut")
            assert log.first_offset == 1
            with pytest.raises(DataLoss) as below:
                log.read(0, 1 << 20)
            assert not isinstance(below.value, ReadPending)
            assert (below.value.first, below.value.last, below.value.reason) == (0, 0, "retention")
            # From offset 0: clamped to what is retained, as on one node.
            async with raw_client(c) as raw:
                await subscribe(raw, "from-zero", "cut", StartKind.OFFSET, 0)
                seen, lost = await collect(raw, 1, len(want))
            assert lost == []
            assert [(o, p) for o, p, _ in seen] == list(enumerate(want))[1:]
        # A node that learnt the floor before the cut finds it when it fetches.
        async with raw_client(other) as raw:
            await subscribe(raw, "stale-floor", "cut", StartKind.OFFSET, 0)
            seen, lost = await collect(raw, 1, len(want))
        assert [e.fields for e in lost] == [{"topic": "cut", "first": "0", "last": "0", "reason": "retention"}]
        assert [(o, p) for o, p, _ in seen] == list(enumerate(want))[1:]


async def test_one_fetch_per_range_and_a_batch_larger_than_the_bound(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a:
        # Each batch is larger than the copy and the replay cache hold.
        store = tune(a, copy_bytes=2048, replay_bytes=1024, replay_fetches=1)
        await publish_to_owner([a], "big", [b"b0" + b"z" * 3000], "creator")
        await settled_owner([a], "big")
        batches = [[f"b{i}".encode() + b"z" * 3000] for i in range(1, 10)]
        await publish_all(a, "big", batches, at_once=1)
        want = [b"b0" + b"z" * 3000] + [p for batch in batches for p in batch]
        await caught_up(a, "big", len(want))
        log = store.topic("big")
        assert log.copy.first_offset == len(want) - 1  # the newest batch only

        # Readers of one range, and of an offset after it, wait for one fetch.
        with pytest.raises(ReadPending) as one:
            log.read(0, 1 << 20)
        with pytest.raises(ReadPending) as two:
            log.read(0, 1 << 20)
        with pytest.raises(ReadPending) as three:
            log.read(4, 1 << 20)
        assert one.value.waitable is two.value.waitable is three.value.waitable
        assert (one.value.topic, one.value.first, one.value.last) == ("big", 0, len(want) - 2)
        assert store.replay.statistics().fetches == 1
        with trio.fail_after(WAIT):
            await one.value.waitable.wait()  # type: ignore[attr-defined]
        got = log.read(0, 1 << 20)
        assert [b.base_offset for b in got] == [0]  # one batch: the bound
        assert decode_batch(got[0].batch)[0][0] == want[0]

        # A subscriber from 0 gets every batch, each alone over the bound
        # (kept as the newest: no fetch of the same range forever).
        async with raw_client(a) as raw:
            await subscribe(raw, "replay", "big", StartKind.EARLIEST)
            seen, lost = await collect(raw, 1, len(want))
        assert lost == []
        assert [(o, p) for o, p, _ in seen] == list(enumerate(want))
        stats = store.replay.statistics()
        assert stats.peak_fetches == 1 and stats.in_flight == 0, stats
        assert stats.batches == 1 and stats.peak_bytes <= 3100, stats
        assert stats.fetches <= len(want), stats


async def test_a_fetch_waits_for_an_index_view_that_lags_the_commits(urls: dict[str, str], tmp_path: Path) -> None:
    # A view's watch may lag the commits a node's copy already holds (a
    # busy machine): the fetch must wait for it, not take the range for
    # cut by retention (seen once in CI). Here the view stops following
    # before anything is published, and follows again once the fetch runs.
    async with cluster_node(urls, "a", tmp_path) as a:
        store = store_of(a)
        index = PartitionIndex(store.etcd, *store.address("lag"), keys=store.settings.keys)
        reader = IndexedReader(index, store.cache)
        async with trio.open_nursery() as nursery:
            following = trio.CancelScope()

            async def follow() -> None:
                with following:
                    await index.run()

            nursery.start_soon(follow)
            with trio.fail_after(WAIT):
                await index.wait_loaded()
            following.cancel()
            await publish_to_owner([a], "lag", [b"l0"], "creator")
            await settled_owner([a], "lag")
            await publish_all(a, "lag", [[b"l1"], [b"l2"]], at_once=1)
            assert index.next_offset == 0  # the view saw none of it

            with pytest.raises(ReadPending) as pending:
                store.replay.read("lag", reader, 0, 3, 1 << 20)
            nursery.start_soon(index.run)  # the view catches up
            with trio.fail_after(WAIT):
                await pending.value.waitable.wait()  # type: ignore[attr-defined]
            got = store.replay.read("lag", reader, 0, 3, 1 << 20)
            assert [decode_batch(b.batch)[0][0] for b in got] == [b"l0", b"l1", b"l2"]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("ordering", ["", "key"])
async def test_a_new_group_from_earliest_gets_what_is_below_the_copy(
    urls: dict[str, str], tmp_path: Path, ordering: str
) -> None:
    async with cluster_node(urls, "a", tmp_path) as a:
        store = tune(a, **SMALL)
        await publish_to_owner([a], "jobs", [b"m0"], "creator")
        await settled_owner([a], "jobs")
        batches = [[f"m{i}.{j}-".encode() + b"w" * 90 for j in range(3)] for i in range(1, 101)]
        await publish_all(a, "jobs", batches, at_once=5)
        want = [b"m0"] + [p for batch in batches for p in batch]
        await caught_up(a, "jobs", len(want))
        got: list[tuple[int, bytes]] = []
        async with raw_client(a) as raw:
            await hello(raw, "member")
            options = {"group": "late", "ordering": ordering} if ordering else {"group": "late"}
            await raw.send_event(Subscribe(1, "jobs", StartKind.EARLIEST, 0, options=options))
            with trio.fail_after(WAIT):
                assert await raw.next_event() == SubAck(1)
                while len(got) < len(want):
                    event = await raw.next_event()
                    assert isinstance(event, GroupDeliver) and event.deliveries == 1, event
                    payloads = [p for p, _ in decode_batch(event.batch)]
                    got += [(event.base_offset + k, p) for k, p in enumerate(payloads)]
                    last = event.base_offset + len(payloads) - 1
                    await raw.send_event(Ack(1, AckKind.ACK, "jobs", ((event.base_offset, last),)))
        assert sorted(got) == list(enumerate(want))
        group = a.broker.groups.groups["late"]
        assert group.lost == 0
        check_bounds(a)
        assert store.replay.statistics().fetches > 2
