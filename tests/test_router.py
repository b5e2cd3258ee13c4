"""Router and memory log: synchronous core logic, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from pybroker.server.storage import MemoryStore, MemoryTopicLog
from pybroker.server.router import Held, NoEvents, Router, Subscription, Topic
from pybroker.protocol import encode_batch


class RecordingSession:
    """Stands in for a Session: records what the router hands it."""

    def __init__(self) -> None:
        self.got: list[tuple[int, str, int, int, bytes, int]] = []

    def deliver(
        self, sub: Subscription, topic: Topic, base: int, ts: int, batch: bytes, count: int
    ) -> None:
        self.got.append((sub.sub_id, topic.name, base, ts, batch, count))


def make_sub(session: Any, sub_id: int, pattern: str) -> Subscription:
    return Subscription(session, sub_id, pattern, credit=1 << 62)


def test_publish_reaches_exactly_the_matching_subscriptions() -> None:
    router = Router(MemoryStore())
    session = RecordingSession()
    subs = {
        1: "orders.eu",
        2: "orders.*",
        3: "orders.>",
        4: ">",
        5: "orders.eu.created",
        6: "*.eu",
        7: "payments.>",
    }
    for sid, pattern in subs.items():
        router.add(make_sub(session, sid, pattern))
    batch = encode_batch([b"a"])
    router.publish(router.topic("orders.eu"), batch, 1, 100)
    assert sorted(g[0] for g in session.got) == [1, 2, 3, 4, 6]
    session.got.clear()
    router.publish(router.topic("orders.eu.created"), batch, 1, 100)
    assert sorted(g[0] for g in session.got) == [3, 4, 5]
    session.got.clear()
    router.publish(router.topic("orders"), batch, 1, 100)
    assert sorted(g[0] for g in session.got) == [4]


def test_subscription_added_after_topic_exists_and_removed() -> None:
    router = Router(MemoryStore())
    session = RecordingSession()
    topic = router.topic("a.b")
    sub = make_sub(session, 1, "a.*")
    assert router.add(sub) == [topic]
    exact = make_sub(session, 2, "a.b")
    assert router.add(exact) == [topic]
    router.publish(topic, encode_batch([b"x"]), 1, 1)
    assert [g[0] for g in session.got] == [1, 2]
    router.remove(sub)
    router.remove(exact)
    session.got.clear()
    router.publish(topic, encode_batch([b"y"]), 1, 2)
    assert session.got == []
    # A topic created after removal is not matched either.
    router.publish(router.topic("a.c"), encode_batch([b"z"]), 1, 3)
    assert session.got == []


def test_same_bytes_object_forwarded_to_every_subscriber() -> None:
    router = Router(MemoryStore())
    session = RecordingSession()
    for sid in range(1, 6):
        router.add(make_sub(session, sid, "t"))
    batch = encode_batch([b"1", b"2", b"3"])
    base, ts, held = router.publish(router.topic("t"), batch, 3, 42)
    assert (base, ts, held) == (0, 42, None)  # memory topics are never held
    assert all(g[4] is batch for g in session.got)
    assert [g[2:4] + (g[5],) for g in session.got] == [(0, 42, 3)] * 5


def test_offsets_and_timestamps_per_topic() -> None:
    router = Router(MemoryStore())
    t = router.topic("t")
    u = router.topic("u")
    assert router.publish(t, encode_batch([b"a", b"b"]), 2, 1000) == (0, 1000, None)
    assert router.publish(u, encode_batch([b"c"]), 1, 1001) == (0, 1001, None)
    # The clock stepping back does not make timestamps go backwards.
    assert router.publish(t, encode_batch([b"d"]), 1, 500) == (2, 1000, None)
    assert t.log.next_offset == 3 and u.log.next_offset == 1


def held_seq(published: tuple[int, int, Held | None]) -> int:
    assert published[2] is not None
    return published[2].seq


def test_held_batches_are_delivered_in_order_on_release() -> None:
    class Synced(MemoryStore):
        def topic(self, name: str) -> MemoryTopicLog:
            log = super().topic(name)
            log.needs_sync = True  # type: ignore[misc]
            return log

    woken: list[int] = []

    class Woken(NoEvents):
        def batch_held(self) -> None:
            woken.append(router.held_seq)

    router = Router(Synced(), events=Woken())
    session = RecordingSession()
    router.add(make_sub(session, 1, ">"))
    t, u = router.topic("t"), router.topic("u")
    assert held_seq(router.publish(t, encode_batch([b"a"]), 1, 1)) == 1
    assert held_seq(router.publish(u, encode_batch([b"b"]), 1, 2)) == 2
    assert held_seq(router.publish(t, encode_batch([b"c", b"d"]), 2, 3)) == 3
    assert woken == [1, 2, 3]
    assert session.got == [] and t.visible_next == 0
    router.release(2)
    assert [(g[1], g[2]) for g in session.got] == [("t", 0), ("u", 0)]
    assert (t.visible_next, u.visible_next) == (1, 1)
    router.release(3)
    assert [(g[1], g[2]) for g in session.got][2:] == [("t", 1)]
    assert t.visible_next == 3
    router.release(3)  # nothing held: nothing more
    assert len(session.got) == 3


def test_memory_log_read_and_time_index() -> None:
    log = MemoryTopicLog("t")
    batches = [encode_batch([b"m%d" % i for i in range(n)]) for n in (3, 1, 4)]
    assert log.append(batches[0], 3, 10) == 0
    assert log.append(batches[1], 1, 20) == 3
    assert log.append(batches[2], 4, 30) == 4
    assert (log.first_offset, log.next_offset) == (0, 8)
    # Reading from an offset inside a batch starts at that batch.
    assert [b.base_offset for b in log.read(1, 1 << 20)] == [0, 3, 4]
    assert [b.base_offset for b in log.read(4, 1 << 20)] == [4]
    assert log.read(8, 1 << 20) == []
    # max_bytes stops early, but at least one batch always comes back.
    assert [b.base_offset for b in log.read(0, 1)] == [0]
    assert log.offset_at_time(0) == 0
    assert log.offset_at_time(15) == 3
    assert log.offset_at_time(30) == 4
    assert log.offset_at_time(31) == 8


def test_memory_log_retention_evicts_oldest_but_never_the_newest() -> None:
    batch = encode_batch([b"x" * 100])
    log = MemoryTopicLog("t", max_bytes=len(batch) * 3)
    for i in range(2000):
        assert log.append(batch, 1, i) == i
    assert log.next_offset == 2000
    assert log.first_offset == 1997
    assert log.size_bytes == len(batch) * 3
    assert [b.base_offset for b in log.read(0, 1 << 20)] == [1997, 1998, 1999]
    tiny = MemoryTopicLog("u", max_bytes=1)
    tiny.append(batch, 1, 1)
    tiny.append(batch, 1, 2)
    assert (tiny.first_offset, tiny.next_offset) == (1, 2)


@pytest.mark.parametrize("count", [1, 7])
def test_memory_store_reports_memory_durability(count: int) -> None:
    store = MemoryStore()
    log = store.topic("x")
    log.append(encode_batch([b"."] * count), count, 1)
    assert store.topic("x") is log
    assert store.topic_names() == ["x"]
    assert not store.needs_sync
