"""The blocking client (pybroker.sync) against a real broker, from plain
threads: publish and subscribe, many threads publishing at once, callbacks
on worker threads, iteration, request/reply, consumer groups, a reconnect
across a broker restart, and a close that leaves no thread behind. Then a
Flask view and a FastAPI app that publish and subscribe with it.

These tests are plain functions: no Trio, no event loop in the test. The
broker runs in a background thread (the ``pybroker_url`` fixture of
pybroker.server.pytest_plugin) or, where the test needs to kill it or count
threads, as a ``pybroker serve`` subprocess.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI, Request
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

import pybroker
import pybroker.sync
from pybroker.server.server import Server
from pybroker.server.testing import broker_thread
from pybroker import ConnectionClosed, NoReceivers, Reconnect
from pybroker.protocol import AckKind

from helpers.auth import user_entry, write_users
from helpers.certs import Certs
from helpers.procs import PYBROKER, START_TIMEOUT, child_env, read_json_lines
from helpers.restarts import free_port

#: Bound on one wait, in seconds.
TIMEOUT = 20.0
#: Quick reconnect attempts, bounded (at most ~40 s of trying).
FAST = Reconnect(max_attempts=200, initial_delay=0.02, max_delay=0.2, jitter=0.5)


def wait_for(condition: Callable[[], bool], ping: Callable[[], None], what: str) -> None:
    """Until ``condition()``; between checks a round trip to the broker
    (``ping``), bounded in count and time."""
    deadline = time.monotonic() + TIMEOUT
    for _ in range(10_000):
        if condition():
            return
        if time.monotonic() > deadline:
            break
        ping()
    raise AssertionError(f"timed out waiting for {what}")


class Serve:
    """``pybroker serve`` as a subprocess on a fixed port and data directory,
    killed (SIGKILL) and started again on both."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.url = f"pybroker://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        log_path = self.tmp_path / f"broker-{self.starts}.log"
        self.starts += 1
        command = [
            *PYBROKER,
            "serve",
            "--port",
            str(self.port),
            "--no-http",
            "--data-dir",
            str(self.tmp_path / "data"),
            "--log-format",
            "json",
        ]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=child_env()
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(r.get("event") == "listening" for r in read_json_lines(log_path)):
                return
            time.sleep(0.02)  # the log file has no event to wait on
        self.kill()
        raise AssertionError(f"broker did not start:\n{log_path.read_text(errors='replace')}")

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(TIMEOUT)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    broker = Serve(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


def client_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("pybroker-sync")}


# ---------------------------------------------------------------------------
# Publishing and subscribing


def test_publish_from_one_thread_iterate_in_another(pybroker_url: str) -> None:
    with pybroker.sync.connect(pybroker_url, name="plain") as c:
        sub = c.subscribe("orders.>")
        received: list[pybroker.sync.Message] = []
        reader_threads: list[str] = []

        def read() -> None:
            reader_threads.append(threading.current_thread().name)
            for msg in sub.messages(timeout=TIMEOUT):
                received.append(msg)
                if len(received) == 3:
                    return

        reader = threading.Thread(target=read, name="reader")
        reader.start()
        acks = [c.publish(f"orders.eu.{i}", b"%d" % i, headers={"n": str(i)}) for i in range(3)]
        reader.join(TIMEOUT)
        assert not reader.is_alive()
        assert reader_threads == ["reader"]
        assert [a.offset for a in acks] == [0, 0, 0]  # one topic each
        assert all(a.durability is pybroker.Durability.DISK for a in acks)
        assert [(m.topic, m.payload, dict(m.headers), m.offset) for m in received] == [
            (f"orders.eu.{i}", b"%d" % i, {"n": str(i)}, 0) for i in range(3)
        ]
        assert received[0].timestamp_us == acks[0].timestamp_us
        assert not received[0].is_group_message


