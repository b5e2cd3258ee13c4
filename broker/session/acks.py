"""A connection's answers that keep the order of its requests: PUBACKs and
PUBLISH refusals, and PONGs, after the fsync that earlier PUBLISHes wait for.

protocol.md, "Ordering and guarantees": every PUBLISH is answered (PUBACK,
or ERROR) in the order the PUBLISH frames arrived, and a PONG comes after
the answers to every PUBLISH before its PING. The reader records each
answer owed (``add``, ``refuse``, ``pong``) and, at the end of every socket
read, hands them over in one go (``flush``): queued at once, or, when any
of them (or an earlier one) waits for a commit round, to the acker task,
which awaits the committer and then queues them in order: a PUBACK, or, if
the fsync that was to cover it failed, a refusal (STORAGE_ERROR).
``unacked`` counts the PUBLISH frames read and not yet answered, the
reader's ``max_inflight_publishes`` bound.
"""

from __future__ import annotations

import struct

import trio

from pybroker.protocol import FRAME_HEADER, Durability, FrameType, RefKind

#: A whole PUBACK frame (protocol.md, "PUBACK"): the frame header, then
#: request_id, base_offset, count, timestamp, durability. One pack per
#: answer instead of an event object and two packs: with one message per
#: PUBLISH there is a PUBACK per message. (tests/test_perframe.py checks it
#: against the codec's encode_puback.)
PUBACK_FRAME = struct.Struct(">" + FRAME_HEADER.format.lstrip("<>!=@") + "QQIQB")
_PUBACK_BODY = PUBACK_FRAME.size - FRAME_HEADER.size
_PUBACK = int(FrameType.PUBACK)

from ..core import Broker, Published, Refused
from .outbox import Outbox


class PendingAck:
    """An answer owed that is not a PUBACK: a frame already encoded (a
    refusal, a PONG) that must keep its place. (A PUBACK owed is the
    Published itself, its ``request_id`` set: no object of its own.)"""

    __slots__ = ("request_id", "frame", "publish")

    def __init__(self, request_id: int, frame: bytes, *, publish: bool = True) -> None:
        self.request_id = request_id
        self.frame = frame
        #: It answers a PUBLISH (counted in ``unacked``); a PONG does not.
        self.publish = publish


