"""The load processes of `pybroker bench`: ``python -m pybroker.server.bench.worker SPEC``.

SPEC is one JSON object naming the role and its parameters. Each process
writes its progress to the shared board (``board.py``) and, when it is done,
one JSON line with its verified results on stdout. Every wait is bounded by
the spec's ``deadline`` (a ``time.time()`` value) and by the parent's STOP
command.

Roles:

- ``publish``: one publisher connection, for ``messages`` messages or, when
  that is 0, for ``duration`` seconds (it then posts the total it sent on
  the board, so subscribers know when they have everything). ``fast``
  pre-encodes a batch of ``batch`` messages once and sends it as PUBLISH
  frames over a raw connection, at most ``window`` frames unacknowledged,
  checking every PUBACK (in order, offsets contiguous, counts right,
  durability tallied); ``client`` goes through the client library (``send``
  in a loop, batches formed by the library, ``max_pending`` unacknowledged).
- ``paced``: a publisher at a fixed rate for the latency scenario: every
  tick it publishes the messages due, each carrying ``time.time_ns()`` in
  its first 8 bytes, in one PUBLISH frame or (``per_frame``) in frames of
  that many messages.
- ``subscribe``: one or more subscriber connections in this process.
  ``raw`` counts messages from batch headers with the codec alone (no
  per-message decode); ``decode`` goes through the client library with a
  callback per message. Either checks that offsets arrive in order, each
  once, and names gaps and duplicates. With ``latency`` each message's
  embedded timestamp is compared with ``time.time_ns()`` on arrival.
- ``idle``: opens connections with plain sockets (HELLO, SUBSCRIBE, SUBACK)
  and holds them until told to close.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import sys
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from pybroker import Message, PendingAck, connect, parse_url
from pybroker.protocol import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_HEADER,
    HEADER_SIZE,
    NEED_DATA,
    RECORD_HEADER,
    Connection,
    Deliver,
    Durability,
    Error,
    ErrorCode,
    FrameType,
    Goodbye,
    Groups,
    GroupsAction,
    GroupsReply,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    PubAck,
    Role,
    StartKind,
    SubAck,
    Subscribe,
    Welcome,
    batch_count,
    decode_frame,
    deliver_at,
    encode_batch,
    encode_batch_from_records,
    encode_event,
    encode_publish,
    frame_at,
    server_frame_limit,
)

from . import board as b

Spec = dict[str, Any]
Result = dict[str, Any]

RECEIVE_SIZE = 1 << 20
#: The largest frame a client accepts from a broker with the default limit.
MAX_SERVER_FRAME = server_frame_limit(DEFAULT_MAX_FRAME_BYTES)
MAX_GAPS = 10
#: The publisher's slot on the board; its EXTRA field is the total published.
PUBLISHER_SLOT = 1
_TS = struct.Struct(">q")  # the send time embedded in latency payloads


def describe(exc: BaseException) -> str:
    """One line naming what went wrong, through nurseries' exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


class Tally:
    """Offsets one subscriber connection received: in order, once each?"""

    __slots__ = ("slot", "next", "received", "duplicates", "gaps", "missing", "first_t", "last_t", "error")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.next = 0  # the offset expected next
        self.received = 0
        self.duplicates = 0
        self.gaps: list[tuple[int, int]] = []
        self.missing = 0
        self.first_t = 0.0
        self.last_t = 0.0
        self.error = ""

    def add(self, base: int, count: int) -> None:
        if base > self.next:
            self.missing += base - self.next
            if len(self.gaps) < MAX_GAPS:
                self.gaps.append((self.next, base - 1))
        elif base < self.next:
            self.duplicates += min(count, self.next - base)
        self.received += count
        self.next = max(self.next, base + count)

    def result(self, expected: int) -> Result:
        gaps = list(self.gaps)
        missing = self.missing
        if self.next < expected:
            missing += expected - self.next
            gaps.append((self.next, expected - 1))  # the tail never arrived
        return {
            "slot": self.slot,
            "received": self.received,
            "missing": missing,
            "gaps": gaps[:MAX_GAPS],
            "duplicates": self.duplicates,
            "complete": missing == 0 and self.duplicates == 0 and self.received == expected,
            "first": self.first_t,
            "last": self.last_t,
            "error": self.error,
        }


class Total:
    """How many messages the run publishes: fixed by the spec, or reported on
    the board by a publisher that publishes for a duration, once it stops."""

    UNKNOWN = 1 << 62

    def __init__(self, spec: Spec, board: b.Board) -> None:
        self.fixed: int = spec.get("messages") or 0
        self.board = board
        self.value = self.fixed or self.UNKNOWN

    def refresh(self) -> int:
        if not self.fixed:
            reported = self.board.get(PUBLISHER_SLOT, b.EXTRA)
            if reported:
                self.value = reported
        return self.value

    @property
    def known(self) -> bool:
        return self.value != self.UNKNOWN


