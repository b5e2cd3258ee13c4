"""Fixtures several test modules use (helpers they share: tests/helpers/)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog

from helpers.certs import Certs, make_certs


# The broker's own fixtures, as users would enable them.
pytest_plugins = ["pybroker.server.pytest_plugin"]

# Keep test output readable: the broker logs every connection at info.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """A test CA and a server certificate for 127.0.0.1 under ``tmp_path``."""
    return make_certs(tmp_path)
