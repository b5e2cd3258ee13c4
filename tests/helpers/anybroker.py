"""An in-process broker for client tests that run under Trio and asyncio.

The broker is a Trio program. Under the Trio backend it runs in the test's
own event loop, as ``running_broker`` always did; under asyncio it cannot
share the loop, so it runs in a thread of its own with its own ``trio.run``
(anyio's blocking portal), and the test talks to it over TCP like any other
client. Starting and stopping it happen in a worker thread, so the asyncio
loop keeps serving the test's clients meanwhile (a broker that shuts down
says GOODBYE and waits for the answer).

Tests that reach into the broker's internals (``server.sessions``, its
storage) while it runs read them from another thread under asyncio: a
snapshot, good for counting; anything that awaits a broker method is for
Trio only (mark the test with ``trio_only``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import sniffio
from anyio.abc import TaskStatus
from anyio.from_thread import start_blocking_portal

from pybroker.server.server import Server
from pybroker.server.testing import running_broker

#: Bound on stopping a broker that runs in a thread.
STOP_TIMEOUT = 30.0

#: Run this test under the Trio backend only (it drives broker internals
#: that live in the broker's event loop).
trio_only = pytest.mark.parametrize("anyio_backend", ["trio"])


@asynccontextmanager
async def serving(**overrides: Any) -> AsyncIterator[Server]:
    """``running_broker(**overrides)`` under whichever backend runs the test."""
    if sniffio.current_async_library() == "trio":
        async with running_broker(**overrides) as server:
            yield server
        return
    with start_blocking_portal(backend="trio") as portal:
        context = portal.wrap_async_context_manager(running_broker(**overrides))
        server = await anyio.to_thread.run_sync(context.__enter__)
        try:
            yield server
        finally:
            # Bounded: a broker that does not stop fails the test, not hangs it.
            with anyio.move_on_after(STOP_TIMEOUT, shield=True) as scope:
                await anyio.to_thread.run_sync(
                    context.__exit__, None, None, None, abandon_on_cancel=True
                )
            if scope.cancelled_caught:
                raise TimeoutError(f"the broker in its thread did not stop within {STOP_TIMEOUT} s")


async def serve_until(
    stop: anyio.Event,
    *,
    task_status: TaskStatus[Server] = anyio.TASK_STATUS_IGNORED,
    **config: Any,
) -> None:
    """``serving(**config)`` until ``stop`` is set; start it with
    ``task_group.start`` (it hands over the Server)."""
    async with serving(**config) as server:
        task_status.started(server)
        await stop.wait()


@pytest.fixture
async def pybroker_server(tmp_path: Path, anyio_backend: object) -> AsyncIterator[Server]:
    """The plugin's fixture of the same name, under either backend (import
    it into a test module to use it there)."""
    async with serving(data_dir=tmp_path / "pybroker-data") as server:
        yield server
