"""The HTTP listener and its connection loop: h11 over Trio, one task per connection.

Each connection runs :class:`HttpConnection`, which feeds socket bytes to an
``h11.Connection`` (sans-I/O), hands each complete request to the routes
(:mod:`.routes`) and writes back what they answer. Limits and timeouts
(``Config.http``):

- the request line and headers are bounded by h11's
  ``max_incomplete_event_size`` (431 beyond); bodies by ``max_body_bytes``
  (413, without reading them when Content-Length already says so);
- a request must arrive whole within ``request_timeout`` of its first byte
  (of the connection opening, for the first one): 408 and close. An idle
  keep-alive connection is closed quietly after ``keepalive_timeout``;
- every write must be taken by the peer within ``write_timeout``, so a
  client that stops reading (an SSE stream included) is disconnected
  rather than holding memory;
- at most ``max_connections`` at once; more get 503.

Shutdown (:meth:`HttpServer.shutdown`): stop accepting, close idle
connections, end event streams cleanly, let requests in progress finish.
"""

from __future__ import annotations

import itertools
import ssl
from collections import Counter
from collections.abc import Iterable
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, unquote

import attrs
import h11
import trio

from .. import __version__
from ..closing import drain, linger_close
from ..listening import open_listeners
from ..logs import get_logger
from .access import authenticate
from .cors import Cors
from ..tls import wrap_server_stream
from .messages import HttpError, Request, Response, StreamResponse
from .rates import RateSampler
from .routes import allowed_methods, build_routes, dispatch, find

if TYPE_CHECKING:
    from ..core import Broker
    from ..session import Session

RECEIVE_SIZE = 64 * 1024
SERVER_HEADER = f"pybroker/{__version__}"


class _Timeout(Exception):
    """The request (or the idle wait for one) ran out of time."""

    def __init__(self, partial: bool) -> None:
        self.partial = partial


class _PeerGone(Exception):
    """The peer closed, reset, or stopped taking what we send."""


class Listener(Protocol):
    """What the HTTP side shows of the TCP listener it runs beside
    (broker/server.py): readiness, uptime, its connections."""

    ready: bool
    started_at: float
    host: str
    port: int
    tls: ssl.SSLContext | None
    sessions: set[Session]
    connections_total: int
    connections_refused: int


