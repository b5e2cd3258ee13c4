"""The store's fsync thread (broker/storage/syncthread.py): one thread for
the store's lifetime runs each round's fsyncs in order, hands back results
and exceptions, and a round handed over is waited for even when its caller
is cancelled (its segments are settled only once the fsync is known)."""

from __future__ import annotations

import threading
from pathlib import Path

import pybroker
import pytest
import trio

from pybroker.server.storage.syncthread import SyncThread
from pybroker.server.testing import running_broker

from helpers.logs import open_store

TIMEOUT = 10.0


@pytest.mark.trio
async def test_jobs_run_in_one_thread_in_order_with_results_and_errors() -> None:
    worker = SyncThread()
    seen: list[tuple[int, str]] = []

    def job(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 2

    def boom() -> None:
        raise OSError(5, "EIO")

    try:
        with trio.fail_after(TIMEOUT):
            assert [await worker.run(job, n) for n in range(5)] == [0, 2, 4, 6, 8]
            with pytest.raises(OSError, match="EIO"):
                await worker.run(boom)
            assert await worker.run(job, 9) == 18
        assert [n for n, _ in seen] == [0, 1, 2, 3, 4, 9]
        assert len({name for _, name in seen}) == 1
        assert seen[0][1] != threading.current_thread().name
    finally:
        worker.stop()


@pytest.mark.trio
async def test_a_cancelled_caller_still_waits_for_its_job() -> None:
    worker = SyncThread()
    release = threading.Event()
    finished: list[bool] = []

    def slow() -> str:
        release.wait(TIMEOUT)
        finished.append(True)
        return "done"

    scope = trio.CancelScope()

    async def caller() -> None:
        with scope:
            await worker.run(slow)
        finished.append(False)  # after its job, whatever the cancel

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
                # The caller cannot leave before the job ends.
                await trio.testing.wait_all_tasks_blocked()
                assert finished == []
                release.set()
            assert finished == [True, False]
    finally:
        worker.stop()


@pytest.mark.trio
async def test_a_file_store_syncs_in_one_thread_and_stops_it_on_close(tmp_path: Path) -> None:
    store = open_store(tmp_path, fsync="always")
    log = store.topic("t")
    names: set[str] = set()
    before = threading.active_count()
    for i in range(3):
        log.append(b"\0\0\0\1" + b"\0" * 20, 1, i)
        await store.sync()
        names.update(t.name for t in threading.enumerate() if t.name == "pybroker fsync")
    assert store.fsyncs == 3
    assert names == {"pybroker fsync"}
    assert threading.active_count() == before + 1
    store.close()
    assert not any(t.name == "pybroker fsync" for t in threading.enumerate())


@pytest.mark.trio
async def test_a_broker_cancelled_rather_than_shut_down_closes_its_store(tmp_path: Path) -> None:
    """Cancelling a running broker (an application's nursery ending) still
    closes its store: the fsync thread ends and the data directory's lock
    is released. Before, the cancellation passed through closing the
    listeners and the store was never closed."""
    async with trio.open_nursery() as nursery:
        ready = trio.Event()

        async def serve() -> None:
            async with running_broker(data_dir=tmp_path) as server:
                async with pybroker.connect(server.url) as client:
                    await client.publish("t", b"synced")  # the fsync thread runs
                ready.set()
                await trio.sleep_forever()

        nursery.start_soon(serve)
        with trio.fail_after(TIMEOUT):
            await ready.wait()
        assert any(t.name == "pybroker fsync" for t in threading.enumerate())
        nursery.cancel_scope.cancel()
    assert not any(t.name == "pybroker fsync" for t in threading.enumerate())
    store = open_store(tmp_path)  # the lock is free: DataDirLocked otherwise
    assert store.topic("t").next_offset == 1
    store.close()
