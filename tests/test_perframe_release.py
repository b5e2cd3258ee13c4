"""A commit round releases a topic's held batches (Router.release): with
nobody subscribed and every held batch covered, in one step instead of one
per batch (issue 17). What it leaves must be what releasing one by one
leaves: visible up to the last batch covered, later rounds' batches still
held."""

from __future__ import annotations

from pathlib import Path

from pybroker.server.config import Config
from pybroker.server.core import Broker, Published
from pybroker.server.principal import Principal

from helpers.frames import good_batch
from helpers.logs import open_store


def _run(broker: Broker, topic: str, n: int) -> list[Published]:
    results, error = broker.publish_run(Principal(), [(i + 1, topic, good_batch(b"m"), 0) for i in range(n)])
    assert error is None
    return [r for r in results if isinstance(r, Published)]


def test_a_round_releases_what_it_covers_and_only_that(tmp_path: Path) -> None:
    broker = Broker(Config(data_dir=tmp_path), store=open_store(tmp_path, fsync="always"))
    broker.recover()
    try:
        router = broker.router
        first = _run(broker, "r.t", 5)
        covered = router.held_seq
        second = _run(broker, "r.t", 3)
        topic = router.topics["r.t"]
        assert topic.visible_next == 0 and len(topic.held) == 8
        # A round that started before the second run covers the first only.
        router.release(covered)
        assert topic.visible_next == 5
        assert [h.base for h in topic.held] == [5, 6, 7]
        router.release(router.held_seq)
        assert topic.visible_next == 8 and not topic.held
        assert [p.base for p in first + second] == list(range(8))
        assert all(p.held is not None and p.held.error is None for p in first + second)
    finally:
        broker.close()
