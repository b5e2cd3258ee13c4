"""``GET /metrics``: the Prometheus text exposition format, version 0.0.4.

Everything is read from counters the broker keeps anyway (per topic, per
server, in the file store), when scraped; nothing here runs on the publish
path. Families:

- ``pybroker_info``, ``pybroker_ready``, ``pybroker_uptime_seconds``
- ``pybroker_connections`` / ``pybroker_connections_opened_total`` by
  transport (tcp, http); ``pybroker_connections_refused_total`` (tcp, at
  max_connections); ``pybroker_http_requests_total`` by status code
- ``pybroker_topics``; ``pybroker_inboxes`` (request/reply inboxes, by
  state: owned, grace; never per inbox); per topic: ``pybroker_topic_messages_in_total``,
  ``..._bytes_in_total``, ``..._messages_out_total``, ``..._bytes_out_total``,
  ``pybroker_topic_log_bytes``, ``..._first_offset``, ``..._next_offset``,
  ``pybroker_topic_subscriptions``, ``pybroker_topic_max_lag_messages``
- ``pybroker_subscription_lag_messages`` per subscription and topic
- ``pybroker_publish_acks_total`` by durability (memory, os, disk)
- ``pybroker_fsyncs_total``, ``pybroker_fsync_duration_seconds`` (histogram),
  ``pybroker_commit_rounds_total`` (file storage)
- storage faults: ``pybroker_storage_degraded``,
  ``pybroker_storage_errors_total`` by kind (full, io),
  ``pybroker_fsync_failures_total``, ``pybroker_storage_damaged_batches_total``,
  ``pybroker_topic_holes`` per topic, ``pybroker_group_lost_total`` per group

- per consumer group: ``pybroker_group_members``, ``pybroker_group_pending``
  (delivered or waiting to be, not yet settled), and the counters
  ``pybroker_group_delivered_total``, ``..._redelivered_total``,
  ``..._acked_total``, ``..._termed_total``, ``..._dead_lettered_total``
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from .. import __version__
from ..storage import FileStore
from ..router import Topic
from ..stats import Histogram
from . import state
from .access import require_admin
from .messages import Request, Response

if TYPE_CHECKING:
    from .server import HttpServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


class Exposition:
    """Accumulates families, each with its HELP and TYPE lines once."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]
    ) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        sample_name = name + "_total" if kind == "counter" else name
        for labels, value in samples:
            self._sample(sample_name, labels, value)

    def histogram(self, name: str, help_text: str, hist: Histogram, labels: Labels | None = None) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} histogram")
        base = dict(labels or {})
        for bound, count in hist.cumulative():
            self._sample(name + "_bucket", {**base, "le": _number(float(bound))}, count)
        self._sample(name + "_sum", base, hist.sum)
        self._sample(name + "_count", base, hist.count)

    def _sample(self, name: str, labels: Labels, value: float) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self._lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self._lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def render(http: HttpServer) -> str:
    broker, server = http.broker, http.listener
    out = Exposition()
    storage = http.broker.storage_kind
    out.family(
        "pybroker_info",
        "gauge",
        "Broker version and storage (always 1).",
        [({"version": __version__, "server_name": broker.config.server_name, "storage": storage}, 1)],
    )
    out.family("pybroker_ready", "gauge", "1 when listeners accept and recovery is done.", [({}, int(server.ready))])
    out.family(
        "pybroker_uptime_seconds", "gauge", "Seconds since the broker started.", [({}, round(time.time() - server.started_at, 3))]
    )
    out.family(
        "pybroker_connections",
        "gauge",
        "Open client connections by transport.",
        [({"transport": "tcp"}, len(server.sessions)), ({"transport": "http"}, len(http.connections))],
    )
    out.family(
        "pybroker_connections_opened",
        "counter",
        "Client connections accepted since start, by transport.",
        [({"transport": "tcp"}, server.connections_total), ({"transport": "http"}, http.connections_total)],
    )
    out.family(
        "pybroker_connections_refused",
        "counter",
        "TCP connections turned away at max_connections (ERROR 108).",
        [({"transport": "tcp"}, server.connections_refused)],
    )
    out.family(
        "pybroker_http_requests",
        "counter",
        "HTTP responses sent, by status code.",
        [({"code": str(code)}, n) for code, n in sorted(http.requests_by_status.items())],
    )
    topics = [broker.router.topics[name] for name in sorted(broker.router.topics)]
    out.family("pybroker_topics", "gauge", "Topics the broker holds.", [({}, len(topics))])
    out.family(
        "pybroker_inboxes",
        "gauge",
        "Request/reply inboxes held in memory (never listed per topic), and those waiting to be reclaimed.",
        [({"state": "owned"}, len(broker.router.inboxes) - broker.router.inboxes.in_grace),
         ({"state": "grace"}, broker.router.inboxes.in_grace)],
    )
    per_topic: list[tuple[str, str, str, Callable[[Topic], float]]] = [
        ("pybroker_topic_messages_in", "counter", "Messages published to the topic.", lambda t: t.messages_in),
        ("pybroker_topic_bytes_in", "counter", "Batch bytes published to the topic.", lambda t: t.bytes_in),
        ("pybroker_topic_messages_out", "counter", "Messages handed to subscribers and HTTP readers.", lambda t: t.messages_out),
        ("pybroker_topic_bytes_out", "counter", "Bytes handed to subscribers and HTTP readers.", lambda t: t.bytes_out),
        ("pybroker_topic_log_bytes", "gauge", "Bytes the topic's log holds.", lambda t: t.log.size_bytes),
        ("pybroker_topic_first_offset", "gauge", "First offset still retained.", lambda t: t.log.first_offset),
        ("pybroker_topic_next_offset", "gauge", "Offset the next message will get.", lambda t: t.log.next_offset),
        ("pybroker_topic_subscriptions", "gauge", "Subscriptions (TCP and SSE) matching the topic.", lambda t: len(t.subs)),
    ]
    for name, kind, help_text, get in per_topic:
        out.family(name, kind, help_text, [({"topic": t.name}, get(t)) for t in topics])
    views = {t.name: state.subscriptions(t) for t in topics}
    out.family(
        "pybroker_topic_max_lag_messages",
        "gauge",
        "Largest lag of any subscription on the topic, in messages.",
        [({"topic": t.name}, max((v.lag for v in views[t.name]), default=0)) for t in topics],
    )
    out.family(
        "pybroker_subscription_lag_messages",
        "gauge",
        "Visible messages of the topic not yet handed to the subscription.",
        [
            (
                {
                    "topic": topic_name,
                    "transport": v.transport,
                    "connection": str(v.connection),
                    "client": v.client,
                    "sub_id": str(v.sub_id),
                    "pattern": v.pattern,
                },
                v.lag,
            )
            for topic_name, vs in views.items()
            for v in vs
        ],
    )
    out.family(
        "pybroker_publish_acks",
        "counter",
        "Publish acknowledgements sent (TCP PUBACKs and HTTP publishes), by durability.",
        [({"durability": d.name.lower()}, n) for d, n in sorted(broker.acks_by_durability.items())],
    )
    out.family(
        "pybroker_commit_rounds",
        "counter",
        "Group-commit rounds completed by the committer.",
        [({}, broker.committer.rounds)],
    )
    groups = [broker.groups.groups[n] for n in sorted(broker.groups.groups)]
    out.family(
        "pybroker_group_members", "gauge", "Members of a consumer group.",
        [({"group": g.name}, len(g.members)) for g in groups],
    )
    out.family(
        "pybroker_group_pending", "gauge", "Messages a consumer group has not settled yet.",
        [({"group": g.name}, sum(len(gt.pending) for gt in g.topics.values())) for g in groups],
    )
    for field, help_text in (
        ("delivered", "Messages handed out for the first time."),
        ("redelivered", "Messages delivered again (ack wait expired, nak, member left)."),
        ("acked", "Messages acknowledged."),
        ("termed", "Messages terminated (never delivered again, not dead-lettered)."),
        ("dead_lettered", "Messages moved to the dead-letter topic after max_deliver."),
    ):
        out.family(
            f"pybroker_group_{field}", "counter", help_text,
            [({"group": g.name}, getattr(g, field)) for g in groups],
        )
    out.family(
        "pybroker_group_lost", "counter", "Messages a group could not hand out: lost from the log (damage, holes).",
        [({"group": g.name}, g.lost) for g in groups],
    )
    out.family(
        "pybroker_storage_degraded", "gauge",
        "1 while storage refuses publishes or group deliveries wait for their counts to be saved (disk full or failing), else 0.",
        [({}, int(broker.problem is not None))],
    )
    store = broker.store
    if isinstance(store, FileStore):
        out.family("pybroker_fsyncs", "counter", "fsync rounds of the file log.", [({}, store.fsyncs)])
        out.histogram("pybroker_fsync_duration_seconds", "Seconds per fsync round of the file log.", store.fsync_seconds)
        out.family(
            "pybroker_storage_errors", "counter",
            "Publishes refused because storage failed: full (disk or quota full, --min-free-bytes) or io.",
            [({"kind": kind}, n) for kind, n in sorted(store.storage_errors.items())],
        )
        out.family("pybroker_fsync_failures", "counter", "Segment fsyncs that failed (their batches refused).", [({}, store.fsync_failures)])
        out.family("pybroker_storage_damaged_batches", "counter", "Damaged batches found by reads (never delivered).", [({}, store.damaged_batches)])
        out.family(
            "pybroker_topic_holes", "gauge", "Ranges of offsets a topic's log does not hold (damage or missing files).",
            [({"topic": t.name}, len(getattr(t.log, "holes", ()))) for t in topics],
        )
    return out.text()


async def handle(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    require_admin(request)  # broker-wide figures name every topic and client
    return Response(200, render(http).encode("utf-8"), CONTENT_TYPE)
