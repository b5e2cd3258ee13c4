"""Where a reader starts in a topic: the SUBSCRIBE start rules, as pure functions.

Plain subscriptions and consumer groups share them (protocol.md,
"SUBSCRIBE" and "Resuming after a reconnect"): ``new`` is the topic's
visible end, ``earliest`` its first retained offset, an offset is clamped
to what is retained, a time is the first batch at or after it.
"""

from __future__ import annotations

from pybroker.protocol import StartKind

from .storage import TopicLog


def start_offset(log: TopicLog, start: StartKind, value: int, new: int) -> int:
    """The first offset to read for ``start``/``value``; ``new`` is what
    NEW means for this reader (the topic's visible end)."""
    if start is StartKind.EARLIEST:
        return log.first_offset
    if start is StartKind.OFFSET:
        return max(value, log.first_offset)
    if start is StartKind.TIME:
        return log.offset_at_time(value)
    return new


def resume_offset(log: TopicLog, position: int | None) -> int | None:
    """A reconnecting client's position in a topic, if it can be trusted:
    one past the end means this log is not the one the client read (memory
    storage restarted, or a crash lost an unsynced tail), and the start
    rule decides instead. A position below the first retained offset stands:
    the reader reports the gap as DATA_LOST."""
    if position is None or position > log.next_offset:
        return None
    return position
