"""A TCP proxy on loopback that a test can partition: the network between
one process and a server, cut and healed on demand.

``cut()`` stops forwarding in both directions: bytes already on their way
wait, new connections are accepted and held, nothing is answered (a
partition drops packets; it does not reset connections). ``heal()``
forwards again, held connections included, so requests sent during the cut
may arrive late, which is the case fencing has to handle.
"""

from __future__ import annotations

from typing import Any

import trio

#: Bytes forwarded per read.
CHUNK = 64 * 1024


class PartitionProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut_at: float | None = None
        self._healed = trio.Event()
        self._healed.set()
        self.connections = 0

    @property
    def is_cut(self) -> bool:
        return not self._healed.is_set()

    def cut(self) -> None:
        if not self.is_cut:
            self._healed = trio.Event()
            self.cut_at = trio.current_time()

    def heal(self) -> None:
        self._healed.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(port)``."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            await self._healed.wait()  # a connection made during a cut is held
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pipe, upstream, client, nursery.cancel_scope)

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await source.receive_some(CHUNK)
                await self._healed.wait()  # held during a cut, delivered after
                if not data:
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()  # either side gone: both go
