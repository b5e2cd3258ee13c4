"""A Hypothesis state machine driving a client and a server codec back to back.

Two :class:`Connection` objects, wired through two byte pipes (one per
direction), get a random mix of valid and invalid actions: sending valid
events of every frame type from either side (legal now or not), events with
out-of-range values, delivering the pipes in random-sized pieces, frames
injected behind the sender's back that the receiver may not accept in its
state, truncated frames at end of stream, and raw garbage or mutated frames
in the middle of a stream.

A model written from protocol.md ("Handshake", "GOODBYE", the frame table's
directions) predicts every outcome until garbage enters a pipe:

- every valid event sent arrives intact on the other side, in order, exactly
  when its last byte does;
- a send the state table forbids raises LocalProtocolError UNEXPECTED_FRAME,
  an unencodable value LocalProtocolError BAD_REQUEST, and neither changes
  the sender's state;
- a frame the receiver may not accept raises RemoteProtocolError with the
  code the table gives (HANDSHAKE_REQUIRED, UNEXPECTED_FRAME,
  UNSUPPORTED_VERSION, MALFORMED_FRAME at a truncated end);
- both sides' states and finished flags match the model after every step.

Once garbage has entered a pipe the model stops predicting (the garbage may
decode as anything) and only the unconditional invariants are checked: no
exception but LocalProtocolError/RemoteProtocolError escapes, every code is
from the table (and fatal, when receiving), and a broken receiver raises the
same error forever (errors are sticky).

The sample events and value strategies are shared with test_codec.py
(tests/helpers/cases.py, tests/helpers/strategies.py).
"""

from __future__ import annotations

import struct
import zlib
from collections import deque

import attrs
import pytest
from hypothesis import HealthCheck, event as note_event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pybroker.protocol import (
    CLOSED,
    EVENT_TYPES,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    AckKind,
    Connection,
    Credit,
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
    Hello,
    Info,
    InfoReply,
    LocalProtocolError,
    MalformedBatch,
    Ping,
    ProtocolError,
    PubAck,
    RemoteProtocolError,
    Role,
    State,
    SubAck,
    Subscribe,
    TopicInfo,
    Welcome,
    check_batch,
    decode_batch,
    encode_event,
    split_records,
)

from helpers.cases import SAMPLES
from helpers.strategies import (
    U8,
    U16,
    U32,
    U64,
    batches,
    client_events,
    errors,
    hellos,
    server_events,
    str_maps,
    texts,
    welcomes,
)

C, S = Role.CLIENT, Role.SERVER

# --------------------------------------------------------------------------
# protocol.md's rules, written out independently of the codec's tables

#: Frame types each side may send in each handshake state ("Handshake", and
#: the direction column of the frame table).
CLIENT_OPEN = {
    FrameType.PUBLISH, FrameType.SUBSCRIBE, FrameType.UNSUBSCRIBE, FrameType.CREDIT,
    FrameType.ACK, FrameType.INFO, FrameType.GROUPS, FrameType.TOPICS,
    FrameType.PING, FrameType.PONG, FrameType.ERROR, FrameType.GOODBYE,
}  # fmt: skip
SERVER_OPEN = {
    FrameType.PUBACK, FrameType.SUBACK, FrameType.UNSUBACK, FrameType.DELIVER,
    FrameType.GROUP_DELIVER, FrameType.INFO_REPLY, FrameType.GROUPS_REPLY, FrameType.TOPICS_REPLY,
    FrameType.PING, FrameType.PONG, FrameType.ERROR, FrameType.GOODBYE,
}  # fmt: skip
MAY_SEND: dict[tuple[Role, State], set[FrameType]] = {
    (C, State.AWAIT_HELLO): {FrameType.HELLO},
    (C, State.AWAIT_WELCOME): set(),
    (C, State.OPEN): CLIENT_OPEN,
    (S, State.AWAIT_HELLO): {FrameType.ERROR},  # refusing a client that never said HELLO
    (S, State.AWAIT_WELCOME): {FrameType.WELCOME, FrameType.ERROR},
    (S, State.OPEN): SERVER_OPEN,
}


