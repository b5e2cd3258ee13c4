"""Storage faults: a full disk, failing writes and fsyncs, two brokers on one
directory. What the broker promises (README, "Durability"): nothing refused
is ever stored or delivered, nothing acknowledged is ever lost, no torn batch
stays in the log, the broker answers instead of hanging or crashing, and
publishing resumes by itself when the disk recovers.

Faults are injected where the log calls the file system (tests/helpers/faults.py)
into a real broker on loopback with the real file store, driven by the real
client and HTTP; a second set uses the kernel's own limits (RLIMIT_FSIZE,
a small tmpfs where the machine allows mounting one) on a `pybroker serve`
subprocess.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio

import pybroker as client
from pybroker.server.config import Config
from pybroker.server.storage import DataDirLocked, FileStore
from pybroker.server.server import Server, run_broker
from pybroker.protocol import Durability, Publish, encode_batch

from helpers.faults import FaultyOps
from helpers.http import assert_error, get_json, post_json, request
from helpers.logs import open_store
from helpers.procs import find_event, run, spawn
from helpers.raw import raw_client

TIMEOUT = 15.0


@asynccontextmanager
async def broker(store: FileStore, **overrides: Any) -> AsyncIterator[Server]:
    overrides.setdefault("retention_check_seconds", 0.05)  # the probe while degraded
    async with run_broker(
        Config(), store=store, host="127.0.0.1", port=0, http_port=0, data_dir=store.data_dir, **overrides
    ) as server:
        yield server


async def replay(url: str, topic: str, n: int) -> list[tuple[int, bytes]]:
    """(offset, payload) of the first ``n`` messages of ``topic`` from the start."""
    out: list[tuple[int, bytes]] = []
    with trio.fail_after(TIMEOUT):
        async with client.connect(url, name="replay") as c:
            async with c.subscribe(topic, start="earliest") as sub:
                async for msg in sub:
                    out.append((msg.offset, msg.payload))
                    if len(out) == n:
                        break
    return out


async def end_offset(url: str, topic: str) -> int:
    async with client.connect(url, name="info") as c:
        [info] = await c.topics(topic)
        return info.next_offset


def segment_files(data_dir: Path, topic: str) -> list[Path]:
    return sorted((data_dir / "topics" / topic).glob("*.log"))


# -- 1. a full disk -------------------------------------------------------------


@pytest.mark.parametrize("how", ["enospc", "short-write", "index-write", "eio"])
async def test_failed_append_is_refused_and_leaves_no_torn_batch(tmp_path: Path, how: str) -> None:
    """The reproduction of the issue: publish onto a disk that fills up, free
    space, publish more, replay, restart. Every acknowledged message is there
    at its offset, the refused one is nowhere, no offset is used twice."""
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with broker(store) as server:
        async with client.connect(server.url, name="pub") as c:
            acked = [await c.publish("jobs", b"before-%d" % i) for i in range(10)]
            size_before = segment_files(tmp_path, "jobs")[-1].stat().st_size
            if how == "enospc":
                ops.fill()
            elif how == "short-write":
                ops.short_next("writev")
            elif how == "index-write":
                # The log write succeeds, the index entry after it does not:
                # the batch must be cut back off the log too.
                store.topic("jobs").segments[-1]._since_index = 1 << 30
                ops.fail_next("write", errno.ENOSPC)
            else:
                ops.fail_next("writev", errno.EIO)
            expected = client.StorageError if how == "eio" else client.StorageFull
            with trio.fail_after(TIMEOUT), pytest.raises(expected) as refused:
                await c.publish("jobs", b"refused")
            assert refused.value.error_code is (
                client.ErrorCode.STORAGE_ERROR if how == "eio" else client.ErrorCode.STORAGE_FULL
            )
            # Nothing of it stays in the file, and the connection goes on.
            assert segment_files(tmp_path, "jobs")[-1].stat().st_size == size_before
            ops.free()
            acked += [await c.publish("jobs", b"after-%d" % i) for i in range(40)]
        offsets = [a.offset for a in acked]
        assert offsets == list(range(50))
        assert {a.durability for a in acked} == {Durability.DISK}
        got = await replay(server.url, "jobs", 50)
        assert got == [(i, b"before-%d" % i) for i in range(10)] + [
            (10 + i, b"after-%d" % i) for i in range(40)
        ]
        assert await end_offset(server.url, "jobs") == 50
    # After a restart: nothing to repair, everything there, offsets go on.
    store = open_store(tmp_path, FaultyOps())
    assert store.findings == []
    async with broker(store) as server:
        assert await replay(server.url, "jobs", 50) == got
        async with client.connect(server.url) as c:
            assert (await c.publish("jobs", b"next")).offset == 50


async def test_disk_full_is_an_answer_over_http_and_readiness_recovers(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with broker(store) as server:
        assert server.http_port
        assert (await get_json(server.http_port, "/readyz"))["status"] == "ready"
        ops.fill()
        reply = await post_json(server.http_port, "/v1/topics/web/messages", {"payload": "x"})
        body = assert_error(reply, 507, "storage_full")
        assert "storage full" in body["error"]
        ready = await request(server.http_port, "GET", "/readyz")
        assert_error(ready, 503, "degraded")
        health = await request(server.http_port, "GET", "/healthz")
        assert health.status == 200
        metrics = (await request(server.http_port, "GET", "/metrics")).body.decode()
        assert 'pybroker_storage_errors_total{kind="full"} 1' in metrics
        # Space returns: the broker's probe notices without any publish.
        ops.free()
        with trio.fail_after(TIMEOUT):
            while (await request(server.http_port, "GET", "/readyz")).status != 200:
                await trio.sleep(0.02)
        reply = await post_json(server.http_port, "/v1/topics/web/messages", {"payload": "y"})
        assert reply.status == 200 and reply.json()["offset"] == 0


async def test_reads_subscriptions_and_groups_work_while_the_disk_is_full(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with broker(store) as server:
        async with client.connect(server.url) as c:
            await c.publish_many("work", [b"job-%d" % i for i in range(5)])
            ops.fill()
            with pytest.raises(client.StorageFull):
                await c.publish("work", b"refused")
            # Replay, a live subscription and a consumer group all work.
            assert [p for _, p in await replay(server.url, "work", 5)] == [b"job-%d" % i for i in range(5)]
            done: list[bytes] = []
            with trio.fail_after(TIMEOUT):
                async with c.subscribe("work", group="workers", start="earliest") as jobs:
                    async for msg in jobs:
                        await msg.ack()
                        done.append(msg.payload)
                        if len(done) == 5:
                            break
            assert done == [b"job-%d" % i for i in range(5)]
            assert server.broker.groups.groups["workers"].acked == 5
            # The connection was never closed: after the disk frees, it publishes.
            ops.free()
            assert (await c.publish("work", b"later")).offset == 5


async def test_min_free_bytes_refuses_before_the_disk_is_full(tmp_path: Path) -> None:
    store = FileStore(tmp_path, min_free_bytes=1 << 62)  # more than any disk has
    async with broker(store) as server:
        async with client.connect(server.url) as c:
            with pytest.raises(client.StorageFull, match="min-free-bytes"):
                await c.publish("t", b"x")
            store.min_free_bytes = 0
            assert (await c.publish("t", b"y")).offset == 0


async def test_a_rollback_that_fails_stops_appends_until_a_repair_works(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with broker(store) as server:
        async with client.connect(server.url) as c:
            await c.publish("t", b"first")
            size = segment_files(tmp_path, "t")[-1].stat().st_size
            ops.short_next("writev")
            ops.fail_next("ftruncate", errno.EIO)
            with pytest.raises(client.StorageFull):
                await c.publish("t", b"torn")
            # The torn half is still in the file: the segment is broken.
            assert segment_files(tmp_path, "t")[-1].stat().st_size > size
            assert store.topic("t").segments[-1].broken
            ops.free()
            # The next append repairs first (cuts the torn bytes), then stores.
            assert (await c.publish("t", b"second")).offset == 1
            assert not store.topic("t").segments[-1].broken
        assert await replay(server.url, "t", 2) == [(0, b"first"), (1, b"second")]
    assert reopened_findings(tmp_path) == []


async def test_a_segment_that_cannot_be_created_refuses_the_publish(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops, segment_bytes=1024)
    async with broker(store) as server:
        async with client.connect(server.url) as c:
            log = store.topic("roll")
            acked = [await c.publish("roll", b"000" + b"." * 300)]
            # The next roll creates the .log, then cannot create its index.
            ops.fail_next("open", errno.ENOSPC, after=1)
            with trio.fail_after(TIMEOUT), pytest.raises(client.StorageFull):
                for i in range(1, 20):
                    acked.append(await c.publish("roll", b"%03d" % i + b"." * 300))
            # Nothing half-created is left behind to confuse a restart.
            assert segment_files(tmp_path, "roll") == [seg.path for seg in log.segments]
            acked.append(await c.publish("roll", b"%03d" % len(acked) + b"." * 300))
            assert len(log.segments) >= 2
        assert [a.offset for a in acked] == list(range(len(acked)))
        got = await replay(server.url, "roll", len(acked))
        assert [p[:3] for _, p in got] == [b"%03d" % i for i in range(len(acked))]
    assert reopened_findings(tmp_path) == []


def reopened_findings(data_dir: Path) -> list[Any]:
    store = FileStore(data_dir)
    try:
        return store.findings
    finally:
        store.close()


# -- 2. a failing fsync ---------------------------------------------------------


async def test_failed_fsync_refuses_what_it_covered_and_is_never_retried(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with broker(store) as server:
        async with client.connect(server.url) as sub_c, client.connect(server.url) as c:
            seen: list[bytes] = []
            await sub_c.subscribe("acct", lambda m: seen.append(m.payload))
            ok = [await c.publish("acct", b"ok-%d" % i) for i in range(3)]
            ops.fail_next("fdatasync", errno.EIO)
            pendings = [c.publish_nowait("acct", b"doomed-%d" % i) for i in range(5)]
            with trio.fail_after(TIMEOUT):
                outcomes = []
                for p in pendings:
                    try:
                        outcomes.append(await p.wait())
                    except client.StorageError as exc:
                        outcomes.append(exc)
            refused = [o for o in outcomes if isinstance(o, client.StorageError)]
            # The round whose fsync failed refused its batches; none was
            # acknowledged after a retried fsync.
            assert refused, outcomes
            assert all("fsync" in str(e) for e in refused)
            acked_late = [o for o in outcomes if not isinstance(o, Exception)]
            ok += acked_late
            ok += [await c.publish("acct", b"later-%d" % i) for i in range(3)]
            assert [a.offset for a in ok] == list(range(len(ok)))
            with trio.fail_after(TIMEOUT):
                while len(seen) < len(ok):
                    await trio.sleep(0.01)
        n = len(ok)
        expected = [b"ok-%d" % i for i in range(3)] + [
            b"doomed-%d" % i for i, o in enumerate(outcomes) if not isinstance(o, Exception)
        ] + [b"later-%d" % i for i in range(3)]
        assert seen == expected  # no refused batch was ever delivered
        assert [p for _, p in await replay(server.url, "acct", n)] == expected
        assert store.fsync_failures == 1
    store = open_store(tmp_path, FaultyOps())
    assert store.findings == []
    assert store.topic("acct").next_offset == n
    store.close()


async def test_failed_fsync_over_http_is_a_503(tmp_path: Path) -> None:
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with broker(store) as server:
        assert server.http_port
        ops.fail_next("fdatasync", errno.EIO, after=0)
        reply = await post_json(server.http_port, "/v1/topics/h/messages", {"payload": "x"})
        assert_error(reply, 503, "storage_error")
        reply = await post_json(server.http_port, "/v1/topics/h/messages", {"payload": "y"})
        assert reply.status == 200 and reply.json()["offset"] == 0
        fetched = await get_json(server.http_port, "/v1/topics/h/messages")
        assert [m["payload"] for m in fetched["messages"]] == ["y"]


# -- 3. one broker per data directory ------------------------------------------


def test_a_second_store_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = FileStore(tmp_path)
    with pytest.raises(DataDirLocked) as refused:
        FileStore(tmp_path)
    assert refused.value.pid == os.getpid()
    assert str(tmp_path) in str(refused.value)
    first.close()
    FileStore(tmp_path).close()  # free again once closed


async def test_a_second_serve_on_the_same_directory_exits_with_an_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    args = ["serve", "--port", "0", "--http-port", "0", "--data-dir", str(data_dir), "--log-format", "json"]
    async with spawn(args, "first") as first:
        await first.stderr.wait_for(find_event("listening"))
        second = await run(args)
        assert second.returncode == 1
        err = second.stderr.decode()
        assert str(data_dir) in err and f"process {first.process.pid}" in err, err
        assert "listening" not in err
        first.process.send_signal(signal.SIGTERM)
        assert await first.wait() == 0


# -- 4. the kernel's own limits: a subprocess broker ---------------------------


async def test_file_size_limit_mid_batch_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel write short and then refuse (EFBIG), as a
    full disk does, in a `pybroker serve` started the way users start it."""
    data_dir = tmp_path / "data"
    limit = 64 * 1024

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ["serve", "--port", "0", "--http-port", "0", "--data-dir", str(data_dir), "--log-format", "json"]
    payload = b"p" * 1000
    acked: list[int] = []
    refused = 0
    async with spawn(args, "limited", preexec_fn=limited) as child:
        listening = await child.stderr.wait_for(find_event("listening"))
        async with client.connect(listening["url"]) as c:
            for i in range(120):  # ~120 KiB: well past the 64 KiB limit
                try:
                    acked.append((await c.publish("big", payload + b"%03d" % i)).offset)
                except client.StorageFull:
                    refused += 1
        child.process.kill()
    assert refused > 0 and acked, (acked, refused)
    # Restarted without the limit: every acknowledged message is there.
    async with spawn(args, "again") as again:
        listening = await again.stderr.wait_for(find_event("listening"))
        got = await replay(listening["url"], "big", len(acked))
        assert [o for o, _ in got] == acked == list(range(len(acked)))
        again.process.send_signal(signal.SIGTERM)
        assert await again.wait() == 0


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


