"""The sans-I/O codec (client/protocol/) against protocol.md.

No sockets and no Trio: bytes go in with ``receive_data``, events come out of
``next_event``, and ``send`` turns events into bytes.
"""

from __future__ import annotations

import enum
import json
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pybroker.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    Credit,
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    Deliver,
    Durability,
    Error,
    ErrorCode,
    Event,
    FrameType,
    Goodbye,
    Hello,
    LocalProtocolError,
    Ping,
    Pong,
    ProtocolError,
    PubAck,
    Publish,
    RefKind,
    RemoteProtocolError,
    Role,
    StartKind,
    State,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
    decode_batch,
    decode_body,
    deliver_header,
    encode_batch,
    encode_event,
    encode_puback,
    encode_publish,
    DEFAULT_MAX_TOPIC_BYTES,
    DEFAULT_MAX_TOPIC_DEPTH,
)

from helpers.cases import (
    BATCH,
    CASES,
    CLIENT_ONLY,
    EITHER,
    HELLO,
    SAMPLES,
    SERVER_ONLY,
    WELCOME,
    C,
    Case,
    Phase,
    S,
    encoded,
    endpoints,
    frame_type_of,
    pair,
    receiver,
)
from helpers.frames import error_body, hello_body, raw_frame, s16, subscribe_body, u8, u16, u32, u64
from helpers.strategies import U8, U32, client_events, errors, hellos, server_events, welcomes


PROTOCOL_MD = Path(__file__).resolve().parent.parent / "protocol.md"

PROPERTY = settings(max_examples=250, deadline=None)
FUZZ = settings(max_examples=250, deadline=None)

# --------------------------------------------------------------------------
# Helpers


def body_of(frame_bytes: bytes) -> bytes:
    return frame_bytes[HEADER_SIZE:]


def reframe(frame_bytes: bytes, body: bytes) -> bytes:
    """The same frame type and flags around a different body."""
    return raw_frame(frame_bytes[4], body, frame_bytes[5])


def remote_error(conn: Connection, data: bytes) -> RemoteProtocolError:
    """Feed ``data`` and return the RemoteProtocolError that decoding raises."""
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        while True:
            event = conn.next_event()
            assert event is not NEED_DATA and event is not CLOSED, event
    assert isinstance(info.value.code, ErrorCode)
    return info.value


def assert_remote(conn: Connection, data: bytes, code: ErrorCode) -> RemoteProtocolError:
    exc = remote_error(conn, data)
    assert exc.code is code, exc
    return exc


def drain(conn: Connection) -> list[Event]:
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return out
        out.append(cast(Event, event))


# --------------------------------------------------------------------------
# One sample event per frame type, and who may send it

def test_samples_cover_every_frame_type() -> None:
    assert set(SAMPLES) == set(FrameType)
    assert sorted(CLIENT_ONLY + SERVER_ONLY + EITHER) == sorted(FrameType)


# --------------------------------------------------------------------------
# 1. Round trip of every frame type, whole, byte by byte and split in two


def test_cases_cover_every_frame_type_in_both_allowed_directions() -> None:
    covered = {(frame_type_of(c.event), c.sender) for c in CASES}
    for ftype in FrameType:
        senders = {C} if ftype in CLIENT_ONLY else {S} if ftype in SERVER_ONLY else {C, S}
        for sender in senders:
            assert (ftype, sender) in covered
    fatal_flags = {c.event.fatal for c in CASES if isinstance(c.event, Error)}
    assert fatal_flags == {True, False}