def frame_type(event: Event) -> FrameType:
    return FrameType(encode_event(event)[4])


def finishes(event: Event) -> bool:
    """GOODBYE and a fatal ERROR end what their sender may send."""
    return isinstance(event, Goodbye) or (isinstance(event, Error) and event.fatal)


# --------------------------------------------------------------------------
# Strategies beyond the shared ones (the frame types they lack)

acks = st.builds(
    Ack,
    sub_id=U32,
    kind=st.one_of(st.sampled_from(AckKind), U8),
    topic=texts,
    ranges=st.lists(st.tuples(U64, U64), max_size=3).map(tuple),
    delay_ms=U32,
)
infos = st.builds(Info, U64, texts)
groups = st.builds(Groups, U64, st.one_of(st.sampled_from(GroupsAction), U8), texts)
group_delivers = st.builds(GroupDeliver, U32, texts, U64, U64, U16, batches)
groups_replies = st.builds(GroupsReply, U64, texts)
info_replies = st.builds(
    InfoReply,
    U64,
    st.lists(st.builds(TopicInfo, texts, U64, U64, U64, U32), max_size=3).map(tuple),
    st.booleans(),
)
# HELLO and WELCOME of any version: another version is the receiver's to refuse.
any_version = st.one_of(st.just(PROTOCOL_VERSION), U16)
any_hellos = st.builds(Hello, client_name=texts, version=any_version, options=str_maps)
any_welcomes = st.one_of(welcomes, welcomes.map(lambda w: attrs.evolve(w, version=2)))
finishers = st.one_of(st.just(Goodbye()), errors.map(lambda e: attrs.evolve(e, fatal=True)))

CLIENT_SIDE_EVENTS = st.one_of(any_hellos, client_events, acks, infos, groups)
SERVER_SIDE_EVENTS = st.one_of(
    any_welcomes, server_events, group_delivers, groups_replies, info_replies
)
ANY_EVENT = st.one_of(
    CLIENT_SIDE_EVENTS, SERVER_SIDE_EVENTS, finishers, st.sampled_from(list(SAMPLES.values()))
)

TOO_LONG = "x" * 65536
# Values the wire cannot carry: each must be refused by send() with
# BAD_REQUEST (when its frame type may be sent now) and change nothing.
OUT_OF_RANGE: list[Event] = [
    Ping(2**64),
    Ping(-1),
    SubAck(2**32),
    Credit(1, -1),
    Credit(2**32, 1),
    Subscribe(1, "a", credit=2**32),
    Subscribe(1, TOO_LONG),
    Subscribe(1, "a", options={"k": TOO_LONG}),
    Error(70_000, "code beyond u16"),
    Error(1, "\ud800 a lone surrogate"),
    PubAck(2**64, 0, 1, 0, Durability.DISK),
    Ack(1, AckKind.ACK, "a", ((0, 0),) * 1025),
    Ack(1, AckKind.ACK, "a", ((-1, 0),)),
    Hello("n", options={TOO_LONG: ""}),
    Welcome("1", "n", {"k": 2**64}),
    Info(1, TOO_LONG),
    Groups(2**64, GroupsAction.LIST),
    InfoReply(1, (TopicInfo("t", 0, 0, 0, 2**32),)),
]


# --------------------------------------------------------------------------
# The model


@attrs.frozen
class Refusal:
    """The receiver must raise RemoteProtocolError with this code here."""

    code: ErrorCode
    #: A HELLO/WELCOME of another version: it still moves the state forward
    #: (and is remembered as the peer's) before it is refused.
    handshake: Hello | Welcome | None = None


