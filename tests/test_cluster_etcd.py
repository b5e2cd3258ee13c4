"""The etcd client (pybroker.server.cluster.etcd) against a real etcd 3.4.

One etcd per module (started by tests/helpers/cluster.py on free loopback
ports); each test works under its own key prefix. Skipped only when the
etcd binary is absent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from helpers.cluster import etcd_cluster, etcd_server, free_ports
from pybroker.server.cluster.etcd import (
    Compare,
    Delete,
    Etcd,
    EtcdError,
    EtcdUnavailable,
    Get,
    LeaseNotFound,
    Put,
    WatchCanceled,
    prefix_end,
)

#: Bound on any one test's waits.
WAIT = 20.0


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with etcd_server(tmp_path_factory.mktemp("etcd")) as (url, _server):
        yield url


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> bytes:
    return f"test/{request.node.name}/".encode()


def test_prefix_end() -> None:
    assert prefix_end(b"own/") == b"own0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\x00"  # every key from there on
    assert prefix_end(b"") == b"\x00"


async def test_put_get_prefix_delete(etcd_url: str, prefix: bytes) -> None:
    async with Etcd(etcd_url) as etcd:
        assert await etcd.get(prefix + b"a") is None
        rev_a = await etcd.put(prefix + b"a", b"1")
        rev_b = await etcd.put(prefix + b"b", b"\x00\xff binary")
        assert rev_b > rev_a
        await etcd.put(prefix + b"c/d", b"3")
        await etcd.put(prefix[:-1] + b"0", b"outside")  # just past the prefix
        kv = await etcd.get(prefix + b"a")
        assert kv is not None and kv.value == b"1" and kv.create_revision == kv.mod_revision == rev_a and kv.version == 1
        await etcd.put(prefix + b"a", b"one")
        kv2 = await etcd.get(prefix + b"a")
        assert kv2 is not None and kv2.value == b"one" and kv2.create_revision == rev_a and kv2.version == 2
        everything = await etcd.get_prefix(prefix)
        assert [kv.key for kv in everything.kvs] == [prefix + b"a", prefix + b"b", prefix + b"c/d"]
        assert everything.kvs[1].value == b"\x00\xff binary" and not everything.more and everything.count == 3
        page = await etcd.get_prefix(prefix, limit=2)
        assert len(page.kvs) == 2 and page.more and page.count == 3
        assert await etcd.delete(prefix + b"c", prefix=True) == 1
        assert await etcd.delete(prefix, prefix=True) == 2
        assert (await etcd.get_prefix(prefix)).kvs == []
        assert await etcd.get(prefix[:-1] + b"0") is not None


async def test_txn_compares_each_target(etcd_url: str, prefix: bytes) -> None:
    key, other = prefix + b"k", prefix + b"other"
    async with Etcd(etcd_url) as etcd:
        # Create only if absent: create_revision == 0.
        created = await etcd.txn([Compare.create_revision(key, "==", 0)], [Put(key, b"v1")], [Get(key)])
        assert created.succeeded
        again = await etcd.txn([Compare.create_revision(key, "==", 0)], [Put(key, b"v2")], [Get(key)])
        assert not again.succeeded
        (kvs,) = again.responses
        assert isinstance(kvs, list) and kvs[0].value == b"v1" and kvs[0].create_revision == created.revision
        kv = await etcd.get(key)
        assert kv is not None
        # mod_revision, version and value, true and false; both writes in one branch.
        for compare, holds in [
            (Compare.mod_revision(key, "==", kv.mod_revision), True),
            (Compare.mod_revision(key, "<", kv.mod_revision), False),
            (Compare.version(key, "==", 1), True),
            (Compare.version(key, ">", 1), False),
            (Compare.value(key, "==", b"v1"), True),
            (Compare.value(key, "!=", b"v1"), False),
        ]:
            result = await etcd.txn([compare], [Put(other, b"ran")], [Delete(other)])
            assert result.succeeded is holds, compare
            assert ((await etcd.get(other)) is not None) is holds
        # Several compares: all must hold; several writes: all happen together.
        both = await etcd.txn(
            [Compare.value(key, "==", b"v1"), Compare.create_revision(key, "==", kv.create_revision)],
            [Put(key, b"v3"), Put(other, b"x"), Delete(prefix + b"none")],
        )
        assert both.succeeded and both.responses[2] == 0
        assert (await etcd.get(key)).value == b"v3"  # type: ignore[union-attr]


async def test_lease_keepalive_revoke_deletes_its_keys(etcd_url: str, prefix: bytes) -> None:
    async with Etcd(etcd_url) as etcd:
        lease, ttl = await etcd.grant(10)
        assert ttl == 10
        await etcd.put(prefix + b"member", b"node-1", lease=lease)
        kv = await etcd.get(prefix + b"member")
        assert kv is not None and kv.lease == lease
        assert await etcd.keepalive(lease) == 10
        assert 0 < await etcd.time_to_live(lease) <= 10
        await etcd.revoke(lease)
        assert await etcd.get(prefix + b"member") is None
        assert await etcd.time_to_live(lease) == -1
        with pytest.raises(LeaseNotFound):
            await etcd.keepalive(lease)
        with pytest.raises(LeaseNotFound):
            await etcd.revoke(lease)
        with pytest.raises(EtcdError, match="lease not found") as refused:
            await etcd.put(prefix + b"member", b"late", lease=lease)
        assert refused.value.code == 5


async def test_watch_delivers_puts_and_deletes(etcd_url: str, prefix: bytes) -> None:
    async with Etcd(etcd_url) as etcd:
        with trio.fail_after(WAIT):
            async with etcd.watch(prefix, prefix=True, prev_kv=True) as watch:
                rev = await etcd.put(prefix + b"index/0", b"obj-0")
                await etcd.put(prefix[:-1] + b"0", b"not under the prefix")
                await etcd.delete(prefix + b"index/0")
                first = await watch.__anext__()
                assert first.revision == rev
                assert [(e.type, e.kv.key, e.kv.value) for e in first.events] == [("PUT", prefix + b"index/0", b"obj-0")]
                second = await watch.__anext__()
                (gone,) = second.events
                assert gone.type == "DELETE" and gone.kv.key == prefix + b"index/0"
                assert gone.prev_kv is not None and gone.prev_kv.value == b"obj-0"


async def test_watch_from_a_past_revision_replays_history(etcd_url: str, prefix: bytes) -> None:
    async with Etcd(etcd_url) as etcd:
        first = await etcd.put(prefix + b"n", b"1")
        await etcd.put(prefix + b"n", b"2")
        with trio.fail_after(WAIT):
            async with etcd.watch(prefix + b"n", start_revision=first) as watch:
                seen: list[bytes] = []
                async for batch in watch:
                    seen += [e.kv.value for e in batch.events]
                    if len(seen) == 2:
                        break
        assert seen == [b"1", b"2"]


async def test_watch_from_a_compacted_revision_is_canceled(etcd_url: str, prefix: bytes) -> None:
    async with Etcd(etcd_url) as etcd:
        old = await etcd.put(prefix + b"x", b"1")
        now = await etcd.put(prefix + b"x", b"2")
        await etcd.compact(now)
        with trio.fail_after(WAIT):
            async with etcd.watch(prefix + b"x", start_revision=old) as watch:
                with pytest.raises(WatchCanceled) as canceled:
                    await watch.__anext__()
        assert canceled.value.compact_revision == now


async def test_unreachable_etcd_is_a_clear_error() -> None:
    (port,) = free_ports(1)  # nothing listens there
    async with Etcd(f"http://127.0.0.1:{port}", timeout=2) as etcd:
        with pytest.raises(EtcdUnavailable, match=f"127.0.0.1:{port}"):
            await etcd.get(b"x")
        with trio.fail_after(WAIT):
            with pytest.raises(EtcdUnavailable):
                async with etcd.watch(b"x"):
                    pass


async def test_a_paused_etcd_is_a_timeout_not_a_hang(tmp_path: Path) -> None:
    """SIGSTOP the server: calls give up at the client's timeout."""
    with etcd_server(tmp_path) as (url, server):
        async with Etcd(url, timeout=1) as etcd:
            await etcd.put(b"k", b"v")
            server.pause()
            try:
                with trio.fail_after(WAIT):
                    with pytest.raises(EtcdUnavailable, match="did not answer"):
                        await etcd.put(b"k", b"w")
            finally:
                server.resume()
            with trio.fail_after(WAIT):
                assert (await etcd.get(b"k")) is not None