async def test_real_disk_full_on_a_small_tmpfs(tmp_path: Path) -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        # Ballast an operator can delete to make room again.
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (1 << 20))
        data_dir = disk / "data"
        args = ["serve", "--port", "0", "--http-port", "0", "--data-dir", str(data_dir), "--log-format", "json"]
        acked: list[int] = []
        refused = 0
        async with spawn(args, "full") as child:
            listening = await child.stderr.wait_for(find_event("listening"))
            async with client.connect(listening["url"]) as c:
                with trio.fail_after(TIMEOUT * 4):
                    for i in range(1000):  # 1000 x 8 KiB: far past 4 MiB
                        try:
                            acked.append((await c.publish("fill", b"%04d" % i + b"f" * 8192)).offset)
                        except client.StorageFull:
                            refused += 1
                            if refused == 3:
                                break
                assert refused == 3 and acked
                ballast.unlink()  # space returns: no restart needed
                for _ in range(40):
                    ack = await c.publish("fill", b"%04d" % len(acked) + b"after")
                    assert ack.durability is Durability.DISK
                    acked.append(ack.offset)
                # What the issue saw: a replay right away gets everything.
                got = await replay(listening["url"], "fill", len(acked))
                assert [o for o, _ in got] == acked
            child.process.kill()  # kill -9: nothing but what is on disk counts
            await child.wait()
        async with spawn(args, "after") as child:
            listening = await child.stderr.wait_for(find_event("listening"))
            got = await replay(listening["url"], "fill", len(acked))
            assert [o for o, _ in got] == acked == list(range(len(acked)))
            assert [p[:4] for _, p in got] == [b"%04d" % i for i in range(len(acked))]
            async with client.connect(listening["url"]) as c:
                assert (await c.publish("fill", b"next")).offset == len(acked)  # never reused
            child.process.send_signal(signal.SIGTERM)
            assert await child.wait() == 0