async def _watch_stop(board: b.Board, scope: trio.CancelScope) -> None:
    while not board.command(b.STOP):
        await trio.sleep(0.1)
    scope.cancel()


async def _bounded(spec: Spec, board: b.Board, body: Callable[[], Awaitable[None]]) -> bool:
    """Run body until it returns, the deadline passes or the parent says STOP.
    Returns True if body finished."""
    finished = False
    with trio.move_on_at(trio.current_time() + max(0.0, spec["deadline"] - time.time())) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_stop, board, scope)
            await body()
            finished = True
            nursery.cancel_scope.cancel()
    return finished


async def _next_event(stream: trio.SocketStream, conn: Connection, closed: str) -> Any:
    """The next event, reading from the socket while none is buffered;
    ConnectionError(``closed``) if the server closes first."""
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise ConnectionError(closed)
        conn.receive_data(data)


async def _handshake(stream: trio.SocketStream, conn: Connection, name: str, options: dict[str, str] | None = None) -> None:
    await stream.send_all(conn.send(Hello(client_name=name, options=options or {})))
    event = await _next_event(stream, conn, "connection closed during the handshake")
    if not isinstance(event, Welcome):
        raise ConnectionError(f"no WELCOME: {event!r}")


#: Seconds a publisher waits for its topic to get an owner (cluster mode),
#: and between asking again while it has none.
OWNER_WAIT = 60.0
OWNER_PAUSE = 0.1
#: The group a publisher makes, then deletes, to find its topic's owner.
PROBE_GROUP = "bench-owner-probe"


def _url(host: str, port: int) -> str:
    return f"pybroker://[{host}]:{port}" if ":" in host else f"pybroker://{host}:{port}"


async def _publish_address(spec: Spec, topic: str) -> tuple[str, int]:
    """Where PUBLISHes to ``topic`` go: the broker at the spec's URL or, in
    cluster mode, the topic's owner (the relay: its URL). Nothing is
    published to find it (subscribers count every message): a group made
    for the topic is answered NOT_OWNER naming the owner, or naming none
    while the topic has none yet (making the group registers the topic);
    made at the owner (or on a single broker), it is deleted again."""
    host, port = parse_url(spec["url"])
    if spec.get("target") == "relay":
        return host, port
    with trio.fail_after(OWNER_WAIT):
        while True:
            stream = await trio.open_tcp_stream(host, port)
            try:
                conn = Connection(Role.CLIENT, max_frame_bytes=MAX_SERVER_FRAME)
                await _handshake(stream, conn, "bench-owner-probe", {"error_fields": "1"})
                await stream.send_all(conn.send(Groups(1, GroupsAction.CREATE, PROBE_GROUP, topic, StartKind.NEW)))
                event = await _next_event(stream, conn, "the broker closed the connection")
                if isinstance(event, GroupsReply):
                    await stream.send_all(conn.send(Groups(2, GroupsAction.DELETE, PROBE_GROUP)))
                    event = await _next_event(stream, conn, "the broker closed the connection")
                    if not isinstance(event, GroupsReply):
                        raise RuntimeError(f"deleting the group {PROBE_GROUP!r}: {event!r}")
                    await stream.send_all(conn.send(Goodbye()))
                    return host, port
                if not (isinstance(event, Error) and event.code == ErrorCode.NOT_OWNER):
                    raise RuntimeError(f"finding where to publish to {topic!r}: {event!r}")
            finally:
                await trio.aclose_forcefully(stream)
            owner = event.fields.get("owner", "")
            name, _, number = owner.rpartition(":")
            if name and number.isdigit():
                host, port = name.strip("[]"), int(number)
            else:
                await trio.sleep(OWNER_PAUSE)  # no owner yet


# -- publishers --------------------------------------------------------------


async def publish(spec: Spec, board: b.Board) -> Result:
    slot: int = spec["slot"]
    state: Result = {"start": 0.0, "sent_at": 0.0, "acked_at": 0.0, "sent": 0, "acked": 0,
                     "in_order": True, "durability": {}, "error": "", "finished_sending": False}

    async def body() -> None:
        if spec["publisher"] == "client":
            await _publish_client(spec, board, state)
        else:
            await _publish_fast(spec, board, state)

    try:
        finished = await _bounded(spec, board, body)
        if not finished and not state["error"]:
            state["error"] = f"stopped after {state['acked']:,} of {state['sent']:,} acknowledged"
    except Exception as exc:  # reported to the parent, which names it
        state["error"] = describe(exc)
    complete = state["finished_sending"] and state["acked"] == state["sent"] and not state["error"]
    board.set(slot, b.STATE, b.DONE if complete else b.FAILED)
    return state


