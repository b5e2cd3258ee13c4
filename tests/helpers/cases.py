"""One sample event of every frame type, who may send each, and the codec's
round-trip cases (every frame type in each direction it may travel, with
edge values), with codec pairs driven to the handshake phase a case needs.

Shared by tests/test_codec.py, tests/test_frame_peek.py and
tests/test_fuzz_codec.py.
"""

from __future__ import annotations

import enum

from pybroker.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_SIZE,
    Ack,
    AckKind,
    Connection,
    Credit,
    Deliver,
    Durability,
    Error,
    ErrorCode,
    Event,
    FrameType,
    Goodbye,
    GroupDeliver,
    Groups,
    GroupsAction,
    GroupsReply,
    Topics,
    TopicsAction,
    TopicsReply,
    Hello,
    Info,
    InfoReply,
    Ping,
    Pong,
    PubAck,
    Publish,
    RefKind,
    Role,
    StartKind,
    State,
    SubAck,
    Subscribe,
    TopicInfo,
    UnsubAck,
    Unsubscribe,
    Welcome,
    encode_batch,
    encode_event,
)


class Phase(enum.Enum):
    FRESH = "fresh"  # nothing exchanged yet
    HELLO_SENT = "hello-sent"  # the server has HELLO, the client awaits WELCOME
    OPEN = "open"  # handshake done


HELLO = Hello("test-client", options={"token": "x"})
WELCOME = Welcome(
    "0.1.0",
    "broker-1",
    {"max_frame_bytes": DEFAULT_MAX_FRAME_BYTES, "max_batch_messages": 100_000},
)
BATCH = encode_batch([b"hi", (b"yo", {"k": "v"})])