async def test_the_client_fails_over_when_the_leader_is_killed(tmp_path: Path) -> None:
    """Three members; the client's first endpoint is the leader, which is
    SIGKILLed. Calls move to the other members, and a lease granted before
    survives the election (the new leader refreshes leases)."""
    with etcd_cluster(tmp_path, 3) as members:
        urls = [url for url, _server in members]
        with trio.fail_after(WAIT):
            async with Etcd(urls) as probe:
                _me, leader = await probe.status()
                leader_url = ""
                for url in urls:
                    async with Etcd(url) as one:
                        if (await one.status())[0] == leader:
                            leader_url = url
            assert leader_url, "no member is the leader"
            ordered = [leader_url] + [u for u in urls if u != leader_url]
            async with Etcd(ordered, timeout=2) as etcd:
                lease, _ = await etcd.grant(10)
                created = await etcd.txn([Compare.create_revision(b"own/t/0", "==", 0)], [Put(b"own/t/0", b"a", lease)])
                assert created.succeeded and etcd.url == leader_url
                dict(members)[leader_url].kill()
                # Until the others have elected a leader, calls may be refused
                # as unavailable: try again, a bounded number of times.
                for _attempt in range(100):
                    try:
                        fenced = await etcd.txn(
                            [Compare.create_revision(b"own/t/0", "==", created.revision)], [Put(b"next/t/0", b"1")]
                        )
                        break
                    except EtcdUnavailable:
                        await trio.sleep(0.1)
                else:
                    raise AssertionError("no etcd member took the write after the leader died")
                assert fenced.succeeded and etcd.url != leader_url
                assert await etcd.keepalive(lease) == 10
                _me, new_leader = await etcd.status()
                assert new_leader not in (0, leader)