def test_eight_threads_publish_at_once_and_every_ack_is_right(pybroker_url: str) -> None:
    threads, per_thread = 8, 400
    acks: dict[int, list[pybroker.PublishAck]] = {}
    errors: list[BaseException] = []
    with pybroker.sync.connect(pybroker_url) as c:
        start = threading.Barrier(threads)

        def publish(n: int) -> None:
            try:
                start.wait(TIMEOUT)
                mine = []
                for i in range(per_thread):
                    if i % 2:
                        mine.append(c.publish("load", f"{n}-{i}".encode()))
                    else:  # send() and wait() separately: the same queue
                        mine.append(c.send("load", f"{n}-{i}".encode()).wait())
                acks[n] = mine
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=publish, args=(n,)) for n in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(TIMEOUT * 3)
        assert not errors and not any(w.is_alive() for w in workers)
        total = threads * per_thread
        offsets = [a.offset for mine in acks.values() for a in mine]
        assert sorted(offsets) == list(range(total))  # each once, no gap
        for mine in acks.values():  # one thread's messages stay in its order
            assert [a.offset for a in mine] == sorted(a.offset for a in mine)
            assert all(a.topic == "load" and a.durability is pybroker.Durability.DISK for a in mine)
        # Each ack names the offset its own payload was stored at.
        stored = {}
        with c.subscribe("load", start="earliest") as sub:
            for msg in sub.messages(timeout=TIMEOUT):
                stored[msg.offset] = msg.payload
                if len(stored) == total:
                    break
        for n, mine in acks.items():
            for i, ack in enumerate(mine):
                assert stored[ack.offset] == f"{n}-{i}".encode()


def test_send_and_flush_then_errors_surface(pybroker_url: str) -> None:
    with pybroker.sync.connect(pybroker_url) as c:
        pendings = [c.send("bulk", b"%d" % i) for i in range(5000)]
        c.flush()
        assert all(p.done() for p in pendings)
        assert [p.result().offset for p in pendings] == list(range(5000))
        # Refused before sending: on the PendingAck, and raised by the next flush.
        bad = c.send("bad topic with spaces", b"x")
        good = c.send("bulk", b"after")
        with pytest.raises(ValueError):
            c.flush()
        with pytest.raises(ValueError):
            bad.wait()
        assert good.wait().offset == 5000
        c.flush()  # reported once
        # publish() raises its own error and does not leave it for flush().
        with pytest.raises(ValueError):
            c.publish("", b"x")
        c.flush()
        with pytest.raises(pybroker.MessageTooLarge):
            c.publish("bulk", b"x" * (c.server.limits["max_frame_bytes"] if c.server else 0))


def test_callbacks_run_on_worker_threads(pybroker_url: str) -> None:
    with pybroker.sync.connect(pybroker_url) as c:
        main = threading.current_thread().name
        seen: list[tuple[str, bytes]] = []
        done = threading.Event()

        def record(msg: pybroker.sync.Message) -> None:
            seen.append((threading.current_thread().name, msg.payload))
            if len(seen) == 20:
                done.set()

        c.subscribe("events", record)
        for i in range(20):
            c.send("events", b"%d" % i)
        c.flush()
        assert done.wait(TIMEOUT)
        assert [p for _, p in seen] == [b"%d" % i for i in range(20)]  # in order
        names = {name for name, _ in seen}
        assert len(names) == 1 and main not in names
        assert names.pop().startswith("pybroker-sync callback events")

        # concurrency=4: four callbacks run at the same time (each waits at a
        # barrier that only opens when all four are inside one).
        inside = threading.Barrier(4)
        threads: set[str] = set()
        finished = threading.Event()
        count = [0]
        lock = threading.Lock()

        def meet(msg: pybroker.sync.Message) -> None:
            inside.wait(TIMEOUT)
            with lock:
                threads.add(threading.current_thread().name)
                count[0] += 1
                if count[0] == 8:
                    finished.set()

        c.subscribe("work", meet, concurrency=4)
        for i in range(8):
            c.send("work", b"%d" % i)
        c.flush()
        assert finished.wait(TIMEOUT)
        assert len(threads) == 4