def deliver_in_chunks(case: Case, chunks: Sequence[bytes]) -> Connection:
    """Feed ``chunks`` to a fresh receiver: NEED_DATA until the last one."""
    assert all(chunks), "an empty chunk would mean end of stream"
    conn = receiver(case.sender, case.phase)
    for chunk in chunks[:-1]:
        conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA
        assert conn.next_event() is NEED_DATA
    conn.receive_data(chunks[-1])
    event = conn.next_event()
    assert event == case.event
    assert type(event) is type(case.event)
    assert conn.next_event() is NEED_DATA
    assert conn.buffered_bytes == 0
    return conn


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_round_trip_whole(case: Case) -> None:
    conn = deliver_in_chunks(case, [encoded(case)])
    # What the receiver learned about the state of the connection.
    finished = isinstance(case.event, Goodbye) or (
        isinstance(case.event, Error) and case.event.fatal
    )
    assert conn.they_finished is finished
    assert not conn.we_finished
    if isinstance(case.event, Hello):
        assert conn.state is State.AWAIT_WELCOME
        assert conn.peer_hello == case.event
    elif isinstance(case.event, Welcome):
        assert conn.state is State.OPEN
        assert conn.peer_welcome == case.event
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_round_trip_byte_by_byte(case: Case) -> None:
    data = encoded(case)
    deliver_in_chunks(case, [data[i : i + 1] for i in range(len(data))])


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_round_trip_split_in_two_everywhere(case: Case) -> None:
    data = encoded(case)
    for cut in range(1, len(data)):
        deliver_in_chunks(case, [data[:cut], data[cut:]])


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_round_trip_in_three_pieces(case: Case) -> None:
    data = encoded(case)
    step = max(1, len(data) // 12)
    for a in range(1, len(data) - 1, step):
        for b in range(a + 1, len(data), step):
            deliver_in_chunks(case, [data[:a], data[a:b], data[b:]])


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_round_trip_decode_body(case: Case) -> None:
    data = encoded(case)
    assert decode_body(FrameType(data[4]), data[5], data[HEADER_SIZE:]) == case.event
    assert decode_body(FrameType(data[4]), data[5], memoryview(data)[HEADER_SIZE:]) == case.event


def test_several_frames_in_one_read() -> None:
    client, server = pair(Phase.OPEN)
    sent = [
        SAMPLES[FrameType.PUBLISH],
        SAMPLES[FrameType.SUBSCRIBE],
        Ping(1),
        Unsubscribe(7),
        Pong(2),
        Error(ErrorCode.DATA_LOST, "x", 7, RefKind.SUBSCRIPTION),
        Credit(7, 10),
        Goodbye(),
    ]
    data = b"".join(client.send(e) for e in sent)
    server.receive_data(data + data[:3])  # plus the start of a frame
    assert server.events() == sent
    assert server.buffered_bytes == 3


def test_welcome_answer_to_hello_in_one_read() -> None:
    """The client may get WELCOME and the first frames in one read."""
    client, server = pair(Phase.HELLO_SENT)
    data = server.send(WELCOME) + server.send(Ping(9)) + server.send(SubAck(1))
    client.receive_data(data)
    assert client.events() == [WELCOME, Ping(9), SubAck(1)]


def test_long_buffers_are_compacted() -> None:
    client, server = pair(Phase.OPEN)
    frame = client.send(Ping(7))
    for _ in range(2000):
        server.receive_data(frame)
        assert server.next_event() == Ping(7)
    assert server.next_event() is NEED_DATA
    assert server.buffered_bytes == 0


# --------------------------------------------------------------------------
# 2. Exact bytes, against protocol.md and against hand-written hex


def doc_text() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


def doc_frames() -> list[tuple[bytes, int, str]]:
    """Every frame written out in protocol.md's "Worked example": its bytes,
    the body size its header comment names, and its lines.

    Frames are separated by blank lines within a block; each line is hex
    bytes, then a comment.
    """
    section = doc_text().split("\n## Worked example", 1)[1].split("\n## ", 1)[0]
    frames = []
    for block in section.split("```")[1::2]:
        for text in block.strip("\n").split("\n\n"):
            out = bytearray()
            for line in text.splitlines():
                for token in line.split():
                    if not re.fullmatch(r"[0-9a-f]{2}", token):
                        break  # the comment starts
                    out.append(int(token, 16))
            size = re.search(r"body (\d+) bytes", text)
            assert size is not None, text
            frames.append((bytes(out), int(size.group(1)), text))
    return frames


FROM_CLIENT = {
    FrameType.HELLO, FrameType.PUBLISH, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE,
    FrameType.CREDIT, FrameType.ACK, FrameType.INFO, FrameType.GROUPS,
}


def test_protocol_md_worked_example_decodes_and_encodes() -> None:
    """Each frame of the worked example agrees with itself (size), is a
    frame of the test vectors, and the codec decodes it and encodes it back
    to the same bytes."""
    frames = doc_frames()
    assert len(frames) == 8
    vectors = {
        f["hex"] for c in json.loads((Path(__file__).parent / "vectors" / "conversations.json").read_text())["conversations"]
        for f in c["frames"]
    }
    for data, size, text in frames:
        assert size == len(data) - HEADER_SIZE == int.from_bytes(data[:4], "big"), text
        assert data.hex() in vectors, text
        kind = FrameType(data[4])
        phase = {FrameType.HELLO: Phase.FRESH, FrameType.WELCOME: Phase.HELLO_SENT}.get(kind, Phase.OPEN)
        client, server = pair(phase)
        receiver = server if kind in FROM_CLIENT else client
        receiver.receive_data(data)
        event = receiver.next_event()
        assert encode_event(event) == data, text


def test_protocol_md_example_hand_checked() -> None:
    """The PUBLISH of the worked example written out here, with the CRC
    worked out once."""
    assert zlib.crc32(bytes.fromhex("00000002 0000 6869")) == 0x86A8B45A
    expected = bytes.fromhex(
        "0000001d 10 00" "0000000000000001" "0003 612e62" "00000001" "86a8b45a" "00000002 0000 6869"
    )
    assert expected in [data for data, _, _ in doc_frames()]
    batch = encode_batch([b"hi"])
    assert encode_publish(1, "a.b", batch) == expected
    client, server = pair(Phase.OPEN)
    assert client.send(Publish(1, "a.b", batch)) == expected
    server.receive_data(expected)
    event = server.next_event()
    assert event == Publish(1, "a.b", batch)
    assert isinstance(event, Publish)
    assert decode_batch(event.batch) == [(b"hi", {})]


HEX_FRAMES = [
    pytest.param(Hello(), "0000000a 01 00 5059424b 0001 0000 0000", id="hello-empty"),
    pytest.param(
        Hello("py", options={"k": "v"}),
        "00000012 01 00 5059424b 0001 0002 7079 0001 0001 6b 0001 76",
        id="hello",
    ),
    pytest.param(
        Welcome("0.1.0", "b", {"max_frame_bytes": 4194304}),
        "00000027 02 00 0001 0005 302e312e30 0001 62"
        " 0001 000f 6d61785f6672616d655f6279746573 0000000000400000",
        id="welcome",
    ),
    pytest.param(
        Publish(0, "é", bytes.fromhex("00000001 86a8b45a 00000002 0000 6869")),
        "0000001c 10 00 0000000000000000 0002 c3a9 00000001 86a8b45a 00000002 0000 6869",
        id="publish-utf8-topic",
    ),
    pytest.param(
        PubAck(7, 100, 3, 0x0102030405060708, Durability.DISK),
        "0000001d 11 00 0000000000000007 0000000000000064 00000003 0102030405060708 02",
        id="puback",
    ),
    pytest.param(
        Subscribe(5, "a.*", StartKind.OFFSET, 42),
        "00000018 20 00 00000005 0003 612e2a 02 000000000000002a ffffffff 0000",
        id="subscribe",
    ),
    pytest.param(
        Subscribe(1, ">", credit=256, options={"x": "y"}),
        "0000001c 20 00 00000001 0001 3e 00 0000000000000000 00000100 0001 0001 78 0001 79",
        id="subscribe-options",
    ),
    pytest.param(SubAck(5, 0x0102030405060708), "0000000c 21 00 00000005 0102030405060708", id="suback"),
    pytest.param(Unsubscribe(5), "00000004 22 00 00000005", id="unsubscribe"),
    pytest.param(UnsubAck(0xFFFFFFFF), "00000004 23 00 ffffffff", id="unsuback"),
    pytest.param(Credit(5, 100), "00000008 24 00 00000005 00000064", id="credit"),
    pytest.param(
        Deliver(
            5, "a.b", 10, 0x0102030405060708, bytes.fromhex("00000001 86a8b45a 00000002 0000 6869")
        ),
        "00000029 30 00 00000005 000000000000000a 0102030405060708 0003 612e62"
        " 00000001 86a8b45a 00000002 0000 6869",
        id="deliver",
    ),
    pytest.param(Ping(0x0102030405060708), "00000008 40 00 0102030405060708", id="ping"),
    pytest.param(Pong(1), "00000008 41 00 0000000000000001", id="pong"),
    pytest.param(
        Error(105, "no", ref=9, fatal=True),
        "0000000f 50 01 0069 00 0000000000000009 0002 6e6f",
        id="error-fatal",
    ),
    pytest.param(
        Error(ErrorCode.BAD_TOPIC, "", 1, RefKind.REQUEST),
        "0000000d 50 00 00c8 01 0000000000000001 0000",
        id="error",
    ),
    pytest.param(Goodbye(), "00000000 60 00", id="goodbye"),
]


@pytest.mark.parametrize(("event", "hex_bytes"), HEX_FRAMES)
def test_exact_bytes(event: Event, hex_bytes: str) -> None:
    data = bytes.fromhex(hex_bytes)
    assert encode_event(event) == data
    assert decode_body(FrameType(data[4]), data[5], data[HEADER_SIZE:]) == event


def test_suback_timestamp_survives_decoding() -> None:
    # SubAck's equality ignores the clock reading, so test_exact_bytes alone
    # would not notice a timestamp decoded wrongly.
    data = encode_event(SubAck(5, 0x0102030405060708))
    decoded = decode_body(FrameType.SUBACK, data[5], data[HEADER_SIZE:])
    assert isinstance(decoded, SubAck) and decoded.timestamp == 0x0102030405060708


def test_fast_paths_match_encode_event() -> None:
    batch = bytes.fromhex("00000001 86a8b45a 00000002 0000 6869")
    deliver = Deliver(5, "a.b", 10, 0x0102030405060708, batch)
    head = deliver_header(5, b"a.b", 10, 0x0102030405060708, len(batch))
    assert head + batch == encode_event(deliver)
    assert len(head) == HEADER_SIZE + 4 + 8 + 8 + 2 + 3
    ack = PubAck(7, 100, 3, 0x0102030405060708, Durability.DISK)
    assert encode_puback(ack) == encode_event(ack)
    assert encode_publish(3, "x.y", batch) == encode_event(Publish(3, "x.y", batch))


def test_frame_type_table_matches_protocol_md() -> None:
    rows = re.findall(r"^\| (0x[0-9a-f]{2}) \| ([A-Z_]+) \| ([^|]+?) \|", doc_text(), re.M)
    assert {name: int(value, 16) for value, name, _ in rows} == {t.name: int(t) for t in FrameType}
    directions = {name: direction.strip() for _, name, direction in rows}
    for ftype in FrameType:
        expected = {
            "client → server": ftype in CLIENT_ONLY,
            "server → client": ftype in SERVER_ONLY,
            "either": ftype in EITHER,
        }
        assert expected[directions[ftype.name]], ftype


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_who_may_send_what(ftype: FrameType) -> None:
    """The direction column of protocol.md, as enforced by ``send``."""
    phase = {FrameType.HELLO: Phase.FRESH, FrameType.WELCOME: Phase.HELLO_SENT}.get(
        ftype, Phase.OPEN
    )
    for role in Role:
        sender, _ = endpoints(role, phase)
        allowed = ftype in EITHER or ftype in (CLIENT_ONLY if role is C else SERVER_ONLY)
        if allowed:
            assert sender.send(SAMPLES[ftype]) == encode_event(SAMPLES[ftype])
        else:
            with pytest.raises(LocalProtocolError) as info:
                sender.send(SAMPLES[ftype])
            assert info.value.code is ErrorCode.UNEXPECTED_FRAME


def test_error_code_table_matches_protocol_md() -> None:
    rows = re.findall(r"^\| (\d{3}) \| ([A-Z_]+) \| (yes|no) \|", doc_text(), re.M)
    assert {name: int(code) for code, name, _ in rows} == {c.name: int(c) for c in ErrorCode}
    for code, name, fatal in rows:
        assert ErrorCode(int(code)).fatal is (fatal == "yes"), name


def test_defaults_match_protocol_md() -> None:
    limits = dict(re.findall(r"^\| `(max_\w+)` \| (\d+)", doc_text(), re.M))
    assert int(limits["max_frame_bytes"]) == DEFAULT_MAX_FRAME_BYTES
    assert int(limits["max_topic_bytes"]) == DEFAULT_MAX_TOPIC_BYTES
    assert int(limits["max_topic_depth"]) == DEFAULT_MAX_TOPIC_DEPTH
    assert MAGIC == b"PYBK" and "ASCII `PYBK`" in doc_text()
    assert PROTOCOL_VERSION == 1
    assert HEADER_SIZE == 6


# --------------------------------------------------------------------------
# 3. The state machine and malformed input


@pytest.mark.parametrize(
    "ftype", [t for t in FrameType if t is not FrameType.HELLO], ids=lambda t: t.name
)
def test_server_requires_hello_first(ftype: FrameType) -> None:
    _, server = pair(Phase.FRESH)
    assert_remote(server, encode_event(SAMPLES[ftype]), ErrorCode.HANDSHAKE_REQUIRED)


def test_server_requires_hello_first_even_for_fatal_error() -> None:
    _, server = pair(Phase.FRESH)
    data = encode_event(Error(ErrorCode.INTERNAL_ERROR, "x", fatal=True))
    assert_remote(server, data, ErrorCode.HANDSHAKE_REQUIRED)


@pytest.mark.parametrize("phase", [Phase.HELLO_SENT, Phase.OPEN])
def test_second_hello(phase: Phase) -> None:
    _, server = pair(phase)
    assert_remote(server, encode_event(HELLO), ErrorCode.UNEXPECTED_FRAME)


def test_second_hello_in_the_same_read() -> None:
    _, server = pair(Phase.FRESH)
    server.receive_data(encode_event(HELLO) * 2)
    assert server.next_event() == HELLO
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME


@pytest.mark.parametrize("phase", [Phase.FRESH, Phase.HELLO_SENT, Phase.OPEN])
def test_welcome_at_the_wrong_time(phase: Phase) -> None:
    client, _ = pair(phase)
    if phase is Phase.HELLO_SENT:
        client.receive_data(encode_event(WELCOME))
        assert client.next_event() == WELCOME
    assert_remote(client, encode_event(WELCOME), ErrorCode.UNEXPECTED_FRAME)


@pytest.mark.parametrize(
    "ftype",
    [t for t in FrameType if t not in (FrameType.WELCOME, FrameType.ERROR)],
    ids=lambda t: t.name,
)
def test_client_awaiting_welcome_accepts_only_welcome_or_error(ftype: FrameType) -> None:
    client, _ = pair(Phase.HELLO_SENT)
    assert_remote(client, encode_event(SAMPLES[ftype]), ErrorCode.UNEXPECTED_FRAME)


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_client_sends_only_hello_before_welcome(ftype: FrameType) -> None:
    fresh, _ = pair(Phase.FRESH)
    waiting, _ = pair(Phase.HELLO_SENT)
    if ftype is FrameType.HELLO:
        fresh.send(HELLO)
    else:
        with pytest.raises(LocalProtocolError) as info:
            fresh.send(SAMPLES[ftype])
        assert info.value.code is ErrorCode.UNEXPECTED_FRAME
    with pytest.raises(LocalProtocolError) as info:
        waiting.send(SAMPLES[ftype])
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_server_sends_only_error_before_hello_and_welcome_or_error_after(
    ftype: FrameType,
) -> None:
    _, fresh = pair(Phase.FRESH)
    _, waiting = pair(Phase.HELLO_SENT)
    if ftype is FrameType.ERROR:
        fresh.send(SAMPLES[ftype])
    else:
        with pytest.raises(LocalProtocolError):
            fresh.send(SAMPLES[ftype])
    if ftype in (FrameType.WELCOME, FrameType.ERROR):
        waiting.send(SAMPLES[ftype])
    else:
        with pytest.raises(LocalProtocolError):
            waiting.send(SAMPLES[ftype])


@pytest.mark.parametrize("ftype", CLIENT_ONLY, ids=lambda t: t.name)
def test_client_only_frame_from_the_server(ftype: FrameType) -> None:
    client, server = pair(Phase.OPEN)
    with pytest.raises(LocalProtocolError) as info:
        server.send(SAMPLES[ftype])
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME
    # A refused send leaves the connection usable.
    assert server.send(Ping(1)) == encode_event(Ping(1))
    assert not server.we_finished
    client.receive_data(encode_event(Ping(1)))
    assert client.next_event() == Ping(1)
    assert_remote(client, encode_event(SAMPLES[ftype]), ErrorCode.UNEXPECTED_FRAME)


@pytest.mark.parametrize("ftype", SERVER_ONLY, ids=lambda t: t.name)
def test_server_only_frame_from_the_client(ftype: FrameType) -> None:
    client, server = pair(Phase.OPEN)
    with pytest.raises(LocalProtocolError) as info:
        client.send(SAMPLES[ftype])
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME
    assert client.send(Ping(1)) == encode_event(Ping(1))
    assert not client.we_finished
    assert_remote(server, encode_event(SAMPLES[ftype]), ErrorCode.UNEXPECTED_FRAME)


FINISHERS = [
    pytest.param(Goodbye(), id="goodbye"),
    pytest.param(Error(ErrorCode.MALFORMED_FRAME, "bad", fatal=True), id="fatal-error"),
]


@pytest.mark.parametrize("finisher", FINISHERS)
@pytest.mark.parametrize("sender_role", [C, S], ids=["client", "server"])
@pytest.mark.parametrize("then", list(FrameType), ids=lambda t: t.name)
def test_frames_after_the_peer_finished(
    finisher: Event, sender_role: Role, then: FrameType
) -> None:
    sender, conn = endpoints(sender_role, Phase.OPEN)
    data = sender.send(finisher)
    assert sender.we_finished
    with pytest.raises(LocalProtocolError) as local:
        sender.send(SAMPLES[then])
    assert local.value.code is ErrorCode.UNEXPECTED_FRAME
    conn.receive_data(data + encode_event(SAMPLES[then]))
    assert conn.next_event() == finisher
    assert conn.they_finished
    with pytest.raises(RemoteProtocolError) as remote:
        conn.next_event()
    assert remote.value.code is ErrorCode.UNEXPECTED_FRAME


@pytest.mark.parametrize("finisher", FINISHERS)
def test_the_other_side_may_still_send_after_a_finish(finisher: Event) -> None:
    """A client's GOODBYE does not stop the server sending what it owes."""
    client, server = pair(Phase.OPEN)
    server.receive_data(client.send(finisher))
    assert server.next_event() == finisher
    data = server.send(SAMPLES[FrameType.PUBACK]) + server.send(Goodbye())
    client.receive_data(data)
    assert client.events() == [SAMPLES[FrameType.PUBACK], Goodbye()]
    client.receive_data(b"")
    assert client.next_event() is CLOSED


def test_non_fatal_error_does_not_finish() -> None:
    client, server = pair(Phase.OPEN)
    err = Error(ErrorCode.BAD_TOPIC, "bad topic", ref=3)
    client.receive_data(server.send(err) + server.send(SubAck(1)))
    assert client.events() == [err, SubAck(1)]
    assert not server.we_finished and not client.they_finished


def test_server_sends_nothing_after_refusing() -> None:
    client, server = pair(Phase.FRESH)
    client.receive_data(server.send(Error(ErrorCode.SHUTTING_DOWN, "bye", fatal=True)))
    assert isinstance(client.next_event(), Error)
    assert client.they_finished
    with pytest.raises(LocalProtocolError):
        server.send(WELCOME)


@pytest.mark.parametrize("magic", [b"PYBX", b"pybk", b"\x00\x00\x00\x00", b"KBYP"])
def test_hello_wrong_magic(magic: bytes) -> None:
    _, server = pair(Phase.FRESH)
    assert_remote(
        server, raw_frame(FrameType.HELLO, hello_body(magic=magic, name=b"n")), ErrorCode.MALFORMED_FRAME
    )


def test_hello_raw_body_is_accepted() -> None:
    _, server = pair(Phase.FRESH)
    server.receive_data(raw_frame(FrameType.HELLO, hello_body(name=b"n")))
    assert server.next_event() == Hello("n")


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_hello_unsupported_version(version: int) -> None:
    _, server = pair(Phase.FRESH)
    exc = assert_remote(
        server, encode_event(Hello("c", version=version)), ErrorCode.UNSUPPORTED_VERSION
    )
    assert exc.code.fatal
    # The server may still refuse with a fatal ERROR.
    server.send(Error(ErrorCode.UNSUPPORTED_VERSION, str(exc), fatal=True))


@pytest.mark.parametrize("type_value", [0x00, 0x03, 0x0F, 0x12, 0x26, 0x32, 0x42, 0x51, 0x61, 0x76, 0xFF])
@pytest.mark.parametrize("role", [C, S], ids=["client", "server"])
@pytest.mark.parametrize("phase", [Phase.FRESH, Phase.OPEN])
def test_unknown_frame_type(type_value: int, role: Role, phase: Phase) -> None:
    client, server = pair(phase)
    conn = client if role is C else server
    assert_remote(conn, raw_frame(type_value, b"\x00" * 8), ErrorCode.UNKNOWN_FRAME_TYPE)


@pytest.mark.parametrize("role", [C, S], ids=["client", "server"])
@pytest.mark.parametrize("phase", [Phase.FRESH, Phase.OPEN])
@pytest.mark.parametrize("size", [DEFAULT_MAX_FRAME_BYTES + 1, 2**31, 2**32 - 1])
def test_frame_too_large_as_soon_as_the_header_arrives(role: Role, phase: Phase, size: int) -> None:
    client, server = pair(phase)
    conn = client if role is C else server
    ftype = {
        (C, Phase.FRESH): FrameType.ERROR,
        (S, Phase.FRESH): FrameType.HELLO,
        (C, Phase.OPEN): FrameType.DELIVER,
        (S, Phase.OPEN): FrameType.PUBLISH,
    }[role, phase]
    header = struct.pack(">IBB", size, ftype, 0)
    for byte in header[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    # The last header byte, and not one byte of the body.
    assert_remote(conn, header[-1:], ErrorCode.FRAME_TOO_LARGE)


def test_frame_size_limit_is_inclusive() -> None:
    limit = 64
    _, server = pair(Phase.OPEN, max_frame_bytes=limit)
    batch = encode_batch([b"x" * (limit - 8 - 2 - 1 - 8 - 6)])
    data = encode_event(Publish(1, "t", batch))
    assert len(data) - HEADER_SIZE == limit
    server.receive_data(data[:HEADER_SIZE])
    assert server.next_event() is NEED_DATA
    server.receive_data(data[HEADER_SIZE:])
    assert server.next_event() == Publish(1, "t", batch)
    _, server = pair(Phase.OPEN, max_frame_bytes=limit)
    big = encode_event(Publish(1, "t", batch + b"!"))
    assert_remote(server, big[:HEADER_SIZE], ErrorCode.FRAME_TOO_LARGE)


def test_max_frame_bytes_is_read_at_every_frame() -> None:
    """A client adopts the server's announced limit after WELCOME."""
    event = SAMPLES[FrameType.DELIVER]
    data = encode_event(event)
    client, _ = pair(Phase.OPEN)
    client.max_frame_bytes = len(data) - HEADER_SIZE - 1
    assert_remote(client, data, ErrorCode.FRAME_TOO_LARGE)
    client, _ = pair(Phase.OPEN, max_frame_bytes=16)
    client.max_frame_bytes = len(data) - HEADER_SIZE
    client.receive_data(data)
    assert client.next_event() == event


RESERVED_FLAGS = [
    pytest.param(FrameType.PING, u64(1), 0x01, id="ping-0x01"),
    pytest.param(FrameType.PING, u64(1), 0x80, id="ping-0x80"),
    pytest.param(FrameType.PONG, u64(1), 0xFF, id="pong-0xff"),
    pytest.param(FrameType.SUBACK, u32(1), 0x01, id="suback-0x01"),
    pytest.param(FrameType.GOODBYE, b"", 0x01, id="goodbye-0x01"),
    pytest.param(FrameType.ERROR, error_body(), 0x02, id="error-0x02"),
    pytest.param(FrameType.ERROR, error_body(), 0x03, id="error-0x03"),
    pytest.param(FrameType.ERROR, error_body(), 0x80, id="error-0x80"),
    pytest.param(FrameType.ERROR, error_body() + u16(0), 0x04, id="error-0x04"),
    pytest.param(
        FrameType.PUBLISH, u64(1) + s16(b"t") + encode_batch([b"x"]), 0x08, id="publish-0x08"
    ),
]


@pytest.mark.parametrize(("ftype", "body", "flags"), RESERVED_FLAGS)
def test_reserved_flags(ftype: FrameType, body: bytes, flags: int) -> None:
    sender = sender_for(ftype)
    assert_remote(
        receiver(sender, Phase.OPEN), raw_frame(ftype, body, flags), ErrorCode.MALFORMED_FRAME
    )


def test_reserved_flags_on_hello() -> None:
    _, server = pair(Phase.FRESH)
    assert_remote(server, raw_frame(FrameType.HELLO, hello_body(name=b"n"), 0x01), ErrorCode.MALFORMED_FRAME)


def test_error_flags_fatal_and_fields() -> None:
    client, _ = pair(Phase.OPEN)
    client.receive_data(raw_frame(FrameType.ERROR, error_body(100, b"x"), 0x01))
    assert client.next_event() == Error(100, "x", 0, RefKind.NONE, fatal=True)
    # FIELDS: a str16 map after the message, exactly as protocol.md lays it out.
    block = u16(2) + s16(b"first") + s16(b"4") + s16(b"reason") + s16(b"missing")
    client, _ = pair(Phase.OPEN)
    client.receive_data(raw_frame(FrameType.ERROR, error_body(208, b"y") + block, 0x02))
    assert client.next_event() == Error(208, "y", fields={"first": "4", "reason": "missing"})
    # Without the flag the same bytes are trailing garbage.
    client, _ = pair(Phase.OPEN)
    assert_remote(client, raw_frame(FrameType.ERROR, error_body(208, b"y") + block, 0), ErrorCode.MALFORMED_FRAME)


def phase_for(ftype: FrameType) -> Phase:
    return {FrameType.HELLO: Phase.FRESH, FrameType.WELCOME: Phase.HELLO_SENT}.get(
        ftype, Phase.OPEN
    )


def sender_for(ftype: FrameType) -> Role:
    return C if ftype in CLIENT_ONLY else S


# Publish and Deliver end in "the rest of the body", so extra bytes there are
# part of the batch, not trailing garbage.
FIXED_LENGTH = [
    t
    for t in FrameType
    if t not in (FrameType.PUBLISH, FrameType.DELIVER, FrameType.GROUP_DELIVER)
]


@pytest.mark.parametrize("ftype", FIXED_LENGTH, ids=lambda t: t.name)
@pytest.mark.parametrize("extra", [b"\x00", b"\xff\xff\xff"])
def test_trailing_bytes_in_a_body(ftype: FrameType, extra: bytes) -> None:
    data = encode_event(SAMPLES[ftype])
    conn = receiver(sender_for(ftype), phase_for(ftype))
    assert_remote(conn, reframe(data, body_of(data) + extra), ErrorCode.MALFORMED_FRAME)


@pytest.mark.parametrize("ftype", [FrameType.PUBLISH, FrameType.DELIVER], ids=lambda t: t.name)
def test_extra_bytes_after_a_batch_belong_to_the_batch(ftype: FrameType) -> None:
    event = SAMPLES[ftype]
    data = encode_event(event)
    conn = receiver(sender_for(ftype), Phase.OPEN)
    conn.receive_data(reframe(data, body_of(data) + b"\x00"))
    got = conn.next_event()
    assert isinstance(got, (Publish, Deliver)) and isinstance(event, (Publish, Deliver))
    assert got.batch == event.batch + b"\x00"


@pytest.mark.parametrize(
    "ftype", [t for t in FIXED_LENGTH if t is not FrameType.GOODBYE], ids=lambda t: t.name
)
def test_body_too_short(ftype: FrameType) -> None:
    data = encode_event(SAMPLES[ftype])
    body = body_of(data)
    for cut in range(len(body)):
        conn = receiver(sender_for(ftype), phase_for(ftype))
        assert_remote(conn, reframe(data, body[:cut]), ErrorCode.MALFORMED_FRAME)


@pytest.mark.parametrize(
    ("ftype", "body"),
    [
        pytest.param(FrameType.PUBLISH, b"", id="publish-empty"),
        pytest.param(FrameType.PUBLISH, u64(1)[:7], id="publish-short-id"),
        pytest.param(FrameType.PUBLISH, u64(1) + u16(5) + b"ab", id="publish-topic-overrun"),
        pytest.param(FrameType.DELIVER, u32(1) + u64(0) + u64(0), id="deliver-no-topic"),
        pytest.param(
            FrameType.DELIVER, u32(1) + u64(0) + u64(0) + u16(3) + b"a", id="deliver-topic-overrun"
        ),
        pytest.param(FrameType.DELIVER, u32(1) + u64(0), id="deliver-short"),
    ],
)
def test_batch_frames_too_short(ftype: FrameType, body: bytes) -> None:
    conn = receiver(sender_for(ftype), Phase.OPEN)
    assert_remote(conn, raw_frame(ftype, body), ErrorCode.MALFORMED_FRAME)


def test_map_count_running_past_the_body() -> None:
    _, server = pair(Phase.FRESH)
    body = MAGIC + u16(1) + s16(b"n") + u16(2) + s16(b"k") + s16(b"v")  # says 2, has 1
    assert_remote(server, raw_frame(FrameType.HELLO, body), ErrorCode.MALFORMED_FRAME)


def test_unknown_durability() -> None:
    client, _ = pair(Phase.OPEN)
    body = u64(1) + u64(0) + u32(1) + u64(0) + bytes([3])
    assert_remote(client, raw_frame(FrameType.PUBACK, body), ErrorCode.MALFORMED_FRAME)


def test_unknown_start_kind_is_passed_on() -> None:
    """An unknown start kind is BAD_REQUEST for the server, not a framing error."""
    _, server = pair(Phase.OPEN)
    body = subscribe_body(b"a.*", start=9, start_value=5, credit=0)
    server.receive_data(raw_frame(FrameType.SUBSCRIBE, body))
    event = server.next_event()
    assert isinstance(event, Subscribe)
    assert event.start == 9 and event.start_value == 5 and event.pattern == "a.*"
    # credit 0 is the server's BAD_REQUEST too, not a framing error
    assert event.credit == 0


@pytest.mark.parametrize("ref_kind", [3, 0x80, 0xFF])
@pytest.mark.parametrize("role", [C, S], ids=["from-client", "from-server"])
def test_unknown_ref_kind(ref_kind: int, role: Role) -> None:
    conn = receiver(role, Phase.OPEN)
    assert_remote(
        conn, raw_frame(FrameType.ERROR, error_body(ref_kind=ref_kind)), ErrorCode.MALFORMED_FRAME
    )


@pytest.mark.parametrize("ref_kind", list(RefKind))
def test_known_ref_kinds(ref_kind: RefKind) -> None:
    conn = receiver(S, Phase.OPEN)
    conn.receive_data(raw_frame(FrameType.ERROR, error_body(208, b"gap", int(ref_kind), 3)))
    event = conn.next_event()
    assert event == Error(208, "gap", 3, ref_kind)
    assert isinstance(event, Error) and event.ref_kind is ref_kind


def test_unknown_option_keys_are_passed_on() -> None:
    _, server = pair(Phase.FRESH)
    body = MAGIC + u16(1) + s16(b"") + u16(1) + s16(b"future") + s16(b"1")
    server.receive_data(raw_frame(FrameType.HELLO, body))
    assert server.next_event() == Hello("", options={"future": "1"})


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(raw_frame(FrameType.HELLO, hello_body(name=b"n")), id="hello"),
        pytest.param(encode_event(SAMPLES[FrameType.PUBLISH]), id="publish"),
        pytest.param(encode_event(Goodbye()), id="goodbye"),
    ],
)
def test_truncated_stream(data: bytes) -> None:
    phase = Phase.FRESH if data[4] == FrameType.HELLO else Phase.OPEN
    for cut in range(1, len(data)):
        _, server = pair(phase)
        server.receive_data(data[:cut])
        assert server.next_event() is NEED_DATA
        server.receive_data(b"")
        with pytest.raises(RemoteProtocolError) as info:
            server.next_event()
        assert info.value.code is ErrorCode.MALFORMED_FRAME, cut