def _sending(spec: Spec, state: Result) -> Callable[[], int]:
    """How many more messages to send: up to spec messages, or while the
    spec duration lasts (counted from the first send)."""
    messages: int = spec.get("messages") or 0
    duration: float = spec.get("duration") or 0.0

    def remaining() -> int:
        if messages:
            return messages - int(state["sent"])
        return Total.UNKNOWN if time.time() - state["start"] < duration else 0

    return remaining


def _finish_sending(board: b.Board, slot: int, state: Result) -> None:
    state["sent_at"] = time.time()
    state["finished_sending"] = True
    board.set(slot, b.EXTRA, state["sent"])  # subscribers now know the total


#: A PUBLISH up to its topic: frame header, request_id, topic length. The
#: fast publisher packs it per frame in front of the topic and batch it
#: encoded once (tests/test_batchread.py checks it against encode_publish).
PUBLISH_PREFIX = struct.Struct(">" + FRAME_HEADER.format.lstrip("<>!=@") + "QH")
#: A whole PUBACK frame: frame header, request_id, base_offset, count,
#: timestamp, durability (protocol.md, "PUBACK").
PUBACK_FRAME = struct.Struct(">" + FRAME_HEADER.format.lstrip("<>!=@") + "QQIQB")
_PUBACK_BODY = PUBACK_FRAME.size - FRAME_HEADER.size
_PUBACK = int(FrameType.PUBACK)
_PUBLISH = int(FrameType.PUBLISH)
_DURABILITY_NAMES = {int(d): d.name for d in Durability}


def publish_frame_tail(topic: str, batch: bytes) -> tuple[int, int, bytes]:
    """What a PUBLISH of ``batch`` to ``topic`` needs besides its request
    id: (body size, topic length, the bytes after the prefix)."""
    name = topic.encode("utf-8")
    return PUBLISH_PREFIX.size - FRAME_HEADER.size + len(name) + len(batch), len(name), name + batch


