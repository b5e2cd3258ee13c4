"""Values handed to applications: received messages and publish results."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Protocol

import attrs
import anyio
import anyio.lowlevel

from .protocol import PARTITION_MARK, AckKind, Durability, partition_of


def _utc(timestamp_us: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(timestamp_us / 1_000_000, tz=_dt.timezone.utc)


class Settler(Protocol):
    """Where a group message's acknowledgement goes (the client)."""

    def _settle(self, sub_id: int, topic: str, offset: int, kind: AckKind, delay: float) -> None: ...


# slots and not frozen: a subscriber creates one per message, and frozen
# attrs classes pay for object.__setattr__ in __init__ (architecture.md).
@attrs.define(slots=True, eq=True)
class Message:
    topic: str
    payload: bytes
    headers: Mapping[str, str]
    offset: int
    timestamp_us: int  #: broker append time, µs since the Unix epoch
    #: How many times this message has been delivered, this time included
    #: (above 1 only for consumer-group redeliveries).
    deliveries: int = 1
    _settler: Settler | None = attrs.field(default=None, repr=False, eq=False)
    _sub_id: int = attrs.field(default=0, repr=False, eq=False)
    #: The AckKind this message was settled with, or None (group messages).
    settled: AckKind | None = attrs.field(default=None, repr=False, eq=False)
    #: The ``msg-id`` that named this message's batch for exactly-once
    #: publishing (protocol.md), if it starts one; not among ``headers``.
    msg_id: str | None = attrs.field(default=None, kw_only=True)

    @property
    def is_group_message(self) -> bool:
        return self._settler is not None

    @property
    def partition(self) -> int | None:
        """The partition this message is in, when its topic is a partition
        of a partitioned topic (``orders~3``: 3); offsets count per
        partition. None for a topic of its own."""
        named = partition_of(self.topic) if PARTITION_MARK in self.topic else None
        return named[1] if named is not None else None

    def _settle(self, kind: AckKind, delay: float = 0.0) -> None:
        if self._settler is None:
            raise RuntimeError("only consumer-group messages are acknowledged")
        if self.settled is not None and self.settled is not AckKind.IN_PROGRESS:
            raise RuntimeError(f"message already settled ({self.settled.name.lower()})")
        self.settled = kind
        self._settler._settle(self._sub_id, self.topic, self.offset, kind, delay)

    async def ack(self) -> None:
        """Done: the group will not deliver it again."""
        self._settle(AckKind.ACK)
        await anyio.lowlevel.checkpoint()

    async def nak(self, delay: float | None = None) -> None:
        """Not done: deliver it again after the group's ``backoff`` for this
        delivery (at once if it has none), or after ``delay`` seconds
        (``delay=0``: at once, whatever the backoff)."""
        # On the wire delay_ms 0 means "the group's backoff": an explicit
        # delay is at least 1 ms (protocol.md, "ACK").
        self._settle(AckKind.NAK, 0.0 if delay is None else max(0.001, delay))
        await anyio.lowlevel.checkpoint()

    async def term(self) -> None:
        """Never deliver it again, and do not dead-letter it."""
        self._settle(AckKind.TERM)
        await anyio.lowlevel.checkpoint()

    async def in_progress(self) -> None:
        """Still working on it: restart its ack-wait clock."""
        self._settle(AckKind.IN_PROGRESS)
        await anyio.lowlevel.checkpoint()

    @property
    def timestamp(self) -> float:
        """Broker append time in seconds since the epoch (like time.time())."""
        return self.timestamp_us / 1_000_000

    @property
    def datetime(self) -> _dt.datetime:
        return _utc(self.timestamp_us)


@attrs.frozen
class PublishAck:
    """Where a published message landed and how durable it is."""

    topic: str
    #: -1 for a delayed message: it gets its offset when it is released.
    offset: int
    timestamp_us: int
    durability: Durability
    #: When a delayed message is due (seconds since the epoch); None otherwise.
    deliver_at: float | None = None

    @property
    def timestamp(self) -> float:
        return self.timestamp_us / 1_000_000
