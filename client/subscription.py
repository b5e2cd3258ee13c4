"""A subscription: an async iterator of messages with credit-based flow control.

The client's reader task decodes each DELIVER into a :class:`Batch` and
appends it here without ever blocking; the amount buffered is bounded by the
credit this subscription grants the broker (``window`` messages, plus at most
one batch), and new credit is granted as the application consumes.

A batch keeps its payloads and headers as decoded, and each Message is made
as it is handed over: a buffered window of Messages would be tens of
thousands of objects for the garbage collector to walk and promote, while
a Message made just in time usually dies young (it was a third of the
callback path's time).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from inspect import isawaitable
from typing import TYPE_CHECKING

import attrs
import anyio
import anyio.lowlevel

from .errors import ConnectionClosed
from .message import Message, Settler
from .protocol import RESUME_OPTION_PREFIX, UNLIMITED_CREDIT, StartKind, Subscribe, resume_fits

if TYPE_CHECKING:
    from .connection import Client

#: A timestamp no batch has: with it, everything below a position is a repeat.
_ANY_TIME = 1 << 64


class Batch:
    """One delivered batch, decoded: its messages' payloads and headers, in
    order from ``base`` (offsets are contiguous within a batch)."""

    __slots__ = ("topic", "base", "timestamp_us", "payloads", "headers", "msg_id", "deliveries", "settler", "sub_id")

    def __init__(
        self,
        topic: str,
        base: int,
        timestamp_us: int,
        payloads: list[bytes],
        headers: list[Mapping[str, str]],
        msg_id: str | None = None,
        deliveries: int = 1,
        settler: Settler | None = None,
        sub_id: int = 0,
    ) -> None:
        self.topic = topic
        self.base = base
        self.timestamp_us = timestamp_us
        self.payloads = payloads
        self.headers = headers
        #: The first message's msg-id (exactly-once publishing), if any.
        self.msg_id = msg_id
        self.deliveries = deliveries
        #: Group deliveries: where acknowledgements go.
        self.settler = settler
        self.sub_id = sub_id

    def __len__(self) -> int:
        return len(self.payloads)

    def drop_first(self, count: int) -> None:
        """Forget the first ``count`` messages (repeats)."""
        del self.payloads[:count], self.headers[:count]
        self.base += count
        self.msg_id = None  # it named the first message

    def message(self, i: int) -> Message:
        if self.settler is None:
            msg = Message(self.topic, self.payloads[i], self.headers[i], self.base + i, self.timestamp_us)
        else:
            msg = Message(
                self.topic, self.payloads[i], self.headers[i], self.base + i, self.timestamp_us,
                self.deliveries, self.settler, self.sub_id,
            )
        if i == 0 and self.msg_id is not None:
            msg.msg_id = self.msg_id
        return msg


#: What a subscription's iteration is on when it is on no batch.
_NO_BATCH = Batch("", 0, 0, [], [])


@attrs.frozen
class SubscriptionStatistics:
    pattern: str
    #: Messages received and not yet handed to the application.
    pending_messages: int
    delivered_messages: int
    #: Batches the broker forwarded that did not decode (a bad publisher's).
    malformed_batches: int
    #: Messages the broker reported lost to retention (ERROR 208).
    lost_messages: int


class Subscription:
    """Iterate with ``async for msg in sub``; stop with ``await sub.unsubscribe()``."""

    def __init__(
        self,
        client: Client,
        sub_id: int,
        pattern: str,
        window: int,
        group: str | None = None,
        start: tuple[StartKind, int] = (StartKind.NEW, 0),
        options: dict[str, str] | None = None,
    ) -> None:
        self._client = client
        self.sub_id = sub_id
        self.pattern = pattern
        self.window = window
        #: The consumer group this subscription is a member of, if any.
        self.group = group
        self._start = start
        self._options = dict(options or {})
        #: Plain subscriptions: for every topic received from, the next
        #: offset (where a resumed subscription continues: protocol.md,
        #: "Resuming after a reconnect") and the last batch's timestamp.
        self._positions: dict[str, tuple[int, int]] = {}
        #: The broker's clock at the first SUBACK: where topics not received
        #: from yet resume, for a subscription that started with "new".
        self._registered_us: int | None = None
        #: A SUBSCRIBE sent again after a reconnect awaits its SUBACK.
        self._resuming = False
        self._unsubscribing = False
        self._batches: deque[Batch] = deque()
        #: The batch being handed over, and how many of it have been: the
        #: counters below move a batch at a time (statistics() adds _index).
        self._current = _NO_BATCH
        self._index = 0
        #: Messages buffered, the current batch's included (handed over or not).
        self._pending = 0
        self._consumed = 0  # messages consumed since the last credit grant
        self._arrived = anyio.Event()
        self._closed = False
        self._error: BaseException | None = None
        #: Messages handed over, not counting the current batch's.
        self._delivered = 0
        self._malformed = 0
        self._lost = 0
        #: Batches older than this (µs) are skipped: a start time in the future
        #: must not yield messages published before it.
        self._skip_before_us = 0
        # A group's start is the broker's business (it hands out from the
        # group's cursor; a later member's start is ignored): no client skips.
        if group is None and start[0] is StartKind.OFFSET:
            # A position held before anything arrived: what lies below it
            # (the rest of the stored batch it is in) is skipped as a repeat.
            self._positions[pattern] = (start[1], _ANY_TIME)
        elif group is None and start[0] is StartKind.TIME:
            self._skip_before_us = start[1]

    # -- called by the client's reader (sync, never blocks) ---------------

    def _push(self, batch: Batch) -> None:
        if self._closed:
            return
        received = len(batch)
        if self.group is None and received:
            topic, timestamp, first = batch.topic, batch.timestamp_us, batch.base
            next_offset = first + received
            seen = self._positions.get(topic)
            if seen is not None and first < seen[0]:
                if timestamp <= seen[1]:
                    # Appended no later than what we last had from this
                    # topic: a repeat (a resume that replays by the start
                    # rule, or a batch holding the position). Drop what we had.
                    batch.drop_first(min(received, seen[0] - first))
                    if next_offset > seen[0]:
                        self._positions[topic] = (next_offset, timestamp)
                else:
                    # Appended after it, at offsets we had: the topic's log
                    # was reset (memory storage restarted). New messages.
                    self._positions[topic] = (next_offset, timestamp)
            else:
                self._positions[topic] = (next_offset, timestamp)
        if self._skip_before_us and received and batch.timestamp_us < self._skip_before_us:
            batch.drop_first(received)  # one timestamp per batch: all of it is too early
        kept = len(batch)
        if kept < received:
            # Skipped messages still used the broker's credit: return it.
            self._account(received - kept)
            if not kept:
                return
        self._batches.append(batch)
        self._pending += kept
        self._arrived.set()

    def _resubscribe(self, max_frame_bytes: int) -> Subscribe:
        """The SUBSCRIBE that continues this subscription on a new connection."""
        kind, value = self._start
        options = dict(self._options)
        if self.group is not None:
            credit = UNLIMITED_CREDIT  # the broker redelivers what was pending
        else:
            if kind is StartKind.NEW and self._registered_us is not None:
                kind, value = StartKind.TIME, self._registered_us
            # Too many topics to name in one frame: the start rule alone
            # replays from earlier (never later), and _push drops repeats.
            positions = ((topic, position) for topic, (position, _) in self._positions.items())
            if resume_fits(self.pattern, positions, max_frame_bytes):
                for topic, (position, _) in self._positions.items():
                    options[RESUME_OPTION_PREFIX + topic] = str(position)
            # The broker's credit starts afresh: what is still buffered here
            # counts against the window. The current batch's consumed part is
            # accounted again when it ends, so it is subtracted in advance.
            credit = max(1, self.window - (self._pending - self._index))
            self._consumed = -self._index
        self._resuming = True
        return Subscribe(self.sub_id, self.pattern, kind, value, credit, options)

    def _note_malformed(self, topic: str, base_offset: int, timestamp: int, count: int) -> None:
        """A batch that did not decode: count it, move past it, and give back
        the credit the broker spent on it (else the window shrinks for good)."""
        self._malformed += 1
        if self.group is None:
            self._positions[topic] = (base_offset + count, timestamp)
            self._account(count)

    def _note_lost(self, count: int) -> None:
        self._lost += count

    def _forget_topic(self, topic: str) -> None:
        """A deleted topic: a new one of its name starts at offset 0, and
        its first messages must not be taken for repeats."""
        self._positions.pop(topic, None)

    def _close(self, error: BaseException | None = None) -> None:
        """No more messages will arrive; iteration ends once the buffer is
        drained, raising ``error`` if the connection was lost."""
        if not self._closed:
            self._closed = True
            self._error = error
            self._arrived.set()

    # -- the application's side -------------------------------------------

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        index = self._index
        if index >= len(self._current):
            if not await self._next_batch():
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            index = self._index
        self._index = index + 1
        return self._current.message(index)

    async def _next_batch(self) -> bool:
        """Make the next buffered batch current, waiting for one if need be;
        False once the subscription is closed and drained."""
        while self._index >= len(self._current):
            if self._current is not _NO_BATCH:
                done = len(self._current)
                self._pending -= done
                self._delivered += done
                self._current = _NO_BATCH
                self._index = 0
                self._account(done)
            if self._batches:
                self._current = self._batches.popleft()
                # One checkpoint per batch, not per message: iterating a
                # large backlog stays cheap and still lets other tasks run.
                await anyio.lowlevel.checkpoint()
                continue
            if self._closed:
                return False
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return True

    async def _for_each(self, call: Callable[[Message], object]) -> None:
        """Hand every message to ``call`` in order, awaiting what it returns
        if that is awaitable: what ``async for msg in self`` would do, less
        a coroutine and a scheduler check per message (the callback path's
        speed). The position moves before each call, as it does before
        ``__anext__`` returns, so statistics and a resume in between see the
        same state. Raises like the iteration would."""
        while await self._next_batch():
            batch = self._current
            if batch.settler is not None or batch.msg_id is not None:
                make = batch.message
            else:
                # Batch.message for a plain batch, inlined.
                topic, payloads, headers, base, ts = (
                    batch.topic, batch.payloads, batch.headers, batch.base, batch.timestamp_us
                )

                def make(i: int) -> Message:
                    return Message(topic, payloads[i], headers[i], base + i, ts)

            # Re-read the position each time: an await in ``call`` may let
            # someone else iterate this subscription too.
            while self._current is batch and (index := self._index) < len(batch):
                self._index = index + 1
                result = call(make(index))
                if result is not None and isawaitable(result):
                    await result
        if self._error is not None:
            raise self._error

    def _account(self, consumed: int) -> None:
        if self.group is not None:
            return  # members are flow-controlled by max_ack_pending, not credit
        self._consumed += consumed
        if self._consumed * 2 >= self.window and not self._closed:
            self._client._grant_credit(self.sub_id, self._consumed)
            self._consumed = 0

    async def unsubscribe(self) -> None:
        """Stop the subscription; messages already buffered are still iterated."""
        if not self._closed:
            await self._client._unsubscribe(self)

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(
            pattern=self.pattern,
            pending_messages=self._pending - self._index,
            delivered_messages=self._delivered + self._index,
            malformed_batches=self._malformed,
            lost_messages=self._lost,
        )

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.unsubscribe()
        except ConnectionClosed:
            pass