def test_truncated_stream_after_complete_frames() -> None:
    client, server = pair(Phase.OPEN)
    data = server.send(Ping(1)) + server.send(Pong(2))
    client.receive_data(data[:-1])
    client.receive_data(b"")
    assert client.next_event() == Ping(1)
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.code is ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("role", [C, S], ids=["client", "server"])
def test_clean_eof(phase: Phase, role: Role) -> None:
    client, server = pair(phase)
    conn = client if role is C else server
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    assert conn.next_event() is CLOSED
    with pytest.raises(RuntimeError):
        conn.receive_data(b"late")


def test_clean_eof_after_frames() -> None:
    client, server = pair(Phase.OPEN)
    server.receive_data(client.send(Ping(1)) + client.send(Goodbye()))
    server.receive_data(b"")
    assert server.next_event() == Ping(1)
    assert server.next_event() == Goodbye()
    assert server.next_event() is CLOSED
    assert server.next_event() is CLOSED


INVALID_UTF8 = [
    pytest.param(b"\xff", id="ff"),
    pytest.param(b"\xc3\x28", id="bad-continuation"),
    pytest.param(b"\xc0\xaf", id="overlong"),
    pytest.param(b"\xed\xa0\x80", id="surrogate"),
    pytest.param(b"\xf4\x90\x80\x80", id="above-10ffff"),
    pytest.param(b"ab\xe2\x82", id="truncated-sequence"),
    pytest.param(b"\x80", id="lone-continuation"),
]


