"""The blocking client (pybroker.sync) next to the async one: messages per
second for publish() one at a time (each waits for its acknowledgement),
send() then one flush(), the same from 8 threads, and reading a backlog by
iteration and by callback.

    python benchmarks/sync_publish.py [--messages 50000] [--waited 2000] [--repeat 3] [--fsync never]

Starts ``pybroker serve`` (``--fsync always`` unless told) on a temporary data
directory and a free port, runs ``--repeat`` rounds of every scenario in
turn in this one process, and prints the median and the range of each.
128-byte payloads; every publish is checked acknowledged, every read counted.
Which CPUs it used is up to the OS: the broker is a separate process, and the
blocking client's loop thread shares this process's GIL with the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio

import pybroker
import pybroker.sync

PAYLOAD = b"x" * 128


def start_broker(data_dir: Path, fsync: str) -> tuple[subprocess.Popen[bytes], str]:
    log_path = data_dir.parent / "broker.log"
    command = [sys.executable, "-m", "pybroker", "serve", "--port", "0", "--no-http",
               "--data-dir", str(data_dir), "--log-format", "json", "--fsync", fsync]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "listening":
                return proc, str(record["url"])
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"broker did not start:\n{log_path.read_text(errors='replace')}")


# -- async (Trio) ----------------------------------------------------------


async def async_publish(url: str, topic: str, n: int) -> float:
    async with pybroker.connect(url) as c:
        t0 = time.perf_counter()
        for _ in range(n):
            await c.publish(topic, PAYLOAD)
        return time.perf_counter() - t0


async def async_send(url: str, topic: str, n: int) -> float:
    async with pybroker.connect(url) as c:
        t0 = time.perf_counter()
        pendings = [await c.send(topic, PAYLOAD) for _ in range(n)]
        await c.flush()
        elapsed = time.perf_counter() - t0
    assert all(p.result().offset >= 0 for p in pendings)
    return elapsed


async def async_publish_tasks(url: str, topic: str, n: int, tasks: int) -> float:
    async with pybroker.connect(url) as c:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):

                async def one() -> None:
                    for _ in range(n // tasks):
                        await c.publish(topic, PAYLOAD)

                nursery.start_soon(one)
        return time.perf_counter() - t0


async def async_iterate(url: str, topic: str, n: int) -> float:
    async with pybroker.connect(url) as c:
        t0 = time.perf_counter()
        count = 0
        async with c.subscribe(topic, start="earliest") as sub:
            async for _ in sub:
                count += 1
                if count == n:
                    break
        return time.perf_counter() - t0


async def async_callback(url: str, topic: str, n: int) -> float:
    async with pybroker.connect(url) as c:
        done = trio.Event()
        count = 0

        def on(msg: pybroker.Message) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        t0 = time.perf_counter()
        await c.subscribe(topic, on, start="earliest")
        await done.wait()
        return time.perf_counter() - t0


# -- blocking --------------------------------------------------------------


def sync_publish(url: str, topic: str, n: int) -> float:
    with pybroker.sync.connect(url) as c:
        t0 = time.perf_counter()
        for _ in range(n):
            c.publish(topic, PAYLOAD)
        return time.perf_counter() - t0


def sync_send(url: str, topic: str, n: int) -> float:
    with pybroker.sync.connect(url) as c:
        t0 = time.perf_counter()
        pendings = [c.send(topic, PAYLOAD) for _ in range(n)]
        c.flush()
        elapsed = time.perf_counter() - t0
    assert all(p.result().offset >= 0 for p in pendings)
    return elapsed


def sync_threads(url: str, topic: str, n: int, threads: int, use_send: bool) -> float:
    with pybroker.sync.connect(url) as c:
        start = threading.Barrier(threads + 1)
        failures: list[BaseException] = []

        def work() -> None:
            try:
                start.wait(30)
                if use_send:
                    pendings = [c.send(topic, PAYLOAD) for _ in range(n // threads)]
                    c.flush()
                    assert all(p.result().offset >= 0 for p in pendings)
                else:
                    for _ in range(n // threads):
                        c.publish(topic, PAYLOAD)
            except BaseException as exc:
                failures.append(exc)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        start.wait(30)
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        if failures:
            raise failures[0]
        return elapsed


def sync_iterate(url: str, topic: str, n: int) -> float:
    with pybroker.sync.connect(url) as c:
        t0 = time.perf_counter()
        count = 0
        with c.subscribe(topic, start="earliest") as sub:
            for _ in sub.messages(timeout=30):
                count += 1
                if count == n:
                    break
        return time.perf_counter() - t0


def sync_callback(url: str, topic: str, n: int) -> float:
    with pybroker.sync.connect(url) as c:
        done = threading.Event()
        count = 0

        def on(msg: pybroker.sync.Message) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        t0 = time.perf_counter()
        c.subscribe(topic, on, start="earliest")
        if not done.wait(120):
            raise SystemExit(f"callback got {count} of {n}")
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000,
                        help="messages per pipelined (send) or reading run (default 50000)")
    parser.add_argument("--waited", type=int, default=2_000,
                        help="messages per run of publish() waiting for each ack (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--threads", type=int, default=8, help="threads (or tasks) publishing at once (default 8)")
    parser.add_argument("--fsync", default="always", choices=["always", "interval", "never"],
                        help="the broker's fsync policy (default always; never shows the clients' own cost)")
    args = parser.parse_args(argv)
    n, w, threads = args.messages, args.waited, args.threads
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_broker(Path(tmp) / "data", args.fsync)
        try:
            # A backlog for the readers.
            trio.run(async_send, url, "backlog", n)
            scenarios: list[tuple[str, str, int, Callable[[str], float]]] = [
                ("publish() one at a time", "async", w, lambda t: trio.run(async_publish, url, t, w)),
                ("publish() one at a time", "sync", w, lambda t: sync_publish(url, t, w)),
                (f"publish() from {threads} tasks", "async", w, lambda t: trio.run(async_publish_tasks, url, t, w, threads)),
                (f"publish() from {threads} threads", "sync", w, lambda t: sync_threads(url, t, w, threads, False)),
                ("send() x N, flush()", "async", n, lambda t: trio.run(async_send, url, t, n)),
                ("send() x N, flush()", "sync", n, lambda t: sync_send(url, t, n)),
                (f"send(), flush() from {threads} threads", "sync", n, lambda t: sync_threads(url, t, n, threads, True)),
                ("iterate a backlog", "async", n, lambda t: trio.run(async_iterate, url, "backlog", n)),
                ("iterate a backlog", "sync", n, lambda t: sync_iterate(url, "backlog", n)),
                ("callback on a backlog", "async", n, lambda t: trio.run(async_callback, url, "backlog", n)),
                ("callback on a backlog", "sync", n, lambda t: sync_callback(url, "backlog", n)),
            ]
            print(f"{len(PAYLOAD)} B messages, {args.repeat} runs, fsync {args.fsync};"
                  f" load average at start {os.getloadavg()[0]:.2f}")
            print("| scenario | client | messages | msg/s (median) | range |")
            print("|---|---|---|---|---|")
            # Rounds of every scenario in turn, so that the async and the
            # blocking figures of a scenario come from the same minutes.
            rates: list[list[float]] = [[] for _ in scenarios]
            for r in range(args.repeat):
                for i, (_, _, count, run) in enumerate(scenarios):
                    rates[i].append(count / run(f"bench.{i}.{r}"))
            for (name, kind, count, _), found in zip(scenarios, rates):
                print(f"| {name} | {kind} | {count:,} | {statistics.median(found):,.0f}"
                      f" | {min(found):,.0f}-{max(found):,.0f} |")
            print(f"load average at end {os.getloadavg()[0]:.2f}")
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
