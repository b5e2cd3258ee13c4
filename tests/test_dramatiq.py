"""Dramatiq on pybroker (pybroker.contrib.dramatiq), with the real framework:
``dramatiq`` worker subprocesses against a real broker on 127.0.0.1 port 0,
messages sent with Dramatiq's own API from this process (in a thread: it
blocks), and what the actors did read from the reports they publish."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

dramatiq = pytest.importorskip("dramatiq")  # the `dramatiq` extra, part of `test`

import pybroker
from pybroker.contrib.dramatiq import PybrokerBroker, group_name, queue_topic
from pybroker.server.testing import running_broker

from helpers.procs import Child, broker_process
from helpers.readme import blocks, section, with_url
from helpers.taskworkers import REPORTS, app_worker, reports, spawn_worker

#: Every connection a test opened in this process is closed by its end.
pytestmark = pytest.mark.usefixtures("no_sync_client_left_behind")


@asynccontextmanager
async def dramatiq_worker(url: str, name: str, *, threads: int = 2, env: dict[str, str] | None = None) -> AsyncIterator[Child]:
    args = ["-m", "dramatiq", "helpers.dramatiq_app", "--processes", "1", "--threads", str(threads)]
    async with app_worker(args, name, url, env) as child:
        yield child


def worker_pid(child: Child) -> int:
    """The pid of the worker process (the dramatiq command forks it)."""
    for line in child.stderr.lines:
        if "taskq worker ready pid=" in line:
            return int(line.rsplit("=", 1)[1])
    raise AssertionError(child.stderr.text())


async def send(
    url: str, actor: str, args_list: list[list[Any]], *, confirm_publish: bool = True, **options: Any
) -> None:
    """Send messages to ``actor`` with Dramatiq's API, in a thread."""

    def go() -> None:
        broker = PybrokerBroker(url, confirm_publish=confirm_publish)
        try:
            broker.declare_queue("default")
            for args in args_list:
                message = dramatiq.Message(
                    queue_name="default", actor_name=actor, args=tuple(args), kwargs={}, options={}
                )
                broker.enqueue(message, **options)
        finally:
            broker.close()

    await trio.to_thread.run_sync(go)


def test_names() -> None:
    assert queue_topic("default") == "dramatiq.default"
    assert group_name("default.DQ") == "dramatiq-default%2EDQ"