def utf8_frames(bad: bytes) -> list[tuple[str, Role, Phase, bytes]]:
    ok = s16(b"ok")
    b = s16(bad)
    batch = encode_batch([b"x"])
    return [
        ("hello-name", C, Phase.FRESH, raw_frame(FrameType.HELLO, MAGIC + u16(1) + b + u16(0))),
        (
            "hello-option-key",
            C,
            Phase.FRESH,
            raw_frame(FrameType.HELLO, MAGIC + u16(1) + ok + u16(1) + b + ok),
        ),
        (
            "hello-option-value",
            C,
            Phase.FRESH,
            raw_frame(FrameType.HELLO, MAGIC + u16(1) + ok + u16(1) + ok + b),
        ),
        (
            "welcome-version",
            S,
            Phase.HELLO_SENT,
            raw_frame(FrameType.WELCOME, u16(1) + b + ok + u16(0)),
        ),
        (
            "welcome-name",
            S,
            Phase.HELLO_SENT,
            raw_frame(FrameType.WELCOME, u16(1) + ok + b + u16(0)),
        ),
        (
            "welcome-limit-key",
            S,
            Phase.HELLO_SENT,
            raw_frame(FrameType.WELCOME, u16(1) + ok + ok + u16(1) + b + u64(1)),
        ),
        ("publish-topic", C, Phase.OPEN, raw_frame(FrameType.PUBLISH, u64(1) + b + batch)),
        (
            "subscribe-pattern",
            C,
            Phase.OPEN,
            raw_frame(FrameType.SUBSCRIBE, u32(1) + b + u8(0) + u64(0) + u32(1) + u16(0)),
        ),
        (
            "subscribe-option-key",
            C,
            Phase.OPEN,
            raw_frame(FrameType.SUBSCRIBE, u32(1) + ok + u8(0) + u64(0) + u32(1) + u16(1) + b + ok),
        ),
        (
            "subscribe-option-value",
            C,
            Phase.OPEN,
            raw_frame(FrameType.SUBSCRIBE, u32(1) + ok + u8(0) + u64(0) + u32(1) + u16(1) + ok + b),
        ),
        (
            "deliver-topic",
            S,
            Phase.OPEN,
            raw_frame(FrameType.DELIVER, u32(1) + u64(0) + u64(0) + b + batch),
        ),
        (
            "error-message-from-server",
            S,
            Phase.OPEN,
            raw_frame(FrameType.ERROR, u16(100) + u8(0) + u64(0) + b),
        ),
        (
            "error-message-from-client",
            C,
            Phase.OPEN,
            raw_frame(FrameType.ERROR, u16(100) + u8(1) + u64(0) + b, 0x01),
        ),
    ]


