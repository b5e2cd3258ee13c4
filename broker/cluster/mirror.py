"""The keys under one etcd prefix, kept current in memory.

A range read of the prefix, then a watch from that read's revision + 1, so
no change between the two is missed (docs/cluster.md §4, §7). A watch that
etcd cancels because its start revision was compacted (``WatchCanceled``),
or that breaks, starts over with a fresh range read, which replaces the
whole picture; etcd being unreachable is retried with a bounded backoff.
Membership, the topic registry and the owner map are mirrors of this kind.
"""

from __future__ import annotations

import anyio

from ..logs import get_logger
from .etcd import Etcd, EtcdError, KeyValue

#: A prefix holding more keys than this is refused rather than mirrored.
DEFAULT_MAX_KEYS = 100_000
#: Pause after a failed read or a broken watch, doubling up to the maximum.
RETRY_MIN = 0.05
RETRY_MAX = 2.0


class MirrorTooLarge(EtcdError):
    """The prefix holds more keys than the mirror's bound."""


class PrefixMirror:
    """``kvs`` maps each key under ``prefix`` to its latest KeyValue while
    ``run`` runs. ``version`` counts changes; ``changed()`` waits for the
    next one; ``synced`` is set after the first complete read."""

    def __init__(self, etcd: Etcd, prefix: bytes, *, max_keys: int = DEFAULT_MAX_KEYS, name: str = "") -> None:
        self.etcd = etcd
        self.prefix = prefix
        self.max_keys = max_keys
        self.kvs: dict[bytes, KeyValue] = {}
        #: The etcd revision the mirror reflects.
        self.revision = 0
        self.version = 0
        self.synced = anyio.Event()
        #: Fresh range reads after the first (watch canceled, broken, or etcd unreachable).
        self.restarts = 0
        #: Why it last started over (None before the first restart).
        self.last_error: EtcdError | None = None
        self._changed = anyio.Event()
        self._log = get_logger(component="cluster-mirror", prefix=name or prefix.decode("utf-8", "replace"))

    async def changed(self) -> None:
        """Wait for the next change of ``kvs``."""
        await self._changed.wait()

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = anyio.Event()

    async def run(self) -> None:
        """Mirror until cancelled. Raises MirrorTooLarge when the prefix
        outgrows the bound; every other etcd failure is retried."""
        pause = RETRY_MIN
        while True:
            try:
                await self._read()
                pause = RETRY_MIN
                await self._follow()
            except MirrorTooLarge:
                raise
            except EtcdError as exc:  # WatchCanceled, EtcdUnavailable, a refused call
                self._log.info("mirror starts over", error=str(exc), pause=pause)
                self.restarts += 1
                self.last_error = exc
                await anyio.sleep(pause)
                pause = min(RETRY_MAX, pause * 2)

    async def _read(self) -> None:
        result = await self.etcd.get_prefix(self.prefix, limit=self.max_keys + 1)
        if result.more or len(result.kvs) > self.max_keys:
            raise MirrorTooLarge(f"{self.prefix!r} holds more than {self.max_keys} keys")
        self.kvs = {kv.key: kv for kv in result.kvs}
        self.revision = result.revision
        self._bump()
        self.synced.set()

    async def _follow(self) -> None:
        async with self.etcd.watch(self.prefix, prefix=True, start_revision=self.revision + 1) as watch:
            async for batch in watch:
                for event in batch.events:
                    if event.type == "DELETE":
                        self.kvs.pop(event.kv.key, None)
                    else:
                        self.kvs[event.kv.key] = event.kv
                if len(self.kvs) > self.max_keys:
                    raise MirrorTooLarge(f"{self.prefix!r} holds more than {self.max_keys} keys")
                self.revision = batch.revision
                self._bump()