class Acks:
    def __init__(self, broker: Broker, outbox: Outbox) -> None:
        self.broker = broker
        self.outbox = outbox
        #: PUBLISH frames read and not yet answered.
        self.unacked = 0
        # This read's, and those waiting for a commit round.
        self._read: list[Published | PendingAck] = []
        self._for_sync: list[Published | PendingAck] = []
        # The highest hold sequence among this read's PUBACKs, and among
        # those waiting for a commit round (0: none waits).
        self._read_seq = 0
        self._sync_seq = 0
        # The acker holds answers while it waits for their commit round:
        # later ones must wait behind them, even those that need no sync.
        self._syncing = False
        # The acker task and its events exist once an answer first waits for
        # a commit round (``_start``): a connection that never publishes to
        # an fsync-always topic (a subscriber) has neither.
        self.nursery: trio.Nursery | None = None
        self._wake: trio.Event | None = None
        self._closing = False
        self._done: trio.Event | None = None

    def add(self, request_id: int, published: Published) -> None:
        published.request_id = request_id
        self._read.append(published)
        self.unacked += 1
        held = published.held
        if held is not None and held.seq > self._read_seq:
            self._read_seq = held.seq

    def add_run(self, frames: list[tuple[int, str, bytes, int]], results: list[Published | Refused]) -> int:
        """The answers owed for a run of PUBLISH frames and the core's
        outcome for each (Broker.publish_run), in order: a PUBACK for each
        Published with a request id, an ERROR for each refusal. Returns the
        messages published."""
        read = self._read
        seq = self._read_seq
        owed = 0
        messages = 0
        for frame, result in zip(frames, results):
            if type(result) is Published:
                messages += result.count
                if not result.request_id:
                    continue  # published without asking for an answer
                read.append(result)
                held = result.held
                if held is not None and held.seq > seq:
                    seq = held.seq
            else:
                assert isinstance(result, Refused)
                request_id = frame[0]
                read.append(
                    PendingAck(
                        request_id,
                        self.outbox.refusal(
                            result.code, result.message, request_id, RefKind.REQUEST, result.fields
                        ),
                    )
                )
            owed += 1
        self.unacked += owed
        self._read_seq = seq
        return messages

    def refuse(self, request_id: int, frame: bytes) -> None:
        """A refused PUBLISH's ERROR, in its place among the PUBACKs."""
        self._read.append(PendingAck(request_id, frame))
        self.unacked += 1

    def pong(self, frame: bytes) -> None:
        """A PONG, after the answers to every PUBLISH before its PING."""
        self._read.append(PendingAck(0, frame, publish=False))

    def flush(self) -> None:
        """Queue this read's PUBACKs, or hand them to the acker when any of
        them, or an earlier one, waits for a sync."""
        if not self._read:
            return
        acks, self._read = self._read, []
        seq, self._read_seq = self._read_seq, 0
        if self._syncing or self._for_sync or seq:
            self._for_sync.extend(acks)
            if seq > self._sync_seq:
                self._sync_seq = seq
            if self._wake is None:
                self._start()
            else:
                self._wake.set()
        else:
            self._answer(acks, None)

    def _answer(self, acks: list[Published | PendingAck], synced: Durability | None) -> None:
        """Queue the answers of ``acks`` in one write: the PUBACKs packed
        with one struct each and joined with the refusals and PONGs."""
        frames = []
        counted: dict[Durability, int] = {}
        answered = 0
        pack = PUBACK_FRAME.pack
        for a in acks:
            if type(a) is not Published:
                assert isinstance(a, PendingAck)
                frames.append(a.frame)
                answered += a.publish
                continue
            answered += 1
            held = a.held
            if held is not None and held.error is not None:
                # Its fsync failed and the log rolled it back: refused,
                # never acknowledged.
                frames.append(
                    self.outbox.refusal(
                        held.error.code, held.error.message, a.request_id, RefKind.REQUEST, held.error.fields(a.topic.name)
                    )
                )
                continue
            durability = synced if held is not None and synced is not None else a.durability
            counted[durability] = counted.get(durability, 0) + 1
            frames.append(pack(_PUBACK_BODY, _PUBACK, 0, a.request_id, a.base, a.count, a.timestamp, durability))
        for durability, n in counted.items():
            self.broker.acknowledged(durability, n)
        self.outbox.queue(b"".join(frames))
        self.unacked -= answered
        self.outbox.notify_room()  # a reader paused on max_inflight_publishes may go on

    def _start(self) -> None:
        assert self.nursery is not None, "Acks.nursery is set before the first read"
        self._wake = trio.Event()
        self._done = trio.Event()
        self.nursery.start_soon(self.run)

    async def run(self) -> None:
        """The acker task, until ``finish``."""
        assert self._wake is not None and self._done is not None
        try:
            while True:
                if self._for_sync:
                    acks, self._for_sync = self._for_sync, []
                    seq, self._sync_seq = self._sync_seq, 0
                    self._syncing = True
                    try:
                        synced = await self.broker.committer.wait_seq(seq)
                    finally:
                        self._syncing = False
                    self._answer(acks, synced)
                    # Not kept while waiting for the next round: each holds
                    # its batch, up to max_frame_bytes per connection.
                    del acks
                    continue
                if self._closing:
                    return
                await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self._done.set()

    async def finish(self) -> None:
        """Answer everything owed, then stop the acker."""
        self.flush()
        self._closing = True
        if self._wake is None or self._done is None:
            return  # never started: everything was answered at once
        self._wake.set()
        await self._done.wait()
