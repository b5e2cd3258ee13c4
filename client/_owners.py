"""A connection per owner for a cluster's publishes (docs/cluster.md §8).

In cluster mode one node owns each partition and the others refuse its
publishes with NOT_OWNER, naming the owner. A client that moved its one
connection to each owner named would move back and forth for a
partitioned topic whose partitions different nodes own. Instead the
client keeps its connection (subscriptions are served by any node) and
opens one more, a *peer*, per owner it publishes to; a topic refused with
NOT_OWNER is published through the owner's peer from then on.

Order is kept: once a publish to a topic is refused, the client sends
nothing more to that topic on its own connection (the writer skips it),
waits for the answers to what it had in flight there (each is refused in
turn: answers keep PUBLISH order), and then hands everything not yet
acknowledged, in the order it was published, to the peer. A peer follows
NOT_OWNER itself by moving its connection, as a client without peers
does; it keeps no peers of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import anyio

from ._publishing import Frame

if TYPE_CHECKING:
    from .connection import Client

#: Owners a client keeps a peer for (a cluster's nodes), and topics it
#: remembers the peer of (a publisher to more starts over: each forgotten
#: one costs one refused PUBLISH to learn again).
MAX_PEERS = 64
MAX_ROUTES = 4096

PeerFactory = Callable[[str], AbstractAsyncContextManager["Client"]]


class Peer:
    """A connection to one owner, opened in the client's task group."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.client: Client | None = None
        #: Why it could not be opened, once it failed.
        self.error: BaseException | None = None
        #: Set once its task has ended (its connection closed).
        self.done = anyio.Event()


class Held:
    """A topic refused with NOT_OWNER, waiting for its owner's peer: the
    refused frames (with their bytes), in the order they were sent."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.frames: list[tuple[Frame, bytes]] = []


class Owners:
    """The peers of one client, and the topics each one publishes."""

    def __init__(self, factory: PeerFactory) -> None:
        self.factory = factory
        self.peers: dict[str, Peer] = {}
        #: Topic -> the peer that publishes it.
        self.routes: dict[str, Client] = {}
        #: Topics refused with NOT_OWNER and not yet handed to a peer.
        self.held: dict[str, Held] = {}
        #: Set when the client closes: the peers then close too (each
        #: waiting for its publishes first).
        self.closing = anyio.Event()

    def route(self, topic: str, peer: Client) -> None:
        if topic not in self.routes and len(self.routes) >= MAX_ROUTES:
            self.routes.clear()
        self.routes[topic] = peer

    def peer(self, client: Client, address: str) -> Peer | None:
        """The peer for ``address``, opening it if there is none yet; None
        when the client already has MAX_PEERS."""
        peer = self.peers.get(address)
        if peer is None or peer.error is not None or (peer.client is not None and peer.client.closed):
            if len(self.peers) >= MAX_PEERS and peer is None:
                return None
            peer = self.peers[address] = Peer(address)
            client._task_group.start_soon(self._run, client, peer, name=f"pybroker peer {address}")
        return peer

    async def _run(self, client: Client, peer: Peer) -> None:
        try:
            async with self.factory(peer.address) as opened:
                opened._owners = None  # a peer follows NOT_OWNER itself, by moving
                peer.client = opened
                for topic in [t for t, h in self.held.items() if h.owner == peer.address]:
                    client._hand_over(topic)
                await self.closing.wait()
        except Exception as exc:  # noqa: BLE001 (what it was is told to every publish it held)
            peer.error = exc
            peer.client = None
            client._peer_failed(peer)
        finally:
            peer.done.set()

    async def close(self) -> None:
        """Close every peer, each once its publishes are acknowledged."""
        self.closing.set()
        for peer in list(self.peers.values()):
            await peer.done.wait()

    async def flush(self) -> None:
        for peer in list(self.peers.values()):
            if peer.client is not None and not peer.client.closed:
                await peer.client.flush()
