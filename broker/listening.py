"""Opening the broker's listening sockets, with errors that say where.

``trio.open_tcp_listeners`` raises the bare OSError ("[Errno 98] Address
already in use"); an operator starting ``pybroker serve`` with two ports
needs to know which one, and on which address.
"""

from __future__ import annotations

import trio


async def open_listeners(what: str, host: str | None, port: int) -> list[trio.SocketListener]:
    """TCP listeners on ``host:port`` for ``what`` ("TCP", "HTTP"); an
    OSError names the address and the flag that sets it."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        flag = "--http-port" if what == "HTTP" else "--port"
        raise OSError(
            exc.errno,
            f"cannot listen for {what} on {host or '*'}:{port}: {exc.strerror or exc} (choose another with {flag}, or 0 for a free one)",
        ) from exc