class HttpServer:
    """The HTTP side of one broker: its handlers call the core
    (broker/core.py) and read the listener's figures."""

    def __init__(self, broker: Broker, listener: Listener) -> None:
        self.broker = broker
        self.listener = listener
        self.config = broker.config
        self.settings = broker.config.http
        self.logger: Any = get_logger(component="http")
        self.connections: dict[int, HttpConnection] = {}
        self.connections_total = 0
        self.requests_by_status: Counter[int] = Counter()
        self.rates = RateSampler(broker.router)
        self.routes = build_routes(self)
        self.cors = Cors(self.settings.cors_origins)
        #: /metrics encodes in a worker thread, one scrape at a time.
        self.metrics_encoding = trio.CapacityLimiter(1)
        self.host = ""
        self.port = 0
        self.stopping = False
        self._ids = itertools.count(1)
        self._shutdown = trio.Event()
        self._stopped = trio.Event()

    def shutdown(self) -> None:
        """Stop accepting; close idle connections and event streams."""
        self.stopping = True
        self._shutdown.set()
        for conn in list(self.connections.values()):
            conn.stop()

    def end_streams(self) -> None:
        """End every event stream (its connection closes once it has);
        other connections go on (a cluster node stepping aside)."""
        for conn in list(self.connections.values()):
            if conn.streaming:
                conn.stop()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until :meth:`shutdown`; ``task_status.started(port)``."""
        config = self.config
        host = config.http_host if config.http_host is not None else config.host
        listeners = await open_listeners("HTTP", host, config.http_port or 0)
        try:
            sockname = listeners[0].socket.getsockname()
            self.host, self.port = sockname[0], sockname[1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.rates.run)
                async with trio.open_nursery() as connections:
                    async with trio.open_nursery() as accepting:
                        await accepting.start(
                            partial(
                                trio.serve_listeners,
                                self._handle,
                                listeners,
                                handler_nursery=connections,
                            )
                        )
                        self.logger.info(
                            "http listening",
                            host=self.host,
                            port=self.port,
                            tls=self.listener.tls is not None,
                        )
                        task_status.started(self.port)
                        await self._shutdown.wait()
                        accepting.cancel_scope.cancel()
                    # Requests in progress finish; this bounds a stuck one.
                    connections.cancel_scope.deadline = (
                        trio.current_time() + config.shutdown_grace
                    )
                nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self._stopped.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn_id = next(self._ids)
        try:
            addr = stream.socket.getpeername()
            peer = f"{addr[0]}:{addr[1]}"
        except OSError:
            peer = "?"
        # HTTPS peers often close without close_notify: https_compatible.
        tls_stream = wrap_server_stream(stream, self.listener.tls, https=True)
        conn = HttpConnection(self, tls_stream, conn_id, peer)
        if len(self.connections) >= self.settings.max_connections or self.stopping:
            await conn.refuse(HttpError(503, "too many HTTP connections" if not self.stopping else "shutting down"))
            return
        self.connections[conn_id] = conn
        self.connections_total += 1
        try:
            await conn.run()
        finally:
            del self.connections[conn_id]


class HttpConnection:
    def __init__(self, http: HttpServer, stream: trio.abc.Stream, conn_id: int, peer: str) -> None:
        self.http = http
        self.settings = http.settings
        self.stream = stream
        self.conn_id = conn_id
        self.peer = peer
        self.logger: Any = http.logger.bind(http_conn=conn_id, peer=peer)
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.settings.max_header_bytes
        )
        self.requests = 0
        self.stopping = False
        self._peer_closed = False
        self._deadline = 0.0
        self._got_bytes = False
        self._idle_scope: trio.CancelScope | None = None
        self._stream_scope: trio.CancelScope | None = None

    @property
    def streaming(self) -> bool:
        return self._stream_scope is not None

    def stop(self) -> None:
        """Server shutdown: finish the request in progress, then close."""
        self.stopping = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()
        if self._stream_scope is not None:
            self._stream_scope.cancel()

    async def run(self) -> None:
        try:
            while not self.stopping and await self._cycle():
                self.h11.start_next_cycle()
        except _PeerGone:
            pass
        except Exception:
            self.logger.exception("internal error in the HTTP connection loop")
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    async def refuse(self, error: HttpError) -> None:
        try:
            await self._send_response(error.response(), head=False, close=True)
        except _PeerGone:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    # -- one request ------------------------------------------------------

    async def _cycle(self) -> bool:
        """Read one request and answer it; True to keep the connection."""
        now = trio.current_time()
        if self.requests == 0:
            self._deadline = now + self.settings.request_timeout
        else:
            self._deadline = now + self.settings.keepalive_timeout
        self._got_bytes = bool(self.h11.trailing_data[0])
        if self._got_bytes:
            self._deadline = now + self.settings.request_timeout
        try:
            event = await self._next_event()
            if isinstance(event, h11.ConnectionClosed):
                return False
            if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees it
                raise HttpError(400, "expected a request")
            self.requests += 1
            request_head = event
            # h11 bounds only a head still incomplete; one that arrived whole
            # in a single read is measured here.
            head_size = len(event.method) + len(event.target) + sum(
                len(name) + len(value) + 4 for name, value in event.headers
            )
            if head_size > self.settings.max_header_bytes:
                raise HttpError(
                    431, f"request line and headers exceed {self.settings.max_header_bytes} bytes"
                )
            body = await self._read_body(request_head)
            request = self._request(request_head, body)
        except _Timeout as timeout:
            if timeout.partial:
                self.logger.info("request timed out", requests=self.requests)
                await self._send_error(HttpError(408, "the request did not arrive in time"))
            return False
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self.logger.info("malformed request", status=status, detail=str(exc))
            message = (
                f"request line and headers exceed {self.settings.max_header_bytes} bytes"
                if status == 431
                else f"malformed request: {exc}"
            )
            await self._send_error(HttpError(status, message))
            return False
        except HttpError as exc:
            await self._send_error(exc)
            return False

        head = request.method == "HEAD"
        response: Response | StreamResponse
        try:
            if request.method == "OPTIONS":
                # Before authentication: a CORS preflight has no credentials.
                route, _ = find(self.http.routes, request)
                response = self.http.cors.options(request, allowed_methods(route))
            else:
                request = await authenticate(self.http, request)
                response = await dispatch(self.http.routes, request)
        except HttpError as exc:
            response = exc.response()
        except Exception:
            self.logger.exception("handler failed", method=request.method, path=request.path)
            response = HttpError(500, "internal error").response()
        self.logger.debug(
            "http request", method=request.method, path=request.path, status=response.status
        )
        response = attrs.evolve(response, headers=self.http.cors.headers(request, response.headers))
        if isinstance(response, StreamResponse):
            await self._stream(response, head)
            return False
        close = self.stopping or self.http.stopping
        await self._send_response(response, head=head, close=close)
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]  # h11 types sentinels loosely
            idle = not self._got_bytes
            scope = trio.CancelScope(deadline=self._deadline)
            if idle:
                self._idle_scope = scope  # shutdown may close an idle connection
                if self.stopping:
                    scope.cancel()
            data: bytes | bytearray = b""
            try:
                with scope:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            finally:
                self._idle_scope = None
            if scope.cancelled_caught:
                raise _Timeout(partial=not idle)
            if not data:
                self._peer_closed = True
            elif not self._got_bytes:
                self._got_bytes = True
                if self.requests > 0:  # a keep-alive request: its own clock starts now
                    self._deadline = trio.current_time() + self.settings.request_timeout
            self.h11.receive_data(bytes(data))

    async def _read_body(self, head: h11.Request) -> bytes:
        limit = self.settings.max_body_bytes
        for name, value in head.headers:
            if name == b"content-length" and int(value) > limit:
                raise HttpError(413, f"request body of {int(value)} bytes, limit {limit}")
        if self.h11.client_is_waiting_for_100_continue:
            await self._send(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > limit:
                    raise HttpError(413, f"request body over the limit of {limit} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:  # pragma: no cover - h11 only yields Data then EndOfMessage here
                raise HttpError(400, "unexpected event in the request body")

    def _request(self, head: h11.Request, body: bytes) -> Request:
        try:
            method = head.method.decode("ascii")
            target = head.target.decode("ascii")
        except UnicodeDecodeError:
            raise HttpError(400, "request target is not ASCII") from None
        if not target.startswith("/"):
            raise HttpError(400, f"request target must be a path, got {target!r}")
        raw_path, _, raw_query = target.partition("?")
        raw_path = raw_path.split("#", 1)[0]
        try:
            segments = tuple(unquote(s, errors="strict") for s in raw_path.split("/")[1:])
            pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError) as exc:
            raise HttpError(400, f"bad percent-encoding in the request target: {exc}") from None
        query: dict[str, str] = {}
        for key, value in pairs:
            if key in query:
                raise HttpError(400, f"query parameter {key!r} given twice")
            query[key] = value
        headers: dict[str, str] = {}
        for raw_name, raw_value in head.headers:
            key = raw_name.decode("latin-1")
            text = raw_value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return Request(
            method=method,
            segments=segments,
            path=raw_path,
            query=query,
            headers=headers,
            body=body,
            conn_id=self.conn_id,
            peer=self.peer,
        )

    # -- answering ----------------------------------------------------------

    def _headers(
        self, content_type: str | None, extra: Iterable[tuple[str, str]], close: bool
    ) -> list[tuple[str, str]]:
        headers = [("server", SERVER_HEADER)]
        if content_type is not None:
            headers.append(("content-type", content_type))
        headers.extend(extra)
        if close:
            headers.append(("connection", "close"))
        return headers

    async def _send_error(self, error: HttpError) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # too late: part of another response went out
        await self._send_response(error.response(), head=False, close=True)

    async def _send_response(self, response: Response, *, head: bool, close: bool) -> None:
        # 204 (OPTIONS) has no body, and no Content-Length (RFC 9110 8.6).
        empty = response.status == 204
        headers = self._headers(
            None if empty else response.content_type,
            [*([] if empty else [("content-length", str(len(response.body)))]), ("cache-control", "no-store"),
             *response.headers.items()],
            close,
        )
        parts = [
            self.h11.send(
                h11.Response(
                    status_code=response.status,
                    headers=headers,
                    reason=_reason(response.status),
                )
            )
        ]
        if response.body and not head:
            parts.append(self.h11.send(h11.Data(data=response.body)))
        parts.append(self.h11.send(h11.EndOfMessage()))
        self.http.requests_by_status[response.status] += 1
        await self._send(b"".join(p for p in parts if p))

    async def _stream(self, response: StreamResponse, head: bool) -> None:
        headers = self._headers(
            response.content_type, [("cache-control", "no-store"), *response.headers.items()], True
        )
        self.http.requests_by_status[response.status] += 1
        await self._send(
            self.h11.send(
                h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))
            )
        )
        if not head and not self.stopping:
            async with trio.open_nursery() as nursery:
                self._stream_scope = nursery.cancel_scope
                nursery.start_soon(self._watch_for_close, nursery.cancel_scope)
                try:
                    await response.produce(self._send_chunk)
                except _PeerGone:
                    self._peer_closed = True
                except Exception:
                    self.logger.exception("event stream failed")
                    self._peer_closed = True  # cannot end the body cleanly
                nursery.cancel_scope.cancel()
            self._stream_scope = None
        if not self._peer_closed:
            await self._send(self.h11.send(h11.EndOfMessage()))

    async def _send_chunk(self, data: bytes) -> None:
        if data:
            await self._send(self.h11.send(h11.Data(data=data)))

    async def _watch_for_close(self, scope: trio.CancelScope) -> None:
        """While streaming, notice the peer closing (it sends nothing else)."""
        await drain(self.stream)
        self._peer_closed = True
        scope.cancel()

    async def _send(self, data: bytes | None) -> None:
        if not data:
            return
        with trio.move_on_after(self.settings.write_timeout) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self.h11.send_failed()
                self._peer_closed = True
                raise _PeerGone() from None
        if scope.cancelled_caught:
            self.logger.info("peer is not reading; closing")
            self.h11.send_failed()
            self._peer_closed = True
            raise _PeerGone()

    async def _close(self) -> None:
        await linger_close(self.stream, send_eof=not self._peer_closed)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
