"""``GET /metrics``: the broker's figures through ``prometheus_client``.

A custom collector (:class:`BrokerCollector`) reads the counters the broker
keeps anyway (per topic, per server, in the file store) when scraped; nothing
here runs on the publish path and no second set of counters exists. The
figures are copied on the event loop; making them into metric families and
writing the text, most of a scrape's cost, run in a worker thread, so a
scrape of thousands of topics does not stall the loop.
``prometheus_client`` writes the exposition: the Prometheus text format 0.0.4
by default, OpenMetrics 1.0 when the ``Accept`` header asks for it
(``choose_encoder``, what Prometheus itself sends). Names follow the
Prometheus conventions: counters end in ``_total`` (the family is declared
under the name without it in OpenMetrics, with it in 0.0.4, as
``prometheus_client`` does), units are base units at the end of the name
(``_bytes``, ``_seconds``). Families:

- ``pybroker_info`` (version, server_name, storage), ``pybroker_ready``,
  ``pybroker_uptime_seconds``
- ``pybroker_connections`` / ``pybroker_connections_opened_total`` by
  transport (tcp, http); ``pybroker_connections_refused_total`` (tcp, at
  max_connections); ``pybroker_http_requests_total`` by status code
- ``pybroker_topics``; ``pybroker_inboxes`` (request/reply inboxes, by
  state: owned, grace; never per inbox); per topic:
  ``pybroker_topic_messages_in_total``, ``pybroker_topic_in_bytes_total``,
  ``pybroker_topic_messages_out_total``, ``pybroker_topic_out_bytes_total``,
  ``pybroker_topic_log_bytes``, ``..._first_offset``, ``..._next_offset``,
  ``pybroker_topic_subscriptions``, ``pybroker_topic_max_lag_messages``
- ``pybroker_subscription_lag_messages`` per subscription and topic
- ``pybroker_publish_acks_total`` by durability (memory, os, disk)
- ``pybroker_delayed_pending`` (scheduled batches waiting for their time),
  ``pybroker_delayed_released_total``
- ``pybroker_fsyncs_total``, ``pybroker_fsync_duration_seconds`` (histogram),
  ``pybroker_commit_rounds_total``
- storage faults: ``pybroker_storage_degraded``,
  ``pybroker_storage_errors_total`` by kind (full, io),
  ``pybroker_fsync_failures_total``, ``pybroker_storage_damaged_batches_total``,
  ``pybroker_topic_holes`` per topic, ``pybroker_group_lost_total`` per group
- cluster mode (``--cluster``): ``pybroker_cluster_member``,
  ``..._members``, ``..._owned_partitions``, ``..._commit_rounds_total``,
  index compaction (``..._index_merges_total``,
  ``..._index_entries_merged_total``, ``..._index_merged_bytes_total``,
  ``..._index_merges_not_taken_total`` by why,
  ``..._index_entries_damaged_total``), ``..._retention_cut_entries_total``,
  old reads (``..._replay_fetches_total``, ``..._replay_fetch_retries_total``,
  ``..._replay_lost_ranges_total``, ``..._replay_bytes``), the read cache
  (``..._cache_requests_total`` by result, ``..._cache_bytes``) and the
  janitor (``..._janitor_sweeps_total``, ``..._janitor_deleted_objects_total``)
  and dead letters handed between nodes (``..._hand_offs_sent_total``,
  ``..._hand_offs_taken_total``)
- per consumer group: ``pybroker_group_members``, ``pybroker_group_pending``
  (delivered or waiting to be, not yet settled), and the counters
  ``pybroker_group_delivered_total``, ``..._redelivered_total``,
  ``..._acked_total``, ``..._termed_total``, ``..._dead_lettered_total``
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs
import trio

from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from .. import __version__
from ..router import Topic
from ..storage import FileStore
from . import state
from .access import require_admin
from .messages import Request, Response

if TYPE_CHECKING:
    from ..cluster.store import ClusterFigures
    from .server import HttpServer


@attrs.frozen
class Family:
    """A gauge or counter family as read on the event loop: plain values, no
    reference to live state. Made into a ``prometheus_client`` metric (the
    costly part, with the encoding) in a worker thread."""

    make: Callable[..., GaugeMetricFamily | CounterMetricFamily]
    name: str
    help_text: str
    labels: tuple[str, ...]
    samples: list[tuple[Sequence[str], float]]
    unit: str = ""

    def metric(self) -> Metric:
        family = self.make(self.name, self.help_text, labels=list(self.labels), unit=self.unit)
        for values, value in self.samples:
            family.add_metric(list(values), value)
        return family


def _gauge(
    name: str, help_text: str, samples: Iterable[tuple[Sequence[str], float]], labels: Sequence[str] = (), unit: str = ""
) -> Family:
    return Family(GaugeMetricFamily, name, help_text, tuple(labels), list(samples), unit)


def _counter(
    name: str, help_text: str, samples: Iterable[tuple[Sequence[str], float]], labels: Sequence[str] = (), unit: str = ""
) -> Family:
    return Family(CounterMetricFamily, name, help_text, tuple(labels), list(samples), unit)


def _cluster(f: ClusterFigures) -> Iterator[Family]:
    """Cluster mode (docs/cluster.md): this node's membership, ownership,
    commits, index compaction and retention, old reads, cache and janitor."""
    c, r, k = f.compaction, f.replay, f.cache
    gauges: list[tuple[str, str, float, str]] = [
        ("pybroker_cluster_member", "1 while this node holds its member lease, else 0.", int(f.member), ""),
        ("pybroker_cluster_members", "Cluster members this node sees.", f.members, ""),
        ("pybroker_cluster_owned_partitions", "Partitions this node owns.", f.owned, ""),
        ("pybroker_cluster_replay_bytes", "Bytes of fetched old batches held.", r.bytes, "bytes"),
        ("pybroker_cluster_cache_bytes", "Bytes the read cache holds.", k.bytes, "bytes"),
    ]
    counters: list[tuple[str, str, float, str]] = [
        (
            "pybroker_cluster_commit_rounds",
            "Rounds this node committed as an owner (one object PUT and one etcd transaction each).",
            f.commit_rounds, "",
        ),
        ("pybroker_cluster_index_merges", "Index compactions committed (runs of entries merged).", c.merges, ""),
        ("pybroker_cluster_index_entries_merged", "Index entries replaced by merges.", c.entries_merged, ""),
        ("pybroker_cluster_index_merged_bytes", "Bytes written into merged objects.", c.bytes_written, "bytes"),
        (
            "pybroker_cluster_index_entries_damaged",
            "Index entries compaction left as they were because their bytes did not check.", c.damaged, "",
        ),
        (
            "pybroker_cluster_retention_cut_entries",
            "Index entries retention cut (their objects go with the janitor).", c.retention_cut, "",
        ),
        ("pybroker_cluster_replay_fetches", "Fetches of batches older than the node's copy.", r.fetches, ""),
        (
            "pybroker_cluster_replay_fetch_retries",
            "Fetch attempts that failed (etcd or the object store) and were tried again.", r.retries, "",
        ),
        ("pybroker_cluster_replay_lost_ranges", "Old ranges found lost (missing or damaged objects).", r.lost, ""),
        ("pybroker_cluster_janitor_sweeps", "Janitor sweeps this node ran.", f.janitor_sweeps, ""),
        (
            "pybroker_cluster_janitor_deleted_objects",
            "Unreferenced objects this node's janitor deleted.", f.janitor_deleted, "",
        ),
        (
            "pybroker_cluster_hand_offs_sent",
            "Dead letters this node handed to the owner of their topic, through etcd.", f.hand_offs_sent, "",
        ),
        (
            "pybroker_cluster_hand_offs_taken",
            "Dead letters handed to this node's topics that it stored.", f.hand_offs_taken, "",
        ),
    ]  # fmt: skip
    for name, help_text, value, unit in gauges:
        yield _gauge(name, help_text, [((), value)], unit=unit)
    for name, help_text, value, unit in counters:
        yield _counter(name, help_text, [((), value)], unit=unit)
    yield _counter(
        "pybroker_cluster_index_merges_not_taken",
        "Merges not committed: refused by etcd (the epoch or an entry changed), or their outcome unknown.",
        [(("refused",), c.refused), (("unknown",), c.unknown)],
        ["why"],
    )
    yield _counter(
        "pybroker_cluster_cache_requests",
        "Object byte ranges asked of the read cache: hit (memory), fetch (a GET), joined (waited for another's GET).",
        [(("hit",), k.hits), (("fetch",), k.fetches), (("joined",), k.joined)],
        ["result"],
    )


def _le(bound: float) -> str:
    """A bucket bound as the ``le`` label (Prometheus writes ``+Inf``)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class Snapshot:
    """The figures of one scrape, as a ``prometheus_client`` collector (handed
    straight to the encoder, no registry)."""

    def __init__(self, families: list[Family | Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.metric() if isinstance(family, Family) else family


class BrokerCollector:
    """Reads one broker's figures at scrape time, on the event loop: only the
    broker's own counters and gauges, copied into :class:`Family` values."""

    def __init__(self, http: HttpServer) -> None:
        self.http = http

    def snapshot(self) -> Snapshot:
        return Snapshot(list(self.read()))

    def read(self) -> Iterator[Family | Metric]:
        http = self.http
        broker, server = http.broker, http.listener
        yield InfoMetricFamily(
            "pybroker",
            "Broker version and storage (always 1).",
            value={"version": __version__, "server_name": broker.config.server_name, "storage": broker.storage_kind},
        )
        yield _gauge("pybroker_ready", "1 when listeners accept and recovery is done.", [((), int(server.ready))])
        yield _gauge(
            "pybroker_uptime_seconds",
            "Seconds since the broker started.",
            [((), round(time.time() - server.started_at, 3))],
            unit="seconds",
        )
        transports = ["transport"]
        yield _gauge(
            "pybroker_connections",
            "Open client connections by transport.",
            [(("tcp",), len(server.sessions)), (("http",), len(http.connections))],
            transports,
        )
        yield _counter(
            "pybroker_connections_opened",
            "Client connections accepted since start, by transport.",
            [(("tcp",), server.connections_total), (("http",), http.connections_total)],
            transports,
        )
        yield _counter(
            "pybroker_connections_refused",
            "TCP connections turned away at max_connections (ERROR 108).",
            [(("tcp",), server.connections_refused)],
            transports,
        )
        yield _counter(
            "pybroker_http_requests",
            "HTTP responses sent, by status code.",
            [((str(code),), n) for code, n in sorted(http.requests_by_status.items())],
            ["code"],
        )
        topics = [broker.router.topics[name] for name in sorted(broker.router.topics)]
        yield _gauge("pybroker_topics", "Topics the broker holds.", [((), len(topics))])
        inboxes = broker.router.inboxes
        yield _gauge(
            "pybroker_inboxes",
            "Request/reply inboxes held in memory (never listed per topic), and those waiting to be reclaimed.",
            [(("owned",), len(inboxes) - inboxes.in_grace), (("grace",), inboxes.in_grace)],
            ["state"],
        )
        yield from self._topics(topics)
        yield _counter(
            "pybroker_publish_acks",
            "Publish acknowledgements sent (TCP PUBACKs and HTTP publishes), by durability.",
            [((d.name.lower(),), n) for d, n in sorted(broker.acks_by_durability.items())],
            ["durability"],
        )
        yield _counter(
            "pybroker_commit_rounds", "Group-commit rounds completed by the committer.", [((), broker.committer.rounds)]
        )
        schedule = broker.schedule
        yield _gauge(
            "pybroker_delayed_pending",
            "Delayed batches kept until their due time (PUBLISH flag DELAYED), not yet released.",
            [((), schedule.pending)],
        )
        yield _counter(
            "pybroker_delayed_released",
            "Delayed batches released into their topics since start.",
            [((), schedule.released)],
        )
        yield from self._groups()
        yield _gauge(
            "pybroker_storage_degraded",
            "1 while storage refuses publishes or group deliveries wait for their counts to be saved "
            "(disk full or failing), else 0.",
            [((), int(broker.problem is not None))],
        )
        store = broker.store
        cluster_figures = getattr(store, "cluster_figures", None)  # cluster mode (its module needs httpx)
        if cluster_figures is not None:
            yield from _cluster(cluster_figures())
        if isinstance(store, FileStore):
            yield _counter("pybroker_fsyncs", "fsync rounds of the file log.", [((), store.fsyncs)])
            hist = store.fsync_seconds
            yield HistogramMetricFamily(
                "pybroker_fsync_duration_seconds",
                "Seconds per fsync round of the file log.",
                buckets=[(_le(bound), count) for bound, count in hist.cumulative()],
                sum_value=hist.sum,
                unit="seconds",
            )
            yield _counter(
                "pybroker_storage_errors",
                "Publishes refused because storage failed: full (disk or quota full, --min-free-bytes) or io.",
                [((kind,), n) for kind, n in sorted(store.storage_errors.items())],
                ["kind"],
            )
            yield _counter(
                "pybroker_fsync_failures",
                "Segment fsyncs that failed (their batches refused).",
                [((), store.fsync_failures)],
            )
            yield _counter(
                "pybroker_storage_damaged_batches",
                "Damaged batches found by reads (never delivered).",
                [((), store.damaged_batches)],
            )
            yield _gauge(
                "pybroker_topic_holes",
                "Ranges of offsets a topic's log does not hold (damage or missing files).",
                [((t.name,), len(getattr(t.log, "holes", ()))) for t in topics],
                ["topic"],
            )

    def _topics(self, topics: list[Topic]) -> Iterator[Family]:
        per_topic: list[tuple[str, Callable[..., Family], str, str, Callable[[Topic], float]]] = [
            ("pybroker_topic_messages_in", _counter, "", "Messages published to the topic.", lambda t: t.messages_in),
            ("pybroker_topic_in_bytes", _counter, "bytes", "Batch bytes published to the topic.", lambda t: t.bytes_in),
            (
                "pybroker_topic_messages_out", _counter, "",
                "Messages handed to subscribers and HTTP readers.", lambda t: t.messages_out,
            ),
            (
                "pybroker_topic_out_bytes", _counter, "bytes",
                "Bytes handed to subscribers and HTTP readers.", lambda t: t.bytes_out,
            ),
            ("pybroker_topic_log_bytes", _gauge, "bytes", "Bytes the topic's log holds.", lambda t: t.log.size_bytes),
            ("pybroker_topic_first_offset", _gauge, "", "First offset still retained.", lambda t: t.log.first_offset),
            ("pybroker_topic_next_offset", _gauge, "", "Offset the next message will get.", lambda t: t.log.next_offset),
            (
                "pybroker_topic_subscriptions", _gauge, "",
                "Subscriptions (TCP and SSE) matching the topic.", lambda t: len(t.subs),
            ),
        ]
        for name, make, unit, help_text, get in per_topic:
            yield make(name, help_text, [((t.name,), get(t)) for t in topics], ["topic"], unit=unit)
        views = {t.name: state.subscriptions(t) for t in topics}
        yield _gauge(
            "pybroker_topic_max_lag_messages",
            "Largest lag of any subscription on the topic, in messages.",
            [((t.name,), max((v.lag for v in views[t.name]), default=0)) for t in topics],
            ["topic"],
        )
        yield _gauge(
            "pybroker_subscription_lag_messages",
            "Visible messages of the topic not yet handed to the subscription.",
            [
                ((topic_name, v.transport, str(v.connection), v.client, str(v.sub_id), v.pattern), v.lag)
                for topic_name, vs in views.items()
                for v in vs
            ],
            ["topic", "transport", "connection", "client", "sub_id", "pattern"],
        )

    def _groups(self) -> Iterator[Family]:
        manager = self.http.broker.groups
        groups = [manager.groups[n] for n in sorted(manager.groups)]
        yield _gauge(
            "pybroker_group_members", "Members of a consumer group.", [((g.name,), len(g.members)) for g in groups], ["group"]
        )
        yield _gauge(
            "pybroker_group_pending",
            "Messages a consumer group has not settled yet.",
            [((g.name,), sum(len(gt.pending) for gt in g.topics.values())) for g in groups],
            ["group"],
        )
        for field, help_text in (
            ("delivered", "Messages handed out for the first time."),
            ("redelivered", "Messages delivered again (ack wait expired, nak, member left)."),
            ("acked", "Messages acknowledged."),
            ("termed", "Messages terminated (never delivered again, not dead-lettered)."),
            ("dead_lettered", "Messages moved to the dead-letter topic after max_deliver."),
            ("lost", "Messages a group could not hand out: lost from the log (damage, holes)."),
        ):
            yield _counter(
                f"pybroker_group_{field}", help_text, [((g.name,), getattr(g, field)) for g in groups], ["group"]
            )


def render(http: HttpServer) -> str:
    """The Prometheus text format 0.0.4 (what a scrape without ``Accept`` gets)."""
    return generate_latest(BrokerCollector(http).snapshot()).decode("utf-8")


async def handle(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    require_admin(request)  # broker-wide figures name every topic and client
    encode, content_type = choose_encoder(request.header("accept") or "")
    # The figures are copied on the loop (consistent, cheap); building the
    # families and writing the text, which take most of a scrape's time
    # with many topics, run in a worker thread, one scrape at a time.
    snapshot = BrokerCollector(http).snapshot()
    body = await trio.to_thread.run_sync(encode, snapshot, limiter=http.metrics_encoding)
    # The format depends on Accept: caches must keep the two apart.
    return Response(200, body, content_type, {"vary": "accept"})
