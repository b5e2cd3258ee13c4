"""TLS on the broker's listeners: the server context and per-connection wrapping.

TLS sits below the framing (protocol.md, "Transport"): a connection accepted
on a TLS listener becomes a ``trio.SSLStream`` over the TCP stream, and the
session (or the HTTP connection) above it is unchanged. The TLS handshake
runs lazily inside the first receive, so the session's handshake timeout
(the HTTP side's request timeout) also cuts off a peer that never finishes
it. A peer that speaks plain TCP or garbage, or aborts the handshake, makes
that receive raise ``trio.BrokenResourceError``, which both connection loops
already treat as a lost connection: it costs that connection only.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import NoReturn

import trio

from .closing import linger_close
from .config import Config


class TLSConfigError(OSError):
    """The certificate or key cannot be used: the broker does not start.

    An OSError, like the other start-up failures a bad file or address
    causes, so ``pybroker serve`` reports it as one line and exits 1.
    """


def server_context(config: Config) -> ssl.SSLContext | None:
    """The server context for ``config.tls_cert``/``tls_key``; None without TLS.

    Built once at start, so a missing or unusable file stops the broker
    before it listens instead of failing every handshake.
    """
    if config.tls_cert is None:
        if config.tls_key is not None:
            raise TLSConfigError("a TLS key was given without a certificate (--tls-cert, Config.tls_cert)")
        return None
    cert = Path(config.tls_cert)
    key = Path(config.tls_key) if config.tls_key is not None else None
    for what, path in (("certificate", cert), ("key", key)):
        if path is not None and not path.is_file():
            raise TLSConfigError(f"TLS {what} file {str(path)!r} does not exist or is not a file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        key_text = f" with key {str(key)!r}" if key is not None else ""
        raise TLSConfigError(
            f"cannot load TLS certificate {str(cert)!r}{key_text}: {exc.reason or exc}"
            " (expected a PEM certificate chain and its unencrypted PEM private key)"
        ) from exc
    except OSError as exc:
        raise TLSConfigError(f"cannot read the TLS certificate or key: {exc}") from exc
    return context


def _no_password() -> NoReturn:
    # Without a callback OpenSSL would prompt on the terminal for an
    # encrypted key: a broker started by a service manager would hang.
    raise TLSConfigError("the TLS private key is encrypted; give an unencrypted key file")


def wrap_server_stream(
    stream: trio.SocketStream, context: ssl.SSLContext | None, *, https: bool = False
) -> trio.abc.Stream:
    """The stream a connection handler should use: ``stream`` itself without TLS.

    ``https``: the HTTP listener, where peers commonly close without a TLS
    close_notify (``https_compatible``, as HTTPS clients expect).
    """
    if context is None:
        return stream
    return trio.SSLStream(
        _LingeringTransport(stream), context, server_side=True, https_compatible=https
    )


class _LingeringTransport(trio.abc.Stream):
    """The TCP stream under an SSLStream, closed the way ``linger_close`` closes TCP.

    ``SSLStream.aclose`` sends close_notify and then closes its transport.
    Closing a socket with unread input resets the connection, which can
    destroy our last records (an ERROR frame, GOODBYE) before the peer reads
    them, so this transport sends EOF and drains before it closes, like a
    plain connection does.
    """

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        try:
            await linger_close(self.inner)
        finally:
            # Cancelled while lingering (aclose_forcefully): still close.
            await trio.aclose_forcefully(self.inner)
