"""Receiving messages with the client library, bounded: the next ``n`` of a
subscription, messages up to a marker, and a callback target that records
what it is handed and lets a test wait for counts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

import anyio
import anyio.lowlevel

from pybroker import Message, Subscription

#: Default bound, in seconds, on one wait.
TIMEOUT = 10.0


async def take(sub: Subscription, n: int, timeout: float = TIMEOUT) -> list[Message]:
    """The next ``n`` messages of ``sub``; fails if it ends first or after ``timeout``."""
    assert n >= 0, n
    out: list[Message] = []
    if n == 0:
        return out
    with anyio.fail_after(timeout):
        async for msg in sub:
            out.append(msg)
            if len(out) >= n:
                break
    assert len(out) == n, f"subscription ended after {len(out)} of {n} messages"
    return out


async def take_until(
    sub: Subscription, stop: Callable[[Message], bool], limit: int, timeout: float = TIMEOUT
) -> list[Message]:
    """Messages up to and including the first one for which ``stop`` is true."""
    out: list[Message] = []
    with anyio.fail_after(timeout):
        async for msg in sub:
            out.append(msg)
            if stop(msg):
                break
            assert len(out) < limit, f"no stop message within {limit} messages"
    return out


class Collector:
    """A callback target that records messages (all, and by topic) and lets
    a test wait for a count, overall or per topic."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.messages: list[Message] = []
        self.by_topic: dict[str, list[Message]] = defaultdict(list)
        self._changed = anyio.Event()

    def __call__(self, msg: Message) -> None:
        self.messages.append(msg)
        self.by_topic[msg.topic].append(msg)
        self._changed.set()
        self._changed = anyio.Event()

    def sync_callback(self, msg: Message) -> None:
        self(msg)

    async def async_callback(self, msg: Message) -> None:
        await anyio.lowlevel.checkpoint()
        self(msg)

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.by_topic[topic]]

    def _has(self, counts: int | Mapping[str, int]) -> bool:
        if isinstance(counts, int):
            return len(self.messages) >= counts
        return all(len(self.by_topic[t]) >= n for t, n in counts.items())

    async def wait_for(self, counts: int | Mapping[str, int], timeout: float | None = None) -> None:
        """Until ``counts`` messages arrived (an int), or that many per topic
        (a mapping); bounded by ``timeout`` (else the collector's)."""
        with anyio.fail_after(self.timeout if timeout is None else timeout):
            if self._has(counts):
                await anyio.lowlevel.checkpoint()
                return
            while not self._has(counts):
                await self._changed.wait()