@pytest.mark.parametrize("bad", INVALID_UTF8)
def test_invalid_utf8_in_every_string_field(bad: bytes) -> None:
    for name, sender, phase, data in utf8_frames(bad):
        conn = receiver(sender, phase)
        exc = remote_error(conn, data)
        assert exc.code is ErrorCode.MALFORMED_FRAME, name


def test_valid_utf8_in_every_string_field() -> None:
    """The frames above are well formed apart from the bad string."""
    for name, sender, phase, data in utf8_frames("ü€😀".encode()):
        conn = receiver(sender, phase)
        conn.receive_data(data)
        event = conn.next_event()
        assert event is not NEED_DATA and event is not CLOSED, name


# Inputs that break the stream, for the "stays broken" tests.
BREAKERS = [
    pytest.param(Phase.FRESH, encode_event(Ping(1)), id="handshake-required"),
    pytest.param(
        Phase.FRESH, raw_frame(FrameType.HELLO, hello_body(magic=b"XXXX", name=b"n")), id="bad-magic"
    ),
    pytest.param(Phase.FRESH, encode_event(Hello(version=2)), id="bad-version"),
    pytest.param(Phase.OPEN, encode_event(HELLO), id="second-hello"),
    pytest.param(Phase.OPEN, raw_frame(0x99, b""), id="unknown-type"),
    pytest.param(Phase.OPEN, raw_frame(FrameType.PING, b"", size=2**32 - 1), id="too-large"),
    pytest.param(Phase.OPEN, raw_frame(FrameType.PING, u64(1), 0x04), id="reserved-flags"),
    pytest.param(Phase.OPEN, raw_frame(FrameType.PING, u64(1) + b"\x00"), id="trailing-bytes"),
    pytest.param(Phase.OPEN, raw_frame(FrameType.PUBLISH, u64(1) + s16(b"\xff")), id="bad-utf8"),
    pytest.param(Phase.OPEN, encode_event(Goodbye()) + encode_event(Ping(1)), id="after-goodbye"),
]


