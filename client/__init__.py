"""pybroker's client library for Trio.

    async with client.connect("pybroker://127.0.0.1:7420") as c:
        await c.publish("orders.created", b"...")
        async with c.subscribe("orders.>") as sub:
            async for msg in sub:
                ...
"""

from .connection import DEFAULT_URL, Client, PendingAck, connect, parse_url, url_credentials
from .errors import (
    AuthenticationError,
    BrokerError,
    ConnectionClosed,
    MessageTooLarge,
    NoReceivers,
    PermissionDenied,
    StorageError,
    StorageFull,
)
from .message import Message, PublishAck
from .protocol import Durability, ErrorCode, TopicInfo
from .reconnect import Reconnect
from .subscription import Subscription, SubscriptionStatistics

__all__ = [
    "DEFAULT_URL",
    "AuthenticationError",
    "BrokerError",
    "Client",
    "ConnectionClosed",
    "Durability",
    "ErrorCode",
    "Message",
    "MessageTooLarge",
    "NoReceivers",
    "PendingAck",
    "PermissionDenied",
    "PublishAck",
    "Reconnect",
    "StorageError",
    "StorageFull",
    "Subscription",
    "SubscriptionStatistics",
    "TopicInfo",
    "connect",
    "parse_url",
    "url_credentials",
]
