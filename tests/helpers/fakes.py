"""Test doubles for the group logic without sockets (tests/test_groups.py,
tests/test_group_state.py): a session that records what it is handed, and
the router's events wired to a GroupManager as the broker core wires them.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import trio

from pybroker.server.groups import GroupManager
from pybroker.server.router import NoEvents, Subscription, Topic
from pybroker.protocol import decode_batch, tokens_match

Headers = Mapping[str, str]


@attrs.frozen
class Delivery:
    """One GROUP_DELIVER a fake session was handed."""

    sub_id: int
    topic: str
    base: int
    timestamp: int
    deliveries: int
    messages: tuple[tuple[bytes, Headers], ...]

    @property
    def offsets(self) -> list[int]:
        return list(range(self.base, self.base + len(self.messages)))

    @property
    def payloads(self) -> list[bytes]:
        return [p for p, _ in self.messages]


class FakeSession:
    """Stands in for a broker Session: records group and plain deliveries."""

    def __init__(self) -> None:
        self.accepting = True
        self.got: list[Delivery] = []
        self.plain: list[tuple[int, str, int, list[tuple[bytes, Headers]]]] = []
        self.arrived = trio.Event()
        self.deleted: list[tuple[int, str]] = []

    def topic_deleted(self, sub: Subscription, topic: Topic) -> None:
        self.deleted.append((sub.sub_id, topic.name))

    def deliver(
        self, sub: Subscription, topic: Topic, base: int, ts: int, batch: bytes, count: int
    ) -> None:
        self.plain.append((sub.sub_id, topic.name, base, decode_batch(batch)))

    def deliver_group(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        deliveries: int,
        batch: bytes,
    ) -> None:
        messages = tuple((p, dict(h)) for p, h in decode_batch(batch))
        self.got.append(Delivery(sub.sub_id, topic.name, base_offset, timestamp, deliveries, messages))
        self.arrived.set()


class GroupEvents(NoEvents):
    """The router's events that concern groups, passed to a GroupManager as
    the broker core does (broker/core.py)."""

    def __init__(self) -> None:
        self.manager: GroupManager | None = None

    def topic_created(self, topic: Topic) -> None:
        if self.manager is not None:  # None while the router recovers, before the groups
            self.manager.topic_created(topic)

    def batch_visible(self, topic: Topic) -> None:
        if self.manager is not None:
            self.manager.wake()

    def sync_failed(self) -> None:
        if self.manager is not None:
            self.manager.wake()

    def group_matches(self, name: str) -> bool:
        if self.manager is None:
            return False
        return any(tokens_match(g.tokens, name.split(".")) for g in self.manager.groups.values())