def test_iteration_timeout_and_end(pybroker_url: str) -> None:
    with pybroker.sync.connect(pybroker_url) as c:
        sub = c.subscribe("quiet")
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="quiet"):
            for _ in sub.messages(timeout=0.2):
                pass
        assert time.monotonic() - t0 < TIMEOUT
        with pytest.raises(TimeoutError):
            sub.get(timeout=0)
        c.publish("quiet", b"one")
        msg = sub.get(timeout=TIMEOUT)
        assert msg is not None and msg.payload == b"one"
        stats = sub.statistics()
        assert stats.delivered_messages == 1 and stats.pending_messages == 0
        # Messages already here are handed out even with timeout=0.
        c.publish("quiet", b"two")
        c.publish("quiet", b"three")
        wait_for(lambda: sub.statistics().pending_messages == 2, c.ping, "two messages here")
        assert [m.payload for m in (sub.get(timeout=0), sub.get(timeout=0)) if m] == [b"two", b"three"]
        stats = sub.statistics()
        assert stats.delivered_messages == 3 and stats.pending_messages == 0
        sub.unsubscribe()
        assert sub.get(timeout=TIMEOUT) is None  # ended
        assert list(sub) == []

        # A thread blocked in `for msg in sub` sees the end when the client closes.
        blocked = c.subscribe("never")
        ended = threading.Event()

        def iterate() -> None:
            for _ in blocked:
                pass
            ended.set()

        reader = threading.Thread(target=iterate)
        reader.start()
    assert ended.wait(TIMEOUT)
    reader.join(TIMEOUT)
    with pytest.raises(ConnectionClosed):
        c.publish("quiet", b"after close")


def test_threads_sharing_one_subscription_each_get_different_messages(pybroker_url: str) -> None:
    total, readers = 3000, 4
    with pybroker.sync.connect(pybroker_url) as c:
        sub = c.subscribe("shared", window=256)
        taken: dict[int, list[int]] = {n: [] for n in range(readers)}
        count = itertools.count(1)
        enough = threading.Event()

        def read(n: int) -> None:
            while not enough.is_set():
                try:
                    msg = sub.get(timeout=0.5)
                except TimeoutError:
                    continue
                assert msg is not None
                taken[n].append(msg.offset)
                if next(count) == total:
                    enough.set()

        threads = [threading.Thread(target=read, args=(n,)) for n in range(readers)]
        for t in threads:
            t.start()
        for i in range(total):
            c.send("shared", b"%d" % i)
        c.flush()
        assert enough.wait(TIMEOUT)
        for t in threads:
            t.join(TIMEOUT)
        offsets = sorted(o for mine in taken.values() for o in mine)
        assert offsets == list(range(total))  # each once
        for mine in taken.values():  # each thread's share in order
            assert mine == sorted(mine)


def test_request_and_reply(pybroker_url: str) -> None:
    with pybroker.sync.connect(pybroker_url) as c:
        c.subscribe("svc.upper", lambda m: c.respond(m, m.payload.upper(), {"by": "svc"}))
        reply = c.request("svc.upper", b"hello", timeout=TIMEOUT)
        assert reply.payload == b"HELLO" and reply.headers["by"] == "svc"
        with pytest.raises(NoReceivers):
            c.request("svc.nobody", b"?", timeout=TIMEOUT)
        c.subscribe("svc.silent", lambda m: None)
        with pytest.raises(TimeoutError, match="svc.silent"):
            c.request("svc.silent", b"?", timeout=0.3)
        # From several threads at once: each gets its own reply.
        replies: dict[int, bytes] = {}

        def ask(n: int) -> None:
            replies[n] = c.request("svc.upper", b"q%d" % n, timeout=TIMEOUT).payload

        askers = [threading.Thread(target=ask, args=(n,)) for n in range(6)]
        for a in askers:
            a.start()
        for a in askers:
            a.join(TIMEOUT)
        assert replies == {n: b"Q%d" % n for n in range(6)}


def test_group_ack_nak_term_by_hand(pybroker_url: str) -> None:
    with pybroker.sync.connect(pybroker_url) as c:
        with c.subscribe("jobs", group="workers", ack_wait=60) as sub:
            for name in (b"ack", b"nak", b"term"):
                c.publish("jobs", name)
            handled = []
            for msg in sub.messages(timeout=TIMEOUT):
                assert msg.is_group_message
                handled.append((msg.payload, msg.deliveries))
                if msg.payload == b"ack" or (msg.payload == b"nak" and msg.deliveries == 2):
                    msg.ack()
                    assert msg.settled is AckKind.ACK
                elif msg.payload == b"nak":
                    msg.nak()
                elif msg.payload == b"term":
                    msg.in_progress()
                    msg.term()
                if len(handled) == 4:
                    break
            # The nak'ed job came back once; the others never did.
            assert sorted(handled) == [(b"ack", 1), (b"nak", 1), (b"nak", 2), (b"term", 1)]
            with pytest.raises(RuntimeError, match="already settled"):
                msg.ack()
            info = c.groups("inspect", "workers")
            assert (info["pending"], info["delivered"], info["redelivered"]) == (0, 3, 1)
            assert (info["acked"], info["termed"], info["dead_lettered"]) == (2, 1, 0)
        plain = c.subscribe("plain")
        c.publish("plain", b"x")
        got = plain.get(timeout=TIMEOUT)
        assert got is not None
        with pytest.raises(RuntimeError, match="consumer-group"):
            got.ack()


