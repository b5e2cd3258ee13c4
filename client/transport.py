"""Opening the byte stream under a client connection: TCP, or TLS over TCP.

TLS sits below the framing (protocol.md, "Transport"). ``pybrokers://``
URLs, or ``tls=True``, verify the broker's certificate and host name against
the system's CAs, or against ``ca_file``; ``tls=`` also takes a ready
``ssl.SSLContext`` (client certificates, pinning, ...).

Streams are anyio's, so the same code runs under Trio and asyncio.
"""

from __future__ import annotations

import errno
import os
import ssl
from os import PathLike

import anyio
from anyio.abc import ByteStream
from anyio.streams.tls import TLSStream

from .errors import ConnectionClosed, Timeout

TLSOption = ssl.SSLContext | bool | None
CAFile = str | PathLike[str] | None


def client_context(tls: TLSOption, ca_file: CAFile, *, url_tls: bool) -> ssl.SSLContext | None:
    """The context to connect with, or None for plain TCP.

    ``tls``: None follows the URL's scheme; True or a context asks for TLS
    whatever the scheme; False refuses it (an error with ``pybrokers://``,
    which promises TLS). ``ca_file`` alone also asks for TLS.
    """
    if isinstance(tls, ssl.SSLContext):
        if ca_file is not None:
            raise ValueError("give ca_file or an ssl.SSLContext as tls, not both")
        return tls
    if tls is False:
        if url_tls:
            raise ValueError("a pybrokers:// URL needs TLS; tls=False contradicts it")
        if ca_file is not None:
            raise ValueError("ca_file was given with tls=False")
        return None
    if tls is None and not url_tls and ca_file is None:
        return None
    if ca_file is not None and not os.path.isfile(ca_file):
        # ssl's own error names no file.
        raise FileNotFoundError(errno.ENOENT, "no such CA file", os.fspath(ca_file))
    # create_default_context: certificate and host name checks on, TLS >= 1.2.
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except ssl.SSLError as exc:
        exc.add_note(f"(loading the CA file {os.fspath(ca_file or '')!r})")
        raise
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def open_stream(
    host: str, port: int, *, ssl_context: ssl.SSLContext | None, timeout: float
) -> ByteStream:
    """A connected stream to ``host:port``, with the TLS handshake done.

    The handshake runs here rather than lazily on the first send, so a
    certificate that fails verification raises from ``connect()`` itself as
    the ``ssl.SSLCertVerificationError`` it is; other TLS failures raise
    ``ssl.SSLError``. No connection within ``timeout`` raises :class:`Timeout`.
    """
    stream: ByteStream | None = None
    # move_on_after, not fail_after: an OS-level ETIMEDOUT is a TimeoutError
    # too, and must stay the OSError it is.
    with anyio.move_on_after(timeout) as scope:
        stream = await anyio.connect_tcp(host, port)
        if ssl_context is not None:
            stream = await _handshake(stream, host, port, ssl_context)
    if scope.cancelled_caught:
        if stream is not None:
            await anyio.aclose_forcefully(stream)
        what = "TLS handshake with" if stream is not None else "connecting to"
        raise Timeout(f"{what} {host}:{port}: no answer within {timeout:g} s")
    assert stream is not None
    return stream


async def _handshake(tcp: ByteStream, host: str, port: int, context: ssl.SSLContext) -> ByteStream:
    try:
        # standard_compatible: a peer that closes without close_notify has
        # broken the stream (a truncation attack looks the same).
        return await TLSStream.wrap(tcp, hostname=host, ssl_context=context, standard_compatible=True)
    except ssl.SSLCertVerificationError as exc:
        await anyio.aclose_forcefully(tcp)
        exc.add_note(f"(TLS handshake with {host}:{port})")
        raise
    except ssl.SSLError as exc:
        await anyio.aclose_forcefully(tcp)
        # Usually a peer that does not speak TLS: say so.
        raise ssl.SSLError(
            f"TLS handshake with {host}:{port} failed: {exc}"
            " (does the broker serve TLS on that port?)"
        ) from exc
    except (anyio.BrokenResourceError, anyio.EndOfStream) as exc:
        await anyio.aclose_forcefully(tcp)
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLError):
            raise ssl.SSLError(
                f"TLS handshake with {host}:{port} failed: {cause}"
                " (does the broker serve TLS on that port?)"
            ) from cause
        raise ConnectionClosed(
            f"the TLS handshake with {host}:{port} failed: {cause or exc!r}"
        ) from exc
    except BaseException:
        await anyio.aclose_forcefully(tcp)
        raise