async def test_a_dead_letter_whose_fsync_failed_is_dead_lettered_again(tmp_path: Path) -> None:
    """The dead letter is rolled back with the fsync that failed; the job it
    carried must not vanish with it: it is dead-lettered again, once."""
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with broker(store) as server:
        async with client.connect(server.url) as c:
            await c.publish("poison", b"bad job")
            seen = trio.Event()

            async def never_ack(msg: client.Message) -> None:
                seen.set()
                await trio.sleep_forever()  # holds the job until ack_wait expires

            await c.subscribe(
                "poison", never_ack, group="g", start="earliest", ack_wait=0.2, max_deliver=1,
                dead_letter="dlq.g",
            )
            with trio.fail_after(TIMEOUT):
                await seen.wait()
            # The next segment fsync is the dead letter's (dlq.g): it fails.
            ops.fail_next("fdatasync", errno.EIO)
            async with c.subscribe("dlq.g", start="earliest") as dlq:
                with trio.fail_after(TIMEOUT):
                    dead = await dlq.__anext__()
            assert dead.payload == b"bad job"
            assert dead.headers["x-original-offset"] == "0"
            assert store.fsync_failures == 1
            group = server.broker.groups.groups["g"]
            assert group.dead_lettered == 1
            assert all(u[-1].error is None for u in group.unconfirmed)
            assert sum(len(gt.pending) for gt in group.topics.values()) == 0
        # Exactly one dead letter made it into the log.
        got = await replay(server.url, "dlq.g", 1)
        assert [p for _, p in got] == [b"bad job"]
        assert await end_offset(server.url, "dlq.g") == 1


