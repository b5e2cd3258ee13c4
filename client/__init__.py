"""pybroker's client library for Trio.

    async with client.connect("pybroker://127.0.0.1:7420") as c:
        await c.publish("orders.created", b"...")
        async with c.subscribe("orders.>") as sub:
            async for msg in sub:
                ...
"""

from .connection import DEFAULT_URL, Client, PendingAck, connect, parse_url
from .errors import BrokerError, ConnectionClosed, MessageTooLarge, NoReceivers
from .message import Message, PublishAck
from .protocol import Durability, ErrorCode, TopicInfo
from .subscription import Subscription, SubscriptionStatistics

__all__ = [
    "DEFAULT_URL",
    "BrokerError",
    "Client",
    "ConnectionClosed",
    "Durability",
    "ErrorCode",
    "Message",
    "MessageTooLarge",
    "NoReceivers",
    "PendingAck",
    "PublishAck",
    "Subscription",
    "SubscriptionStatistics",
    "TopicInfo",
    "connect",
    "parse_url",
]