async def test_messages_are_processed_and_delayed_ones_wait_for_their_eta(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            async with dramatiq_worker(server.url, "w1"):
                await send(server.url, "touch", [[f"now-{i}"] for i in range(20)])
                await got.wait_count("done", 20)
                sent_at = trio.current_time()
                await send(server.url, "touch", [["later"]], delay=1000)
                await got.wait_for(lambda items: any(r["key"] == "later" for r in items))
                waited = trio.current_time() - sent_at
            summary = await c.groups("inspect", "dramatiq-default%2EDQ")
    assert sorted(r["key"] for r in got.of("done")) == sorted([f"now-{i}" for i in range(20)] + ["later"])
    assert waited >= 1.0  # held by the worker until its eta
    # The delayed message went through the delay queue's group and was acked
    # there once moved to the queue.
    assert summary["acked"] == 1


async def test_a_failing_actor_is_retried_with_backoff_then_dead_lettered(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            dead = await c.subscribe("dlq.dramatiq-default", window=100)
            async with dramatiq_worker(server.url, "w1"):
                await send(server.url, "flaky", [["job-1"]])
                attempts = await got.wait_count("attempt", 3)
                with trio.fail_after(30):
                    letter = await dead.__anext__()
            assert len(got.of("attempt")) == 3
    assert [a["retries"] for a in attempts] == [0, 1, 2]
    for before, after in zip(attempts, attempts[1:]):
        assert after["at"] - before["at"] >= 0.45, attempts  # backoff 500..1000 ms
    assert letter.headers["x-reason"] == "rejected"
    assert letter.headers["x-group"] == "dramatiq-default"
    body = json.loads(letter.payload)
    assert body["actor_name"] == "flaky"
    assert body["args"] == ["job-1"]
    # The dead letter is the message as its last delivery carried it.
    assert body["options"]["retries"] == 2


async def test_a_message_whose_worker_is_killed_runs_on_another_worker(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            async with dramatiq_worker(server.url, "victim", threads=1, env={"TASKQ_VICTIM": "1"}) as victim:
                victim_pid = worker_pid(victim)
                await send(server.url, "hold", [["job-1"]])
                [started] = await got.wait_count("started", 1)
                assert started["pid"] == victim_pid
                assert started["deliveries"] == 1
                async with dramatiq_worker(server.url, "survivor", threads=1) as survivor:
                    os.kill(victim_pid, signal.SIGKILL)
                    [done] = await got.wait_count("done", 1)
                    assert done["pid"] == worker_pid(survivor)
                    assert done["deliveries"] == 2
            assert [r["key"] for r in got.of("done")] == ["job-1"]


async def test_a_broker_killed_and_restarted_loses_no_queued_message(tmp_path: Path) -> None:
    n = 300
    async with broker_process(tmp_path / "data", tmp_path) as broker:
        url = await broker.start()
        await send(url, "touch", [[f"job-{i}"] for i in range(n)])  # each waits for its PUBACK
        assert await broker.kill() == -signal.SIGKILL
        url = await broker.start()
        async with pybroker.connect(url) as c, reports(c, REPORTS) as got:
            async with dramatiq_worker(url, "w1", threads=4):
                done = await got.wait_count("done", n)
    keys = Counter(r["key"] for r in done)
    assert set(keys) == {f"job-{i}" for i in range(n)}


async def test_ten_thousand_small_messages_are_processed_once_each(tmp_path: Path) -> None:
    n = 10_000
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            async with dramatiq_worker(server.url, "w1", threads=4), dramatiq_worker(server.url, "w2", threads=4):
                # Sent in batches; close() waits for their acknowledgements.
                await send(server.url, "touch", [[f"t{i}"] for i in range(n)], confirm_publish=False)
                done = await got.wait_count("done", n, timeout=120)
            summary = await c.groups("inspect", "dramatiq-default")
    keys = Counter(r["key"] for r in done)
    assert set(keys) == {f"t{i}" for i in range(n)}
    # No worker died, so nothing was delivered twice, and nothing ran twice.
    assert {k: v for k, v in keys.items() if v > 1} == {}
    assert summary["redelivered"] == 0
    assert summary["acked"] == n
    assert len(Counter(r["pid"] for r in done)) == 2  # both workers took part


async def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    """README "Dramatiq": actors.py, the worker command as written (one
    process per CPU, 8 threads each) and the sender, now and delayed."""
    text = section("Dramatiq")
    app_code, sender = blocks(text, "python")
    [command] = [line for line in blocks(text, "sh")[0].splitlines() if line.strip()]
    project = tmp_path / "project"
    project.mkdir()
    async with running_broker(data_dir=tmp_path / "data") as server:
        (project / "actors.py").write_text(with_url(app_code, server.url))
        argv = shlex.split(command)
        assert argv[0] == "dramatiq"

        def ready(lines: list[str]) -> bool:
            return any("ready for action" in line for line in lines)

        async with spawn_worker(["-m", *argv], "readme worker", {}, ready, cwd=project) as worker:
            with trio.fail_after(60):
                result = await trio.run_process(
                    [sys.executable, "-c", sender], cwd=project, capture_stdout=True, capture_stderr=True, check=False
                )
            assert result.returncode == 0, result.stderr.decode()
            sent_at = trio.current_time()
            # Dramatiq hands its worker processes' output to the main
            # process, which writes it to stderr.
            await worker.stderr.wait_for(lambda lines: True if "welcome 43" in lines else None, 60)
            waited = trio.current_time() - sent_at
    assert worker.stderr.lines.count("welcome 42") == 1
    assert worker.stderr.lines.count("welcome 43") == 1
    assert waited >= 0.5  # delayed by a second from before the sender exited


async def test_a_worker_stopped_gracefully_hands_back_the_messages_it_holds_for_later(tmp_path: Path) -> None:
    """A delayed message waits in the worker, unacknowledged on the delay
    queue; a graceful stop (SIGTERM) requeues it (a nak), and another
    worker moves it to the queue when due."""
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            async with dramatiq_worker(server.url, "first", threads=1) as first:
                await send(server.url, "hold", [["job-1"]], delay=4000)
                # The worker has it (nothing announces that: ask the broker,
                # each look a round trip, bounded).
                with trio.fail_after(30):
                    while (await c.groups("inspect", "dramatiq-default%2EDQ"))["in_flight"] != 1:
                        pass
                first.process.send_signal(signal.SIGTERM)
                assert await first.wait() == 0
            assert got.of("started") == [], got.items
            async with dramatiq_worker(server.url, "second", threads=1) as second:
                [done] = await got.wait_count("done", 1)
            summary = await c.groups("inspect", "dramatiq-default%2EDQ")
        assert done["pid"] == worker_pid(second)
        assert summary["redelivered"] == 1
        assert summary["acked"] == 1


async def test_join_waits_for_the_queue_and_flush_drops_what_waits(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path / "data") as server:
        async with pybroker.connect(server.url) as c, reports(c, REPORTS) as got:
            # No worker yet: five wait in the declared group; flush drops them.
            await send(server.url, "touch", [[f"dropped-{i}"] for i in range(5)])

            def flush() -> None:
                broker = PybrokerBroker(server.url)
                try:
                    broker.declare_queue("default")
                    broker.flush_all()
                finally:
                    broker.close()

            await trio.to_thread.run_sync(flush)
            async with dramatiq_worker(server.url, "w1", threads=2):
                await send(server.url, "touch", [[f"kept-{i}"] for i in range(20)])

                def join() -> None:
                    broker = PybrokerBroker(server.url)
                    try:
                        broker.declare_queue("default")
                        broker.join("default", timeout=30_000)
                    finally:
                        broker.close()

                await trio.to_thread.run_sync(join)
                # join returned: every message was acked, so every actor ran.
                summary = await c.groups("inspect", "dramatiq-default")
                assert summary["acked"] == 20
                assert summary["pending"] == 0
                await got.wait_count("done", 20)
            assert sorted(r["key"] for r in got.of("done")) == sorted(f"kept-{i}" for i in range(20))