async def _publish_fast(spec: Spec, board: b.Board, state: Result) -> None:
    """Frames packed from a template, the frames of a write with one pack;
    PUBACKs checked a read at a time with one unpack
    (frame by frame only where that does not match what was expected): the
    load costs far less per message than the broker it measures, also with
    one message per frame."""
    slot, topic = spec["slot"], spec["topic"]
    per_batch, window = spec["batch"], spec["window"]
    host, port = await _publish_address(spec, topic)
    stream = await trio.open_tcp_stream(host, port)
    conn = Connection(Role.CLIENT, max_frame_bytes=MAX_SERVER_FRAME)
    await _handshake(stream, conn, "bench-pub-fast")
    payload = b"x" * spec["size"]
    tails: dict[int, tuple[int, int, bytes]] = {per_batch: publish_frame_tail(topic, encode_batch([payload] * per_batch))}
    sizes: list[int] = []  # messages in each frame sent; request_id i is sizes[i - 1]
    inflight = 0
    room = trio.Event()
    all_acked = trio.Event()
    durability: dict[str, int] = state["durability"]
    # What the handshake's read left over (PUBACKs cannot be among it).
    leftover = conn.discard_received()
    if leftover:
        raise RuntimeError(f"{leftover} unexpected bytes after WELCOME")

    async def read_acks() -> None:
        nonlocal inflight, room
        next_id, next_base = 1, 0
        unpack = PUBACK_FRAME.unpack_from
        header = FRAME_HEADER.unpack_from
        buf = b""
        while True:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise ConnectionError("the broker closed the connection")
            buf = buf + data if buf else data
            pos, end = 0, len(buf)
            acked = frames = 0
            # The usual read: only PUBACKs, each the next one expected.
            whole = end // PUBACK_FRAME.size
            if whole and (checked := _pubacks_as_expected(buf, whole, next_id, next_base, sizes)) is not None:
                acked, promised = checked
                if next_id == 1:
                    state["first_offset"] = next_base = PUBACK_FRAME.unpack_from(buf, 0)[4]
                next_id += whole
                next_base += acked
                promise = _DURABILITY_NAMES[promised]
                durability[promise] = durability.get(promise, 0) + acked
                frames = whole
                pos = whole * PUBACK_FRAME.size
            while end - pos >= HEADER_SIZE:
                size, ftype, _flags = header(buf, pos)
                if end - pos < HEADER_SIZE + size:
                    break
                if ftype == _PUBACK and size == _PUBACK_BODY:
                    _, _, _, request_id, base, count, _ts, promised = unpack(buf, pos)
                    if not 0 < request_id <= len(sizes):
                        raise RuntimeError(f"PUBACK for request {request_id}, never sent")
                    if next_id == 1:
                        next_base = base
                        state["first_offset"] = base
                    if request_id != next_id or base != next_base or count != sizes[request_id - 1]:
                        state["in_order"] = False
                    next_id = request_id + 1
                    next_base = base + count
                    name = _DURABILITY_NAMES.get(promised)
                    if name is None:
                        raise RuntimeError(f"PUBACK with unknown durability {promised}")
                    durability[name] = durability.get(name, 0) + count
                    acked += count
                    frames += 1
                else:
                    event = decode_frame(buf, pos)
                    if isinstance(event, Error):
                        raise RuntimeError(f"ERROR {event.code} from the broker: {event.message}")
                pos += HEADER_SIZE + size
            buf = buf[pos:]
            if frames:
                state["acked"] += acked
                board.set(slot, b.ACKED, state["acked"])
                inflight -= frames
                room.set()
                if state["finished_sending"] and state["acked"] >= state["sent"]:
                    state["acked_at"] = time.time()
                    all_acked.set()

    remaining = _sending(spec, state)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_acks)
        board.set(slot, b.STATE, b.RUNNING)
        state["start"] = time.time()
        while True:
            left = remaining()
            if left <= 0:
                break
            while inflight >= window:
                room = trio.Event()
                await room.wait()
            # Up to SEND_FRAMES frames of the free window per write (a steady
            # stream, not a window per round trip, which would leave the
            # broker idle during each fsync), the last frame of the run
            # shorter if fewer messages are left.
            k = min(window - inflight, SEND_FRAMES, -(-left // per_batch))
            full = min(k, left // per_batch)
            parts = []
            if full:
                parts.append(_pack_frames(tails[per_batch], len(sizes) + 1, full))
                sizes.extend([per_batch] * full)
            if full < k:
                n = left - full * per_batch
                if n not in tails:
                    tails[n] = publish_frame_tail(topic, encode_batch([payload] * n))
                parts.append(_pack_frames(tails[n], len(sizes) + 1, 1))
                sizes.append(n)
            sent = min(left, k * per_batch)
            state["sent"] += sent
            await stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
            inflight += k
            board.set(slot, b.COUNT, state["sent"])
        _finish_sending(board, slot, state)
        if state["acked"] < state["sent"]:
            await all_acked.wait()
        else:
            state["acked_at"] = time.time()
        nursery.cancel_scope.cancel()
    await stream.send_all(conn.send(Goodbye()))
    await trio.aclose_forcefully(stream)


#: PUBLISH frames per write: the broker reads a stream of small writes, as
#: from a publisher sending as its application produces.
SEND_FRAMES = 8
#: Structs that pack or unpack k PUBLISH (by tail length) or PUBACK frames at once.
_MANY_PUBLISHES: dict[tuple[int, int], struct.Struct] = {}
_MANY_PUBACKS: dict[int, struct.Struct] = {}


def _pack_frames(tail: tuple[int, int, bytes], first_id: int, k: int) -> bytes:
    """``k`` PUBLISH frames of ``tail`` (publish_frame_tail), request ids
    from ``first_id`` on, with one pack."""
    body, topic_len, rest = tail
    many = _MANY_PUBLISHES.get((len(rest), k))
    if many is None:
        one = PUBLISH_PREFIX.format.lstrip("<>!=@") + f"{len(rest)}s"
        many = _MANY_PUBLISHES[(len(rest), k)] = struct.Struct(">" + one * k)
    args = [body, _PUBLISH, 0, 0, topic_len, rest] * k
    args[3::6] = range(first_id, first_id + k)
    return many.pack(*args)


def _pubacks_as_expected(
    buf: bytes, k: int, next_id: int, next_base: int, sizes: list[int]
) -> tuple[int, int] | None:
    """If ``buf`` starts with ``k`` PUBACK frames answering requests
    ``next_id``.. in order, with contiguous offsets from ``next_base`` (any,
    for the first request), the counts sent and one durability: (messages
    acknowledged, that durability). None otherwise (the caller then checks
    frame by frame)."""
    many = _MANY_PUBACKS.get(k)
    if many is None:
        many = _MANY_PUBACKS[k] = struct.Struct(">" + PUBACK_FRAME.format.lstrip("<>!=@") * k)
    fields = many.unpack_from(buf, 0)
    counts = fields[5::8]
    if (
        fields[0::8].count(_PUBACK_BODY) != k
        or fields[1::8].count(_PUBACK) != k
        or next_id - 1 + k > len(sizes)
        or fields[3::8] != tuple(range(next_id, next_id + k))
        or list(counts) != sizes[next_id - 1 : next_id - 1 + k]
    ):
        return None
    promised = fields[7]
    if promised not in _DURABILITY_NAMES or fields[7::8].count(promised) != k:
        return None
    first = fields[4] if next_id == 1 else next_base
    if fields[4::8] != tuple(itertools.accumulate(counts[:-1], initial=first)):
        return None
    return sum(counts), promised


async def _publish_client(spec: Spec, board: b.Board, state: Result) -> None:
    slot, topic = spec["slot"], spec["topic"]
    payload = b"x" * spec["size"]
    pending: deque[PendingAck] = deque()
    durability: dict[str, int] = state["durability"]
    expected: int | None = None

    def settle(force: bool) -> None:
        nonlocal expected
        while pending and (force or pending[0].done()):
            ack = pending.popleft().result()
            if expected is None:
                expected = ack.offset
                state["first_offset"] = expected
            if ack.offset != expected:
                state["in_order"] = False
            expected = ack.offset + 1
            name = ack.durability.name
            durability[name] = durability.get(name, 0) + 1
            state["acked"] += 1

    remaining = _sending(spec, state)
    host, port = await _publish_address(spec, topic)
    async with connect(_url(host, port), name="bench-pub-client", max_pending=spec["max_pending"]) as c:
        board.set(slot, b.STATE, b.RUNNING)
        state["start"] = time.time()
        while (left := remaining()) > 0:
            for _ in range(min(left, 1024)):
                pending.append(await c.send(topic, payload))
            state["sent"] += min(left, 1024)
            settle(False)
            board.set(slot, b.COUNT, state["sent"])
            board.set(slot, b.ACKED, state["acked"])
        _finish_sending(board, slot, state)
        await c.flush()
        state["acked_at"] = time.time()
        settle(True)
        board.set(slot, b.ACKED, state["acked"])


async def paced(spec: Spec, board: b.Board) -> Result:
    """Publish ``rate`` messages a second for ``duration`` seconds, in ticks."""
    slot, topic = spec["slot"], spec["topic"]
    rate, duration, tick = spec["rate"], spec["duration"], spec["tick"]
    pad = b"x" * max(0, spec["size"] - 8)
    state: Result = {"start": 0.0, "end": 0.0, "sent": 0, "acked": 0, "max_behind": 0.0, "error": "",
                     "durability": {}}

    async def body() -> None:
        if spec["publisher"] == "client":
            await _paced_client(spec, board, state, pad)
        else:
            await _paced_fast(spec, board, state, pad)

    try:
        finished = await _bounded(spec, board, body)
        if not finished and not state["error"]:
            state["error"] = f"stopped after {state['sent']} messages"
    except Exception as exc:
        state["error"] = describe(exc)
    ok = not state["error"] and state["acked"] == state["sent"] == int(rate * duration)
    board.set(slot, b.STATE, b.DONE if ok else b.FAILED)
    return state


async def _ticks(spec: Spec, board: b.Board, state: Result, send: Callable[[int], Awaitable[None]]) -> None:
    """Call send(n) every tick with the n messages due by then."""
    rate, duration, tick, slot = spec["rate"], spec["duration"], spec["tick"], spec["slot"]
    total = int(rate * duration)
    board.set(slot, b.STATE, b.RUNNING)
    state["start"] = time.time()
    t0 = trio.current_time()
    sent = 0
    step = 0
    while sent < total:
        step += 1
        await trio.sleep_until(t0 + step * tick)
        now = trio.current_time()
        state["max_behind"] = max(state["max_behind"], now - (t0 + step * tick))
        due = min(total, int((now - t0) * rate)) - sent
        if due > 0:
            await send(due)
            sent += due
            state["sent"] = sent
            board.set(slot, b.COUNT, sent)
    state["end"] = time.time()
    board.set(slot, b.EXTRA, sent)


async def _paced_fast(spec: Spec, board: b.Board, state: Result, pad: bytes) -> None:
    host, port = await _publish_address(spec, spec["topic"])
    stream = await trio.open_tcp_stream(host, port)
    conn = Connection(Role.CLIENT, max_frame_bytes=MAX_SERVER_FRAME)
    await _handshake(stream, conn, "bench-pub-paced")
    head = RECORD_HEADER.pack(8 + len(pad), 0)
    request_id = 0
    durability: dict[str, int] = state["durability"]

    async def read_acks() -> None:
        while True:
            event = await _next_event(stream, conn, "the broker closed the connection")
            if isinstance(event, PubAck):
                state["acked"] += event.count
                durability[event.durability.name] = durability.get(event.durability.name, 0) + event.count
                board.set(spec["slot"], b.ACKED, state["acked"])
            elif isinstance(event, Error):
                raise RuntimeError(f"ERROR {event.code} from the broker: {event.message}")

    # Messages per PUBLISH frame: 0 puts all that are due in one frame; 1 is
    # how most applications publish (a frame per call). The frames of one
    # tick go out in one write.
    per_frame: int = spec.get("per_frame") or 0

    async def send(n: int) -> None:
        nonlocal request_id
        records = [head + _TS.pack(time.time_ns()) + pad for _ in range(n)]
        step = per_frame or n
        frames = []
        for i in range(0, n, step):
            request_id += 1
            frames.append(encode_publish(request_id, spec["topic"], encode_batch_from_records(records[i:i + step])))
        state["frames"] = request_id
        await stream.send_all(b"".join(frames))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_acks)
        await _ticks(spec, board, state, send)
        while state["acked"] < state["sent"]:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await stream.send_all(conn.send(Goodbye()))
    await trio.aclose_forcefully(stream)


async def _paced_client(spec: Spec, board: b.Board, state: Result, pad: bytes) -> None:
    pending: list[PendingAck] = []

    host, port = await _publish_address(spec, spec["topic"])
    async with connect(_url(host, port), name="bench-pub-paced", max_pending=1 << 20) as c:

        async def send(n: int) -> None:
            for _ in range(n):
                pending.append(await c.send(spec["topic"], _TS.pack(time.time_ns()) + pad))

        await _ticks(spec, board, state, send)
        await c.flush()
    durability: dict[str, int] = state["durability"]
    for p in pending:
        name = p.result().durability.name
        durability[name] = durability.get(name, 0) + 1
    state["acked"] = len(pending)


# -- subscribers -------------------------------------------------------------


async def subscribe(spec: Spec, board: b.Board) -> Result:
    slots: list[int] = spec["slots"]
    total = Total(spec, board)
    tallies = [Tally(slot) for slot in slots]
    samples = [array("q") for _ in slots] if spec.get("latency") else None
    #: Connections still running, by slot: how to stop one that has everything.
    stoppers: dict[int, Callable[[], None]] = {}

    async def watch_total() -> None:
        # A connection blocked in a read when the publisher reports its total
        # (duration runs) would wait for bytes that never come: stop it here.
        while True:
            await trio.sleep(0.02)
            value = total.refresh()
            for tally in tallies:
                if tally.next >= value and tally.slot in stoppers:
                    stoppers.pop(tally.slot)()

    async def connection(tally: Tally, sample: array[int] | None) -> None:
        run = _raw_subscriber if spec["mode"] == "raw" else _decode_subscriber
        with trio.CancelScope() as scope:
            stoppers[tally.slot] = scope.cancel
            try:
                await run(spec, board, tally, total, sample)
            except Exception as exc:  # one connection's failure is reported, not fatal to the others
                tally.error = describe(exc)
        stoppers.pop(tally.slot, None)
        complete = total.known and tally.next >= total.value and not tally.error
        board.set(tally.slot, b.STATE, b.DONE if complete else b.FAILED)

    async def body() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(watch_total)
            async with trio.open_nursery() as nursery:
                for i, tally in enumerate(tallies):
                    nursery.start_soon(connection, tally, samples[i] if samples else None)
            outer.cancel_scope.cancel()

    await _bounded(spec, board, body)
    if samples is not None:
        with open(spec["samples"], "wb") as f:
            for s in samples:
                s.tofile(f)
    total.refresh()
    results = []
    for t in tallies:
        if not total.known and not t.error:
            t.error = "the publisher never reported how many messages it published"
        results.append(t.result(total.value if total.known else t.next))
    return {"connections": results, "total": total.value if total.known else None}


async def _raw_subscriber(
    spec: Spec, board: b.Board, tally: Tally, total: Total, samples: array[int] | None
) -> None:
    host, port = parse_url(spec["url"])
    stream = await trio.open_tcp_stream(host, port)
    try:
        conn = Connection(Role.CLIENT, max_frame_bytes=MAX_SERVER_FRAME)
        await _handshake(stream, conn, "bench-sub-raw")
        await stream.send_all(conn.send(Subscribe(1, spec["topic"])))
        while True:
            event = await _next_event(stream, conn, "connection closed before SUBACK")
            if isinstance(event, SubAck):
                break
            elif isinstance(event, Error):
                raise RuntimeError(f"SUBSCRIBE refused: ERROR {event.code}: {event.message}")
        board.set(tally.slot, b.STATE, b.READY)
        if not conn.buffered_bytes:
            await _count_deliveries(spec, board, tally, total, stream, samples)
        else:
            await _decode_deliveries(spec, board, tally, total, stream, conn, samples)
        if not conn.we_finished:
            with trio.move_on_after(2):
                await stream.send_all(encode_event(Goodbye()))
    finally:
        await trio.aclose_forcefully(stream)


async def _stall(spec: Spec, board: b.Board, tally: Tally) -> None:
    """The stalled subscriber of the memory scenario stops reading here."""
    board.set(tally.slot, b.EXTRA, 1)
    while not board.command(b.RESUME):
        await trio.sleep(0.05)
    board.set(tally.slot, b.EXTRA, 0)


async def _count_deliveries(
    spec: Spec, board: b.Board, tally: Tally, total: Total, stream: trio.SocketStream,
    samples: array[int] | None = None,
) -> None:
    """Count messages from DELIVER and batch headers as bytes arrive, without
    buffering or copying the batches: the load side must cost far less than
    the broker, or the benchmark measures its own subscribers.

    With ``samples`` (latency) each DELIVER is held until it is whole and
    its records' embedded timestamps are compared with the time of the read
    that completed it: a frame at a time, with structs, so that a DELIVER
    per message (one message per PUBLISH) does not make the subscribers the
    slow side."""
    stall_after: int = spec.get("stall_after", -1) if tally.slot == spec.get("stall_slot") else -1
    slot = tally.slot
    skip = 0  # bytes of the current frame still to come
    partial = b""  # the start of a frame whose headers are not complete yet
    deliver = int(FrameType.DELIVER)
    while tally.next < total.refresh():
        if 0 <= stall_after <= tally.received:
            await _stall(spec, board, tally)
            stall_after = -1
        data: bytes = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            tally.error = "the server closed the connection"
            return
        if samples is not None:
            now_ns = time.time_ns()
        size_now = len(data)
        if skip >= size_now:
            skip -= size_now
            continue
        pos, skip = skip, 0
        if partial:
            data, pos, partial = partial + data[pos:], 0, b""
            size_now = len(data)
        before = tally.received
        while pos < size_now:
            head = frame_at(data, pos)
            if head is None:
                partial = data[pos:]
                break
            ftype, _flags, end = head
            if ftype == deliver:
                delivered = deliver_at(data, pos)
                if delivered is None:
                    partial = data[pos:]
                    break
                base, count = delivered.base_offset, delivered.messages
                if samples is not None:
                    if end > size_now:
                        partial = data[pos:]
                        break
                    _sample(data, pos, count, now_ns, samples)
                if base == tally.next:
                    tally.next += count
                    tally.received += count
                else:
                    tally.add(base, count)
            else:
                if end > size_now:  # control frames are decoded whole
                    partial = data[pos:]
                    break
                event = decode_frame(data, pos)
                if isinstance(event, Error):
                    tally.error = f"ERROR {event.code}: {event.message}"
                    if event.fatal:
                        return
                elif isinstance(event, Goodbye):
                    tally.error = "the server said GOODBYE"
                    return
                elif isinstance(event, Ping):
                    # A run longer than the broker's idle timeout: stay alive.
                    await stream.send_all(encode_event(Pong(event.nonce)))
            if end > size_now:
                skip = end - size_now
                break
            pos = end
        if tally.received != before:
            now = time.time()
            if not before:
                tally.first_t = now
            tally.last_t = now
            board.set(slot, b.COUNT, tally.received)


#: protocol.md, DELIVER: the frame header, sub_id, base_offset, timestamp,
#: then the topic's length and the topic; the batch follows.
_DELIVER_PREFIX = struct.Struct(">IBBIQQH")


def _sample(data: bytes, pos: int, count: int, now_ns: int, samples: array[int]) -> None:
    """Append (sent, latency) of each record of the whole DELIVER at data[pos]."""
    rec = RECORD_HEADER.size
    at = pos + _DELIVER_PREFIX.size + _DELIVER_PREFIX.unpack_from(data, pos)[-1] + 8  # past the batch header
    for _ in range(count):
        plen, hlen = RECORD_HEADER.unpack_from(data, at)
        ts = _TS.unpack_from(data, at + rec + hlen)[0]
        samples.append(ts)
        samples.append(now_ns - ts)
        at += rec + hlen + plen


async def _decode_deliveries(
    spec: Spec, board: b.Board, tally: Tally, total: Total, stream: trio.SocketStream, conn: Connection,
    samples: array[int] | None,
) -> None:
    """The codec's Connection decodes every frame; with samples (latency)
    each record's embedded timestamp is read too."""
    stall_after: int = spec.get("stall_after", -1) if tally.slot == spec.get("stall_slot") else -1
    slot = tally.slot
    unpack_record, unpack_ts, rec = RECORD_HEADER.unpack_from, _TS.unpack_from, RECORD_HEADER.size
    while tally.next < total.value:
        event = conn.next_event()
        if event is NEED_DATA:
            total.refresh()
            if 0 <= stall_after <= tally.received:
                await _stall(spec, board, tally)
                stall_after = -1
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                tally.error = "the server closed the connection"
                return
            conn.receive_data(data)
        elif isinstance(event, Deliver):
            batch = event.batch
            count = batch_count(batch)
            now = time.time()
            if not tally.received:
                tally.first_t = now
            tally.last_t = now
            if event.base_offset == tally.next:
                tally.next += count
                tally.received += count
            else:
                tally.add(event.base_offset, count)
            board.set(slot, b.COUNT, tally.received)
            if samples is not None:
                now_ns, pos = time.time_ns(), 8
                for _ in range(count):
                    plen, hlen = unpack_record(batch, pos)
                    ts = unpack_ts(batch, pos + rec + hlen)[0]
                    samples.append(ts)
                    samples.append(now_ns - ts)
                    pos += rec + hlen + plen
        elif isinstance(event, Error):
            tally.error = f"ERROR {event.code}: {event.message}"
            if event.fatal:
                return
        elif event is CLOSED or isinstance(event, Goodbye):
            tally.error = "the server closed the connection"
            return
        elif isinstance(event, Ping):
            # A run longer than the broker's idle timeout: stay alive.
            await stream.send_all(conn.send(Pong(event.nonce)))


async def _decode_subscriber(
    spec: Spec, board: b.Board, tally: Tally, total: Total, samples: array[int] | None
) -> None:
    slot = tally.slot
    done = trio.Event()

    def on_message(msg: Message) -> None:
        # A callback per message through the client library: what an
        # application pays for every message.
        offset = msg.offset
        now = time.time()
        if not tally.received:
            tally.first_t = now
        tally.last_t = now
        if offset == tally.next:
            tally.next += 1
            tally.received += 1
        else:
            tally.add(offset, 1)
        if samples is not None:
            now_ns = time.time_ns()
            ts = _TS.unpack_from(msg.payload)[0]
            samples.append(ts)
            samples.append(now_ns - ts)
        if tally.received & 1023 == 0 or tally.next >= total.value:
            board.set(slot, b.COUNT, tally.received)
            if tally.next >= total.refresh():
                done.set()

    async with connect(spec["url"], name="bench-sub-decode") as c:
        await c.subscribe(spec["topic"], on_message, window=spec.get("window", 65536))
        board.set(slot, b.STATE, b.READY)
        await done.wait()


# -- idle connections --------------------------------------------------------


def idle(spec: Spec, board: b.Board) -> Result:
    """Open ``count`` subscriber connections with plain sockets; hold them."""
    host, port = parse_url(spec["url"])
    slot, count, deadline = spec["slot"], spec["count"], spec["deadline"]
    socks: list[socket.socket] = []
    error = ""
    board.set(slot, b.STATE, b.RUNNING)
    opened = 0
    try:
        for _ in range(count):
            if board.command(b.STOP) or time.time() > deadline:
                error = "stopped"
                break
            s = socket.create_connection((host, port), timeout=10)
            socks.append(s)
            conn = Connection(Role.CLIENT, max_frame_bytes=MAX_SERVER_FRAME)
            s.sendall(conn.send(Hello("bench-idle")))
            _wait_for(s, conn, Welcome)
            s.sendall(conn.send(Subscribe(1, spec["pattern"])))
            _wait_for(s, conn, SubAck)
            opened += 1
            board.set(slot, b.COUNT, opened)
    except (OSError, ProtocolError) as exc:  # EMFILE, a refused or timed-out connection
        error = f"{type(exc).__name__} after {opened} connections: {exc}"
    if error:
        print(error, file=sys.stderr, flush=True)  # the parent reads it while we hold the rest open
    board.set(slot, b.STATE, b.FAILED if error else b.READY)
    while not board.command(b.CLOSE) and not board.command(b.STOP) and time.time() < deadline:
        time.sleep(0.1)
    for s in socks:
        s.close()
    return {"opened": opened, "error": error}


def _wait_for(s: socket.socket, conn: Connection, kind: type) -> None:
    while True:
        event = conn.next_event()
        if isinstance(event, kind):
            return
        if event is NEED_DATA:
            data = s.recv(65536)
            conn.receive_data(data)
            if not data:
                raise ConnectionError("closed by the server")
        elif isinstance(event, Error):
            raise ConnectionError(f"ERROR {event.code}: {event.message}")


# -- entry point -------------------------------------------------------------

ASYNC_ROLES: dict[str, Callable[[Spec, b.Board], Awaitable[Result]]] = {
    "publish": publish,
    "paced": paced,
    "subscribe": subscribe,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec: Spec = json.loads(args[0])
    if spec.get("cpus"):
        os.sched_setaffinity(0, set(spec["cpus"]))
    board = b.Board(spec["board"], spec["board_slots"])
    role = spec["role"]
    result = idle(spec, board) if role == "idle" else trio.run(ASYNC_ROLES[role], spec, board)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