def pair(
    phase: Phase, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[Connection, Connection]:
    """A (client, server) pair driven to ``phase``."""
    client = Connection(Role.CLIENT, max_frame_bytes=max_frame_bytes)
    server = Connection(Role.SERVER, max_frame_bytes=max_frame_bytes)
    if phase is Phase.FRESH:
        return client, server
    # The handshake itself runs under the default limit.
    client.max_frame_bytes = server.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
    server.receive_data(client.send(HELLO))
    assert server.next_event() == HELLO
    assert server.peer_hello == HELLO
    assert client.state is server.state is State.AWAIT_WELCOME
    if phase is Phase.HELLO_SENT:
        client.max_frame_bytes = server.max_frame_bytes = max_frame_bytes
        return client, server
    client.receive_data(server.send(WELCOME))
    assert client.next_event() == WELCOME
    assert client.peer_welcome == WELCOME
    assert client.state is server.state is State.OPEN
    client.max_frame_bytes = server.max_frame_bytes = max_frame_bytes
    return client, server


def endpoints(sender: Role, phase: Phase) -> tuple[Connection, Connection]:
    client, server = pair(phase)
    return (client, server) if sender is Role.CLIENT else (server, client)


def receiver(
    sender: Role, phase: Phase, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Connection:
    client, server = pair(phase, max_frame_bytes)
    return server if sender is Role.CLIENT else client


SAMPLES: dict[FrameType, Event] = {
    FrameType.HELLO: HELLO,
    FrameType.WELCOME: WELCOME,
    FrameType.PUBLISH: Publish(1, "orders.eu", BATCH),
    FrameType.PUBACK: PubAck(1, 41, 2, 1_700_000_000_000_000, Durability.DISK),
    FrameType.SUBSCRIBE: Subscribe(7, "orders.eu", StartKind.OFFSET, 40, 1000, {"k": "v"}),
    FrameType.SUBACK: SubAck(7, 1_764_316_800_000_000),
    FrameType.UNSUBSCRIBE: Unsubscribe(7),
    FrameType.UNSUBACK: UnsubAck(7),
    FrameType.CREDIT: Credit(7, 500),
    FrameType.DELIVER: Deliver(7, "orders.eu", 41, 1_700_000_000_000_000, BATCH),
    FrameType.PING: Ping(12345),
    FrameType.PONG: Pong(12345),
    FrameType.ERROR: Error(ErrorCode.CHECKSUM_MISMATCH, "crc mismatch", 1, RefKind.REQUEST),
    FrameType.GOODBYE: Goodbye(),
    FrameType.ACK: Ack(7, AckKind.NAK, "orders.eu", ((40, 45), (47, 47)), 250),
    FrameType.GROUP_DELIVER: GroupDeliver(7, "orders.eu", 41, 1_700_000_000_000_000, 2, BATCH),
    FrameType.GROUPS: Groups(9, GroupsAction.INSPECT, "workers"),
    FrameType.GROUPS_REPLY: GroupsReply(9, '{"group": "workers", "pending": 3}'),
    FrameType.TOPICS: Topics(10, TopicsAction.DELETE, "orders.eu"),
    FrameType.TOPICS_REPLY: TopicsReply(10, '{"deleted": "orders.eu", "messages": 41}'),
    FrameType.INFO: Info(9, "orders.>"),
    FrameType.INFO_REPLY: InfoReply(9, (TopicInfo("orders.eu", 3, 42, 4096, 2),)),
}
CLIENT_ONLY = [
    FrameType.HELLO,
    FrameType.PUBLISH,
    FrameType.SUBSCRIBE,
    FrameType.UNSUBSCRIBE,
    FrameType.CREDIT,
    FrameType.ACK,
    FrameType.INFO,
    FrameType.GROUPS,
    FrameType.TOPICS,
]
SERVER_ONLY = [
    FrameType.WELCOME,
    FrameType.PUBACK,
    FrameType.SUBACK,
    FrameType.UNSUBACK,
    FrameType.DELIVER,
    FrameType.GROUP_DELIVER,
    FrameType.INFO_REPLY,
    FrameType.GROUPS_REPLY,
    FrameType.TOPICS_REPLY,
]
EITHER = [FrameType.PING, FrameType.PONG, FrameType.ERROR, FrameType.GOODBYE]


class Case:
    def __init__(self, name: str, sender: Role, phase: Phase, event: Event) -> None:
        self.name = name
        self.sender = sender
        self.phase = phase
        self.event = event

    def __repr__(self) -> str:
        return self.name


C, S = Role.CLIENT, Role.SERVER
CASES = [
    Case("hello", C, Phase.FRESH, HELLO),
    Case("hello-defaults", C, Phase.FRESH, Hello()),
    Case("hello-unicode", C, Phase.FRESH, Hello("клиент 🚀", options={"ключ": "値", "": ""})),
    Case("welcome", S, Phase.HELLO_SENT, WELCOME),
    Case("welcome-no-limits", S, Phase.HELLO_SENT, Welcome("", "")),
    Case("welcome-max-limit", S, Phase.HELLO_SENT, Welcome("1", "é", {"x": 2**64 - 1, "y": 0})),
    Case("publish", C, Phase.OPEN, SAMPLES[FrameType.PUBLISH]),
    Case("publish-no-ack", C, Phase.OPEN, Publish(0, "a", encode_batch([b""]))),
    Case("publish-max-id", C, Phase.OPEN, Publish(2**64 - 1, "ü.ñ", encode_batch([b"x" * 300]))),
    Case("puback", S, Phase.OPEN, SAMPLES[FrameType.PUBACK]),
    Case("puback-memory", S, Phase.OPEN, PubAck(2**64 - 1, 0, 2**32 - 1, 0, Durability.MEMORY)),
    Case("puback-os", S, Phase.OPEN, PubAck(0, 2**64 - 1, 1, 2**64 - 1, Durability.OS)),
    Case("subscribe", C, Phase.OPEN, SAMPLES[FrameType.SUBSCRIBE]),
    Case("subscribe-defaults", C, Phase.OPEN, Subscribe(0, ">")),
    Case(
        "subscribe-time",
        C,
        Phase.OPEN,
        Subscribe(2**32 - 1, "*.x", StartKind.TIME, 2**64 - 1, 1, {"é": "", "": "ü"}),
    ),
    Case("subscribe-earliest", C, Phase.OPEN, Subscribe(3, "a", StartKind.EARLIEST, credit=0)),
    Case("credit", C, Phase.OPEN, Credit(7, 1)),
    Case("credit-max", C, Phase.OPEN, Credit(2**32 - 1, 2**32 - 1)),
    Case("suback", S, Phase.OPEN, SubAck(7)),
    Case("unsubscribe", C, Phase.OPEN, Unsubscribe(2**32 - 1)),
    Case("unsuback", S, Phase.OPEN, UnsubAck(0)),
    Case("deliver", S, Phase.OPEN, SAMPLES[FrameType.DELIVER]),
    Case("deliver-max", S, Phase.OPEN, Deliver(2**32 - 1, "т.т", 2**64 - 1, 2**64 - 1, BATCH)),
    Case("ping-from-client", C, Phase.OPEN, Ping(0)),
    Case("ping-from-server", S, Phase.OPEN, Ping(2**64 - 1)),
    Case("pong-from-client", C, Phase.OPEN, Pong(2**64 - 1)),
    Case("pong-from-server", S, Phase.OPEN, Pong(1)),
    Case(
        "error-from-client",
        C,
        Phase.OPEN,
        Error(ErrorCode.BAD_REQUEST, "no", 5, RefKind.SUBSCRIPTION),
    ),
    Case("error-from-server", S, Phase.OPEN, SAMPLES[FrameType.ERROR]),
    Case("error-unknown-code", S, Phase.OPEN, Error(65535, "", ref=2**64 - 1)),
    Case(
        "error-with-fields",
        S,
        Phase.OPEN,
        Error(
            ErrorCode.DATA_LOST, "lost", 3, RefKind.SUBSCRIPTION,
            fields={"topic": "t", "first": "10", "last": "12", "reason": "damaged"},
        ),
    ),
    Case(
        "error-fatal-with-fields",
        S,
        Phase.OPEN,
        Error(ErrorCode.INTERNAL_ERROR, "", fatal=True, fields={"ключ": "値"}),
    ),
    Case(
        "error-fatal-from-client",
        C,
        Phase.OPEN,
        Error(ErrorCode.MALFORMED_FRAME, "bad frame", fatal=True),
    ),
    Case(
        "error-fatal-from-server",
        S,
        Phase.OPEN,
        Error(ErrorCode.INTERNAL_ERROR, "boom ✗", 9, RefKind.REQUEST, fatal=True),
    ),
    Case(
        "error-fatal-refusing-hello",
        S,
        Phase.HELLO_SENT,
        Error(ErrorCode.UNSUPPORTED_VERSION, "version 2", fatal=True),
    ),
    Case(
        "error-fatal-before-hello",
        S,
        Phase.FRESH,
        Error(ErrorCode.SHUTTING_DOWN, "going away", fatal=True),
    ),
    Case("ack", C, Phase.OPEN, SAMPLES[FrameType.ACK]),
    Case("ack-max", C, Phase.OPEN, Ack(2**32 - 1, AckKind.IN_PROGRESS, "é", ((0, 2**64 - 1),), 2**32 - 1)),
    Case("ack-term", C, Phase.OPEN, Ack(1, AckKind.TERM, "a", ((3, 3),))),
    Case("group-deliver", S, Phase.OPEN, SAMPLES[FrameType.GROUP_DELIVER]),
    Case("group-deliver-max", S, Phase.OPEN, GroupDeliver(2**32 - 1, "т", 2**64 - 1, 0, 65535, BATCH)),
    Case("groups", C, Phase.OPEN, SAMPLES[FrameType.GROUPS]),
    Case("groups-list", C, Phase.OPEN, Groups(2**64 - 1, GroupsAction.LIST)),
    Case(
        "groups-create",
        C,
        Phase.OPEN,
        Groups(
            3, GroupsAction.CREATE, "workers", "jobs.>", StartKind.TIME, 1_700_000_000_000_000,
            {"max_deliver": "3", "backoff_ms": "1000,5000"},
        ),
    ),
    Case("groups-create-bare", C, Phase.OPEN, Groups(4, GroupsAction.CREATE, "w", "jobs")),
    Case("groups-reply", S, Phase.OPEN, SAMPLES[FrameType.GROUPS_REPLY]),
    Case("groups-reply-unicode", S, Phase.OPEN, GroupsReply(0, '{"g": "ü"}')),
    Case("topics-delete", C, Phase.OPEN, Topics(2**64 - 1, TopicsAction.DELETE, "a.b")),
    Case("topics-keep-from", C, Phase.OPEN, Topics(5, TopicsAction.DELETE, "ü.x", 2**64 - 1)),
    Case("topics-reply", S, Phase.OPEN, TopicsReply(5, '{"deleted": "ü.x"}')),
    Case("info", C, Phase.OPEN, SAMPLES[FrameType.INFO]),
    Case("info-unicode", C, Phase.OPEN, Info(2**64 - 1, "ü.*")),
    Case("info-reply", S, Phase.OPEN, SAMPLES[FrameType.INFO_REPLY]),
    Case("info-reply-empty", S, Phase.OPEN, InfoReply(0)),
    Case(
        "info-reply-truncated",
        S,
        Phase.OPEN,
        InfoReply(
            1,
            (TopicInfo("a", 0, 0, 0, 0), TopicInfo("é.b", 2**64 - 1, 2**64 - 1, 1, 2**32 - 1)),
            truncated=True,
        ),
    ),
    Case("goodbye-from-client", C, Phase.OPEN, Goodbye()),
    Case("goodbye-from-server", S, Phase.OPEN, Goodbye()),
]


def frame_type_of(event: Event) -> FrameType:
    return FrameType(encode_event(event)[4])


def encoded(case: Case) -> bytes:
    sender, _ = endpoints(case.sender, case.phase)
    data = sender.send(case.event)
    assert data == encode_event(case.event)
    assert int.from_bytes(data[:4], "big") == len(data) - HEADER_SIZE
    assert data[4] == frame_type_of(case.event)
    return data
