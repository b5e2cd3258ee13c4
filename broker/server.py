"""The TCP server: listeners, one Session per connection, graceful shutdown.

Lifecycle as in Trio's ``serve_listeners`` (broker/listening.py's
``serve_streams``, which leaves closing a stream to its session: an idle
connection is parked without a task, broker/session/parking.py): connection
tasks run in a nursery the server owns, so none outlives it; ``task_status.started(server)``
hands the bound port to whoever started it. Shutdown stops accepting first,
then asks every session to flush and say GOODBYE, bounded by
``config.shutdown_grace``.
"""

from __future__ import annotations

import itertools
import resource
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from pybroker.protocol import HEADER_SIZE, Error, ErrorCode, encode_event

from .auth import unprotected_hosts
from .closing import drain
from .config import Config
from .core import Broker
from .framebudget import FREE_BYTES, FrameBudget, trim_heap
from .http import HttpServer
from .listening import open_listeners, serve_streams
from .logs import get_logger
from .session import Session
from .session.parking import ParkingLot
from .storage import LogStore
from .tls import server_context, wrap_server_stream

#: Seconds between looks at whether large frames were freed, to give their
#: memory back to the operating system (Server._trim_heap).
TRIM_INTERVAL = 1.0
#: Idle-timeout sweeps per idle_timeout: the precision of the timeout.
IDLE_SWEEPS = 4
#: Refused connections (max_connections) being told so at once; beyond this
#: they are closed without a word, so a flood costs a bounded amount.
MAX_REFUSING = 64
#: A refused connection gets this long to take its ERROR 108 ...
REFUSE_SECONDS = 1.0
#: ... and this much of its input (its HELLO) is read and dropped, so that
#: closing does not reset the connection before the ERROR is read.
REFUSE_DRAIN_BYTES = 4096


