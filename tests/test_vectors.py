"""The wire test vectors (tests/vectors/conversations.json; protocol.md,
"Test vectors") against the codec, byte for byte, both ways.

Every frame of every conversation is decoded by the peer that receives it
and must give the recorded fields; the decoded event, sent by the peer that
sent it, must give the recorded bytes. A change in the file is a change of
the wire protocol.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pybroker.protocol import NEED_DATA, Connection, Role
from vectors.generate import OUT, build, to_json

VECTORS: dict[str, Any] = json.loads(OUT.read_text())
CONVERSATIONS = VECTORS["conversations"]


def test_every_frame_type_is_in_the_vectors() -> None:
    seen = {f["fields"]["type"] for c in CONVERSATIONS for f in c["frames"]}
    assert seen == {
        "Hello", "Welcome", "Publish", "PubAck", "Subscribe", "SubAck", "Unsubscribe", "UnsubAck",
        "Credit", "Ack", "GroupDeliver", "Deliver", "Ping", "Pong", "Error", "Goodbye",
        "Info", "InfoReply", "Groups", "GroupsReply", "Topics", "TopicsReply",
    }


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=[c["name"] for c in CONVERSATIONS])
def test_conversation_decodes_and_encodes_byte_for_byte(conversation: dict[str, Any]) -> None:
    peers = {"client": Connection(Role.CLIENT), "server": Connection(Role.SERVER)}
    for frame in conversation["frames"]:
        sender = peers[frame["from"]]
        receiver = peers["server" if frame["from"] == "client" else "client"]
        data = bytes.fromhex(frame["hex"])
        # Byte by byte: a frame split anywhere decodes the same.
        for i in range(len(data)):
            receiver.receive_data(data[i : i + 1])
            if i < len(data) - 1:
                assert receiver.next_event() is NEED_DATA
        event = receiver.next_event()
        assert to_json(event) == frame["fields"]
        assert receiver.next_event() is NEED_DATA
        assert sender.send(event) == data


def test_the_file_is_what_the_generator_writes() -> None:
    """The checked-in file and tests/vectors/generate.py agree, so neither
    drifts (regenerate deliberately when the protocol changes)."""
    assert json.loads(json.dumps(build())) == VECTORS


def test_vectors_file_is_plain_json_with_hex() -> None:
    for c in CONVERSATIONS:
        assert c["frames"][0]["fields"]["type"] == "Hello"
        for f in c["frames"]:
            size = int(f["hex"][:8], 16)
            assert len(f["hex"]) == 2 * (6 + size)  # 4-byte size + type + flags + body