def test_group_callbacks_ack_on_return_and_nak_on_error(pybroker_url: str) -> None:
    with pybroker.sync.connect(pybroker_url) as c:
        attempts: dict[bytes, int] = {}
        lock = threading.Lock()

        def work(msg: pybroker.sync.Message) -> None:
            with lock:
                attempts[msg.payload] = msg.deliveries
            if msg.payload.startswith(b"flaky") and msg.deliveries == 1:
                raise RuntimeError("first try fails")  # nak: redelivered

        c.subscribe("tasks", work, group="pool", concurrency=3)
        for i in range(10):
            c.send("tasks", b"job-%d" % i)
            c.send("tasks", b"flaky-%d" % i)
        c.flush()

        def settled() -> bool:
            info = c.groups("inspect", "pool")
            return info["acked"] == 20 and info["pending"] == 0

        wait_for(settled, c.ping, "every job acked")
        assert {p: n for p, n in attempts.items() if p.startswith(b"flaky")} == {
            b"flaky-%d" % i: 2 for i in range(10)
        }
        assert {p: n for p, n in attempts.items() if p.startswith(b"job")} == {
            b"job-%d" % i: 1 for i in range(10)
        }


def test_a_plain_callback_error_stops_its_subscription_and_close_raises_it(pybroker_url: str) -> None:
    c = pybroker.sync.connect(pybroker_url)
    calls = []

    def fail(msg: pybroker.sync.Message) -> None:
        calls.append(msg.payload)
        raise KeyError("boom")

    c.subscribe("fragile", fail)
    other = c.subscribe("fragile")
    c.publish("fragile", b"1")
    c.publish("fragile", b"2")
    for expected in (b"1", b"2"):  # the other subscription goes on
        msg = other.get(timeout=TIMEOUT)
        assert msg is not None and msg.payload == expected
    c.ping()
    assert calls == [b"1"]  # the failing one stopped at its first error
    with pytest.raises(KeyError, match="boom"):
        c.close()
    c.close()  # once


# ---------------------------------------------------------------------------
# Reconnecting, closing, connecting


def test_reconnects_after_the_broker_restarts(serve: Serve) -> None:
    with pybroker.sync.connect(serve.url, reconnect=FAST) as c:
        got: list[bytes] = []
        arrived = threading.Condition()

        def collect(msg: pybroker.sync.Message) -> None:
            with arrived:
                got.append(msg.payload)
                arrived.notify_all()

        c.subscribe("orders", collect)
        for i in range(5):
            c.publish("orders", b"before-%d" % i)
        serve.kill()  # SIGKILL: the connection breaks without a goodbye
        # While it is down a publish waits, and gives up after its timeout
        # (the message stays queued: sent once the broker is back).
        with pytest.raises(TimeoutError, match="orders"):
            c.publish("orders", b"during", timeout=0.3)
        serve.start()
        acks = [c.publish("orders", b"after-%d" % i, timeout=TIMEOUT) for i in range(5)]
        assert c.reconnects >= 1 and c.connected
        assert all(a.durability is pybroker.Durability.DISK for a in acks)
        expected = [b"before-%d" % i for i in range(5)] + [b"during"] + [b"after-%d" % i for i in range(5)]
        with arrived:
            assert arrived.wait_for(lambda: len(got) >= len(expected), TIMEOUT)
        assert got == expected


def test_the_queue_to_the_connection_is_bounded(serve: Serve) -> None:
    """With the broker away and the async client's max_pending reached, the
    queue between the threads fills to OUTBOX_LIMIT, then send() waits up to
    its timeout; everything queued is stored once the broker is back."""
    with pybroker.sync.connect(serve.url, reconnect=FAST, max_pending=100) as c:
        c.publish("bounded", b"first")
        serve.kill()
        # 100 in the async client, one in the hand-over task's hands
        # (waiting for room there), OUTBOX_LIMIT in the queue.
        limit = pybroker.sync.OUTBOX_LIMIT
        pendings = [c.send("bounded", b"%d" % i, timeout=TIMEOUT) for i in range(100 + 1 + limit)]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="still waiting"):
            c.send("bounded", b"one too many", timeout=0.2)
        assert 0.2 <= time.monotonic() - t0 < TIMEOUT
        serve.start()
        c.flush(timeout=TIMEOUT * 3)
        offsets = [p.wait().offset for p in pendings]
        assert offsets == list(range(1, 102 + limit))
        assert c.publish("bounded", b"last").offset == 102 + limit


