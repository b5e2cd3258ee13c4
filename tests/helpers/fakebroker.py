"""A stand-in broker's side of one connection, for client tests that need
a broker misbehaving in a chosen way (silent, mute, refusing the HELLO)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc

from pybroker.protocol import NEED_DATA, Connection, Event, Role

#: Answers one event the client sent (``conn`` encodes the answer for
#: ``stream``); False ends the connection.
Answer = Callable[[anyio.abc.SocketStream, Connection, Event], Awaitable[bool]]


async def serve_client(stream: anyio.abc.SocketStream, answer: Answer, timeout: float) -> None:
    """Read the client's events and hand each to ``answer``, until the client
    closes, ``answer`` says so, or ``timeout`` seconds have passed."""
    conn = Connection(Role.SERVER)
    async with stream:
        with anyio.move_on_after(timeout):
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    try:
                        conn.receive_data(await stream.receive(65536))
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                elif not await answer(stream, conn, event):
                    return
