"""An in-process broker's state: its sessions, and bounded polling of what
no event announces (a connection gone on the broker's side, a counter)."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from pybroker.server.server import Server
from pybroker.server.session import Session

#: Default bound on a poll.
TIMEOUT = 10.0


async def wait_until(check: Callable[[], object], timeout: float = TIMEOUT) -> None:
    """Poll ``check`` until it holds, failing after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.005)


async def wait_sessions(server: Server, count: int, timeout: float = TIMEOUT) -> None:
    """Wait until the broker has exactly ``count`` connections (bounded)."""
    await wait_until(lambda: len(server.sessions) == count, timeout)


def session_named(server: Server, name: str) -> Session:
    """The one session whose client is called ``name``."""
    found = [s for s in server.sessions if s.client_name == name]
    assert len(found) == 1, f"sessions named {name!r}: {len(found)} of {[s.client_name for s in server.sessions]}"
    return found[0]
