"""Coverage-guided fuzzing of the sans-I/O codec with atheris (libFuzzer).

The invariant, as in h11's fuzz/afl-server.py: whatever bytes arrive, the
codec either turns them into events or rejects them with a
RemoteProtocolError carrying a fatal code from protocol.md's table; nothing
else escapes, and a broken stream repeats its first error. Whatever a frame
body decodes to encodes back to a body that decodes the same. Batch decoding
(what subscribers and the broker's consumer groups do with a stored batch)
may in addition raise MalformedBatch, its documented verdict on records.

An input's first byte picks the target (``data[0] % 10``), the rest is fed
to it:

- 0-5: a connection's receive side, whole and then in three pieces: a fresh
  server, a server past HELLO, a client awaiting WELCOME, an open server, an
  open client, an open server with a 24-byte frame limit;
- 6-7: ``decode_body`` (next byte: frame type, then flags, then the body);
- 8-9: ``check_batch``, ``split_records`` and ``decode_batch``.

Bounded runs, as the test suite does (tests/test_fuzz_atheris.py):

    .venv/bin/python tests/fuzz/fuzz_codec.py -runs=20000 -seed=1

Longer, keeping what it learns in a corpus directory (an empty one is first
seeded with one valid frame of every type for every target):

    mkdir -p fuzz-corpus
    .venv/bin/python tests/fuzz/fuzz_codec.py fuzz-corpus -max_total_time=600

Every option is libFuzzer's (``-help=1`` lists them); a crash is written to
``crash-<sha1>`` (``-artifact_prefix=DIR/`` puts it elsewhere) and replays
with ``.venv/bin/python tests/fuzz/fuzz_codec.py crash-<sha1>``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris

# Instrument only the codec: coverage feedback is about its branches.
with atheris.instrument_imports(include=["pybroker.protocol"]):
    from pybroker.protocol import (
        CLOSED,
        NEED_DATA,
        Connection,
        ErrorCode,
        FrameType,
        Hello,
        MalformedBatch,
        ProtocolError,
        RemoteProtocolError,
        Role,
        Welcome,
        check_batch,
        decode_batch,
        decode_body,
        encode_batch,
        encode_event,
        split_records,
    )

_HELLO = encode_event(Hello("fuzz"))
_WELCOME = encode_event(Welcome("0.1.0", "fuzz", {"max_frame_bytes": 1 << 20}))
_FRAME_TYPES = sorted(FrameType)
#: Bounds one input's work: a stream of empty frames could otherwise run long.
_MAX_EVENTS = 10_000
_LIMIT = 1 << 16  # receive limit: large frames cost time, not coverage


def _fresh_server() -> Connection:
    return Connection(Role.SERVER, max_frame_bytes=_LIMIT)


def _server_after_hello() -> Connection:
    server = _fresh_server()
    server.receive_data(_HELLO)
    server.next_event()
    return server


def _client_awaiting_welcome() -> Connection:
    client = Connection(Role.CLIENT, max_frame_bytes=_LIMIT)
    client.send(Hello("fuzz"))
    return client


def _open_server() -> Connection:
    server = _server_after_hello()
    server.send(Welcome("0.1.0", "fuzz"))
    return server


def _open_client() -> Connection:
    client = _client_awaiting_welcome()
    client.receive_data(_WELCOME)
    client.next_event()
    return client


def _small_limit_server() -> Connection:
    server = _open_server()
    server.max_frame_bytes = 24
    return server


_TARGETS: list[Callable[[], Connection]] = [
    _fresh_server,
    _server_after_hello,
    _client_awaiting_welcome,
    _open_server,
    _open_client,
    _small_limit_server,
]


def _feed(conn: Connection, chunks: list[bytes]) -> None:
    """Feed chunks, then end of stream; check the codec's answers."""
    events = 0
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
                events += 1
                assert events <= _MAX_EVENTS, "too many events from one input"
    except ProtocolError as exc:
        # Receiving only ever blames the peer, with a fatal code of the table.
        assert isinstance(exc, RemoteProtocolError), repr(exc)
        assert isinstance(exc.code, ErrorCode) and exc.code.fatal, repr(exc)
        try:
            conn.next_event()
        except RemoteProtocolError as again:
            assert again is exc, "a broken stream must repeat its first error"
        else:
            raise AssertionError("errors must be sticky") from None


