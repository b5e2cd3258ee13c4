"""Topics, subscriptions and which subscription sees which topic.

Synchronous, no I/O: the router keeps, for every topic, the list of
subscriptions whose pattern matches it, so a publish costs one dict lookup
and one pass over that list. Matching runs only when a subscription or a
topic is added.

Request/reply inboxes (``_inbox.<token>``) are not topics: they live in
``Router.inboxes`` (broker/inboxes.py), never in ``topics`` or the log
store, and only their owner's exact subscriptions receive them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from pybroker.protocol import PARTITION_MARK, partition_of, tokens_match

from .inboxes import DEFAULT_GRACE, RETAIN_BYTES, Inboxes, is_inbox
from .storage import LogStore, MemoryTopicLog, StorageError, StoredBatch, TopicLog

if TYPE_CHECKING:
    from .groups import Group, Member
    from .subscriber import Subscriber

#: Credit standing for "no flow control": large enough never to run out.
NO_FLOW_CONTROL = 1 << 62


class RouterEvents(Protocol):
    """What the router tells its owner (the broker core), which passes it
    on to the committer and the consumer groups."""

    def topic_created(self, topic: Topic) -> None: ...

    def batch_held(self) -> None:
        """A batch waits for the fsync that covers it (wake the committer)."""

    def batch_visible(self, topic: Topic) -> None:
        """New visible messages in a topic consumer groups read."""

    def sync_failed(self) -> None:
        """Held batches were dropped because their fsync failed."""

    def group_matches(self, name: str) -> bool:
        """Whether a consumer group would read topic ``name``."""


class NoEvents:
    """For a router on its own (tests): nobody to tell."""

    def topic_created(self, topic: Topic) -> None:
        pass

    def batch_held(self) -> None:
        pass

    def batch_visible(self, topic: Topic) -> None:
        pass

    def sync_failed(self) -> None:
        pass

    def group_matches(self, name: str) -> bool:
        return False


class Held:
    """A batch appended to a topic that needs sync, waiting for the fsync
    that covers it. Its publisher keeps it to learn the outcome: released
    (delivered, acknowledged) or ``error`` (its fsync failed, the log was
    rolled back: never acknowledged, never delivered)."""

    __slots__ = ("seq", "base", "timestamp", "batch", "count", "error")

    def __init__(self, seq: int, base: int, timestamp: int, batch: bytes, count: int) -> None:
        self.seq = seq
        self.base = base
        self.timestamp = timestamp
        self.batch = batch
        self.count = count
        self.error: StorageError | None = None


class Topic:
    __slots__ = (
        "name",
        "name_bytes",
        "log",
        "subs",
        "messages_in",
        "bytes_in",
        "messages_out",
        "bytes_out",
        "last_timestamp",
        "visible_next",
        "held",
        "groups",
        "append_many",
    )

    def __init__(self, name: str, log: TopicLog) -> None:
        self.name = name
        self.name_bytes = name.encode("utf-8")
        self.log = log
        #: Appends several batches with one write (FileTopicLog.append_many);
        #: None for a log that appends one at a time (memory, inboxes).
        self.append_many: Callable[[list[bytes], list[int], int, int], int] | None = getattr(
            log, "append_many", None
        )
        self.subs: list[Subscription] = []
        self.messages_in = 0
        self.bytes_in = 0
        #: Messages and bytes handed to subscribers (TCP and HTTP), counted
        #: per batch where they are queued for sending.
        self.messages_out = 0
        self.bytes_out = 0
        self.last_timestamp = getattr(log, "last_timestamp", 0)
        #: Offsets below this have been handed to subscribers (or may be
        #: read from the log by them): appended and, if the topic needs
        #: sync, durable.
        self.visible_next = log.next_offset
        #: Appended batches waiting for the sync that covers them, in order.
        self.held: deque[Held] = deque()
        #: Consumer groups reading this topic (they read from the log).
        self.groups: list[Group] = []

    def __repr__(self) -> str:
        return f"Topic({self.name!r})"


class Subscription:
    __slots__ = (
        "subscriber",
        "sub_id",
        "pattern",
        "tokens",
        "wildcard",
        "lag",
        "credit",
        "group",
        "member",
    )

    def __init__(self, subscriber: Subscriber, sub_id: int, pattern: str, credit: int | None = None) -> None:
        #: Who receives its messages (a TCP session, an SSE stream, ...).
        self.subscriber = subscriber
        self.sub_id = sub_id
        self.pattern = pattern
        self.tokens = pattern.split(".")
        self.wildcard = "*" in self.tokens or ">" in self.tokens
        #: Topics this subscription reads from the log rather than live, with
        #: the next offset to read (replay, or a full outbound queue).
        self.lag: dict[Topic, int] = {}
        #: Messages the subscriber can still take (protocol.md, "Credit").
        self.credit = NO_FLOW_CONTROL if credit is None else credit
        #: Set for a consumer-group member, which the router does not fan out to.
        self.group: Group | None = None
        self.member: Member | None = None

    def __repr__(self) -> str:
        return f"Subscription({self.sub_id}, {self.pattern!r})"


def _inbox_topic(name: str) -> Topic:
    return Topic(name, MemoryTopicLog(name, RETAIN_BYTES))


class Router:
    def __init__(
        self,
        store: LogStore,
        events: RouterEvents | None = None,
        inbox_grace: float = DEFAULT_GRACE,
    ) -> None:
        self.store = store
        self.events: RouterEvents = events or NoEvents()
        #: Sequence number of the last batch held for a sync.
        self.held_seq = 0
        self._held_topics: dict[Topic, None] = {}
        #: Topics, without inboxes (those are in ``inboxes``).
        self.topics: dict[str, Topic] = {}
        self.inboxes = Inboxes(_inbox_topic, inbox_grace)
        # Subscriptions by exact pattern, and the wildcard ones, so a new
        # topic is matched against the wildcards only.
        self._exact: dict[str, list[Subscription]] = {}
        self._wild: list[Subscription] = []
        # The partitions (``orders~3``) of each partitioned topic that has
        # any here: an exact subscription to the topic matches them all.
        self._partitions: dict[str, list[Topic]] = {}

    def recover(self) -> list[str]:
        """Open every stored topic; return the inboxes found in the store
        (left by a version that stored them), which stay there untouched:
        they are no topics any more."""
        leftovers = []
        for name in self.store.topic_names():
            if is_inbox(name):
                leftovers.append(name)
            else:
                self.topic(name)
        return leftovers

    def topic(self, name: str) -> Topic:
        """The topic called ``name`` (already validated), created on first use;
        for an inbox, where a publish to it goes (Inboxes.topic)."""
        if is_inbox(name):
            return self.inboxes.topic(name)
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(name, self.store.topic(name))
            tokens = name.split(".")
            topic.subs.extend(self._exact.get(name, ()))
            named = partition_of(name) if PARTITION_MARK in name else None
            if named is not None:
                self._partitions.setdefault(named[0], []).append(topic)
                topic.subs.extend(self._exact.get(named[0], ()))
            topic.subs.extend(s for s in self._wild if tokens_match(s.tokens, tokens))
            self.events.topic_created(topic)
        return topic

    def drop(self, topic: Topic) -> None:
        """A deleted topic leaves the router: its subscriptions forget it
        (nothing of it is read or delivered again) and are told; a publish
        to its name then creates a new topic."""
        if self.topics.get(topic.name) is topic:
            del self.topics[topic.name]
        named = partition_of(topic.name)
        if named is not None and topic in self._partitions.get(named[0], ()):
            siblings = self._partitions[named[0]]
            siblings.remove(topic)
            if not siblings:
                del self._partitions[named[0]]
        self._held_topics.pop(topic, None)
        for sub in topic.subs:
            sub.lag.pop(topic, None)
            sub.subscriber.topic_deleted(sub, topic)
        topic.subs = []

    def has_receivers(self, name: str) -> bool:
        """Whether a message published to ``name`` now would reach any
        subscription or consumer group (a request's NEEDS_RECEIVER)."""
        if is_inbox(name):
            return self.inboxes.has_receivers(name)  # its owner's subscriptions only
        topic = self.topics.get(name)
        if topic is not None:
            return bool(topic.subs or topic.groups)
        if name in self._exact:
            return True
        named = partition_of(name)
        if named is not None and named[0] in self._exact:
            return True
        tokens = name.split(".")
        if any(tokens_match(s.tokens, tokens) for s in self._wild):
            return True
        return self.events.group_matches(name)

    def add(self, sub: Subscription) -> list[Topic]:
        """Register ``sub``; return the existing topics it matches."""
        if not sub.wildcard and is_inbox(sub.pattern):
            return self.inboxes.attach(sub)
        if sub.wildcard:
            self._wild.append(sub)
            matched = [
                t for t in self.topics.values() if tokens_match(sub.tokens, t.name.split("."))
            ]
        else:
            self._exact.setdefault(sub.pattern, []).append(sub)
            matched = self._named(sub.pattern)
        for t in matched:
            t.subs.append(sub)
        return matched

    def remove(self, sub: Subscription) -> None:
        if not sub.wildcard and is_inbox(sub.pattern):
            self.inboxes.detach(sub)
            sub.lag.clear()
            return
        if sub.wildcard:
            self._wild.remove(sub)
            candidates = list(self.topics.values())
        else:
            subs = self._exact[sub.pattern]
            subs.remove(sub)
            if not subs:
                del self._exact[sub.pattern]
            candidates = self._named(sub.pattern)
        for t in candidates:
            if sub in t.subs:
                # Rebuild rather than mutate: a publish may be iterating the
                # old list (deliver never awaits, but be safe and cheap).
                t.subs = [s for s in t.subs if s is not sub]
        sub.lag.clear()

    def _named(self, name: str) -> list[Topic]:
        """The topics an exact pattern matches: the topic of that name, or
        the partitions of a partitioned topic."""
        t = self.topics.get(name)
        return [t] if t is not None else list(self._partitions.get(name, ()))

    def publish(self, topic: Topic, batch: bytes, count: int, now: int) -> tuple[int, int, Held | None]:
        """Append a checked batch; hand it to every matching subscription now,
        or, for a topic that needs sync, once the committer made it durable.

        Returns (base offset, timestamp, the held batch or None); raises
        StorageError, with nothing stored or delivered, if the append fails.
        The hot path: no loop over the batch's messages, one loop over the
        topic's subscriptions, the same ``bytes`` object for all of them.
        """
        # Timestamps never go backwards within a topic, so the time index
        # stays sorted even if the wall clock steps back.
        timestamp = now if now > topic.last_timestamp else topic.last_timestamp
        base = topic.log.append(batch, count, timestamp)
        topic.last_timestamp = timestamp
        topic.messages_in += count
        topic.bytes_in += len(batch)
        if topic.log.needs_sync:
            self.held_seq += 1
            held = Held(self.held_seq, base, timestamp, batch, count)
            topic.held.append(held)
            self._held_topics[topic] = None
            self.events.batch_held()
            return base, timestamp, held
        topic.visible_next = base + count
        if topic.groups:
            self.events.batch_visible(topic)
        for sub in topic.subs:
            sub.subscriber.deliver(sub, topic, base, timestamp, batch, count)
        return base, timestamp, None

    def publish_many(
        self, topic: Topic, batches: list[bytes], counts: list[int], start: int, now: int
    ) -> tuple[int, int, int, list[Held] | None]:
        """Append checked batches ``batches[start:]`` with one write, as many
        as the log's active segment takes (at least one), and hand them on
        as :meth:`publish` would, in order: one hold sequence and one wake
        of the committer for all of them when the topic needs sync.

        Returns (how many it stored, the first one's base offset, their
        timestamp, their Held each or None); raises StorageError having
        stored none of them (the caller then publishes them one by one, so
        that exactly the batches not stored are refused). A log without
        ``append_many`` stores one batch per call.
        """
        append_many = topic.append_many
        if append_many is None:
            base, timestamp, held = self.publish(topic, batches[start], counts[start], now)
            return 1, base, timestamp, None if held is None else [held]
        timestamp = now if now > topic.last_timestamp else topic.last_timestamp
        first = topic.log.next_offset
        stored = append_many(batches, counts, start, timestamp)
        end = start + stored
        topic.last_timestamp = timestamp
        if start == 0 and end == len(batches):  # the usual case: all of them
            messages, size = sum(counts), sum(map(len, batches))
        else:
            messages, size = sum(counts[start:end]), sum(map(len, batches[start:end]))
        topic.messages_in += messages
        topic.bytes_in += size
        base = first
        if topic.log.needs_sync:
            self.held_seq += 1
            seq = self.held_seq
            helds = []
            for i in range(start, end):
                count = counts[i]
                helds.append(Held(seq, base, timestamp, batches[i], count))
                base += count
            topic.held.extend(helds)
            self._held_topics[topic] = None
            self.events.batch_held()
            return stored, first, timestamp, helds
        topic.visible_next = first + messages
        if topic.groups:
            self.events.batch_visible(topic)
        subs = topic.subs
        if subs:
            for i in range(start, end):
                batch, count = batches[i], counts[i]
                for sub in subs:
                    sub.subscriber.deliver(sub, topic, base, timestamp, batch, count)
                base += count
        return stored, first, timestamp, None

    def committed_elsewhere(self, name: str, stored: StoredBatch) -> None:
        """Cluster mode: a batch the topic's owner (another node, or this one
        in an earlier term) committed is now in this node's copy of the
        topic: hand it on as :meth:`publish` does a durable one."""
        topic = self.topic(name)
        base, count, timestamp, batch = stored.base_offset, stored.count, stored.timestamp, stored.batch
        if timestamp > topic.last_timestamp:
            topic.last_timestamp = timestamp
        topic.messages_in += count
        topic.bytes_in += len(batch)
        topic.visible_next = base + count
        if topic.groups:
            self.events.batch_visible(topic)
        for sub in topic.subs:
            sub.subscriber.deliver(sub, topic, base, timestamp, batch, count)

    def copy_positioned(self, name: str, offset: int) -> None:
        """Cluster mode: this node's copy of a topic begins at ``offset``
        (where the cluster's index window begins): nothing before it is
        waited for."""
        topic = self.topics.get(name)
        if topic is not None and not topic.held and topic.visible_next < offset:
            topic.visible_next = offset

    def release(self, seq: int, failed: Mapping[str, tuple[int, StorageError]] | None = None) -> None:
        """Deliver every held batch with hold sequence <= ``seq``, in order.

        ``failed``: topics whose fsync failed, with the offset their log was
        cut back to. Their held batches at or past it are gone from the log:
        marked with the error (their publishers are refused), never delivered.
        """
        for topic in list(self._held_topics):
            held = topic.held
            failure = failed.get(topic.name) if failed else None
            if failure is not None:
                cut, error = failure
                for h in held:
                    if h.base >= cut:
                        h.error = error
                topic.held = held = deque(h for h in held if h.error is None)
                self.events.sync_failed()  # a dead letter among them is redone
            if held and not topic.subs and held[-1].seq <= seq:
                # All of them, and nobody to deliver to (durable publishing
                # with no subscriber): visible up to the last, in one step.
                last = held[-1]
                topic.visible_next = last.base + last.count
                held.clear()
            while held and held[0].seq <= seq:
                h = held.popleft()
                base, timestamp, batch, count = h.base, h.timestamp, h.batch, h.count
                topic.visible_next = base + count
                for sub in topic.subs:
                    sub.subscriber.deliver(sub, topic, base, timestamp, batch, count)
            if topic.groups:
                self.events.batch_visible(topic)
            if not held:
                del self._held_topics[topic]
