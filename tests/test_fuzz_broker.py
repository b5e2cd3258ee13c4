"""Fuzzing a running broker over loopback (issue 7, "Fuzzing").

A broker with durable storage in ``tmp_path`` gets thousands of frames over
many raw TCP connections, in rounds: random bytes, valid client frames with
flipped bits, overwritten bytes, wrong lengths and truncations, frames the
client may not send (server frames, a second HELLO, anything before HELLO),
batches whose records were mutated and whose CRC was then fixed up (so the
broker stores them: it does not parse records), and plain valid requests.
A raw consumer-group member settles what it gets at random meanwhile, so
malformed stored batches go through the groups' split, redelivery and
dead-letter paths too.

After every round a well-behaved client (``pybroker.connect``) must still
publish, subscribe and receive; at the end every message it had
acknowledged is replayed from the earliest offset, payload for payload.
The broker must never answer INTERNAL_ERROR, never send a frame that the
client-side codec rejects, never log at error level, and end every fuzz
connection itself (fatal ERROR or GOODBYE, then EOF).

The random seed is fixed and printed; ``PYBROKER_FUZZ_SEED=N`` replays
another run. Counts and times are bounded.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import attrs
import trio

import pybroker
from pybroker.server.config import Limits
from pybroker.server.server import Server
from pybroker.server.testing import running_broker
from pybroker.protocol import (
    Ack,
    AckKind,
    Error,
    ErrorCode,
    Event,
    GroupDeliver,
    Goodbye,
    Hello,
    MalformedBatch,
    PubAck,
    Publish,
    RemoteProtocolError,
    StartKind,
    SubAck,
    Subscribe,
    Welcome,
    decode_batch,
    encode_batch,
    encode_event,
)

from helpers.brokerlog import broker_log
from helpers.frames import HEADER, batch_with_count
from helpers.fuzzing import (
    GROUP,
    SEED,
    Healthy,
    mutate,
    valid_client_event,
    wrong_direction_event,
)
from helpers.raw import raw_client

ROUNDS = 20
CONNECTIONS_PER_ROUND = 25
#: A connection sends this many valid frames, then (mostly) one fault, then
#: a few more frames the broker must not act on once the fault was fatal.
VALID_PREFIX = (0, 16)
SUFFIX = (0, 4)
#: Bound on any single wait for the broker.
TIMEOUT = 15.0
#: Bound on the whole fuzz run.
RUN_TIMEOUT = 240.0
#: A fuzz connection that gets more answers than this is flooding us.
MAX_ANSWERS = 20_000

GROUP_PATTERN = "fuzz.>"


# --------------------------------------------------------------------------
# Fuzz connections (the frame generators: tests/helpers/fuzzing.py)


def fault(rng: random.Random) -> bytes:
    """One frame (or bytes) that breaks the protocol, more often than not."""
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.randint(1, 48))
    if kind < 0.75:
        return mutate(rng, encode_event(valid_client_event(rng)))
    if kind < 0.92:
        return encode_event(wrong_direction_event(rng))
    return encode_event(Goodbye())


@attrs.frozen
class FuzzConnection:
    handshake: bool  # opens with a real HELLO
    data: bytes
    frames: int


def fuzz_connection(rng: random.Random) -> FuzzConnection:
    # A fault ends a connection (every 1xx is fatal), so each connection gets
    # a run of valid frames first: the broker is in some state worth breaking.
    frames = [encode_event(valid_client_event(rng)) for _ in range(rng.randint(*VALID_PREFIX))]
    if rng.random() < 0.9:
        frames.append(fault(rng))
    for _ in range(rng.randint(*SUFFIX)):
        frames.append(fault(rng) if rng.random() < 0.5 else encode_event(valid_client_event(rng)))
    return FuzzConnection(rng.random() < 0.92, b"".join(frames), len(frames))


# --------------------------------------------------------------------------
# Talking to the broker


@attrs.define
class Tally:
    connections: int = 0
    frames: int = 0
    bytes: int = 0
    answers: int = 0
    fatal: dict[str, int] = attrs.Factory(dict)
    goodbyes: int = 0


async def run_fuzz_connection(server: Server, fc: FuzzConnection, tally: Tally) -> None:
    async with raw_client(server, timeout=TIMEOUT, reset_is_eof=True) as peer:
        # The codec believes HELLO went out either way, so a WELCOME (a HELLO
        # may hide in the random bytes) or an ERROR are both legal answers.
        hello = peer.conn.send(Hello("fuzz"))
        data = (hello if fc.handshake else b"") + fc.data
        try:
            await peer.send(data)
            with trio.fail_after(TIMEOUT):
                await peer.stream.send_eof()
        except trio.BrokenResourceError:
            pass  # it closed on us mid-send: a fatal ERROR is waiting
        last: Event | None = None
        for _ in range(MAX_ANSWERS):
            try:
                event = await peer.next_event()
            except RemoteProtocolError as exc:
                raise AssertionError(f"the broker sent an invalid frame: {exc}") from exc
            if event is None:
                break
            tally.answers += 1
            if isinstance(event, Error):
                assert event.code != ErrorCode.INTERNAL_ERROR, event
                assert event.fatal == ErrorCode(event.code).fatal, event
            last = event
        else:
            raise AssertionError(f"more than {MAX_ANSWERS} answers to {fc.frames} frames")
        # Every connection ends by the broker's word, never a bare close.
        if isinstance(last, Error) and last.fatal:
            name = ErrorCode(last.code).name
            tally.fatal[name] = tally.fatal.get(name, 0) + 1
        else:
            assert isinstance(last, Goodbye), f"ended without a fatal ERROR or GOODBYE: {last!r}"
            tally.goodbyes += 1
    tally.connections += 1
    tally.frames += fc.frames
    tally.bytes += len(data)


async def group_member(
    server: Server,
    rng: random.Random,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> int:
    """A raw group member that acks, naks or ignores at random; returns how
    many GROUP_DELIVERs it got. Started once it created the group, so the
    group has its settings (fuzz connections join it too)."""
    got = 0
    async with raw_client(server, timeout=TIMEOUT, reset_is_eof=True) as peer:
        await peer.send(peer.conn.send(Hello("member")))
        assert isinstance(await peer.next_event(), Welcome)
        options = {"group": GROUP, "max_ack_pending": "3", "ack_wait_ms": "30", "max_deliver": "2"}
        await peer.send(peer.conn.send(Subscribe(1, GROUP_PATTERN, StartKind.EARLIEST, options=options)))
        assert await peer.next_event() == SubAck(1)
        assert server.broker.groups.groups[GROUP].config.max_ack_pending == 3
        task_status.started()

        async def read() -> None:
            nonlocal got
            while True:
                # Idle while the group has nothing for it: the run's bound.
                event = await peer.next_event(RUN_TIMEOUT)
                assert event is not None, "the broker closed the member's connection"
                assert not isinstance(event, Error), event
                if isinstance(event, GroupDeliver):
                    got += 1
                    try:
                        count = len(decode_batch(event.batch))
                    except MalformedBatch:
                        # Like the client library: report, settle nothing. The
                        # ack wait expires and the group must redeliver it alone.
                        continue
                    last = event.base_offset + count - 1
                    choice = rng.random()
                    if choice < 0.85:
                        kind = AckKind.ACK
                    elif choice < 0.95:
                        kind = AckKind.NAK
                    else:
                        continue  # let the ack wait expire: redelivery, dead letter
                    await peer.send(
                        peer.conn.send(Ack(1, kind, event.topic, ((event.base_offset, last),)))
                    )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await stop.wait()
            nursery.cancel_scope.cancel()
    return got


async def group_caught_up(server: Server) -> None:
    """Wait (bounded) until the member's group has handed out and settled
    everything stored, so every stored batch went through its paths."""
    group = server.broker.groups.groups[GROUP]
    with trio.move_on_after(RUN_TIMEOUT / 4):
        while any(
            gt.cursor < gt.topic.visible_next or gt.pending for gt in group.topics.values()
        ):
            await trio.sleep(0.05)
        return
    state = {
        gt.topic.name: (gt.cursor, gt.topic.visible_next, dict(list(gt.pending.items())[:5]), list(gt.ready)[:5])
        for gt in group.topics.values()
    }
    members = [(m.sub.sub_id, m.unacked, m.sub.session.accepting) for m in group.members]
    raise AssertionError(f"group stuck: {state}, members {members}, {group.config}")


def broker_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "data_dir": tmp_path / "data",
        "handshake_timeout": 5.0,
        "limits": Limits(max_batch_messages=50, max_subscriptions=6),
    }


# --------------------------------------------------------------------------
# Directed regressions for what the fuzzer found


def malformed_but_crc_ok() -> bytes:
    """Two records announced; the first one's payload takes all but 3 bytes."""
    records = struct.pack(">IH", 3, 0) + b"abc" + b"\x00\x00\x00"
    return batch_with_count(2, records)


