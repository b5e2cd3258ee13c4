"""A cluster node's in-memory copy of a topic (broker/cluster/store.py,
storage/memory.py): where it starts, cutting a failed round off its end,
and a range the follower could not get, read as lost rather than as the
batch before it. No servers: the store is built, never run."""

from __future__ import annotations

import pytest

from helpers.frames import good_batch
from pybroker.server.storage.errors import DataLoss
from pybroker.server.storage.memory import MemoryTopicLog

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

from pybroker.server.cluster.store import ClusterStore, ClusterTopicLog, parse_cluster_urls  # noqa: E402


def test_a_copy_starts_where_it_is_told() -> None:
    log = MemoryTopicLog("t", start=40)
    assert (log.first_offset, log.next_offset, log.read(40, 1 << 20)) == (40, 40, [])
    assert log.append(good_batch(b"a", b"b"), 2, 5) == 40
    assert log.next_offset == 42 and log.last_timestamp == 5


def test_cut_drops_a_failed_round_and_only_at_a_batch_boundary() -> None:
    log = MemoryTopicLog("t")
    for i in range(3):
        log.append(good_batch(b"x", b"y"), 2, i)  # offsets 0-1, 2-3, 4-5
    with pytest.raises(ValueError):
        log.cut(3)  # inside a batch
    with pytest.raises(ValueError):
        log.cut(7)  # past the end
    log.cut(2)
    assert (log.next_offset, [b.base_offset for b in log.read(0, 1 << 20)]) == (2, [0])
    assert log.size_bytes == len(good_batch(b"x", b"y"))
    assert log.append(good_batch(b"z"), 1, 9) == 2  # the next append takes the cut offset
    log.cut(3)  # the end itself: nothing to drop
    assert log.next_offset == 3


def test_a_range_the_follower_could_not_get_reads_as_lost() -> None:
    store = ClusterStore(parse_cluster_urls("etcd://127.0.0.1:1", "s3://127.0.0.1:1/bucket"))
    log = ClusterTopicLog(store, "t")
    log.copy.append(good_batch(b"a"), 1, 1)  # offset 0
    log.copy.skip_to(5)  # 1..4 lost in the object store
    log.copy.append(good_batch(b"f"), 1, 2)  # offset 5
    assert [b.base_offset for b in log.read(0, 1 << 20)] == [0, 5]
    with pytest.raises(DataLoss) as lost:
        log.read(2, 1 << 20)
    assert (lost.value.first, lost.value.last, lost.value.reason) == (2, 4, "missing")
    assert [b.base_offset for b in log.read(5, 1 << 20)] == [5]


def test_cluster_urls_are_parsed_and_refused_clearly() -> None:
    settings = parse_cluster_urls("etcd://h1:2379,h2:2379/prod/eu", "s3://store:8333/bucket/pre/fix")
    assert settings.etcd == ["http://h1:2379", "http://h2:2379"]
    assert settings.keys.prefix == b"/prod/eu/"
    assert (settings.object_endpoint, settings.bucket, settings.object_prefix) == ("http://store:8333", "bucket", "pre/fix/")
    assert parse_cluster_urls("etcd://h:1", "s3s://s:443/b").object_endpoint == "https://s:443"
    for cluster, objects in [("http://h:1", "s3://s:1/b"), ("etcd://", "s3://s:1/b"), ("etcd://h:1", "s3://s:1"), ("etcd://h:1", "gs://s/b")]:
        with pytest.raises(ValueError):
            parse_cluster_urls(cluster, objects)
