"""Run a real broker inside a test suite.

    from pybroker.server.testing import running_broker

    async def test_something(tmp_path):            # Trio
        async with running_broker(data_dir=tmp_path) as server:
            async with pybroker.connect(server.url) as c:
                ...

    def test_something_else(tmp_path):             # any test: no event loop needed
        with broker_thread(data_dir=tmp_path) as server:
            with pybroker.sync.connect(server.url) as c:
                ...

Pytest users can instead enable the fixtures of :mod:`pybroker.server.pytest_plugin`
with ``pytest_plugins = ["pybroker.server.pytest_plugin"]`` in their conftest.py.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from .config import Config
from .server import Server, run_broker

#: Bound on starting and on stopping a broker thread, in seconds.
THREAD_TIMEOUT = 30.0


@asynccontextmanager
async def running_broker(**overrides: Any) -> AsyncIterator[Server]:
    """A broker on 127.0.0.1 and a free port (``server.url``), stopped on exit.
    Its HTTP side listens on another free port (``server.http_port``).

    Keyword arguments override :class:`broker.config.Config` fields. With a
    ``data_dir`` it uses the durable file log there (fsync ``always`` unless
    ``topic_settings`` says otherwise); without one, memory storage.
    """
    overrides.setdefault("host", "127.0.0.1")
    overrides.setdefault("port", 0)
    overrides.setdefault("http_port", 0)  # the HTTP side too: server.http_port
    if "data_dir" not in overrides:
        # Nowhere to put files: keep everything in memory rather than
        # writing into the current directory.
        overrides.setdefault("storage", "memory")
    async with run_broker(Config(), **overrides) as server:
        yield server


@contextmanager
def broker_thread(**overrides: Any) -> Iterator[Server]:
    """:func:`running_broker` in a thread of its own (its own ``trio.run``),
    for tests without a Trio loop: plain functions, asyncio, threads. Yields
    once it listens (``server.url``, ``server.port``, ``server.http_port``;
    read those, and leave the rest of the Server to its thread); on exit it
    shuts down gracefully, as ``pybroker serve`` does on Ctrl-C, and the
    thread ends. Same keyword arguments as :func:`running_broker`.
    """
    started: queue.Queue[tuple[Server, trio.lowlevel.TrioToken, trio.Event] | BaseException] = queue.Queue(1)

    async def serve() -> None:
        stop = trio.Event()
        async with running_broker(**overrides) as server:
            started.put((server, trio.lowlevel.current_trio_token(), stop))
            await stop.wait()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # handed to the test's thread
            failure.append(exc)
            if started.empty():
                started.put(exc)

    thread = threading.Thread(target=run, name="pybroker-test-broker", daemon=True)
    thread.start()
    try:
        result = started.get(timeout=THREAD_TIMEOUT)
    except queue.Empty:
        raise TimeoutError(f"the broker thread did not start within {THREAD_TIMEOUT:g} s") from None
    if isinstance(result, BaseException):
        thread.join(THREAD_TIMEOUT)
        raise result
    server, token, stop = result
    try:
        yield server
    finally:
        try:
            token.run_sync_soon(stop.set)
        except trio.RunFinishedError:
            pass  # it ended already; failure says why
        thread.join(THREAD_TIMEOUT)
        if thread.is_alive():
            raise TimeoutError(f"the broker thread did not stop within {THREAD_TIMEOUT:g} s")
        if failure:
            raise failure[0]


__all__ = ["Server", "broker_thread", "running_broker"]