async def test_refusals_owed_to_a_peer_that_is_gone_are_dropped(tmp_path: Path) -> None:
    """A failed fsync's refusal owed to a connection whose writer already
    found the peer gone (Connection.send_failed): dropped, not an internal
    error. (Before, building the ERROR frame raised and the session logged
    an internal error; seen under a benchmark whose publisher left at its
    first refusal while the object store was failing.)"""
    ops = FaultyOps()
    store = open_store(tmp_path, ops)
    async with broker(store) as server:
        with structlog.testing.capture_logs() as logs:
            async with raw_client(server) as raw:
                await raw.handshake()
                (session,) = server.sessions
                ops.sync_errno = errno.EIO
                session.conn.send_failed()  # what the writer does when a write finds the peer gone
                await raw.send_event(Publish(1, "t", encode_batch([b"x"])))
                with trio.fail_after(TIMEOUT):
                    while session.acks.unacked or not ops.calls["fdatasync"]:
                        await trio.sleep(0.01)  # (bounded) until the failed round was answered
            with trio.fail_after(TIMEOUT):
                while server.sessions:
                    await trio.sleep(0.01)  # (bounded) until the session has ended
        assert not [e for e in logs if e.get("log_level") in ("error", "exception") and "internal" in e["event"]], logs
        ops.sync_errno = None
