"""Ownership and fencing on a real etcd (docs/cluster.md, "Fencing").

An owner holds ``own/{topic}/{partition}``, created only if absent, under
its lease; its epoch is that key's create revision. Every write it makes is
one transaction comparing that create revision, so once its lease is gone
(revoked, expired, or expired while the process was stopped) and another
node has created the key anew, etcd itself refuses the old owner's writes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from helpers.cluster import Server, etcd_server
from pybroker.server.cluster.etcd import Compare, Etcd, Get, Put
from pybroker.server.cluster.lease import LeaseKeeper, LeaseLost

WAIT = 30.0
#: etcd's smallest TTL with its default election timeout is about 2 s.
TTL = 2


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with etcd_server(tmp_path_factory.mktemp("etcd")) as (url, _server):
        yield url


@pytest.fixture
def keys(request: pytest.FixtureRequest) -> tuple[bytes, bytes, bytes]:
    """(owner key, next-offset key, index prefix) of one test's partition."""
    topic = request.node.name.encode()
    return b"own/" + topic + b"/0", b"next/" + topic + b"/0", b"idx/" + topic + b"/0/"


async def acquire(etcd: Etcd, own: bytes, node: bytes, lease: int) -> int | None:
    """Create the owner key if absent; its create revision (the epoch), or
    None if another node holds it."""
    result = await etcd.txn([Compare.create_revision(own, "==", 0)], [Put(own, node, lease)], [Get(own)])
    return result.revision if result.succeeded else None


async def fenced_append(etcd: Etcd, own: bytes, epoch: int, next_key: bytes, index: bytes, expected: int, count: int) -> bool:
    """The append path's one transaction: the epoch and the expected next
    offset must hold; then next offset and index entry are written together."""
    compare = [Compare.create_revision(own, "==", epoch)]
    if expected == 0:
        compare.append(Compare.create_revision(next_key, "==", 0))
    else:
        compare.append(Compare.value(next_key, "==", str(expected).encode()))
    writes = [Put(next_key, str(expected + count).encode()), Put(index + b"%020d" % expected, b"object-%d" % epoch)]
    return (await etcd.txn(compare, writes)).succeeded


async def test_a_new_owner_fences_the_old_one(etcd_url: str, keys: tuple[bytes, bytes, bytes]) -> None:
    own, next_key, index = keys
    with trio.fail_after(WAIT):
        async with Etcd(etcd_url) as etcd:
            lease_a, _ = await etcd.grant(10)
            lease_b, _ = await etcd.grant(10)
            epoch_a = await acquire(etcd, own, b"node-a", lease_a)
            assert epoch_a is not None
            assert await acquire(etcd, own, b"node-b", lease_b) is None  # A holds it
            assert await fenced_append(etcd, own, epoch_a, next_key, index, 0, 3)
            assert not await fenced_append(etcd, own, epoch_a, next_key, index, 0, 3)  # offset 0 is taken
            assert await fenced_append(etcd, own, epoch_a, next_key, index, 3, 2)
            await etcd.revoke(lease_a)  # A gives up (or its lease ends)
            epoch_b = await acquire(etcd, own, b"node-b", lease_b)
            assert epoch_b is not None and epoch_b > epoch_a
            # A still believes it owns the partition and its next offset is 5:
            # etcd refuses it on the epoch alone.
            assert not await fenced_append(etcd, own, epoch_a, next_key, index, 5, 1)
            assert await fenced_append(etcd, own, epoch_b, next_key, index, 5, 1)
            assert (await etcd.get(next_key)).value == b"6"  # type: ignore[union-attr]
            entries = (await etcd.get_prefix(index)).kvs
            assert [(kv.key[len(index) :], kv.value) for kv in entries] == [
                (b"%020d" % 0, b"object-%d" % epoch_a),
                (b"%020d" % 3, b"object-%d" % epoch_a),
                (b"%020d" % 5, b"object-%d" % epoch_b),
            ]
            # The same node coming back under a new lease is a new epoch too.
            await etcd.revoke(lease_b)
            lease_a2, _ = await etcd.grant(10)
            epoch_a2 = await acquire(etcd, own, b"node-a", lease_a2)
            assert epoch_a2 is not None and epoch_a2 > epoch_b
            assert not await fenced_append(etcd, own, epoch_a, next_key, index, 6, 1)
            assert not await fenced_append(etcd, own, epoch_b, next_key, index, 6, 1)
            await etcd.revoke(lease_a2)


