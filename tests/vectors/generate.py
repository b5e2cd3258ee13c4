"""Write tests/vectors/conversations.json: wire test vectors (protocol.md,
"Test vectors").

Each conversation is the frames two peers exchange, in order, each with its
bytes (hex) and its decoded fields. ``tests/test_vectors.py`` plays every
conversation through the codec: it decodes each frame's bytes and compares
the fields, and encodes the fields' event and compares the bytes. Another
implementation can do the same with the same file.

Run ``python tests/vectors/generate.py`` only when protocol.md changes on
purpose: the file is the contract, and a diff in it is a wire change.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import attrs

from pybroker.protocol import (
    Ack,
    AckKind,
    Connection,
    Credit,
    Deliver,
    Durability,
    Error,
    ErrorCode,
    DELIVER_AT_HEADER,
    MSG_ID_HEADER,
    NO_OFFSET,
    Goodbye,
    GroupDeliver,
    Groups,
    GroupsAction,
    GroupsReply,
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
    SubAck,
    Subscribe,
    TopicInfo,
    Topics,
    TopicsAction,
    TopicsReply,
    Unsubscribe,
    UnsubAck,
    Welcome,
    check_batch,
    decode_batch,
    encode_batch,
)

HERE = Path(__file__).parent
OUT = HERE / "conversations.json"

#: Fixed clock readings so the bytes never change: 2026-01-01T00:00:00Z in µs.
T0 = 1_767_225_600_000_000

HELLO = Hello("vectors", options={"error_fields": "1"})
WELCOME = Welcome("1.0.0", "vectors", {"max_frame_bytes": 4_194_304, "max_batch_messages": 100_000})


def to_json(event: Any) -> dict[str, Any]:
    """An event's fields as JSON values: bytes as hex, enums as their
    numbers; a batch also as its decoded records and whether its CRC
    matches, for checking a batch codec on its own."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for field in attrs.fields(type(event)):
        if isinstance(event, Groups) and event.action != GroupsAction.CREATE and field.name in _CREATE_ONLY:
            continue  # not on the wire for other actions
        out[field.name] = _value(getattr(event, field.name))
    batch = getattr(event, "batch", None)
    if isinstance(batch, bytes):
        count, crc_ok = check_batch(batch)
        out["records"] = [
            {"payload": payload.hex(), "headers": dict(headers)} for payload, headers in decode_batch(batch)
        ]
        out["crc_ok"] = crc_ok
        assert count == len(out["records"])
    return out


#: GROUPS fields that only action 3 (create) carries.
_CREATE_ONLY = {"pattern", "start", "start_value", "options"}


def _value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, Enum):
        return int(v.value)
    if isinstance(v, bool | int | str) or v is None:
        return v
    if isinstance(v, Mapping):
        return {str(k): _value(x) for k, x in v.items()}
    if isinstance(v, tuple | list):
        return [_value(x) for x in v]
    if attrs.has(type(v)):
        return {f.name: _value(getattr(v, f.name)) for f in attrs.fields(type(v))}
    raise TypeError(f"no JSON for {v!r}")


