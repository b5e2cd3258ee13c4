"""Fixtures several test modules use (helpers they share: tests/helpers/)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from helpers.certs import Certs, make_certs
from helpers.cluster import Server as ServerProcess
from helpers.cluster import etcd_server, weed_server
from helpers.taskworkers import sync_client_threads


# The broker's own fixtures, as users would enable them.
pytest_plugins = ["pybroker.server.pytest_plugin"]

# Keep test output readable: the broker logs every connection at info.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# Two async test runners share this suite. pyproject.toml sets trio_mode:
# pytest-trio runs every async test under Trio, as the broker's own tests
# expect. The client's tests run under both Trio and asyncio: their modules
# say ``pytestmark = pytest.mark.anyio`` and anyio's pytest plugin runs each
# test once per backend (the ``anyio_backend`` fixture). Trio mode would
# claim those too (it marks every coroutine test ``trio`` at collection), so
# the hook below takes that mark off anything anyio runs; each test then has
# exactly one runner. Their async fixtures are anyio's as well (anyio wraps
# any async fixture a test with ``anyio_backend`` requests, before
# pytest-trio looks at it).
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("anyio") is not None:
            item.own_markers[:] = [m for m in item.own_markers if m.name != "trio"]


@pytest.fixture(params=["trio", "asyncio"], scope="module")
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both backends, Trio first (anyio's default list order varies)."""
    backend: str = request.param
    return backend


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """A test CA and a server certificate for 127.0.0.1 under ``tmp_path``."""
    return make_certs(tmp_path)


@pytest.fixture
def no_sync_client_left_behind() -> Iterator[None]:
    """Every blocking client a test opened in this process is closed by its
    end (the task-queue tests: kombu and Dramatiq hold connections that a
    framework's close() does not close)."""
    before = sync_client_threads()
    yield
    assert sync_client_threads() == before


@pytest.fixture(scope="session")
def cluster_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerProcess, str]]:
    """One etcd member and one SeaweedFS for the cluster test modules that
    neither stop nor restart them: (etcd URL, etcd's process, S3 endpoint).
    Started on first use; every test keeps to its own key prefix, object
    prefix or bucket. Modules that stop, pause or kill a server start their
    own (tests/helpers/cluster.py)."""
    tmp = tmp_path_factory.mktemp("cluster-shared")
    with etcd_server(tmp) as (etcd_url, etcd), weed_server(tmp, max_volumes=64) as (s3_url, _weed):
        yield etcd_url, etcd, s3_url