async def test_an_owner_stops_trusting_its_lease_before_etcd_expires_it(
    etcd_url: str, keys: tuple[bytes, bytes, bytes]
) -> None:
    """A's lease is not renewed. By A's own monotonic clock it stops holding
    before etcd deletes the owner key; then B takes over and A is fenced."""
    own, next_key, index = keys
    with trio.fail_after(WAIT):
        async with Etcd(etcd_url) as etcd:
            keeper = LeaseKeeper(etcd, TTL, margin=0.2)
            lease_a = await keeper.grant()
            epoch_a = await acquire(etcd, own, b"node-a", lease_a)
            assert epoch_a is not None and keeper.held()
            async with etcd.watch(own) as watch:
                batch = await watch.__anext__()  # the lease expires: etcd deletes the key
                deleted_at = trio.current_time()
            assert [e.type for e in batch.events] == ["DELETE"]
            assert not keeper.held() and keeper.safe_until <= deleted_at
            lease_b, _ = await etcd.grant(10)
            epoch_b = await acquire(etcd, own, b"node-b", lease_b)
            assert epoch_b is not None
            assert not await fenced_append(etcd, own, epoch_a, next_key, index, 0, 1)
            assert await fenced_append(etcd, own, epoch_b, next_key, index, 0, 1)
            with pytest.raises(LeaseLost):
                await keeper.run()
            assert keeper.lost.is_set()
            await etcd.revoke(lease_b)


async def test_a_kept_lease_outlives_its_ttl(etcd_url: str, keys: tuple[bytes, bytes, bytes]) -> None:
    own = keys[0]
    async with Etcd(etcd_url) as etcd:
        keeper = LeaseKeeper(etcd, TTL, margin=0.2)
        lease = await keeper.grant()
        assert await acquire(etcd, own, b"node-a", lease) is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keeper.run)
            async with etcd.watch(own) as watch:
                # Three TTLs in which the key must not go (waiting for an
                # event that must not come: the window is the test).
                with trio.move_on_after(3 * TTL) as window:
                    await watch.__anext__()
                assert window.cancelled_caught, "the owner key went while its lease was kept"
            assert keeper.held() and keeper.renewals >= 3
            nursery.cancel_scope.cancel()
        with trio.fail_after(WAIT):
            await keeper.revoke()
            assert await etcd.get(own) is None


CHILD = """
import json, sys, trio
from pybroker.server.cluster.etcd import Compare, Etcd, Put
from pybroker.server.cluster.lease import LeaseKeeper, LeaseLost

async def main(url, own, next_key):
    async with Etcd(url, timeout=2) as etcd:
        keeper = LeaseKeeper(etcd, 2, margin=0.2)
        lease = await keeper.grant()
        result = await etcd.txn([Compare.create_revision(own, "==", 0)], [Put(own, b"child", lease)])
        assert result.succeeded
        print(json.dumps({"event": "owner", "epoch": result.revision}), flush=True)
        try:
            await keeper.run()
        except LeaseLost as lost:
            held = keeper.held()
            write = await etcd.txn([Compare.create_revision(own, "==", result.revision)], [Put(next_key, b"from the child")])
            print(json.dumps({"event": "lost", "held": held, "wrote": write.succeeded, "why": str(lost)}), flush=True)

trio.run(main, sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode())
"""


async def test_an_owner_stopped_past_its_lease_is_fenced_when_it_resumes(
    tmp_path: Path, etcd_url: str, keys: tuple[bytes, bytes, bytes]
) -> None:
    """A process keeping its lease alive is SIGSTOPped: the lease expires,
    B takes over; SIGCONT: the process finds its lease lost by its own
    clock, and its fenced write is refused by etcd."""
    own, next_key, _index = keys
    child = Server("owner", [sys.executable, "-c", CHILD, etcd_url, own.decode(), next_key.decode()], r'"owner"', tmp_path)
    try:
        await trio.to_thread.run_sync(child.wait_ready, WAIT)
        epoch_a = json.loads(child.wait_line(r'"owner"'))["epoch"]
        with trio.fail_after(WAIT):
            async with Etcd(etcd_url) as etcd:
                async with etcd.watch(own) as watch:
                    child.pause()
                    batch = await watch.__anext__()
                assert [e.type for e in batch.events] == ["DELETE"]
                lease_b, _ = await etcd.grant(10)
                epoch_b = await acquire(etcd, own, b"node-b", lease_b)
                assert epoch_b is not None and epoch_b > epoch_a
                child.resume()
                lost = json.loads(await trio.to_thread.run_sync(child.wait_line, r'"lost"', WAIT))
                assert lost["held"] is False and lost["wrote"] is False, lost
                assert await etcd.get(next_key) is None
                await etcd.revoke(lease_b)
    finally:
        child.kill()


async def test_an_owner_cut_off_from_etcd_stops_holding_by_its_deadline(tmp_path: Path) -> None:
    """etcd stops answering (SIGSTOP): renewals time out, and the keeper
    gives the lease up at its deadline instead of waiting on etcd."""
    with etcd_server(tmp_path) as (url, server):
        async with Etcd(url, timeout=1) as etcd:
            keeper = LeaseKeeper(etcd, TTL, margin=0.2)
            await keeper.grant()
            server.pause()
            try:
                with trio.fail_after(WAIT):
                    with pytest.raises(LeaseLost, match="not renewed before its deadline"):
                        await keeper.run()
                lost_at = trio.current_time()
            finally:
                server.resume()
            assert not keeper.held() and keeper.lost.is_set() and keeper.renewals == 0
            # It gave up at its deadline (a loose bound: hanging on the paused
            # etcd would end only at WAIT).
            assert keeper.safe_until <= lost_at < keeper.safe_until + 5.0
