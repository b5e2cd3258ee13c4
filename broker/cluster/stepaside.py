"""A node cut off from etcd sends its clients to the others (docs/cluster.md §11).

A node that cannot renew its member lease stops acknowledging publishes
(lease.py), and soon its topics are owned elsewhere; its copies stop
growing, so its subscribers would wait for nothing, silently, for as long
as the cut lasts. Once it has not been able to rely on its lease for
``after`` seconds (two lease TTLs: longer than any take-over), it asks the
other members it last saw whether *they* are ready (their HTTP
``/readyz``: 200 only while a node holds its own lease). If one is, the
trouble is this node's: it **steps aside**: it ends every client
connection (GOODBYE) and answers each HELLO with ERROR 503
``SHUTTING_DOWN`` until it holds a lease again, so clients reconnect to
another node their URL lists and resume there. If none is ready, etcd
itself is down for everyone: moving clients would gain nothing, and the
node keeps them. Without an HTTP side on the others (``--no-http``),
there is nothing to ask and the node keeps its clients. Its HTTP event
streams end too, and new ones are answered 503 meanwhile (a browser's
EventSource then gives up on this node; a load balancer's /readyz check
already sends requests elsewhere), while the rest of its HTTP side
(health, metrics) keeps answering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import trio

from ..logs import get_logger

if TYPE_CHECKING:
    from .ownership import OwnershipManager

#: Seconds one probe of another member's /readyz may take.
PROBE_TIMEOUT = 1.0
#: Members asked per check.
MAX_PROBES = 8


class StepAside:
    def __init__(self, ttl: float, *, after: float | None = None) -> None:
        #: Seconds between checks, and without a lease before stepping aside.
        self.every = ttl / 4
        self.after = 2 * ttl if after is None else after
        self.stepped_aside = False
        #: Ends the node's client connections (set by the server).
        self.on_step_aside: Callable[[], None] | None = None
        self.times = 0
        self.logger = get_logger(component="cluster-step-aside")

    async def run(self, manager_of: Callable[[], OwnershipManager | None], addr: str) -> None:
        """Check until cancelled; ``manager_of()`` is the node's current
        ownership manager (None before it joined), ``addr`` its own address."""
        since: float | None = None
        while True:
            await trio.sleep(self.every)
            manager = manager_of()
            now = trio.current_time()
            if manager is not None and manager.keeper.held():
                if self.stepped_aside:
                    self.logger.warning("holding a lease again: taking clients again")
                since, self.stepped_aside = None, False
                continue
            if manager is None or self.stepped_aside:
                continue
            since = now if since is None else since
            if now - since < self.after:
                continue
            peers = [m.http for m in manager.membership.members.values() if m.http and m.addr != addr]
            ready = await self._ready(peers[:MAX_PROBES])
            if ready is None:
                continue  # nobody to send clients to (etcd down for all): keep them
            self.stepped_aside = True
            self.times += 1
            self.logger.warning(
                "no etcd lease to rely on while another member is ready: sending clients to the others",
                cut_off_for=round(now - since, 1), ready=ready,
            )  # fmt: skip
            if self.on_step_aside is not None:
                self.on_step_aside()

    async def _ready(self, peers: list[str]) -> str | None:
        """The first of ``peers`` (the URLs of their HTTP sides) whose
        /readyz answers 200, or None."""
        if not peers:
            return None
        # Over HTTPS the peer's certificate is not checked: a readiness answer
        # carries no secret, and one who can pose as a member on the
        # cluster's network can do worse than move this node's clients.
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT, verify=False) as client:  # noqa: S501
            for peer in peers:
                try:
                    response = await client.get(f"{peer}/readyz")
                except httpx.HTTPError:
                    continue
                if response.status_code == 200:
                    return peer
        return None
