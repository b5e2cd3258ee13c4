"""Pytest fixtures for testing against a real pybroker.

Enable with ``pytest_plugins = ["pybroker.server.pytest_plugin"]`` in conftest.py.

For any test (plain functions, asyncio, threads; nothing else to install):

- ``pybroker_url``: the URL of a broker running in a background thread
  (its own ``trio.run``) on 127.0.0.1 and a free port.
- ``pybroker_server_thread``: that broker (``.url``, ``.port``,
  ``.http_port``).
- ``pybroker_sync_client``: a connected :mod:`pybroker.sync` client for it.

For Trio tests (with pytest-trio: ``@pytest.mark.trio``, or ``trio_mode =
true`` in the pytest configuration):

- ``pybroker_server``: a broker running in the test's own Trio loop; use
  ``pybroker_server.url``.
- ``pybroker_client``: a connected async client for that broker.

Every fixture is per test (function scope): each test gets a new broker
whose data directory is under the test's ``tmp_path``, so no test sees
another's topics, groups or offsets. A broker starts in a few milliseconds,
which is why there is no shared, per-session one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import pybroker
import pybroker.sync

from .server import Server
from .testing import broker_thread, running_broker


@pytest.fixture
async def pybroker_server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_broker(data_dir=tmp_path / "pybroker-data") as server:
        yield server


@pytest.fixture
async def pybroker_client(pybroker_server: Server) -> AsyncIterator[pybroker.Client]:
    async with pybroker.connect(pybroker_server.url, name="pytest") as c:
        yield c


@pytest.fixture
def pybroker_server_thread(tmp_path: Path) -> Iterator[Server]:
    with broker_thread(data_dir=tmp_path / "pybroker-data") as server:
        yield server


@pytest.fixture
def pybroker_url(pybroker_server_thread: Server) -> str:
    return pybroker_server_thread.url


@pytest.fixture
def pybroker_sync_client(pybroker_url: str) -> Iterator[pybroker.sync.Client]:
    with pybroker.sync.connect(pybroker_url, name="pytest") as c:
        yield c