@attrs.define
class Side:
    conn: Connection
    role: Role
    state: State = State.AWAIT_HELLO
    we_finished: bool = False
    they_finished: bool = False
    peer_hello: Hello | None = None
    peer_welcome: Welcome | None = None
    #: The RemoteProtocolError its receiving side raised; raised again forever.
    broken: RemoteProtocolError | None = None
    got_eof: bool = False

    def may_send(self, ftype: FrameType) -> bool:
        return not self.we_finished and ftype in MAY_SEND[(self.role, self.state)]

    def may_receive(self, ftype: FrameType) -> bool:
        peer = S if self.role is C else C
        return not self.they_finished and ftype in MAY_SEND[(peer, self.state)]

    def refusal_code(self) -> ErrorCode:
        """The code for a frame type it may not receive now."""
        if self.role is S and self.state is State.AWAIT_HELLO and not self.they_finished:
            return ErrorCode.HANDSHAKE_REQUIRED
        return ErrorCode.UNEXPECTED_FRAME

    def advance(self, event: Event) -> None:
        if isinstance(event, Hello) and self.state is State.AWAIT_HELLO:
            self.state = State.AWAIT_WELCOME
        elif isinstance(event, Welcome) and self.state is State.AWAIT_WELCOME:
            self.state = State.OPEN


@attrs.define
class Pipe:
    """Bytes on their way from ``sender`` to ``receiver``."""

    sender: Side
    receiver: Side
    data: bytearray = attrs.Factory(bytearray)
    #: (stream offset where it completes, what the receiver must produce).
    expected: deque[tuple[int, Event | Refusal]] = attrs.Factory(deque)
    sent: int = 0
    delivered: int = 0
    closed: bool = False

    def push(self, data: bytes, expect: Event | Refusal | None) -> None:
        if self.closed:
            return  # the sender's transport is gone: nothing arrives
        self.data += data
        self.sent += len(data)
        if expect is not None:
            self.expected.append((self.sent, expect))


#: Bound on events drained from one delivery (garbage may hold many frames).
MAX_DRAIN = 10_000


class CodecMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.client = Side(Connection(C), C)
        self.server = Side(Connection(S), S)
        self.pipes = {
            C: Pipe(self.client, self.server),  # client -> server
            S: Pipe(self.server, self.client),
        }
        #: Garbage entered a pipe: outcomes are no longer predicted.
        self.chaos = False
        self.steps = 0
        #: Steps before rules that end a stream (refusals, EOF, garbage) may
        #: run: drawn per run, so some break early and some live long.
        self.calm_steps = 0

    def side(self, role: Role) -> Side:
        return self.client if role is C else self.server

    # -- receiving ----------------------------------------------------------

    def receive(self, pipe: Pipe, n: int | None = None) -> None:
        """Deliver ``n`` bytes (all if None) and check what comes out."""
        receiver = pipe.receiver
        chunk = bytes(pipe.data if n is None else pipe.data[:n])
        del pipe.data[: len(chunk)]
        pipe.delivered += len(chunk)
        if chunk:
            receiver.conn.receive_data(chunk)
        self.drain(pipe)

    def drain(self, pipe: Pipe) -> None:
        receiver = pipe.receiver
        for _ in range(MAX_DRAIN):
            if receiver.broken is not None:
                self.check_sticky(receiver)
                return
            due = bool(pipe.expected) and pipe.expected[0][0] <= pipe.delivered
            try:
                event = receiver.conn.next_event()
            except ProtocolError as exc:
                check_remote(exc)
                assert isinstance(exc, RemoteProtocolError)
                receiver.broken = exc
                if not self.chaos:
                    assert due, f"unexpected {exc!r}"
                    _, expect = pipe.expected.popleft()
                    assert isinstance(expect, Refusal), f"{exc!r} instead of {expect!r}"
                    assert exc.code is expect.code, f"{exc!r} instead of {expect!r}"
                    note_event(f"predicted refusal {exc.code.name}")
                    if expect.handshake is not None:
                        self.model_receive(receiver, expect.handshake)
                return
            if event is NEED_DATA:
                assert not receiver.got_eof, "NEED_DATA after end of stream"
                if not self.chaos:
                    assert not due, f"{pipe.expected[0][1]!r} did not arrive"
                return
            if event is CLOSED:
                assert receiver.got_eof, "CLOSED before end of stream"
                if not self.chaos:
                    assert not pipe.expected, f"{pipe.expected[0][1]!r} did not arrive"
                return
            assert not isinstance(event, type(NEED_DATA))
            if self.chaos:
                continue
            assert due, f"{event!r} arrived before its last byte"
            _, expect = pipe.expected.popleft()
            assert event == expect, f"{event!r} arrived instead of {expect!r}"
            assert type(event) is type(expect)
            note_event(f"predicted arrival in {receiver.state.name}")
            self.model_receive(receiver, event)
        raise AssertionError(f"more than {MAX_DRAIN} events from one delivery")

    def model_receive(self, receiver: Side, event: Event) -> None:
        if isinstance(event, Hello) and receiver.state is State.AWAIT_HELLO:
            receiver.peer_hello = event
        if isinstance(event, Welcome) and receiver.state is State.AWAIT_WELCOME:
            receiver.peer_welcome = event
        receiver.advance(event)
        if finishes(event):
            receiver.they_finished = True

    def check_sticky(self, side: Side) -> None:
        assert side.broken is not None
        with pytest.raises(RemoteProtocolError) as again:
            side.conn.next_event()
        assert again.value is side.broken, "a broken stream must repeat its first error"

    # -- sending ------------------------------------------------------------

    def send(self, role: Role, event: Event) -> None:
        sender = self.side(role)
        pipe = self.pipes[role]
        ftype = frame_type(event)
        legal = sender.may_send(ftype)
        state_before = (sender.conn.state, sender.conn.we_finished)
        try:
            data = sender.conn.send(event)
        except ProtocolError as exc:
            assert isinstance(exc, LocalProtocolError), repr(exc)
            assert isinstance(exc.code, ErrorCode)
            assert (sender.conn.state, sender.conn.we_finished) == state_before, "a refused send changed state"
            if not self.chaos:
                assert not legal, f"{event!r} refused in {sender.state}: {exc!r}"
                assert exc.code is ErrorCode.UNEXPECTED_FRAME, repr(exc)
                note_event("predicted refused send")
            return
        assert data == encode_event(event)
        if self.chaos:
            pipe.push(data, None)
            return
        assert legal, f"{sender.role.value} sent {ftype.name} in {sender.state}"
        sender.advance(event)
        if finishes(event):
            sender.we_finished = True
        expect: Event | Refusal = event
        if isinstance(event, (Hello, Welcome)) and event.version != PROTOCOL_VERSION:
            expect = Refusal(ErrorCode.UNSUPPORTED_VERSION, handshake=event)
        pipe.push(data, expect)

    # -- rules ----------------------------------------------------------------

    @initialize(
        opening=st.sampled_from(["none", "hello", "handshake", "handshake", "handshake"]),
        hello=hellos,
        welcome=welcomes,
        calm_steps=st.integers(0, 30),
    )
    def open_connection(self, opening: str, hello: Hello, welcome: Welcome, calm_steps: int) -> None:
        """Most runs start past the handshake, where most frame types live."""
        self.calm_steps = calm_steps
        if opening != "none":
            self.send(C, hello)
            self.receive(self.pipes[C])
        if opening == "handshake":
            self.send(S, welcome)
            self.receive(self.pipes[S])
            assert self.client.conn.state is self.server.conn.state is State.OPEN

    @rule(role=st.sampled_from([C, S]), event=ANY_EVENT)
    def send_event(self, role: Role, event: Event) -> None:
        """A valid event, whether or not the sender may send it now."""
        self.send(role, event)

    @rule(role=st.sampled_from([C, S]), data=st.data())
    def send_the_handshake_frame(self, role: Role, data: st.DataObject) -> None:
        """HELLO or WELCOME (rare among all events, and needed to get OPEN)."""
        event: Hello | Welcome = data.draw(any_hellos) if role is C else data.draw(any_welcomes)
        self.send(role, event)

    # By index: the events hold 64 KiB strings, too long for failure reports.
    @rule(role=st.sampled_from([C, S]), which=st.integers(0, len(OUT_OF_RANGE) - 1))
    def send_out_of_range(self, role: Role, which: int) -> None:
        event = OUT_OF_RANGE[which]
        sender = self.side(role)
        before = (sender.conn.state, sender.conn.we_finished, sender.conn.they_finished)
        with pytest.raises(LocalProtocolError) as info:
            sender.conn.send(event)
        assert (sender.conn.state, sender.conn.we_finished, sender.conn.they_finished) == before
        if not self.chaos:
            expected = (
                ErrorCode.BAD_REQUEST if sender.may_send(frame_type_of_invalid(event)) else ErrorCode.UNEXPECTED_FRAME
            )
            assert info.value.code is expected, repr(info.value)

    @rule(role=st.sampled_from([C, S]), n=st.one_of(st.none(), st.integers(1, 64)))
    def deliver(self, role: Role, n: int | None) -> None:
        pipe = self.pipes[role]
        if pipe.receiver.got_eof:
            return
        self.receive(pipe, n)

    @precondition(lambda self: not self.chaos and self.steps >= self.calm_steps)
    @rule(role=st.sampled_from([C, S]), data=st.data())
    def inject_frame_not_allowed_now(self, role: Role, data: st.DataObject) -> None:
        """A well-formed frame the receiver may not accept in its state,
        written behind the sender's codec (a buggy or hostile peer)."""
        pipe = self.pipes[role]
        receiver = pipe.receiver
        if pipe.closed or receiver.broken is not None:
            return
        self.receive(pipe)  # flush: the receiver's state is the model's now
        if receiver.broken is not None:
            return
        refused = [e for t, e in SAMPLES.items() if not receiver.may_receive(t)]
        event = data.draw(st.sampled_from(refused))
        pipe.push(encode_event(event), Refusal(receiver.refusal_code()))
        self.receive(pipe)
        assert receiver.broken is not None

    @precondition(lambda self: not self.chaos and self.steps >= self.calm_steps)
    @rule(role=st.sampled_from([C, S]), data=st.data())
    def truncated_frame_then_eof(self, role: Role, data: st.DataObject) -> None:
        pipe = self.pipes[role]
        receiver = pipe.receiver
        if pipe.closed or receiver.broken is not None:
            return
        self.receive(pipe)
        if receiver.broken is not None:
            return
        frame = encode_event(data.draw(st.sampled_from(list(SAMPLES.values()))))
        cut = data.draw(st.integers(1, len(frame) - 1))
        if cut >= 6 and not receiver.may_receive(FrameType(frame[4])):
            code = receiver.refusal_code()  # the header alone is refused
        else:
            code = ErrorCode.MALFORMED_FRAME  # "a truncated frame at end of stream"
        pipe.push(frame[:cut], None)
        pipe.expected.append((pipe.sent, Refusal(code)))
        self.close(pipe, expect_refusal=True)

    @precondition(lambda self: self.steps >= self.calm_steps)
    @rule(role=st.sampled_from([C, S]))
    def end_of_stream(self, role: Role) -> None:
        pipe = self.pipes[role]
        if pipe.closed:
            return
        self.close(pipe, expect_refusal=False)

    def close(self, pipe: Pipe, expect_refusal: bool) -> None:
        receiver = pipe.receiver
        chunk = bytes(pipe.data)
        pipe.data.clear()
        pipe.delivered += len(chunk)
        pipe.closed = True
        if chunk:
            receiver.conn.receive_data(chunk)
        if expect_refusal and not self.chaos and receiver.broken is None:
            # Refused as soon as the header arrived?
            expect = pipe.expected[-1][1]
            assert isinstance(expect, Refusal)
            if expect.code is not ErrorCode.MALFORMED_FRAME:
                self.drain(pipe)
                assert receiver.broken is not None
        receiver.conn.receive_data(b"")
        receiver.got_eof = True
        self.drain(pipe)
        if receiver.broken is None:
            assert receiver.conn.next_event() is CLOSED  # and again

    @rule(
        role=st.sampled_from([C, S]),
        garbage=st.one_of(
            st.binary(min_size=1, max_size=40),
            ANY_EVENT.map(encode_event).flatmap(
                lambda f: st.tuples(st.integers(0, len(f) - 1), st.integers(1, 255)).map(
                    lambda iv: f[: iv[0]] + bytes([f[iv[0]] ^ iv[1]]) + f[iv[0] + 1 :]
                )
            ),
            ANY_EVENT.map(encode_event).flatmap(
                lambda f: st.integers(1, len(f) - 1).map(lambda cut: f[:cut])
            ),
        ),
    )
    @precondition(lambda self: self.steps >= max(10, self.calm_steps))  # strict checks first
    def inject_garbage(self, role: Role, garbage: bytes) -> None:
        """Random bytes, a frame with one byte changed, or a truncated frame,
        in the middle of a stream: from here on nothing is predicted."""
        pipe = self.pipes[role]
        if pipe.closed:
            return
        self.chaos = True
        pipe.push(garbage, None)

    # -- invariants -----------------------------------------------------------

    @invariant()
    def states_match_the_model(self) -> None:
        self.steps += 1
        for side in (self.client, self.server):
            assert side.conn.state in State
            if side.broken is not None:
                self.check_sticky(side)
            if self.chaos:
                continue
            conn = side.conn
            assert conn.state is side.state, (side.role, conn.state, side.state)
            assert conn.we_finished is side.we_finished, side.role
            assert conn.they_finished is side.they_finished, side.role
            assert conn.peer_hello == side.peer_hello
            assert conn.peer_welcome == side.peer_welcome