def conversations() -> dict[str, list[tuple[str, Any]]]:
    """Each conversation after its HELLO and WELCOME: (sender, event)."""
    one = encode_batch([b"hi"])
    named = encode_batch([(b"hi", {MSG_ID_HEADER: "0f1e2d3c4b5a6978.1"})])
    later = encode_batch([(b"remind", {DELIVER_AT_HEADER: str(T0 // 1000 + 60_000)})])
    two = encode_batch([b"job-1", (b"job-2", {"trace": "7f"})])
    lost = {"topic": "orders.eu", "first": "3", "last": "9", "reason": "retention"}
    return {
        "publish one message": [
            ("client", Publish(1, "a.b", one)),
            ("server", PubAck(1, 0, 1, T0, Durability.DISK)),
        ],
        "publish exactly once: a resend gets the original offsets": [
            ("client", Publish(1, "a.b", named, dedup=True)),
            ("client", Publish(2, "a.b", named, dedup=True)),
            ("server", PubAck(1, 5, 1, T0, Durability.DISK)),
            ("server", PubAck(2, 5, 1, T0, Durability.DISK)),
        ],
        "publish delayed: no offset until it is released": [
            ("client", Publish(1, "a.b", later, delayed=True)),
            ("server", PubAck(1, NO_OFFSET, 1, T0, Durability.DISK)),
        ],
        "subscribe, deliver, credit, unsubscribe": [
            ("client", Subscribe(1, "orders.>", StartKind.EARLIEST, 0, 4096)),
            ("server", SubAck(1, T0)),
            ("server", Deliver(1, "orders.eu", 0, T0 + 1, two)),
            ("client", Credit(1, 2)),
            ("client", Unsubscribe(1)),
            ("server", UnsubAck(1)),
        ],
        "publish refused, then acknowledged, then a PING barrier": [
            ("client", Publish(1, "a.b", one)),
            ("client", Publish(2, "a.b", one[:4] + b"\x00\x00\x00\x00" + one[8:])),
            ("client", Ping(42)),
            ("server", PubAck(1, 7, 1, T0, Durability.DISK)),
            ("server", Error(ErrorCode.CHECKSUM_MISMATCH, "batch CRC does not match", 2, RefKind.REQUEST)),
            ("server", Pong(42)),
        ],
        "consumer group: deliver, nak, deliver again, ack": [
            (
                "client",
                Subscribe(3, "jobs.>", StartKind.NEW, 0, 0, {"group": "workers", "ack_wait_ms": "5000"}),
            ),
            ("server", SubAck(3, T0)),
            ("server", GroupDeliver(3, "jobs.mail", 0, T0 + 5, 1, two)),
            ("client", Ack(3, AckKind.ACK, "jobs.mail", ((0, 0),))),
            ("client", Ack(3, AckKind.NAK, "jobs.mail", ((1, 1),), 250)),
            ("server", GroupDeliver(3, "jobs.mail", 1, T0 + 5, 2, encode_batch([(b"job-2", {"trace": "7f"})]))),
            ("client", Ack(3, AckKind.IN_PROGRESS, "jobs.mail", ((1, 1),))),
            ("client", Ack(3, AckKind.ACK, "jobs.mail", ((1, 1),))),
        ],
        "data lost, with fields": [
            ("client", Subscribe(2, "orders.eu", StartKind.OFFSET, 3)),
            ("server", SubAck(2, T0)),
            ("server", Error(ErrorCode.DATA_LOST, "orders.eu 3..9 lost (retention)", 2, RefKind.SUBSCRIPTION, False, lost)),
            ("server", Deliver(2, "orders.eu", 10, T0 + 9, one)),
        ],
        "topic listing in two pages": [
            ("client", Info(5, "orders.>")),
            ("server", InfoReply(5, (TopicInfo("orders.eu", 0, 10, 1024, 1),), True)),
            ("client", Info(6, "orders.>", "orders.eu")),
            ("server", InfoReply(6, (TopicInfo("orders.us", 3, 4, 99, 0),), False)),
        ],
        "group admin": [
            ("client", Groups(7, GroupsAction.LIST)),
            ("server", GroupsReply(7, '{"groups":[],"next":""}')),
            ("client", Groups(8, GroupsAction.DELETE, "workers")),
            ("server", GroupsReply(8, '{"deleted":"workers"}')),
            (
                "client",
                Groups(9, GroupsAction.CREATE, "mail", "jobs.mail", StartKind.EARLIEST, 0, {"max_deliver": "3"}),
            ),
            ("server", GroupsReply(9, '{"group":"mail","pattern":"jobs.mail","members":0,"created":true}')),
        ],
        "purge a topic, change its retention": [
            ("client", Topics(10, TopicsAction.PURGE, "orders.eu", 40)),
            ("server", TopicsReply(10, '{"topic": "orders.eu", "first_offset": 40, "next_offset": 42, "purged": 40}')),
            ("client", Topics(11, TopicsAction.SET, "orders.eu", 0, {"retention_seconds": "7d"})),
            ("server", TopicsReply(11, '{"topic": "orders.eu", "settings": {"retention_seconds": 604800.0}}')),
        ],
        "delete a topic; a subscriber reading it is told": [
            ("client", Topics(9, TopicsAction.DELETE, "orders.eu")),
            ("server", Error(ErrorCode.TOPIC_DELETED, "topic 'orders.eu' was deleted", 2, RefKind.SUBSCRIPTION, False, {"topic": "orders.eu"})),
            ("server", TopicsReply(9, '{"deleted": "orders.eu", "messages": 10}')),
        ],
        "fatal error": [
            ("server", Error(ErrorCode.MALFORMED_FRAME, "frame body ends inside a field", 0, RefKind.NONE, True)),
        ],
        "closing": [
            ("client", Goodbye()),
            ("server", Goodbye()),
        ],
    }


def build() -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for name, frames in conversations().items():
        client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
        played: list[dict[str, Any]] = []
        for sender, event in [("client", HELLO), ("server", WELCOME), *frames]:
            src, dst = (client, server) if sender == "client" else (server, client)
            data = src.send(event)
            dst.receive_data(data)
            decoded = dst.next_event()
            assert decoded == event, (name, event, decoded)
            played.append({"from": sender, "hex": data.hex(), "fields": to_json(event)})
        out.append({"name": name, "frames": played})
    return {
        "about": "pybroker wire protocol version 1 test vectors (protocol.md, 'Test vectors'). "
        "Each conversation starts on a new connection; 'hex' is every byte of the frame, "
        "header included; 'fields' is what it decodes to ('records': its batch decoded).",
        "conversations": out,
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
