"""pybroker: a durable pub/sub broker; this package is its client library.

The async client runs under Trio and asyncio alike (it is written on anyio).

    import pybroker

    async with pybroker.connect("pybroker://127.0.0.1:7420") as c:
        await c.publish("orders.created", b"...")
        async with c.subscribe("orders.>") as sub:
            async for msg in sub:
                ...

The server lives in :mod:`pybroker.server` (``pybroker serve``, or
``python -m pybroker serve``); importing this package does not load it.
"""

from ._version import __version__

from .connection import DEFAULT_URL, Client, PendingAck, connect, parse_url, parse_urls, url_credentials
from .errors import (
    AuthenticationError,
    BrokerError,
    ConnectionClosed,
    MessageTooLarge,
    NoReceivers,
    NotOwner,
    Partitioned,
    PermissionDenied,
    StorageError,
    StorageFull,
    Timeout,
)
from .message import Message, PublishAck
from .protocol import Durability, ErrorCode, TopicInfo
from .reconnect import Reconnect
from .subscription import Subscription, SubscriptionStatistics

#: What ``Client.publish_nowait`` raises when the pipeline is full (anyio's,
#: whichever event loop runs the client).
from anyio import WouldBlock

__all__ = [
    "__version__",
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
    "NotOwner",
    "Partitioned",
    "PendingAck",
    "PermissionDenied",
    "PublishAck",
    "Reconnect",
    "StorageError",
    "StorageFull",
    "Subscription",
    "SubscriptionStatistics",
    "Timeout",
    "TopicInfo",
    "WouldBlock",
    "connect",
    "parse_url",
    "parse_urls",
    "url_credentials",
]