def test_close_gives_up_after_close_timeout(serve: Serve) -> None:
    c = pybroker.sync.connect(serve.url, reconnect=FAST, close_timeout=0.5)
    c.publish("away", b"stored")
    serve.kill()
    pendings = [c.send("away", b"%d" % i) for i in range(1000)]
    t0 = time.monotonic()
    c.close()
    assert time.monotonic() - t0 < 0.5 + 5.0  # not twice close_timeout, nor a reconnect's
    for p in pendings:
        with pytest.raises(ConnectionClosed):
            p.wait()
    assert not any(t.name.startswith("pybroker-sync") for t in threading.enumerate())


def test_close_leaves_no_thread_behind(serve: Serve) -> None:
    before = set(threading.enumerate())
    c = pybroker.sync.connect(serve.url, name="tidy")
    assert client_threads() == {"pybroker-sync tidy"}
    c.subscribe("a", lambda m: None, concurrency=3)
    c.subscribe("b", lambda m: None, group="g", concurrency=2)
    held = c.subscribe("c")
    reader = threading.Thread(target=lambda: list(held))
    reader.start()
    for i in range(100):
        c.send("a", b"x")
        c.send("b", b"y")
    c.flush()
    assert len(client_threads()) == 1 + 3 + 2
    c.close()
    reader.join(TIMEOUT)
    # Nothing started since is left (threads running before may end meanwhile:
    # trio's idle worker threads do).
    assert set(threading.enumerate()) - before == set()
    assert c.closed and not c.connected
    with pytest.raises(ConnectionClosed):
        c.send("a", b"late")
    with pytest.raises(ConnectionClosed):
        c.subscribe("a")
    with pytest.raises(ConnectionClosed):
        c.ping()


def test_close_waits_for_what_was_sent(serve: Serve) -> None:
    with pybroker.sync.connect(serve.url) as c:
        pendings = [c.send("closing", b"%d" % i) for i in range(20_000)]
    # Leaving the block handed everything over and waited for the acks.
    assert [p.result().offset for p in pendings] == list(range(20_000))
    with pybroker.sync.connect(serve.url) as c:
        assert c.topics("closing")[0].next_offset == 20_000


def test_connect_failure_raises_and_leaves_no_thread() -> None:
    before = set(threading.enumerate())
    with pytest.raises(OSError):
        pybroker.sync.connect(f"pybroker://127.0.0.1:{free_port()}", connect_timeout=5)
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(ValueError):
        pybroker.sync.connect("http://127.0.0.1:1")


def test_tls_and_credentials_pass_through(tmp_path: Path, certs: Certs) -> None:
    users = write_users(
        tmp_path, {"alice": user_entry(password="s3cret", publish=["orders.>"], subscribe=["orders.>"])}
    )
    before = set(threading.enumerate())
    with broker_thread(
        data_dir=tmp_path / "data", auth_file=users, tls_cert=certs.cert_file, tls_key=certs.key_file
    ) as server:
        assert server.url.startswith("pybrokers://")
        with pybroker.sync.connect(server.url, user="alice", password="s3cret", ca_file=certs.ca_file) as c:
            assert c.publish("orders.eu", b"x").offset == 0
            with pytest.raises(pybroker.PermissionDenied):
                c.publish("billing", b"x")  # raised in the calling thread
            with pytest.raises(pybroker.PermissionDenied):
                c.subscribe("billing")
            assert c.publish("orders.eu", b"y").offset == 1  # the connection stays open
        with pytest.raises(pybroker.AuthenticationError):
            pybroker.sync.connect(server.url, user="alice", password="wrong", ca_file=certs.ca_file)
        with pytest.raises(ssl.SSLCertVerificationError):
            pybroker.sync.connect(server.url, user="alice", password="s3cret")  # not our CA
        assert not client_threads()
    # Only Trio's idle worker threads (the broker's scrypt and fsync calls) remain.
    assert all(t.name.startswith("Trio thread") for t in set(threading.enumerate()) - before)


