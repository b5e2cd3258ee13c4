"""Headless Chromium for the browser tests, through Playwright: Debian's
chromium (never a downloaded one: no downloads from outside the package
registries). ``playwright_sync_api()`` skips the calling test module, saying why, when
either is missing."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def playwright_sync_api() -> ModuleType:
    """playwright.sync_api, or a skip of the whole module that asked."""
    api = pytest.importorskip(
        "playwright.sync_api",
        reason="the browser test needs Playwright: pip install -e '.[browser]'",
    )
    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"the browser test needs Debian's chromium at {CHROMIUM}: apt-get install -y chromium",
            allow_module_level=True,
        )
    return api