async def test_group_survives_batch_whose_records_do_not_tile(tmp_path: Path) -> None:
    """A batch with a valid CRC but records that do not tile it, stored on a
    topic a group follows whose member has room for one message: the group
    cannot split it. That once raised struct.error in the groups' dispatch
    task and took the whole broker down."""
    with broker_log() as logs:
        async with running_broker(**broker_config(tmp_path)) as server:
            async with raw_client(server, timeout=TIMEOUT, reset_is_eof=True) as member:
                await member.send(member.conn.send(Hello("member")))
                assert isinstance(await member.next_event(), Welcome)
                options = {"group": "g", "max_ack_pending": "1", "ack_wait_ms": "30"}
                await member.send(member.conn.send(Subscribe(1, "bad.>", StartKind.EARLIEST, options=options)))
                assert await member.next_event() == SubAck(1)
                async with pybroker.connect(server.url, connect_timeout=TIMEOUT) as c:
                    async with raw_client(server, timeout=TIMEOUT, reset_is_eof=True) as pub:
                        await pub.send(pub.conn.send(Hello("pub")))
                        assert isinstance(await pub.next_event(), Welcome)
                        await pub.send(pub.conn.send(Publish(5, "bad.topic", malformed_but_crc_ok())))
                        ack = await pub.next_event()
                        assert isinstance(ack, PubAck) and ack.count == 2, ack
                    # Then a good message, which the member must get.
                    good = await c.publish("bad.topic", b"good")
                    with trio.fail_after(TIMEOUT):
                        while True:
                            event = await member.next_event()
                            assert isinstance(event, GroupDeliver), event
                            if event.base_offset == good.offset:
                                break
                    await c.ping()
                    stats = await c.groups("inspect", "g")
                    assert stats["termed"] == 2, stats
    assert any(e.get("event") == "malformed batch settled" for e in logs), logs