@pytest.mark.parametrize(("phase", "data"), BREAKERS)
def test_errors_are_sticky(phase: Phase, data: bytes) -> None:
    _, server = pair(phase)
    exc = remote_error(server, data)
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            server.next_event()
        assert again.value is exc
    server.receive_data(b"")  # EOF does not repair it either
    with pytest.raises(RemoteProtocolError) as again:
        server.next_event()
    assert again.value is exc


@pytest.mark.parametrize(("phase", "data"), BREAKERS)
def test_errors_stay_sticky_when_more_data_arrives(phase: Phase, data: bytes) -> None:
    """A session may have more bytes in hand when the error surfaces; handing
    them to the codec must not fail with anything but the same error."""
    client, server = pair(phase)
    exc = remote_error(server, data)
    server.receive_data(encode_event(Ping(2)))
    with pytest.raises(RemoteProtocolError) as again:
        server.next_event()
    assert again.value is exc


def test_error_message_is_bounded() -> None:
    """encode_event cuts ERROR messages to 1000 characters (not in protocol.md)."""
    long = "é" * 5000
    data = encode_event(Error(ErrorCode.INTERNAL_ERROR, long, fatal=True))
    event = decode_body(FrameType.ERROR, data[5], data[HEADER_SIZE:])
    assert isinstance(event, Error)
    assert long.startswith(event.message) and 0 < len(event.message) <= 1000


