"""Values handed to applications: received messages and publish results."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping

import attrs

from .protocol import Durability


def _utc(timestamp_us: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(timestamp_us / 1_000_000, tz=_dt.timezone.utc)


# slots and not frozen: a subscriber creates one per message, and frozen
# attrs classes pay for object.__setattr__ in __init__ (architecture.md).
@attrs.define(slots=True, eq=True)
class Message:
    topic: str
    payload: bytes
    headers: Mapping[str, str]
    offset: int
    timestamp_us: int  #: broker append time, µs since the Unix epoch

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
    offset: int
    timestamp_us: int
    durability: Durability

    @property
    def timestamp(self) -> float:
        return self.timestamp_us / 1_000_000
