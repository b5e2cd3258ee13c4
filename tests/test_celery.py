"""Celery on pybroker (pybroker.contrib.kombu), with the real framework:
``celery worker`` subprocesses against a real broker on 127.0.0.1 port 0,
tasks sent with Celery's own API from this process (in a thread: it
blocks), and what the tasks did read from the reports they publish."""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

celery = pytest.importorskip("celery")  # the `celery` extra, part of `test`

import pybroker
import pybroker.contrib.kombu
from pybroker.contrib.kombu import group_name, queue_topic
from pybroker.server.testing import running_broker

from helpers.procs import Child, broker_process, serve
from helpers.readme import blocks, section, with_url
from helpers.restarts import FAST, free_port
from helpers.taskworkers import REPORTS, app_worker, reports, spawn_worker

#: Every connection a test opened in this process is closed by its end.
pytestmark = pytest.mark.usefixtures("no_sync_client_left_behind")


@asynccontextmanager
async def celery_worker(
    url: str, name: str, *, concurrency: int = 2, env: dict[str, str] | None = None
) -> AsyncIterator[Child]:
    args = [
        "-m", "celery", "-A", "helpers.celery_app", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        "--without-mingle", "--without-gossip", "--without-heartbeat",
        "--loglevel", "warning", "--hostname", f"{name}@%h",
    ]
    async with app_worker(args, name, url, env) as child:
        yield child


def client_app(url: str, backend: str | None = None, **conf: Any) -> Any:
    """The sending side: a Celery app of its own, naming tasks by name."""
    app = celery.Celery("taskq-client", broker=url, backend=backend)
    app.conf.update(broker_connection_retry_on_startup=True, **conf)
    return app


def close_app(app: Any) -> None:
    """Close every connection the app opened (app.close() closes none:
    kombu's connection pools are global), so that no client is left
    trying to reconnect to a stopped broker: the rpc:// result consumer's
    (from this thread's backend) and the pool's."""
    if app.conf.result_backend:
        app.backend.result_consumer.stop()
    app.pool.force_close_all()
    app.close()


async def send(app: Any, name: str, args_list: list[list[Any]]) -> list[Any]:
    """send_task for each args, in a thread (Celery's API blocks)."""

    def go() -> list[Any]:
        return [app.send_task(name, args=args) for args in args_list]

    return await trio.to_thread.run_sync(go)


def test_the_scheme_is_registered_with_kombu() -> None:
    from kombu import Connection

    transport = Connection("pybroker://127.0.0.1:1").transport
    assert type(transport) is pybroker.contrib.kombu.Transport
    assert queue_topic("celery") == "kombu.celery"
    assert group_name("w1@host.celery.pidbox") == "kombu-w1@host%2Ecelery%2Epidbox"


