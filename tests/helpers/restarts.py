"""What the reconnect tests share: a broker served until an event (so it
can be stopped and started again on the same port), a free port to start it
on, the quick bounded retry policy their clients use, and publishing named
payloads (with the client library, or as one PUBLISH frame)."""

from __future__ import annotations

import socket

from typing import Any

import anyio
import anyio.abc

import pybroker
from pybroker.server.server import Server
from pybroker import Reconnect
from pybroker.protocol import PubAck, Publish, encode_batch_from_records, encode_record

from .anybroker import serving
from .raw import raw_client

#: Bound on one wait.
TIMEOUT = 30.0
#: Quick retries, bounded: at most ~40 s of trying.
FAST = Reconnect(max_attempts=200, initial_delay=0.02, max_delay=0.2, jitter=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def serve_until(
    stop: anyio.Event,
    task_status: anyio.abc.TaskStatus[Server] = anyio.TASK_STATUS_IGNORED,
    *,
    stopped: anyio.Event | None = None,
    **config: Any,
) -> None:
    """``running_broker(**config)`` until ``stop`` is set (start it with
    ``task_group.start``: it hands over the Server); sets ``stopped`` once
    the broker is down. Under asyncio the broker runs in a thread of its own
    (helpers.anybroker)."""
    try:
        async with serving(**config) as server:
            task_status.started(server)
            await stop.wait()
    finally:
        if stopped is not None:
            stopped.set()


def batch(prefix: str, n: int) -> list[bytes]:
    """``n`` payloads named ``prefix-0`` .. ``prefix-(n-1)``."""
    return [f"{prefix}-{i}".encode() for i in range(n)]


async def publish_all(url: str, topic: str, payloads: list[bytes]) -> None:
    async with pybroker.connect(url) as c:
        await c.publish_many(topic, payloads)


async def publish_one_batch(url: str, topic: str, payloads: list[bytes]) -> None:
    """One PUBLISH frame (one stored batch) with all of ``payloads``."""
    async with raw_client(url, handshake="raw", timeout=TIMEOUT) as raw:
        records = [encode_record(p, None) for p in payloads]
        await raw.send_event(Publish(1, topic, encode_batch_from_records(records)))
        ack = await raw.next_event()
        assert isinstance(ack, PubAck) and ack.count == len(payloads)