def test_connect_takes_the_async_options() -> None:
    sync_params = inspect.signature(pybroker.sync.connect).parameters
    async_params = inspect.signature(pybroker.connect).parameters
    assert list(sync_params) == list(async_params)
    for name, param in async_params.items():
        assert sync_params[name].default == param.default, name
    # subscribe() too, plus the blocking call's own timeout.
    sync_sub = inspect.signature(pybroker.sync.Client.subscribe).parameters
    async_sub = inspect.signature(pybroker.Client.subscribe).parameters
    assert [n for n in sync_sub if n != "timeout"] == list(async_sub)
    for name, param in async_sub.items():
        assert sync_sub[name].default == param.default, name


# ---------------------------------------------------------------------------
# Web frameworks


def test_a_flask_view_publishes_and_subscribes(pybroker_url: str) -> None:
    broker = pybroker.sync.connect(pybroker_url, name="flask")
    app = Flask("orders")
    orders = broker.subscribe("orders.created")

    @app.post("/orders")
    def create_order():  # type: ignore[no-untyped-def]
        ack = broker.publish("orders.created", request.get_data(), {"path": request.path})
        return jsonify(offset=ack.offset, durability=ack.durability.name)

    @app.get("/orders/next")
    def next_order():  # type: ignore[no-untyped-def]
        msg = orders.get(timeout=float(request.args.get("timeout", "5")))
        assert msg is not None
        return jsonify(offset=msg.offset, payload=msg.payload.decode(), path=msg.headers["path"])

    # A real threaded server: each request on a thread of its own.
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=server.serve_forever)
    serving.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        answers: dict[int, dict[str, object]] = {}

        def post(n: int) -> None:
            req = urllib.request.Request(f"{base}/orders", data=b"order-%d" % n, method="POST")
            with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
                answers[n] = json.loads(response.read())

        posters = [threading.Thread(target=post, args=(n,)) for n in range(8)]
        for p in posters:
            p.start()
        for p in posters:
            p.join(TIMEOUT)
        assert sorted(int(str(a["offset"])) for a in answers.values()) == list(range(8))
        assert {a["durability"] for a in answers.values()} == {"DISK"}
        received = []
        for _ in range(8):
            with urllib.request.urlopen(f"{base}/orders/next", timeout=TIMEOUT) as response:
                received.append(json.loads(response.read()))
        assert [r["offset"] for r in received] == list(range(8))
        assert sorted(r["payload"] for r in received) == sorted(f"order-{n}" for n in range(8))
        for n, answer in answers.items():  # each ack names its own order
            assert received[int(str(answer["offset"]))]["payload"] == f"order-{n}"
        assert {r["path"] for r in received} == {"/orders"}
    finally:
        server.shutdown()
        serving.join(TIMEOUT)
        broker.close()


def test_a_fastapi_app_publishes_and_subscribes(pybroker_url: str) -> None:
    broker = pybroker.sync.connect(pybroker_url, name="fastapi")
    seen: list[bytes] = []
    seen_threads: set[str] = set()
    arrived = threading.Condition()

    def on_order(msg: pybroker.sync.Message) -> None:
        with arrived:
            seen.append(msg.payload)
            seen_threads.add(threading.current_thread().name)
            arrived.notify_all()

    app = FastAPI()
    broker.subscribe("shop.>", on_order)

    @app.post("/sync")
    def publish_sync(payload: dict[str, str]) -> dict[str, int]:
        # A plain `def` endpoint: FastAPI runs it on a worker thread.
        ack = broker.publish("shop.sync", json.dumps(payload).encode())
        return {"offset": ack.offset}

    @app.post("/async")
    async def publish_async(request: Request) -> dict[str, int]:
        # An `async def` endpoint runs on the asyncio loop: hand the blocking
        # call to a worker thread rather than block the loop.
        body = await request.body()
        ack = await anyio.to_thread.run_sync(broker.publish, "shop.async", body)
        return {"offset": ack.offset}

    @app.get("/request")
    def ask() -> dict[str, str]:
        return {"reply": broker.request("shop.price", b"widget", timeout=TIMEOUT).payload.decode()}

    broker.subscribe("shop.price", lambda m: broker.respond(m, b"9.99"))

    async def main() -> None:
        # The app on an asyncio loop (this thread's), called over ASGI.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            assert (await http.post("/sync", json={"id": "1"})).json() == {"offset": 0}
            assert (await http.get("/request")).json() == {"reply": "9.99"}
            # Many at once: the loop is never blocked by a publish.
            answers = await asyncio.gather(
                *(http.post("/async", content=b'{"id": "a%d"}' % i) for i in range(8)),
                *(http.post("/sync", json={"id": f"s{i}"}) for i in range(8)),
            )
            assert sorted(r.json()["offset"] for r in answers[:8]) == list(range(8))
            assert sorted(r.json()["offset"] for r in answers[8:]) == list(range(1, 9))

    try:
        asyncio.run(main())
        expected = 1 + 1 + 8 + 8  # the publishes and the request
        with arrived:
            assert arrived.wait_for(lambda: len(seen) >= expected, TIMEOUT)
        assert sorted(seen) == sorted(
            [json.dumps({"id": "1"}).encode(), b"widget"]
            + [b'{"id": "a%d"}' % i for i in range(8)]
            + [json.dumps({"id": f"s{i}"}).encode() for i in range(8)]
        )
        assert all(name.startswith("pybroker-sync callback") for name in seen_threads)
    finally:
        broker.close()


