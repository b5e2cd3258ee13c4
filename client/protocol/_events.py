"""Frame events: one class per frame type of protocol.md, and the enums of
their fields.

These are plain values. The readers (:mod:`._readers`) turn bytes into them
and the writers (:mod:`._writers`) them into bytes. Hot-path events
(Publish, Deliver) carry the batch as one opaque ``bytes`` object that the
broker stores and forwards unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from ._wire import PROTOCOL_VERSION, UNLIMITED_CREDIT, FrameType


def _name(self: enum.IntEnum) -> str:
    """What the enums users meet print: their name (an IntEnum prints its
    number). Values, comparisons and the wire are unchanged."""
    return self.name


class Durability(enum.IntEnum):
    """What a PUBACK promises about the batch it acknowledges."""

    __str__ = _name  # print(ack.durability) says DISK, not 2

    MEMORY = 0
    OS = 1
    DISK = 2


class StartKind(enum.IntEnum):
    """Where a subscription starts reading (SUBSCRIBE ``start``)."""

    __str__ = _name

    NEW = 0
    EARLIEST = 1
    OFFSET = 2
    TIME = 3


class AckKind(enum.IntEnum):
    """How an ACK frame settles group deliveries."""

    __str__ = _name

    ACK = 0
    NAK = 1
    TERM = 2
    IN_PROGRESS = 3


class RefKind(enum.IntEnum):
    """What an ERROR's ``ref`` names."""

    __str__ = _name

    NONE = 0
    REQUEST = 1
    SUBSCRIPTION = 2


@attrs.frozen
class Hello:
    client_name: str = ""
    version: int = PROTOCOL_VERSION
    options: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Welcome:
    server_version: str
    server_name: str
    limits: Mapping[str, int] = attrs.field(factory=dict)
    version: int = PROTOCOL_VERSION


@attrs.frozen
class Publish:
    request_id: int
    topic: str
    batch: bytes  # count | crc | records, exactly as on the wire
    needs_receiver: bool = False
    #: Store this batch once: its first record's ``msg-id`` header names it.
    dedup: bool = False
    #: Deliver it at its first record's ``deliver-at`` header, not now.
    delayed: bool = False


@attrs.frozen
class PubAck:
    request_id: int
    base_offset: int
    count: int
    timestamp: int  # microseconds since the epoch
    durability: Durability


@attrs.frozen
class Subscribe:
    sub_id: int
    pattern: str
    start: StartKind = StartKind.NEW
    start_value: int = 0
    credit: int = UNLIMITED_CREDIT
    options: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class SubAck:
    sub_id: int
    #: The broker's clock (µs since the epoch) when it registered the
    #: subscription: every message delivered live to it has a timestamp at or
    #: after this, so a client resuming after a reconnect starts topics it
    #: has not seen yet from here. A reading of a clock, not part of the
    #: answer's identity: ``SubAck(1) == SubAck(1, t)``.
    timestamp: int = attrs.field(default=0, eq=False)


@attrs.frozen
class Unsubscribe:
    sub_id: int


@attrs.frozen
class UnsubAck:
    sub_id: int


@attrs.frozen
class Credit:
    sub_id: int
    messages: int


@attrs.frozen
class Ack:
    sub_id: int
    kind: AckKind
    topic: str
    ranges: tuple[tuple[int, int], ...]  # inclusive (first, last)
    delay_ms: int = 0


@attrs.frozen
class GroupDeliver:
    sub_id: int
    topic: str
    base_offset: int
    timestamp: int
    deliveries: int
    batch: bytes


@attrs.frozen
class Deliver:
    sub_id: int
    topic: str
    base_offset: int
    timestamp: int
    batch: bytes


@attrs.frozen
class Ping:
    nonce: int = 0


@attrs.frozen
class Pong:
    nonce: int = 0


@attrs.frozen
class Error:
    code: int
    message: str = ""
    ref: int = 0
    ref_kind: RefKind = RefKind.NONE
    fatal: bool = False
    #: Machine-readable details (DATA_LOST: topic, first, last, reason), sent
    #: only to clients that asked for them in HELLO (protocol.md, "ERROR").
    fields: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Goodbye:
    pass


@attrs.frozen
class Info:
    request_id: int
    pattern: str = ">"
    #: Continue a listing after this topic name ("": from the first).
    after: str = ""


class GroupsAction(enum.IntEnum):
    __str__ = _name

    LIST = 0
    INSPECT = 1
    DELETE = 2
    CREATE = 3


@attrs.frozen
class Groups:
    request_id: int
    action: GroupsAction
    name: str = ""
    # CREATE only (on the wire for action 3 alone): the group's pattern,
    # start and settings (SUBSCRIBE's group options).
    pattern: str = ""
    start: StartKind = StartKind.NEW
    start_value: int = 0
    options: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class GroupsReply:
    request_id: int
    document: str  # UTF-8 JSON


class TopicsAction(enum.IntEnum):
    DELETE = 0
    PURGE = 1
    SET = 2
    CREATE = 3


@attrs.frozen
class Topics:
    """Topic administration (protocol.md, "TOPICS")."""

    request_id: int
    action: TopicsAction
    topic: str
    #: PURGE: the first offset to keep; at or past the topic's end, all of it.
    keep_from: int = 0
    #: SET and CREATE only (on the wire for actions 2 and 3 alone): the
    #: settings to change, or the new topic's (``partitions``).
    settings: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class TopicsReply:
    request_id: int
    document: str  # UTF-8 JSON


@attrs.frozen
class TopicInfo:
    topic: str
    first_offset: int
    next_offset: int
    retained_bytes: int
    subscriptions: int


@attrs.frozen
class InfoReply:
    request_id: int
    topics: tuple[TopicInfo, ...] = ()
    truncated: bool = False


Event = (
    Hello
    | Welcome
    | Publish
    | PubAck
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | Credit
    | Ack
    | GroupDeliver
    | Deliver
    | Ping
    | Pong
    | Error
    | Goodbye
    | Info
    | InfoReply
    | Groups
    | GroupsReply
    | Topics
    | TopicsReply
)

EVENT_TYPES: dict[type[Event], FrameType] = {
    Hello: FrameType.HELLO,
    Welcome: FrameType.WELCOME,
    Publish: FrameType.PUBLISH,
    PubAck: FrameType.PUBACK,
    Subscribe: FrameType.SUBSCRIBE,
    SubAck: FrameType.SUBACK,
    Unsubscribe: FrameType.UNSUBSCRIBE,
    UnsubAck: FrameType.UNSUBACK,
    Credit: FrameType.CREDIT,
    Ack: FrameType.ACK,
    GroupDeliver: FrameType.GROUP_DELIVER,
    Deliver: FrameType.DELIVER,
    Ping: FrameType.PING,
    Pong: FrameType.PONG,
    Error: FrameType.ERROR,
    Goodbye: FrameType.GOODBYE,
    Info: FrameType.INFO,
    InfoReply: FrameType.INFO_REPLY,
    Groups: FrameType.GROUPS,
    GroupsReply: FrameType.GROUPS_REPLY,
    Topics: FrameType.TOPICS,
    TopicsReply: FrameType.TOPICS_REPLY,
}