class Server:
    """Listeners and lifecycle around one broker core (broker/core.py)."""

    def __init__(self, config: Config | None = None, store: LogStore | None = None) -> None:
        self.config = config or Config()
        self.logger: Any = get_logger()
        #: TLS for both listeners (broker/tls.py); None: plain. Loaded first,
        #: so a bad certificate stops the start before any recovery work.
        self.tls: ssl.SSLContext | None = server_context(self.config)
        #: The rules and the state: storage (recovery runs here, before
        #: anything listens), router, committer, groups, authentication.
        self.broker = Broker(self.config, store)
        self.sessions: set[Session] = set()
        #: Idle connections without a task (broker/session/parking.py).
        self.lot = ParkingLot(self.sessions)
        #: Bytes of frames in progress, shared by every connection
        #: (broker/framebudget.py); the reserve lets the largest frame finish.
        self.frame_budget = FrameBudget(
            self.config.pending_frame_bytes,
            reserve=max(0, HEADER_SIZE + self.config.limits.max_frame_bytes - FREE_BYTES),
        )
        self.host = self.config.host
        self.port: int = 0
        self.connections_total = 0
        #: Connections turned away with ERROR 108 (config.max_connections).
        self.connections_refused = 0
        self._refusing = 0
        self._at_limit_logged = False
        self._refusal = encode_event(
            Error(
                int(ErrorCode.TOO_MANY_CONNECTIONS),
                f"the broker serves at most {self.config.max_connections} connections; try later",
                fatal=True,
            )
        )
        #: Listeners accepting and recovery done (GET /readyz); False again
        #: once shutdown begins.
        self.ready = False
        self.started_at = time.time()
        http_port = self.config.http_port
        #: The HTTP side (broker/http), on its own port; None when disabled.
        self.http = HttpServer(self.broker, self) if http_port is not None and http_port >= 0 else None
        self.http_port: int | None = None
        self._ids = itertools.count(1)
        self._shutdown = trio.Event()
        self._stopped = trio.Event()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "pybrokers" if self.tls is not None else "pybroker"
        return f"{scheme}://{host}:{self.port}"

    def shutdown(self) -> None:
        """Begin a graceful shutdown; ``serve`` returns when it is done."""
        self._shutdown.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.broker.recover()
        listeners = await open_listeners("TCP", self.config.host, self.config.port)
        self._check_descriptor_limit()
        try:
            sockname = listeners[0].socket.getsockname()
            self.host, self.port = sockname[0], sockname[1]
            async with trio.open_nursery() as background:
                # The core's tasks outlive the connections: closing sessions
                # still wait on the committer for their last acknowledgements.
                await background.start(self.broker.run)
                if self.http is not None:
                    self.http_port = await background.start(self.http.serve)
                # Cluster mode: join once the address others are sent to is known.
                joining = getattr(self.broker.store, "run", None)
                if joining is not None:
                    await background.start(joining, self.config.advertise or f"{self.host}:{self.port}", self._http_addr())
                    # A node cut off from etcd may send its clients to the
                    # others (broker/cluster/stepaside.py).
                    self.broker.store.step_aside.on_step_aside = self._send_clients_away  # type: ignore[attr-defined]
                if self.config.idle_timeout > 0:
                    background.start_soon(self._sweep_idle, self.config.idle_timeout)
                background.start_soon(self._trim_heap)
                await self._serve_connections(listeners, background, task_status)
                leave = getattr(self.broker.store, "leave", None)
                if leave is not None:
                    await leave()  # hand the partitions over (bounded)
                if self.http is not None:
                    # Its requests in progress may still wait on the committer.
                    with trio.move_on_after(self.config.shutdown_grace):
                        await self.http.wait_stopped()
                background.cancel_scope.cancel()
        finally:
            self.lot.release()
            # Shielded: when the broker is cancelled (not shut down), an
            # outer cancellation passes through aclose_forcefully, and the
            # store (its fsync thread, its data directory's lock) would
            # never be closed.
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
            self.broker.close()
            self._stopped.set()
            self.logger.info("stopped")

    async def _serve_connections(
        self, listeners: list[trio.SocketListener], background: trio.Nursery, task_status: Any
    ) -> None:
        try:
            await self._serve_in(listeners, background, task_status)
        finally:
            # Parked connections have no task to close them when the server
            # is cancelled rather than shut down.
            self.lot.abandon()

    async def _serve_in(
        self, listeners: list[trio.SocketListener], background: trio.Nursery, task_status: Any
    ) -> None:
        async with trio.open_nursery() as connections:
            # Parked connections resume in the connection nursery; the lot's
            # own task is a background one (it never ends by itself).
            self.lot.attach(connections)
            await background.start(self.lot.run)
            async with trio.open_nursery() as accepting:
                await accepting.start(serve_streams, self._handle, listeners, connections, self.logger)
                self.logger.info(
                    "listening",
                    host=self.host,
                    port=self.port,
                    url=self.url,
                    tls=self.tls is not None,
                    storage=self.broker.storage_kind,
                    data_dir=str(self.config.data_dir),
                    http_port=self.http_port,
                    auth=str(self.config.auth_file) if self.broker.auth else "none",
                )
                self._log_auth()
                self.ready = True
                task_status.started(self)
                await self._shutdown.wait()
                self.ready = False
                if self.http is not None:
                    self.http.shutdown()
                accepting.cancel_scope.cancel()
            self.logger.info("shutting down", connections=len(self.sessions))
            for session in list(self.sessions):
                session.shutdown()
            self.lot.close()  # none was left parked; none is parked from now on
            # Sessions bound their own flush by shutdown_grace; this is the
            # backstop for one stuck anywhere else.
            connections.cancel_scope.deadline = (
                trio.current_time() + self.config.shutdown_grace + 1.0
            )

    def _http_addr(self) -> str:
        """The URL other cluster nodes reach this one's HTTP side at ("" without
        one): the advertised host, else the one it listens on."""
        if self.http is None or self.http_port is None:
            return ""
        host = (self.config.advertise or "").rpartition(":")[0] or self.config.http_host or self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.http_port}"

    def _send_clients_away(self) -> None:
        """Every client connection ends (GOODBYE); new ones are refused while
        the node stays cut off (Session: HELLO answered 503)."""
        self.logger.warning("ending every client connection: this node is cut off from the cluster", connections=len(self.sessions))
        for session in list(self.sessions):
            session.shutdown()
        if self.http is not None:
            self.http.end_streams()  # browsers reconnect, and get 503 here

    def _log_auth(self) -> None:
        if self.broker.auth is not None:
            self.logger.info("authentication required", users_file=self.broker.auth.users.source, users=len(self.broker.auth.users.by_name))
        elif unprotected_hosts(self._hosts()):
            self.logger.warning(
                "no authentication configured and listening beyond loopback: "
                "anyone who can reach the broker may publish and subscribe",
                hosts=self._hosts(),
            )
        else:
            self.logger.info("no authentication configured (no --auth); listening on loopback only")

    def _hosts(self) -> list[str]:
        hosts = [self.config.host]
        if self.http is not None and self.config.http_host is not None:
            hosts.append(self.config.http_host)
        return hosts

    async def _sweep_idle(self, idle: float) -> None:
        """The idle timeout of every session (Session.check_idle): a PING
        goes out between ``idle`` and ``idle * (1 + 1/IDLE_SWEEPS)`` seconds
        after a client's last frame, ERROR 107 as long again after that."""
        while True:
            await trio.sleep(idle / IDLE_SWEEPS)
            now = trio.current_time()
            for session in list(self.sessions):
                session.check_idle(now, idle)

    async def _trim_heap(self) -> None:
        """After large frames were decoded or dropped, give their memory
        back to the operating system (framebudget.trim_heap): at most once
        per TRIM_INTERVAL, and not at all while only small frames flow."""
        budget = self.frame_budget
        while True:
            await budget.large_return.wait()
            # Returns within the interval share one trim.
            await trio.sleep(TRIM_INTERVAL)
            budget.large_return = trio.Event()  # what was returned so far, this trim covers
            if not await trio.to_thread.run_sync(trim_heap):
                return

    def _check_descriptor_limit(self) -> None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < self.config.max_connections + 64:
            # Past the descriptor limit accepting stalls (Trio retries after
            # EMFILE) instead of answering ERROR 108: say so now.
            self.logger.warning(
                "max_connections is above what RLIMIT_NOFILE allows",
                max_connections=self.config.max_connections,
                nofile=soft,
            )

    async def _handle(self, stream: trio.SocketStream) -> None:
        """A new connection's task. The stream is the session's to close
        (serve_streams does not): it may outlive this task, parked."""
        if len(self.sessions) >= self.config.max_connections:
            await self._refuse(stream)
            return
        self._at_limit_logged = False
        conn_id = next(self._ids)
        try:
            peer_addr = stream.socket.getpeername()
            peer = f"{peer_addr[0]}:{peer_addr[1]}"
        except OSError:
            peer = "?"
        try:
            session = Session(
                self.broker, self.config, self.frame_budget, wrap_server_stream(stream, self.tls), conn_id, peer,
                self.lot,
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.sessions.add(session)
        self.connections_total += 1
        # Returns when the connection has ended and is closed (it left
        # self.sessions then) or is parked (a later task carries on).
        await session.run()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """ERROR 108 without reading anything first, then close.

        Costs at most REFUSE_SECONDS, REFUSE_DRAIN_BYTES and one task each,
        for at most MAX_REFUSING connections at a time; the rest are closed
        at once.
        """
        self.connections_refused += 1
        if not self._at_limit_logged:
            self._at_limit_logged = True  # once per episode, not per refusal
            self.logger.warning("connection limit reached", max_connections=self.config.max_connections)
        if self._refusing >= MAX_REFUSING:
            await trio.aclose_forcefully(stream)
            return
        self._refusing += 1
        try:
            with trio.move_on_after(REFUSE_SECONDS):
                await stream.send_all(self._refusal)
                await stream.send_eof()
                await drain(stream, REFUSE_DRAIN_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def run_broker(
    config: Config | None = None, *, store: LogStore | None = None, **overrides: Any
) -> AsyncIterator[Server]:
    """Run a broker for the body of an ``async with``; it stops on exit.

    ``overrides`` replace fields of ``config`` (or of the defaults), e.g.
    ``run_broker(port=0)``; ``store`` replaces the one the config would
    open. Used by the test fixture in ``pybroker.server.testing``.
    """
    config = attrs.evolve(config or Config(), **overrides)
    # Built outside the nursery: a bad setting (a TLS certificate that will
    # not load) raises as itself, not wrapped in an ExceptionGroup.
    server = Server(config, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            server.shutdown()