def _body(data: bytes) -> None:
    if len(data) < 2:
        return
    ftype = _FRAME_TYPES[data[0] % len(_FRAME_TYPES)]
    flags, body = data[1], data[2:]
    try:
        event = decode_body(ftype, flags, body)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED_FRAME, repr(exc)
        return
    frame = encode_event(event)
    assert frame[4] == ftype
    assert decode_body(ftype, frame[5], frame[6:]) == event


def _batch(data: bytes) -> None:
    try:
        count, _ = check_batch(data)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED_FRAME, repr(exc)
        return
    assert count >= 1
    try:
        assert len(split_records(data)) == count
    except MalformedBatch:
        pass
    try:
        assert len(decode_batch(data)) == count
    except MalformedBatch:
        pass


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 10, data[1:]
    if mode < len(_TARGETS):
        target = _TARGETS[mode]
        _feed(target(), [rest] if rest else [])
        # The same bytes in three pieces (where each piece is non-empty).
        a, b = len(rest) // 3, 2 * len(rest) // 3
        _feed(target(), [c for c in (rest[:a], rest[a:b], rest[b:]) if c])
    elif mode < 8:
        _body(rest)
    else:
        _batch(rest)


def _seeds() -> list[bytes]:
    """One valid frame of every type for each target, and a few batches."""
    from pybroker.protocol import (
        Ack, AckKind, Credit, Deliver, Durability, Error, Goodbye, GroupDeliver, Groups,
        GroupsAction, GroupsReply, Info, InfoReply, Ping, Pong, PubAck, Publish, StartKind,
        SubAck, Subscribe, TopicInfo, UnsubAck, Unsubscribe,
    )  # fmt: skip

    batch = encode_batch([b"hi", (b"yo", {"k": "v"})])
    events = [
        Hello("seed"), Welcome("0.1.0", "seed", {"max_frame_bytes": 4096}),
        Publish(1, "a.b", batch, True), PubAck(1, 0, 2, 0, Durability.DISK),
        Subscribe(1, "a.*", StartKind.OFFSET, 3, 10, {"group": "g"}), SubAck(1),
        Unsubscribe(1), UnsubAck(1), Credit(1, 5), Ack(1, AckKind.NAK, "a.b", ((0, 1),), 5),
        Deliver(1, "a.b", 0, 0, batch), GroupDeliver(1, "a.b", 0, 0, 2, batch),
        Ping(7), Pong(7), Error(202, "crc", 1, fatal=False), Error(100, "bad", fatal=True),
        Goodbye(), Info(1, ">"), InfoReply(1, (TopicInfo("a.b", 0, 2, 40, 1),), True),
        Groups(1, GroupsAction.INSPECT, "g"), GroupsReply(1, '{"groups": []}'),
    ]  # fmt: skip
    frames = [encode_event(e) for e in events]
    seeds = [bytes([mode]) + f for mode in range(len(_TARGETS)) for f in frames]
    seeds += [bytes([6, f[4], f[5]]) + f[6:] for f in frames]
    seeds += [bytes([8]) + batch, bytes([8]) + encode_batch([b""] * 3)]
    return seeds


def main(argv: list[str]) -> None:
    # libFuzzer's positional arguments are corpus directories (or inputs to
    # replay); seed the empty directories so a run starts from valid frames.
    for arg in argv[1:]:
        path = Path(arg)
        if not arg.startswith("-") and path.is_dir() and not any(path.iterdir()):
            for i, seed in enumerate(_seeds()):
                (path / f"seed-{i:03d}").write_bytes(seed)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
