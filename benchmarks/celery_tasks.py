"""Celery tasks per second through pybroker (pybroker.contrib.kombu), and
through Redis in the same sitting when ``redis-server`` is installed.

    python benchmarks/celery_tasks.py [--tasks 10000] [--concurrency 4] [--workers 1]
                                      [--repeat 3] [--fsync always] [--no-redis]

For each broker and round: a fresh broker (``pybroker serve --port 0`` on a
temporary data directory, fsync ``always`` unless told; ``redis-server`` on a
free port with its defaults, no RDB snapshot), ``--workers`` real ``celery
worker`` processes (``--pool threads``, ``--concurrency``, Celery's default
prefetch multiplier of 4, early acks), all ready before the clock starts.
Then this process sends ``--tasks`` no-op tasks with ``send_task`` and waits
until the broker says every one was taken and settled (pybroker: the
queue's group acked them all; Redis: the list is empty and kombu's unacked
hash too). Printed per broker: the send rate (tasks/s while sending) and the
end-to-end rate (tasks sent and worked off, per second of the whole run),
median and range over the rounds.

pybroker is measured twice: with ``confirm_publish`` on (the default: each
``send_task`` waits for the broker's acknowledgement, so under fsync
``always`` for a disk flush) and off (tasks sent in batches, acknowledged
by ``app.close()``). Redis acknowledges an LPUSH once it is in memory.

The same file is the workers' Celery app (``celery -A celery_tasks``): its
broker is ``CELERY_BENCH_BROKER``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready

import pybroker.contrib.kombu  # noqa: F401  (registers pybroker:// with kombu)
import pybroker.sync

HERE = Path(__file__).resolve().parent

app = Celery("celery_tasks", broker=os.environ.get("CELERY_BENCH_BROKER", "pybroker://127.0.0.1:7420"))
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@worker_ready.connect
def _ready(**_: object) -> None:
    """Tells the benchmark this worker consumes (Celery's worker_ready)."""
    marker = os.environ.get("CELERY_BENCH_READY")
    if marker:
        Path(marker).write_text("ready")


@app.task(name="bench.noop")
def noop(i: int) -> None:
    return None


#: Bound on one wait (a broker's or a worker's start, a round's drain).
TIMEOUT = 300.0
POLL = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(what: str, done: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(POLL)


@contextmanager
def pybroker_server(workdir: Path, fsync: str) -> Iterator[str]:
    log_path = workdir / "broker.log"
    command = [sys.executable, "-m", "pybroker", "serve", "--port", "0", "--no-http",
               "--data-dir", str(workdir / "data"), "--log-format", "json", "--fsync", fsync]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    url: list[str] = []

    def listening() -> bool:
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "listening":
                url.append(str(record["url"]))
                return True
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited:\n{log_path.read_text(errors='replace')}")
        return False

    try:
        wait_until("pybroker listening", listening, 30)
        yield url[0]
    finally:
        proc.kill()
        proc.wait(30)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        wait_until("redis-server listening", up, 30)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(30)


@contextmanager
def workers(url: str, count: int, concurrency: int, workdir: Path) -> Iterator[None]:
    procs = []
    logs = []
    markers = []
    try:
        for i in range(count):
            log_path = workdir / f"worker-{i}.log"
            logs.append(log_path)
            markers.append(workdir / f"worker-{i}.ready")
            env = dict(os.environ, CELERY_BENCH_BROKER=url, CELERY_BENCH_READY=str(markers[-1]), PYTHONUNBUFFERED="1")
            with open(log_path, "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "--pool", "threads",
                     "--concurrency", str(concurrency), "--without-mingle", "--without-gossip",
                     "--without-heartbeat", "--loglevel", "warning", "--hostname", f"bench{i}@%h"],
                    cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                ))
        for proc, log_path, marker in zip(procs, logs, markers):
            def ready(proc: subprocess.Popen[bytes] = proc, log_path: Path = log_path, marker: Path = marker) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"a worker exited:\n{log_path.read_text(errors='replace')}")
                return marker.exists()
            wait_until("worker ready", ready, 60)
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait(30)


def pybroker_drained(url: str, n: int) -> Callable[[], bool]:
    client = pybroker.sync.connect(url)

    def drained() -> bool:
        summary = client.groups("inspect", "kombu-celery")
        return int(summary["acked"]) >= n

    drained.close = client.close  # type: ignore[attr-defined]
    return drained


def redis_drained(url: str, n: int) -> Callable[[], bool]:
    import redis

    r = redis.Redis.from_url(url)

    def drained() -> bool:
        return int(r.llen("celery")) == 0 and int(r.hlen("unacked")) == 0

    drained.close = r.close  # type: ignore[attr-defined]
    return drained


def one_round(url: str, n: int, options: dict[str, object], drained_for: Callable[[str, int], Callable[[], bool]],
              args: argparse.Namespace, workdir: Path) -> tuple[float, float]:
    sender = Celery("bench-sender", broker=url)
    sender.conf.update(broker_connection_retry_on_startup=True, broker_transport_options=options)
    # Declare the queue (a pybroker group) before the clock starts.
    with sender.connection_for_write() as conn:
        conn.default_channel.queue_declare("celery", durable=True, auto_delete=False)
    with workers(url, args.workers, args.concurrency, workdir):
        drained = drained_for(url, n)
        try:
            start = time.perf_counter()
            for i in range(n):
                sender.send_task("bench.noop", args=[i])
            sender.close()  # waits for what is still unacknowledged
            sent = time.perf_counter() - start
            wait_until("all tasks worked off", drained)
            total = time.perf_counter() - start
        finally:
            drained.close()  # type: ignore[attr-defined]
    return n / sent, n / total


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8,.0f} /s  ({min(values):,.0f} .. {max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fsync", default="always", choices=["always", "interval", "never"])
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()

    cases: list[tuple[str, Callable[[Path], Any], dict[str, object], Callable[[str, int], Callable[[], bool]]]] = [
        (f"pybroker (fsync {args.fsync}), confirm_publish on", lambda d: pybroker_server(d, args.fsync),
         {"confirm_publish": True}, pybroker_drained),
        (f"pybroker (fsync {args.fsync}), confirm_publish off", lambda d: pybroker_server(d, args.fsync),
         {"confirm_publish": False}, pybroker_drained),
    ]
    if args.no_redis:
        print("redis: skipped (--no-redis)")
    elif shutil.which("redis-server") is None:
        print("redis: skipped (no redis-server on PATH)")
    else:
        cases.append(("redis (redis-server defaults, no RDB)", redis_server, {}, redis_drained))

    print(f"{args.tasks:,} no-op tasks, {args.workers} worker(s) x {args.concurrency} threads, "
          f"{args.repeat} round(s), {os.cpu_count()} CPUs")
    for name, server, options, drained_for in cases:
        sends: list[float] = []
        totals: list[float] = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="celery-bench-") as tmp:
                workdir = Path(tmp)
                with server(workdir) as url:
                    send_rate, total_rate = one_round(url, args.tasks, options, drained_for, args, workdir)
            sends.append(send_rate)
            totals.append(total_rate)
        print(f"{name}\n  sent:       {summary(sends)}\n  end to end: {summary(totals)}")


if __name__ == "__main__":
    main()
