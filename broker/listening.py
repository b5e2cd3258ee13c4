"""Opening the broker's listening sockets, with errors that say where, and
accepting connections on them.

``trio.open_tcp_listeners`` raises the bare OSError ("[Errno 98] Address
already in use"); an operator starting ``pybroker serve`` with two ports
needs to know which one, and on which address.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

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


#: accept() failures that mean the process is out of something for now
#: (descriptors, memory): wait and retry, as trio.serve_listeners does.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_SECONDS = 0.1


async def serve_streams(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    listeners: list[trio.SocketListener],
    handler_nursery: trio.Nursery,
    logger: Any,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """``trio.serve_listeners``, except that the handler owns its stream and
    closes it itself: a connection may outlive its first task (an idle one
    is parked without a task, broker/session/parking.py), so the stream is
    not closed when the handler returns. Runs until cancelled."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, handler, listener, handler_nursery, logger)
        task_status.started()
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


async def _accept_loop(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    listener: trio.SocketListener,
    handler_nursery: trio.Nursery,
    logger: Any,
) -> None:
    async with listener:  # closed when accepting stops: no connection waits in its backlog
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                logger.error(
                    "accept failed; retrying", error=errno.errorcode[exc.errno], retry_in=_ACCEPT_RETRY_SECONDS
                )
                await trio.sleep(_ACCEPT_RETRY_SECONDS)
            else:
                handler_nursery.start_soon(handler, stream)