def test_overlong_strings_are_refused_locally() -> None:
    client, _ = pair(Phase.FRESH)
    with pytest.raises(LocalProtocolError):
        client.send(Hello("x" * 0x10000))
    # the refused HELLO did not move the state on
    assert client.state is State.AWAIT_HELLO
    client.send(Hello("x" * 0xFFFF))


@pytest.mark.parametrize("role", [C, S], ids=["publish", "deliver"])
def test_overlong_topic_is_refused_locally(role: Role) -> None:
    """Like every other str16, a topic over 65535 bytes is a LocalProtocolError."""
    sender, _ = endpoints(role, Phase.OPEN)
    topic = "t" * 0x10000
    event: Event = Publish(1, topic, BATCH) if role is C else Deliver(1, topic, 0, 0, BATCH)
    with pytest.raises(LocalProtocolError):
        sender.send(event)


def test_send_failed_stops_sending() -> None:
    client, _ = pair(Phase.OPEN)
    client.send_failed()
    with pytest.raises(LocalProtocolError):
        client.send(Ping(1))


# --------------------------------------------------------------------------
# 4. Properties

finishers = st.one_of(
    st.none(),
    st.just(Goodbye()),
    errors.map(lambda e: attrs.evolve(e, fatal=True)),
)


def chunked(data: bytes, cuts: Sequence[int]) -> Iterator[bytes]:
    """``data`` cut at the given offsets, never yielding an empty chunk."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    start = 0
    for point in points + [len(data)]:
        if point > start:
            yield data[start:point]
            start = point


def receive_stream(conn: Connection, frames: list[bytes], cuts: Sequence[int]) -> list[Event]:
    """Feed the concatenated frames in chunks, checking that each event comes
    out exactly when its last byte has arrived, then EOF."""
    data = b"".join(frames)
    ends = []
    total = 0
    for f in frames:
        total += len(f)
        ends.append(total)
    got: list[Event] = []
    fed = 0
    for chunk in chunked(data, cuts):
        conn.receive_data(chunk)
        fed += len(chunk)
        got.extend(drain(conn))
        assert len(got) == sum(1 for end in ends if end <= fed)
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    return got


@PROPERTY
@given(
    hello=hellos,
    welcome=welcomes,
    c_events=st.lists(client_events, max_size=8),
    c_final=finishers,
    s_events=st.lists(server_events, max_size=8),
    s_final=finishers,
    c_cuts=st.lists(st.integers(0, 2000), max_size=30),
    s_cuts=st.lists(st.integers(0, 2000), max_size=30),
)
def test_conversation_round_trip(
    hello: Hello,
    welcome: Welcome,
    c_events: list[Event],
    c_final: Event | None,
    s_events: list[Event],
    s_final: Event | None,
    c_cuts: list[int],
    s_cuts: list[int],
) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    # The client's stream: HELLO, then (once WELCOME is in) its frames.
    c_sent: list[Event] = [hello, *c_events] + ([c_final] if c_final is not None else [])
    s_sent: list[Event] = [welcome, *s_events] + ([s_final] if s_final is not None else [])
    c_frames = [client.send(hello)]
    server.receive_data(c_frames[0])
    assert server.next_event() == hello
    s_frames = [server.send(welcome)]
    client.receive_data(s_frames[0])
    assert client.next_event() == welcome
    c_frames += [client.send(e) for e in c_sent[1:]]
    s_frames += [server.send(e) for e in s_sent[1:]]
    assert c_frames == [encode_event(e) for e in c_sent]
    assert s_frames == [encode_event(e) for e in s_sent]

    # Replay both streams into fresh connections, in chunks. The server must
    # answer HELLO before the client's other frames are legal.
    fresh_server = Connection(Role.SERVER)
    fresh_server.receive_data(c_frames[0])
    assert fresh_server.next_event() == hello
    fresh_server.send(welcome)
    assert receive_stream(fresh_server, c_frames[1:], c_cuts) == c_sent[1:]
    fresh_client = Connection(Role.CLIENT)
    fresh_client.send(Hello())
    assert receive_stream(fresh_client, s_frames, s_cuts) == s_sent
    assert fresh_client.state is fresh_server.state is State.OPEN
    assert fresh_server.they_finished is (c_final is not None)
    assert fresh_client.they_finished is (s_final is not None)


@PROPERTY
@given(event=st.one_of(client_events, server_events, hellos, welcomes, finishers.filter(bool)))
def test_decode_body_inverts_encode_event(event: Event) -> None:
    data = encode_event(event)
    assert int.from_bytes(data[:4], "big") == len(data) - HEADER_SIZE
    assert decode_body(FrameType(data[4]), data[5], data[HEADER_SIZE:]) == event


# --- fuzzing: arbitrary bytes never raise anything but RemoteProtocolError


@st.composite
def plausible_headers(draw: st.DrawFn) -> bytes:
    size = draw(st.one_of(st.integers(0, 40), U32))
    ftype = draw(st.one_of(st.sampled_from(FrameType), U8))
    flags = draw(st.sampled_from([0, 0, 0, 1, 2, 0x80, 0xFF]))
    return struct.pack(">IBB", size, ftype, flags)


@st.composite
def framed_junk(draw: st.DrawFn) -> bytes:
    """A well-sized frame of a known type around an arbitrary body."""
    ftype = draw(st.sampled_from(FrameType))
    body = draw(st.binary(max_size=40))
    flags = draw(st.sampled_from([0, 0, 0, 1, 2]))
    return raw_frame(ftype, body, flags)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    event = draw(st.one_of(client_events, server_events, hellos, welcomes))
    data = bytearray(encode_event(event))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    return bytes(data)


segments = st.one_of(
    st.binary(min_size=1, max_size=24),
    plausible_headers(),
    framed_junk(),
    mutated_frames(),
    st.one_of(client_events, server_events).map(encode_event),
)
streams = st.lists(segments, max_size=6).map(b"".join)


class Target(enum.Enum):
    FRESH_SERVER = "fresh-server"
    FRESH_CLIENT = "fresh-client"
    AWAITING_WELCOME_CLIENT = "awaiting-welcome-client"
    OPEN_SERVER = "open-server"
    OPEN_CLIENT = "open-client"
    SMALL_LIMIT_SERVER = "small-limit-server"


def make_target(target: Target) -> tuple[Connection, bytes]:
    """A connection, and the frame that lets a stream get past its handshake."""
    if target is Target.FRESH_SERVER:
        return Connection(Role.SERVER), encode_event(Hello("fuzz"))
    if target is Target.FRESH_CLIENT:
        return Connection(Role.CLIENT), encode_event(Error(ErrorCode.SHUTTING_DOWN, "x"))
    if target is Target.AWAITING_WELCOME_CLIENT:
        client, _ = pair(Phase.HELLO_SENT)
        return client, encode_event(WELCOME)
    if target is Target.OPEN_SERVER:
        return pair(Phase.OPEN)[1], b""
    if target is Target.OPEN_CLIENT:
        return pair(Phase.OPEN)[0], b""
    _, server = pair(Phase.OPEN, max_frame_bytes=24)
    return server, b""


def fuzz_feed(conn: Connection, chunks: Sequence[bytes]) -> tuple[list[Event], ErrorCode | None]:
    """Feed chunks then EOF; return the events and the error code, if any."""
    events: list[Event] = []
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    assert chunk, "NEED_DATA after end of stream"
                    break
                if event is CLOSED:
                    assert not chunk, "CLOSED before end of stream"
                    break
                events.append(cast(Event, event))
    except ProtocolError as exc:
        assert isinstance(exc, RemoteProtocolError), exc
        assert isinstance(exc.code, ErrorCode)
        assert exc.code.fatal
        with pytest.raises(RemoteProtocolError) as again:
            conn.next_event()
        assert again.value is exc
        return events, exc.code
    return events, None


@pytest.mark.parametrize("target", list(Target), ids=lambda t: t.value)
@FUZZ
@given(
    stream=st.one_of(st.binary(max_size=200), streams),
    opening=st.booleans(),
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
def test_arbitrary_bytes_decode_or_raise_protocol_errors(
    target: Target, stream: bytes, opening: bool, cuts: list[int]
) -> None:
    conn, prefix = make_target(target)
    data = (prefix if opening else b"") + stream
    whole = fuzz_feed(conn, [data] if data else [])
    conn2, _ = make_target(target)
    in_chunks = fuzz_feed(conn2, list(chunked(data, cuts)))
    # How the bytes were cut makes no difference.
    assert in_chunks == whole


@FUZZ
@given(
    ftype=st.sampled_from(FrameType),
    flags=st.one_of(st.just(0), st.just(1), U8),
    body=st.one_of(
        st.binary(max_size=80), framed_junk().map(body_of), mutated_frames().map(body_of)
    ),
)
def test_decode_body_on_arbitrary_bodies(ftype: FrameType, flags: int, body: bytes) -> None:
    try:
        event = decode_body(ftype, flags, body)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED_FRAME
        return
    data = encode_event(event)
    assert FrameType(data[4]) is ftype
    assert data[5] == flags  # reserved flags were 0, ERROR's is kept
    assert decode_body(ftype, flags, data[HEADER_SIZE:]) == event
    if not isinstance(event, (Hello, Welcome, Subscribe)):  # no maps, so nothing collapses
        assert data[HEADER_SIZE:] == body