# ---------------------------------------------------------------------------
# The pytest plugin's fixtures for tests without Trio


def test_the_thread_fixtures_are_one_broker(
    pybroker_server_thread: Server, pybroker_url: str, pybroker_sync_client: pybroker.sync.Client
) -> None:
    assert pybroker_url == pybroker_server_thread.url
    assert pybroker_sync_client.publish("fixtures", b"x").offset == 0
    # Its HTTP side is up too, on a port of its own.
    port = pybroker_server_thread.http_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/topics/fixtures", timeout=TIMEOUT) as response:
        assert json.loads(response.read())["next_offset"] == 1
    # The broker runs in a thread of its own, not this one.
    assert "pybroker-test-broker" in {t.name for t in threading.enumerate()}


def test_an_asyncio_test_uses_the_url_fixture(pybroker_url: str) -> None:
    async def main() -> list[bytes]:
        with pybroker.sync.connect(pybroker_url) as c:
            sub = c.subscribe("aio")
            acks = await asyncio.gather(*(asyncio.to_thread(c.publish, "aio", b"%d" % i) for i in range(5)))
            assert sorted(a.offset for a in acks) == list(range(5))
            got = [await asyncio.to_thread(sub.get, TIMEOUT) for _ in range(5)]
            return sorted(m.payload for m in got if m is not None)

    assert asyncio.run(main()) == [b"%d" % i for i in range(5)]


def test_a_client_never_closed_delivers_what_it_queued_at_exit(serve: Serve, tmp_path: Path) -> None:
    script = tmp_path / "forgetful.py"
    script.write_text(
        "import sys, pybroker.sync\n"
        "c = pybroker.sync.connect(sys.argv[1])\n"
        "c.subscribe('noise', lambda m: None)\n"
        "for i in range(100_000):\n"
        "    c.send('forgotten', b'%d' % i)\n"
        "print('exiting without close()', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), serve.url], capture_output=True, text=True, timeout=TIMEOUT, env=child_env()
    )
    assert done.returncode == 0, done.stderr
    assert "exiting without close()" in done.stdout
    with pybroker.sync.connect(serve.url) as c:
        assert c.topics("forgotten")[0].next_offset == 100_000
        with c.subscribe("forgotten", start="earliest") as sub:
            got = [m.payload for m in itertools.islice(sub.messages(timeout=TIMEOUT), 100_000)]
    assert got == [b"%d" % i for i in range(100_000)]


def test_admin_calls_declare_groups_and_delete_topics(pybroker_url: str) -> None:
    with pybroker.sync.connect(pybroker_url) as c:
        created = c.create_group("sync-workers", "sync.admin.>", start="earliest", ordering="key")
        assert created["created"] is True and created["config"]["ordering"] == "key"
        c.publish("sync.admin.a", b"x")
        c.publish("sync.admin.a", b"y")
        assert c.purge_topic("sync.admin.a", 1)["first_offset"] == 1
        assert c.delete_topic("sync.admin.a") == {"deleted": "sync.admin.a", "messages": 1}
        assert [t.topic for t in c.topics("sync.admin.>")] == []