def frame_type_of_invalid(event: Event) -> FrameType:
    """The frame type of an event that cannot be encoded."""
    return EVENT_TYPES[type(event)]


def check_remote(exc: ProtocolError) -> None:
    assert isinstance(exc, RemoteProtocolError), f"receiving raised {exc!r}"
    assert isinstance(exc.code, ErrorCode), repr(exc)
    assert exc.code.fatal, f"receiving raised a non-fatal code: {exc!r}"


CodecMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestCodecStateMachine = CodecMachine.TestCase


# --------------------------------------------------------------------------
# Batches a broker stored without parsing (what the broker fuzzer found)


def test_split_records_on_records_that_do_not_tile() -> None:
    """Two records announced, the first one's payload takes all but 3 bytes:
    the envelope check passes, and splitting it once raised struct.error in
    the broker's group dispatch (taking the broker down)."""
    records = struct.pack(">IH", 3, 0) + b"abc" + b"\x00\x00\x00"
    batch = struct.pack(">II", 2, zlib.crc32(records)) + records
    assert check_batch(batch) == (2, True)
    with pytest.raises(MalformedBatch):
        split_records(batch)
    with pytest.raises(MalformedBatch):
        decode_batch(batch)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    count=st.integers(1, 6),
    records=st.one_of(
        st.binary(max_size=60),
        st.lists(
            st.tuples(st.integers(0, 20), st.integers(0, 20), st.binary(max_size=20)),
            max_size=6,
        ).map(lambda rs: b"".join(struct.pack(">IH", p, h) + b for p, h, b in rs)),
    ),
)
def test_records_of_a_crc_valid_batch_split_or_raise_malformed_batch(count: int, records: bytes) -> None:
    batch = struct.pack(">II", count, zlib.crc32(records)) + records
    try:
        check_batch(batch)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED_FRAME
        return
    try:
        pieces = split_records(batch)
    except MalformedBatch:
        pass
    else:
        assert len(pieces) == count
        assert b"".join(pieces) == records[: sum(map(len, pieces))]
    try:
        messages = decode_batch(batch)
    except MalformedBatch:
        return
    assert len(messages) == count
