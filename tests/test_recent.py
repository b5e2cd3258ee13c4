"""Recent batches in memory for subscribers that fell behind (broker/recent.py).

The window's rules on their own (contiguous, bounded for all topics
together, read like a log), then a real broker: a subscriber that stopped
reading catches up with what it missed, byte for byte and in order, from
the window when it is not far behind and from the log when it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pybroker.protocol import UNLIMITED_CREDIT
from pybroker.server.recent import RecentCache
from pybroker.server.storage import StoredBatch
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.server.testing import running_broker

from helpers.frames import good_batch, publish_frame
from helpers.inproc import wait_until
from helpers.raw import RawSubscriber, raw_client


def _fill(window, batches: int, size: int = 100, count: int = 2, start: int = 0) -> None:  # type: ignore[no-untyped-def]
    for i in range(batches):
        base = start + i * count
        window.add(base, count, 1000 + i, bytes([i % 256]) * size)


def test_reads_like_a_log_from_the_batch_holding_the_offset() -> None:
    window = RecentCache(10_000).topic()
    _fill(window, 10)  # offsets 0..19, two per batch
    got = window.read(5, 300)  # batch 4..5 holds offset 5
    assert [(b.base_offset, b.count) for b in got] == [(4, 2), (6, 2), (8, 2)]
    assert got[0] == StoredBatch(4, 2, 1002, bytes([2]) * 100)
    assert [b.base_offset for b in window.read(0, 1)] == [0]  # at least one
    assert window.read(20, 10_000) == []  # past the end: the log's (nothing yet)


def test_the_bound_is_for_all_topics_together_and_drops_the_oldest() -> None:
    cache = RecentCache(1_000)
    a, b = cache.topic(), cache.topic()
    _fill(a, 6)  # 600 bytes
    _fill(b, 6)  # 600 more: a's two oldest go
    assert cache.bytes == 1_000
    assert len(a) == 4 and len(b) == 6
    assert a.read(2, 10_000) == []  # evicted: the log serves it
    assert [x.base_offset for x in a.read(9, 10_000)] == [8, 10]


def test_a_hole_starts_the_window_again() -> None:
    window = RecentCache(10_000).topic()
    _fill(window, 3)  # 0..5
    window.add(10, 2, 9, b"x")  # 6..9 never delivered live (no subscriber then)
    assert window.read(2, 10_000) == []
    assert [b.base_offset for b in window.read(10, 10_000)] == [10]


def test_clear_forgets_and_the_bound_still_counts() -> None:
    cache = RecentCache(1_000)
    window = cache.topic()
    _fill(window, 5)
    window.clear()
    assert window.read(0, 10_000) == [] and len(window) == 0
    _fill(window, 8, start=100)
    assert cache.bytes <= 1_000


def test_long_use_compacts_the_evicted_head() -> None:
    cache = RecentCache(50 * 10)
    window = cache.topic()
    _fill(window, 5000, size=10, count=1)
    assert len(window) == 50
    assert len(window._entries) < 5000  # the evicted head was dropped, not kept
    assert [b.base_offset for b in window.read(4990, 10_000)] == list(range(4990, 5000))


@pytest.mark.trio
@pytest.mark.parametrize(("recent_bytes", "from_log"), [(64 << 20, False), (4096, True)], ids=["window", "log"])
async def test_a_stalled_subscriber_catches_up_whole_and_in_order(
    tmp_path: Path, recent_bytes: int, from_log: bool
) -> None:
    frames = 600
    payload = b"r" * 1000
    settings = SettingsResolver.from_specs(TopicSettings(fsync="never"), [])
    async with running_broker(
        data_dir=tmp_path / "data", topic_settings=settings, outbound_queue_bytes=64 * 1024, recent_bytes=recent_bytes
    ) as server:
        stalled = await RawSubscriber.open(server.url, "stalled", "recent.t", UNLIMITED_CREDIT)
        try:
            async with raw_client(server, handshake="pub") as pub:
                await pub.send(b"".join(publish_frame(i, b"recent.t", good_batch(payload + b"%d" % i)) for i in range(1, frames + 1)))
                await pub.events(frames)
            topic = server.broker.router.topics["recent.t"]
            session = next(s for s in server.sessions if s.client_name == "stalled")
            await wait_until(lambda: bool(session.outbox.lagging))
            reads = 0
            real_read = topic.log.read

            def counting_read(offset: int, max_bytes: int) -> list[StoredBatch]:
                nonlocal reads
                reads += 1
                return real_read(offset, max_bytes)

            topic.log.read = counting_read  # type: ignore[method-assign]
            with trio.fail_after(30):
                await stalled.read_messages(frames)
            assert [o for o, _ in stalled.messages] == list(range(frames))
            assert all(p == payload + b"%d" % (o + 1) for o, p in stalled.messages)
            assert (reads > 0) is from_log, reads
        finally:
            await stalled.aclose()
