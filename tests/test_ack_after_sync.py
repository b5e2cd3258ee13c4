"""The server's acknowledgement path for topics whose acks wait for a sync.

This checks, with a store whose ``sync()`` the test controls, that the
server neither acknowledges nor delivers a batch before the sync covering it
returns, that one sync covers every batch appended before it (group commit),
and that the PUBACK carries the durability the store reports.
"""

from __future__ import annotations

import attrs
import trio

import pybroker
from pybroker.server.config import Config
from pybroker.server.storage import MemoryStore, MemoryTopicLog, SyncResult
from pybroker.server.server import Server
from pybroker.protocol import Durability


class SyncedTopicLog(MemoryTopicLog):
    needs_sync = True
    durability = Durability.DISK


class GatedStore(MemoryStore):
    """A store whose sync() waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.syncs = 0
        self.sync_started = trio.Event()
        self._logs: dict[str, SyncedTopicLog] = {}

    def topic(self, name: str) -> SyncedTopicLog:
        if name not in self._logs:
            self._logs[name] = SyncedTopicLog(name)
        return self._logs[name]

    async def sync(self) -> SyncResult:
        self.sync_started.set()
        await self.gate.wait()
        self.syncs += 1
        return SyncResult(Durability.DISK)


async def test_puback_waits_for_sync_and_one_sync_covers_many() -> None:
    store = GatedStore()
    config = attrs.evolve(Config(), port=0, http_port=0)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(config, store).serve)
        async with pybroker.connect(server.url) as c:
            got: list[int] = []
            await c.subscribe("t", lambda m: got.append(m.offset))
            pendings = [c.publish_nowait("t", b"%d" % i) for i in range(50)]
            with trio.fail_after(10):
                await store.sync_started.wait()
            # Neither acknowledgements nor deliveries get ahead of the sync:
            # a subscriber never sees a batch a crash could still take back.
            await trio.sleep(0.1)
            assert not any(p.done() for p in pendings)
            assert got == []
            store.gate.set()
            with trio.fail_after(10):
                acks = [await p.wait() for p in pendings]
                while len(got) < 50:
                    await trio.sleep(0.01)
            assert got == list(range(50))
            assert [a.offset for a in acks] == list(range(50))
            assert {a.durability for a in acks} == {Durability.DISK}
            # Every batch queued before the gate opened shared few syncs.
            assert 1 <= store.syncs <= len({id(p) for p in pendings})
            assert store.syncs < 50
        server.shutdown()


async def test_close_waits_for_outstanding_syncs() -> None:
    store = GatedStore()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(Server(attrs.evolve(Config(), port=0, http_port=0), store).serve)

        async def open_gate_later() -> None:
            await store.sync_started.wait()
            await trio.sleep(0.2)
            store.gate.set()

        nursery.start_soon(open_gate_later)
        with trio.fail_after(10):
            async with pybroker.connect(server.url) as c:
                pending = c.publish_nowait("t", b"x")
            # Leaving the block flushed: the ack arrived after the sync.
        assert pending.result().durability is Durability.DISK
        server.shutdown()