async def test_tasks_run_and_return_results(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with celery_worker(server.url, "w1", concurrency=3):

            def roundtrip() -> list[int]:
                # One thread: Celery's result backend is per thread.
                app = client_app(server.url, backend="rpc://")
                try:
                    results = [app.send_task("taskq.add", args=[i, i * 10]) for i in range(20)]
                    return [r.get(timeout=30) for r in results]
                finally:
                    close_app(app)

            assert await trio.to_thread.run_sync(roundtrip) == [i * 11 for i in range(20)]
            async with pybroker.connect(server.url) as c:
                # A result can arrive before its task's ack, which the
                # worker queues without waiting for it: ask until all 20
                # are in (each look a round trip, bounded).
                with trio.fail_after(30):
                    while (summary := await c.groups("inspect", "kombu-celery"))["acked"] < 20:
                        pass
        # The queue is a declared durable group; Celery's prefetch
        # (concurrency 3 x multiplier 4) is the member's max_ack_pending.
        assert summary["members"] == 1
        assert summary["prefetch"] == 3 * 4
        assert summary["pattern"] == "kombu.celery"
        assert summary["acked"] >= 20
        assert summary["config"]["ack_wait_ms"] == 3_600_000


async def test_a_failing_task_is_retried_with_its_countdown_then_dead_lettered(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            dead = await c.subscribe("dlq.kombu-celery", window=100)
            async with celery_worker(server.url, "w1"):
                app = client_app(server.url)
                try:
                    [result] = await send(app, "taskq.flaky", [["job-1"]])
                finally:
                    await trio.to_thread.run_sync(close_app, app)
                attempts = await got.wait_count("attempt", 3)
                with trio.fail_after(30):
                    letter = await dead.__anext__()
            # A fourth attempt would have been reported by now if there
            # were one: the dead letter follows the last attempt's failure.
            assert len(got.of("attempt")) == 3
        assert [a["retries"] for a in attempts] == [0, 1, 2]
        # Each retry waited for its countdown (1 s), held by the worker.
        for before, after in zip(attempts, attempts[1:]):
            assert after["at"] - before["at"] >= 0.9, attempts
            assert after["eta"] is not None
        assert letter.headers["x-reason"] == "rejected"
        assert letter.headers["x-group"] == "kombu-celery"
        assert letter.headers["x-original-topic"] == "kombu.celery"
        body = json.loads(letter.payload)
        assert body["headers"]["id"] == result.id
        assert body["headers"]["retries"] == 2


async def test_a_task_whose_worker_is_killed_runs_on_another_worker(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            async with celery_worker(server.url, "victim", concurrency=1, env={"TASKQ_VICTIM": "1"}) as victim:
                app = client_app(server.url)
                try:
                    await send(app, "taskq.hold", [["job-1"]])
                finally:
                    await trio.to_thread.run_sync(close_app, app)
                [started] = await got.wait_count("started", 1)
                assert started["pid"] == victim.process.pid
                assert started["redelivered"] is False
                async with celery_worker(server.url, "survivor", concurrency=1) as survivor:
                    victim.process.send_signal(signal.SIGKILL)
                    assert await victim.wait() == -signal.SIGKILL
                    [done] = await got.wait_count("done", 1)
                    assert done["pid"] == survivor.process.pid
                    assert done["redelivered"] is True
            assert [r["key"] for r in got.of("done")] == ["job-1"]


async def test_a_broker_killed_and_restarted_loses_no_queued_task(tmp_path: Path) -> None:
    n = 300
    async with broker_process(tmp_path / "data", tmp_path) as broker:
        url = await broker.start()
        app = client_app(url)
        try:
            # Queued with no worker running: the sender declared the queue
            # (Celery does, on its first publish), and its group holds them.
            await send(app, "taskq.touch", [[f"job-{i}"] for i in range(n)])
        finally:
            await trio.to_thread.run_sync(close_app, app)
        assert await broker.kill() == -signal.SIGKILL
        url = await broker.start()
        async with pybroker.connect(url) as c, reports(c, REPORTS) as got:
            async with celery_worker(url, "w1", concurrency=4):
                done = await got.wait_count("done", n)
        keys = Counter(r["key"] for r in done)
        assert set(keys) == {f"job-{i}" for i in range(n)}


async def test_ten_thousand_small_tasks_complete_once_each(tmp_path: Path) -> None:
    n = 10_000
    # The broker in a process of its own, as users run it: here it would
    # share this process's GIL with Celery's sender and the reports.
    async with serve(tmp_path) as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            async with celery_worker(server.url, "w1", concurrency=4), celery_worker(server.url, "w2", concurrency=4):
                # Sent in batches (each publish waiting for its fsync would
                # make this test about the disk); app.close() waits for
                # their acknowledgements.
                app = client_app(server.url, broker_transport_options={"confirm_publish": False})
                try:
                    await send(app, "taskq.touch", [[f"t{i}"] for i in range(n)])
                finally:
                    await trio.to_thread.run_sync(close_app, app)
                done = await got.wait_count("done", n, timeout=120)
            summary = await c.groups("inspect", "kombu-celery")
    keys = Counter(r["key"] for r in done)
    assert set(keys) == {f"t{i}" for i in range(n)}
    # At least once: a task runs twice only if it was delivered twice,
    # and no worker died here, so none was.
    duplicates = {k: v for k, v in keys.items() if v > 1}
    assert duplicates == {}
    assert summary["redelivered"] == 0
    assert summary["acked"] == n
    pids = Counter(r["pid"] for r in done)
    assert len(pids) == 2, pids  # both workers took part


async def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    """README "Celery": tasks.py, the worker command as written (prefork
    pool, mingle, gossip and heartbeats on) and the caller."""
    text = section("Celery")
    app_code, caller = blocks(text, "python")
    [command] = [line for line in blocks(text, "sh")[0].splitlines() if line.strip()]
    project = tmp_path / "project"
    project.mkdir()
    async with running_broker(data_dir=tmp_path / "data") as server:
        (project / "tasks.py").write_text(with_url(app_code, server.url))
        argv = shlex.split(command)
        assert argv[0] == "celery"
        async with spawn_worker(["-m", *argv], "readme worker", {}, lambda lines: any(" ready." in l for l in lines), cwd=project):
            with trio.fail_after(60):
                result = await trio.run_process(
                    [sys.executable, "-c", caller], cwd=project, capture_stdout=True, capture_stderr=True, check=False
                )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "5"


async def test_a_worker_stopped_gracefully_hands_back_the_tasks_it_holds_for_later(tmp_path: Path) -> None:
    """A task with a countdown waits in the worker, unacknowledged; a warm
    shutdown (SIGTERM) gives it back, and another worker runs it when due."""
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            async with celery_worker(server.url, "first", concurrency=1) as first:
                # The sender leaves the delay to the worker (without this
                # the broker keeps the task until due: the next test).
                app = client_app(server.url, broker_transport_options={"delay_at_broker": False})
                try:

                    def later() -> None:
                        # Long enough for the warm shutdown to end first
                        # (Celery looks for it between 2 s waits for work).
                        app.send_task("taskq.hold", args=["job-1"], countdown=10)

                    await trio.to_thread.run_sync(later)
                finally:
                    await trio.to_thread.run_sync(close_app, app)
                # The worker has it (nothing announces that: ask the broker,
                # each look a round trip, bounded).
                with trio.fail_after(30):
                    while (await c.groups("inspect", "kombu-celery"))["in_flight"] != 1:
                        pass
                first.process.send_signal(signal.SIGTERM)
                assert await first.wait() == 0
            assert got.of("started") == [], got.items
            async with celery_worker(server.url, "second", concurrency=1) as second:
                [done] = await got.wait_count("done", 1)
        assert done["pid"] == second.process.pid
        assert done["redelivered"] is True


async def test_countdown_tasks_wait_in_the_broker_not_in_the_workers_prefetch(tmp_path: Path) -> None:
    """With delayed delivery (the default), tasks sent with a countdown are
    kept by the broker: a worker whose prefetch they would all fill (one
    process, multiplier 1: a prefetch of 1) runs a task sent after them at
    once, and each delayed one when due, not before."""
    countdown = 6
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            async with celery_worker(server.url, "w1", concurrency=1, env={"TASKQ_PREFETCH": "1"}):
                app = client_app(server.url)
                try:

                    def send_all() -> float:
                        sent = time.time()
                        for i in range(3):
                            app.send_task("taskq.touch", args=[f"later-{i}"], countdown=countdown)
                        app.send_task("taskq.touch", args=["now"])
                        return sent

                    sent = await trio.to_thread.run_sync(send_all)
                finally:
                    await trio.to_thread.run_sync(close_app, app)
                # Kept by the broker: none is in the worker's hands meanwhile.
                assert (await c.groups("inspect", "kombu-celery"))["in_flight"] <= 1
                done = await got.wait_count("done", 4, timeout=countdown + 30)
    by_key = {d["key"]: d["at"] for d in done}
    assert by_key["now"] < sent + countdown, (by_key, sent)
    for i in range(3):
        assert by_key[f"later-{i}"] >= sent + countdown - 0.05, (by_key, sent)
    assert sorted(by_key) == ["later-0", "later-1", "later-2", "now"]


async def test_a_running_worker_carries_on_across_a_broker_kill_and_restart(tmp_path: Path) -> None:
    """The worker's connection is reopened (same port), its group rejoined;
    tasks queued before the kill and sent after it all run (at least once)."""
    port = free_port()
    async with broker_process(tmp_path / "data", tmp_path, "--port", str(port)) as broker:
        url = await broker.start()
        assert url.endswith(f":{port}")
        async with pybroker.connect(url, reconnect=FAST) as c, reports(c, REPORTS) as got:
            async with celery_worker(url, "w1", concurrency=2):
                app = client_app(url)
                try:
                    await send(app, "taskq.touch", [[f"before-{i}"] for i in range(100)])
                    assert await broker.kill() == -signal.SIGKILL
                    assert await broker.start() == url
                    await send(app, "taskq.touch", [[f"after-{i}"] for i in range(100)])
                finally:
                    await trio.to_thread.run_sync(close_app, app)
                expected = {f"before-{i}" for i in range(100)} | {f"after-{i}" for i in range(100)}
                await got.wait_for(lambda items: expected <= {r.get("key") for r in items}, timeout=90)


def test_a_failover_url_gives_the_client_every_broker(tmp_path: Path) -> None:
    """kombu's failover URL (``;``-separated) reaches the pybroker client as
    one URL of every broker, so that it moves to the next broker by itself
    when the one it is on goes away (a cluster node stopping) instead of
    retrying that one until kombu gives the connection up. Here one
    broker's data moves to another port, which is the same thing as far as
    the client can tell."""
    from kombu import Connection

    from pybroker.contrib.kombu import broker_url
    from pybroker.server.testing import broker_thread

    assert broker_url(Connection("pybroker://u:p@h1:1;pybroker://u:p@h2:2;pybroker://h1:1")) == "pybroker://h1:1,h2:2"
    first, second = free_port(), free_port()
    data = tmp_path / "data"
    conn = Connection(f"pybroker://127.0.0.1:{first};pybroker://127.0.0.1:{second}")
    try:
        with broker_thread(data_dir=data, port=first):
            queue = conn.SimpleQueue("moving")
            queue.put({"n": 1})
            message = queue.get(timeout=30)
            assert message.payload == {"n": 1}
            message.ack()
        with broker_thread(data_dir=data, port=second):
            queue.put({"n": 2})  # the client moved to the second broker by itself
            # The ack of n=1 is sent, not awaited: when the first broker
            # stopped before it arrived, n=1 comes again (at-least-once;
            # seen in about one run in fifteen), then n=2.
            seen = []
            for _ in range(2):
                message = queue.get(timeout=30)
                seen.append(message.payload["n"])
                message.ack()
                if seen[-1] == 2:
                    break
            assert seen in ([2], [1, 2]), seen
            queue.close()
    finally:
        conn.release()
