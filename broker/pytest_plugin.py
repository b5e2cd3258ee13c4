"""Pytest fixtures for testing against a real pybroker (needs pytest-trio).

Enable with ``pytest_plugins = ["pybroker.server.pytest_plugin"]`` in conftest.py:

- ``pybroker_server``: a running broker on 127.0.0.1, a free port, its data
  directory under the test's ``tmp_path``; use ``pybroker_server.url``.
- ``pybroker_client``: a connected client for that broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import pybroker

from .server import Server
from .testing import running_broker


@pytest.fixture
async def pybroker_server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_broker(data_dir=tmp_path / "pybroker-data") as server:
        yield server


@pytest.fixture
async def pybroker_client(pybroker_server: Server) -> AsyncIterator[pybroker.Client]:
    async with pybroker.connect(pybroker_server.url, name="pytest") as c:
        yield c
