"""Run a real broker inside a test suite.

    from pybroker.server.testing import running_broker

    async def test_something(tmp_path):
        async with running_broker(data_dir=tmp_path) as server:
            async with pybroker.connect(server.url) as c:
                ...

Pytest users can instead enable the fixtures of :mod:`pybroker.server.pytest_plugin`
with ``pytest_plugins = ["pybroker.server.pytest_plugin"]`` in their conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .config import Config
from .server import Server, run_broker


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


__all__ = ["Server", "running_broker"]