async def test_dead_letter_of_message_with_malformed_headers(tmp_path: Path) -> None:
    """A message whose record tiles but whose headers do not parse still goes
    to the dead-letter topic (payload kept) instead of crashing dispatch."""
    # One record: headers_len 3 with a headers block that is not (str16, str16).
    records = struct.pack(">IH", 2, 3) + b"\x00\x05x" + b"hi"
    with broker_log():
        async with running_broker(**broker_config(tmp_path)) as server:
            async with pybroker.connect(server.url, connect_timeout=TIMEOUT) as c:
                async with raw_client(server, timeout=TIMEOUT, reset_is_eof=True) as member:
                    await member.send(member.conn.send(Hello("member")))
                    assert isinstance(await member.next_event(), Welcome)
                    options = {"group": "g", "ack_wait_ms": "20", "max_deliver": "1"}
                    await member.send(
                        member.conn.send(Subscribe(1, "dl.>", StartKind.EARLIEST, options=options))
                    )
                    assert await member.next_event() == SubAck(1)
                    await member.send(member.conn.send(Publish(0, "dl.t", batch_with_count(1, records))))
                    event = await member.next_event()
                    assert isinstance(event, GroupDeliver), event
                    # Not acked: after 20 ms it is dead-lettered.
                    with trio.fail_after(TIMEOUT):
                        async with c.subscribe("dlq.g", start="earliest") as sub:
                            msg = await anext(sub)
                assert msg.payload == b"hi"
                assert msg.headers["x-original-topic"] == "dl.t"
                assert msg.headers["x-reason"] == "max_deliver"


