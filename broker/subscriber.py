"""What receives messages from the broker core: the ``Subscriber`` protocol.

A TCP session, an HTTP event stream and a test's collector are subscribers;
the core, the router and the consumer groups know them only through this
protocol, never by their type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import attrs

if TYPE_CHECKING:
    from .router import Subscription, Topic


@attrs.frozen
class SubscriberInfo:
    """Who a subscriber is, for the HTTP API, metrics and logs."""

    transport: str  #: "tcp", "sse", ...
    connection: int
    client: str
    peer: str


class Subscriber(Protocol):
    """Receives batches for its subscriptions. Every method is synchronous
    and must not block: the router calls them on the publish path."""

    def deliver(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        batch: bytes,
        count: int,
    ) -> None:
        """A batch for a plain subscription: the same ``bytes`` object every
        subscriber gets. Queue it, or note the topic as lagging (read it from
        the log later) when there is no room or credit."""

    def deliver_group(
        self,
        sub: Subscription,
        topic: Topic,
        base_offset: int,
        timestamp: int,
        deliveries: int,
        batch: bytes,
    ) -> None:
        """Messages handed to this consumer-group member (bounded by the
        group's max_ack_pending, not by the subscriber's queue)."""

    def topic_deleted(self, sub: Subscription, topic: Topic) -> None:
        """``topic`` was deleted: nothing more of it comes (a topic created
        later under its name starts from offset 0). Tell the subscriber."""

    @property
    def accepting(self) -> bool:
        """Whether deliveries may still be given to it (a group asks first)."""

    def position(self, sub: Subscription, topic: Topic) -> int:
        """The next offset of ``topic`` it will be handed (for lag figures)."""

    def describe(self) -> SubscriberInfo:
        """Who it is."""
