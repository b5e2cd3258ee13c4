"""Closing a TCP connection without losing our last words.

Closing a socket with unread input makes the kernel send a reset, which can
destroy what we sent just before (an ERROR frame, an HTTP error answer)
before the peer reads it. So: send EOF, read and drop what the peer still
sends (bounded in bytes and time), then close. Both the binary protocol's
sessions and the HTTP side close this way. Over TLS (broker/tls.py) the
SSLStream sends close_notify first and its transport does the lingering.
"""

from __future__ import annotations

import trio

#: Input drained (and dropped) before closing, at most.
LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 1.0
_CHUNK = 64 * 1024


async def drain(stream: trio.abc.ReceiveStream, limit: int = LINGER_BYTES) -> None:
    """Read and drop input until EOF, an error or ``limit`` bytes."""
    drained = 0
    try:
        while drained < limit:
            data = await stream.receive_some(_CHUNK)
            if not data:
                return
            drained += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


async def linger_close(stream: trio.abc.Stream, *, send_eof: bool = True) -> None:
    """EOF, drain for up to LINGER_SECONDS, then close (forcefully if need be)."""
    if isinstance(stream, trio.SSLStream):
        await _close_tls(stream, linger=send_eof)
        return
    try:
        if send_eof and isinstance(stream, trio.SocketStream):
            await stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):
                await drain(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    await trio.aclose_forcefully(stream)


async def _close_tls(stream: trio.SSLStream[trio.abc.Stream], *, linger: bool) -> None:
    # aclose sends close_notify (unless https_compatible), then closes the
    # transport, which lingers when broker.tls made it. Bounded: a peer that
    # never read our handshake or close_notify must not hold the close up.
    if linger:
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
    await trio.aclose_forcefully(stream)