async def test_dead_letter_of_message_with_maximal_headers(tmp_path: Path) -> None:
    """A message whose headers block is at the 65535-byte limit: the
    dead-letter headers no longer fit beside it, so they replace it."""
    headers = {"big": "x" * (65535 - 2 - 3 - 2)}
    with broker_log():
        async with running_broker(**broker_config(tmp_path)) as server:
            async with pybroker.connect(server.url, connect_timeout=TIMEOUT) as c:
                async with c.subscribe("big.>", group="g", ack_wait=0.02, max_deliver=1, auto_ack=False) as sub:
                    await c.publish("big.t", b"payload", headers=headers)
                    with trio.fail_after(TIMEOUT):
                        first = await anext(sub)
                    assert first.headers == headers
                    with trio.fail_after(TIMEOUT):
                        async with c.subscribe("dlq.g", start="earliest") as dlq:
                            msg = await anext(dlq)
                assert msg.payload == b"payload"
                assert msg.headers["x-original-topic"] == "big.t"
                assert "big" not in msg.headers


async def test_pubacks_owed_go_out_before_the_fatal_error(tmp_path: Path) -> None:
    """PUBLISHes followed by a broken frame in one read: the PUBACKs (which
    wait for fsync) come first, the fatal ERROR last, then EOF. The broker
    once queued the ERROR at once and the PUBACKs after it, which the
    client's codec rightly rejects as frames after the peer finished."""
    with broker_log():
        async with running_broker(**broker_config(tmp_path)) as server:
            async with raw_client(server, timeout=TIMEOUT, reset_is_eof=True) as peer:
                await peer.send(peer.conn.send(Hello("pub")))
                assert isinstance(await peer.next_event(), Welcome)
                publishes = b"".join(
                    encode_event(Publish(i + 1, "acks.t", encode_batch([b"m%d" % i]))) for i in range(20)
                )
                await peer.send(publishes + HEADER.pack(1, 0x40, 0) + b"\x00")  # a 1-byte PING
                events = []
                while (event := await peer.next_event()) is not None:
                    events.append(event)
            assert [e.request_id for e in events[:-1] if isinstance(e, PubAck)] == list(range(1, 21))
            assert len(events) == 21, events
            last = events[-1]
            assert isinstance(last, Error) and last.fatal and last.code == ErrorCode.MALFORMED_FRAME, last


# --------------------------------------------------------------------------
# The fuzz run


async def test_fuzz_broker_over_loopback(tmp_path: Path) -> None:
    print(f"fuzz seed {SEED} (PYBROKER_FUZZ_SEED={SEED} replays this run)")
    rng = random.Random(SEED)
    tally = Tally()
    with broker_log() as logs:
        async with running_broker(**broker_config(tmp_path)) as server:
            with trio.fail_after(RUN_TIMEOUT):
                async with pybroker.connect(server.url, name="healthy", connect_timeout=TIMEOUT) as c:
                    healthy = Healthy(c)
                    await healthy.check()
                    stop = trio.Event()
                    member_got = 0

                    async def member(task_status: trio.TaskStatus[None]) -> None:
                        nonlocal member_got
                        member_got = await group_member(
                            server, random.Random(SEED + 1), stop, task_status=task_status
                        )

                    async with trio.open_nursery() as background:
                        await background.start(member)
                        for round_no in range(ROUNDS):
                            conns = [fuzz_connection(rng) for _ in range(CONNECTIONS_PER_ROUND)]
                            async with trio.open_nursery() as nursery:
                                for fc in conns:
                                    nursery.start_soon(run_fuzz_connection, server, fc, tally)
                            await healthy.check()
                            assert server.broker.groups.groups[GROUP].members, f"member lost in round {round_no}"
                        await group_caught_up(server)
                        stop.set()
                    await healthy.check()
                await healthy.verify_replay(server)
                with trio.fail_after(TIMEOUT):
                    while server.sessions:
                        await trio.sleep(0.01)
    malformed_settled = sum(1 for e in logs if e.get("event") == "malformed batch settled")
    print(f"fuzz: {tally}, group member got {member_got} batches, {malformed_settled} malformed settled")
    assert tally.connections == ROUNDS * CONNECTIONS_PER_ROUND
    assert tally.frames >= 2000
    assert member_got > 0, "the group path was never exercised"
    assert malformed_settled > 0, "no stored batch ever failed to split in a group"
    # The fuzzer reached both ends of a connection's life, and varied errors.
    assert tally.goodbyes > 0 and len(tally.fatal) >= 3, tally
