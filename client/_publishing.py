"""What a client keeps of the messages it publishes until they are acknowledged.

``send()`` appends a message's record to its topic's open :class:`Run` and
returns a :class:`PendingAck` that points into that run. The writer seals
runs and cuts them into PUBLISH frames (:class:`Frame`); a PUBACK resolves a
whole frame at once. Nothing here holds a PendingAck: the application does
(or not). A publisher that drops them lets each die as soon as it is made,
instead of keeping up to ``max_pending`` live objects per connection for the
garbage collector to walk and promote (a quarter of a send()'s time), and an
acknowledgement costs the same whatever the number of messages it covers.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque

import anyio
import anyio.lowlevel

from .message import PublishAck
from .protocol import NO_OFFSET, Durability

#: An enum member read from its class costs 0.08 µs on Python 3.11.
_MEMORY = Durability.MEMORY


class Frame:
    """One PUBLISH frame's messages: where they landed, once acknowledged."""

    __slots__ = ("run", "count", "base", "timestamp_us", "durability", "error", "moved")

    def __init__(self, run: Run, count: int) -> None:
        self.run = run
        self.count = count
        self.base = -1  #: the first message's offset, once acknowledged
        self.timestamp_us = 0
        self.durability = _MEMORY
        self.error: BaseException | None = None
        #: Where its messages were published again, one by one, when the
        #: broker refused the frame because its topic is partitioned.
        self.moved: list[PendingAck] | None = None

    def move(self, pendings: list[PendingAck]) -> None:
        self.moved = pendings
        self.run.wake()

    def resolve(self, base: int, timestamp_us: int, durability: Durability) -> None:
        self.base = base
        self.timestamp_us = timestamp_us
        self.durability = durability
        self.run.wake()

    def fail(self, error: BaseException) -> None:
        if self.base < 0 and self.error is None:
            self.error = error
            self.run.wake()


class Run:
    """Messages queued to one topic between two takes of the writer, in
    order; the first ``framed`` of them are in frames, the rest in
    ``records`` (their encoded records)."""

    __slots__ = ("topic", "records", "framed", "starts", "frames", "error", "event")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.records: list[bytes] = []
        self.framed = 0
        #: frames[k] holds messages starts[k] .. starts[k] + frames[k].count - 1.
        self.starts: list[int] = []
        self.frames: list[Frame] = []
        #: Why the messages not yet framed will never be sent, if so.
        self.error: BaseException | None = None
        #: Set (and dropped) whenever something of this run is settled.
        self.event: anyio.Event | None = None

    def frame(self, count: int) -> Frame:
        """The next ``count`` unframed messages become one frame."""
        frame = Frame(self, count)
        self.starts.append(self.framed)
        self.frames.append(frame)
        self.framed += count
        return frame

    def fail(self, error: BaseException) -> None:
        """The messages not yet framed will never be sent."""
        self.records = []
        self.error = error
        self.wake()

    def wake(self) -> None:
        event = self.event
        if event is not None:
            self.event = None
            event.set()


class Topic:
    """A topic published to: the largest record one PUBLISH to it carries,
    the open run that send() appends to, and sealed runs with messages the
    writer has not framed yet (when it ran out of room), oldest first."""

    __slots__ = ("name", "limit", "run", "sealed")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.run = Run(name)
        self.sealed: deque[Run] = deque()

    def seal(self) -> None:
        if self.run.records:
            self.sealed.append(self.run)
            self.run = Run(self.name)

    def fail(self, error: BaseException) -> None:
        for run in self.sealed:
            run.fail(error)
        self.sealed.clear()
        self.run.fail(error)
        self.run = Run(self.name)


class PendingAck:
    """The acknowledgement of one queued message; ``await p.wait()`` for it."""

    __slots__ = ("topic", "_run", "_index")

    def __init__(self, topic: str, run: Run, index: int) -> None:
        self.topic = topic
        self._run = run
        self._index = index  # in its run

    def _frame(self) -> tuple[Frame | None, int]:
        """The frame this message went out in, if it has, and its place there."""
        run, index = self._run, self._index
        if index >= run.framed:
            return None, 0
        starts = run.starts
        k = bisect_right(starts, index) - 1 if len(starts) > 1 else 0
        return run.frames[k], index - starts[k]

    def _moved(self) -> PendingAck | None:
        """Where this message was published again, if it was."""
        frame, place = self._frame()
        return frame.moved[place] if frame is not None and frame.moved is not None else None

    @property
    def offset(self) -> int:
        """Where the message landed; -1 until acknowledged."""
        frame, place = self._frame()
        if frame is None:
            return -1
        if frame.moved is not None:
            return frame.moved[place].offset
        return frame.base + place if frame.base >= 0 else -1

    @property
    def timestamp_us(self) -> int:
        frame, place = self._frame()
        if frame is not None and frame.moved is not None:
            return frame.moved[place].timestamp_us
        return frame.timestamp_us if frame is not None else 0

    @property
    def durability(self) -> Durability:
        frame, place = self._frame()
        if frame is not None and frame.moved is not None:
            return frame.moved[place].durability
        return frame.durability if frame is not None else _MEMORY

    @property
    def error(self) -> BaseException | None:
        """Why it failed, if it did."""
        frame, place = self._frame()
        if frame is not None and frame.moved is not None:
            return frame.moved[place].error
        return frame.error if frame is not None else self._run.error

    def done(self) -> bool:
        frame, place = self._frame()
        if frame is None:
            return self._run.error is not None
        if frame.moved is not None:
            return frame.moved[place].done()
        return frame.base >= 0 or frame.error is not None

    def result(self) -> PublishAck:
        """The acknowledgement; raises if it failed or has not arrived."""
        frame, place = self._frame()
        if frame is not None and frame.moved is not None:
            return frame.moved[place].result()
        error = frame.error if frame is not None else self._run.error
        if error is not None:
            raise error
        if frame is None or frame.base < 0:
            raise RuntimeError("not acknowledged yet")
        if frame.base == NO_OFFSET:  # delayed: no offset until it is released
            return PublishAck(self.topic, -1, frame.timestamp_us, frame.durability)
        return PublishAck(self.topic, frame.base + place, frame.timestamp_us, frame.durability)

    async def wait(self) -> PublishAck:
        if self.done():
            await anyio.lowlevel.checkpoint()
        else:
            run = self._run
            while not self.done():
                moved = self._moved()
                if moved is not None:  # its new run's events wake it now
                    return await moved.wait()
                # One event per run, woken whenever a frame of it settles.
                if run.event is None:
                    run.event = anyio.Event()
                await run.event.wait()
        return self.result()
