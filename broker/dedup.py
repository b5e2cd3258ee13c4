"""Exactly-once publishing: the msg-ids each topic stored recently.

A PUBLISH with flag DEDUP names its batch with the ``msg-id`` header of
its first record (protocol.md, "Publishing exactly once"). The broker
remembers, per topic, the ids of the batches stored within the window and
where they went; the same id again (a publisher resending what it is not
sure was stored, after a reconnect) gets the original offsets back and
stores nothing.

The ids live in the stored batches themselves, so they are exactly as
durable as the messages: after a restart a topic's ids are read back from
its log (the batches of the last window) the first time a DEDUP publish
reaches it. A batch that was never acknowledged and was cut off by recovery
takes its id with it, and its resend is stored: that is the point.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

from pybroker.protocol import MalformedBatch, first_msg_id

from .storage import DataLoss

if TYPE_CHECKING:
    from .router import Held, Topic

#: Bytes read from a log at a time while rebuilding its ids.
_READ_BYTES = 1 << 20


class Stored:
    """Where a named batch went; ``held`` while its fsync is pending."""

    __slots__ = ("base", "count", "timestamp", "held")

    def __init__(self, base: int, count: int, timestamp: int, held: Held | None) -> None:
        self.base = base
        self.count = count
        self.timestamp = timestamp
        self.held = held


class _TopicIds:
    __slots__ = ("by_id", "order")

    def __init__(self) -> None:
        self.by_id: dict[str, Stored] = {}
        # (timestamp, id) in the order stored: timestamps never decrease.
        self.order: collections.deque[tuple[int, str]] = collections.deque()


class DedupWindow:
    """The msg-ids of the last ``window_us`` per topic, at most ``max_ids``
    each (the oldest go first): memory is bounded by both."""

    def __init__(self, window_seconds: float, max_ids: int) -> None:
        self.window_us = int(window_seconds * 1_000_000)
        self.max_ids = max_ids
        self._topics: dict[str, _TopicIds] = {}
        #: Resent batches answered with their original offsets (GET /metrics).
        self.duplicates = 0

    def find(self, topic: Topic, msg_id: str, now_us: int) -> Stored | None:
        """The batch ``msg_id`` named in ``topic`` within the window, if
        it is still stored (its fsync did not fail)."""
        ids = self._ids(topic, now_us)
        stored = ids.by_id.get(msg_id)
        if stored is None:
            return None
        if stored.held is not None and stored.held.error is not None:
            # Its fsync failed and the log rolled it back: never stored.
            del ids.by_id[msg_id]
            return None
        if stored.timestamp < now_us - self.window_us:
            return None  # expired; _expire drops it on the next remember
        return stored

    def loaded(self, topic_name: str) -> bool:
        """Whether the topic's ids are in memory: once they are, only what
        ``remember`` adds changes them; before, the first ``find`` reads
        them back from what the log holds then."""
        return topic_name in self._topics

    def remember(self, topic: Topic, msg_id: str, stored: Stored) -> None:
        ids = self._ids(topic, stored.timestamp)
        ids.by_id[msg_id] = stored
        ids.order.append((stored.timestamp, msg_id))
        self._expire(ids, stored.timestamp)

    def remember_many(self, topic: Topic, named: list[tuple[str, Stored]]) -> None:
        """``remember`` each, in order (the DEDUP batches of one write)."""
        if not named:
            return
        ids = self._ids(topic, named[0][1].timestamp)
        by_id, order = ids.by_id, ids.order
        for msg_id, stored in named:
            by_id[msg_id] = stored
            order.append((stored.timestamp, msg_id))
        self._expire(ids, named[-1][1].timestamp)

    def add_older(self, topic: Topic, named: list[tuple[str, Stored]], now_us: int) -> None:
        """Ids of batches stored before what the log now holds (cluster mode:
        read from etcd by a node taking the topic over), merged in time
        order with those read back from the log or remembered since; an id
        already known keeps what is known."""
        ids = self._ids(topic, now_us)
        fresh = [(stored.timestamp, msg_id) for msg_id, stored in named if msg_id not in ids.by_id]
        for msg_id, stored in named:
            ids.by_id.setdefault(msg_id, stored)
        if fresh:
            ids.order = collections.deque(sorted([*fresh, *ids.order], key=lambda entry: entry[0]))
        self._expire(ids, now_us)

    def forget(self, topic_name: str) -> None:
        self._topics.pop(topic_name, None)

    def _expire(self, ids: _TopicIds, now_us: int) -> None:
        oldest = now_us - self.window_us
        order, by_id = ids.order, ids.by_id
        while order and (order[0][0] < oldest or len(order) > self.max_ids):
            timestamp, msg_id = order.popleft()
            stored = by_id.get(msg_id)
            if stored is not None and stored.timestamp == timestamp:
                del by_id[msg_id]

    def _ids(self, topic: Topic, now_us: int) -> _TopicIds:
        ids = self._topics.get(topic.name)
        if ids is None:
            ids = self._topics[topic.name] = self._read_back(topic, now_us)
        return ids

    def _read_back(self, topic: Topic, now_us: int) -> _TopicIds:
        """The ids of the topic's batches stored within the window, from its
        log: every batch up to what is visible (appended and, where the log
        needs it, synced; later ones were remembered as they came)."""
        ids = _TopicIds()
        log = topic.log
        offset = max(log.offset_at_time(now_us - self.window_us), log.first_offset)
        end = topic.visible_next
        while offset < end:
            try:
                batches = log.read(offset, _READ_BYTES)
            except DataLoss as lost:
                offset = lost.last + 1  # nothing there to name
                continue
            if not batches:
                break
            for b in batches:
                if b.base_offset >= end:
                    break
                try:
                    msg_id = first_msg_id(b.batch)
                except MalformedBatch:
                    msg_id = None
                if msg_id is not None:
                    ids.by_id[msg_id] = Stored(b.base_offset, b.count, b.timestamp, None)
                    ids.order.append((b.timestamp, msg_id))
            offset = batches[-1].next_offset
        self._expire(ids, now_us)
        return ids
