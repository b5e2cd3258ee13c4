"""``GET /metrics`` as real tools read it: prometheus_client's parsers for both
text formats, content negotiation from ``Accept``, and ``promtool check
metrics`` (Debian's ``prometheus`` package) when it is installed.

The broker runs with the file store and has a topic, a subscription, a
consumer group, HTTP requests behind it, so that every family has samples.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.server.testing import running_broker

from helpers.http import Reply, post_json, request

text_parser = pytest.importorskip(
    "prometheus_client.parser", reason="prometheus_client is a dependency (pip install -e .)"
)
from prometheus_client.openmetrics import parser as openmetrics_parser  # noqa: E402

TIMEOUT = 10.0

#: Every family the broker exposes (file storage), with its type: none may
#: go missing or change type unnoticed.
FAMILIES = {
    "pybroker": "info",
    "pybroker_ready": "gauge",
    "pybroker_uptime_seconds": "gauge",
    "pybroker_connections": "gauge",
    "pybroker_connections_opened": "counter",
    "pybroker_connections_refused": "counter",
    "pybroker_http_requests": "counter",
    "pybroker_topics": "gauge",
    "pybroker_inboxes": "gauge",
    "pybroker_topic_messages_in": "counter",
    "pybroker_topic_in_bytes": "counter",
    "pybroker_topic_messages_out": "counter",
    "pybroker_topic_out_bytes": "counter",
    "pybroker_topic_log_bytes": "gauge",
    "pybroker_topic_first_offset": "gauge",
    "pybroker_topic_next_offset": "gauge",
    "pybroker_topic_subscriptions": "gauge",
    "pybroker_topic_max_lag_messages": "gauge",
    "pybroker_subscription_lag_messages": "gauge",
    "pybroker_publish_acks": "counter",
    "pybroker_commit_rounds": "counter",
    "pybroker_delayed_pending": "gauge",
    "pybroker_delayed_released": "counter",
    "pybroker_group_members": "gauge",
    "pybroker_group_pending": "gauge",
    "pybroker_group_delivered": "counter",
    "pybroker_group_redelivered": "counter",
    "pybroker_group_acked": "counter",
    "pybroker_group_termed": "counter",
    "pybroker_group_dead_lettered": "counter",
    "pybroker_group_lost": "counter",
    "pybroker_storage_degraded": "gauge",
    "pybroker_fsyncs": "counter",
    "pybroker_fsync_duration_seconds": "histogram",
    "pybroker_storage_errors": "counter",
    "pybroker_fsync_failures": "counter",
    "pybroker_storage_damaged_batches": "counter",
    "pybroker_topic_holes": "gauge",
}
#: What the text format 0.0.4 has: the info family is a gauge named
#: ``..._info`` (the format has no info type); the parser names a counter
#: family without its samples' ``_total``, as OpenMetrics does.
TEXT_FAMILIES = {
    (name + "_info" if kind == "info" else name): ("gauge" if kind == "info" else kind)
    for name, kind in FAMILIES.items()
}
#: Families with a unit (declared in OpenMetrics with ``# UNIT``).
UNITS = {
    "pybroker_uptime_seconds": "seconds",
    "pybroker_fsync_duration_seconds": "seconds",
    "pybroker_topic_in_bytes": "bytes",
    "pybroker_topic_out_bytes": "bytes",
    "pybroker_topic_log_bytes": "bytes",
}
#: What Prometheus 2.42 sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


async def scrape(tmp_path: Path, accepts: list[str | None]) -> list[Reply]:
    """Scrape a broker that has something in every family, once per Accept."""
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        async with pybroker.connect(server.url, name="metrics") as c:
            seen: list[pybroker.Message] = []
            worked: list[pybroker.Message] = []
            await c.subscribe("m.>", seen.append)
            await c.subscribe("jobs", worked.append, group="workers")
            await c.publish("m.one", b"x")
            await c.publish("jobs", b"job")
            assert (await post_json(port, "/v1/topics/m.two/messages", {"payload": "y"})).status == 200
            with trio.fail_after(TIMEOUT):
                while len(seen) < 2 or not worked:
                    await trio.sleep(0.01)
            replies = []
            for accept in accepts:
                headers = {} if accept is None else {"accept": accept}
                replies.append(await request(port, "GET", "/metrics", headers=headers))
    return replies


async def test_text_format_every_family_typed(tmp_path: Path) -> None:
    (default, plain) = await scrape(tmp_path, [None, "text/plain"])
    for reply in (default, plain):
        assert reply.status == 200
        assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert reply.headers["vary"] == "accept"
    families = {f.name: f for f in text_parser.text_string_to_metric_families(default.body.decode())}
    # The bug: every counter came back as an empty counter family
    # plus an "unknown" family per _total sample.
    assert {name: f.type for name, f in families.items()} == TEXT_FAMILIES
    for name, family in families.items():
        assert family.documentation, name
        assert family.samples, f"{name} has no samples"
        if family.type == "counter":
            assert all(s.name == name + "_total" for s in family.samples), family
    by_topic = {s.labels["topic"]: s.value for s in families["pybroker_topic_messages_in"].samples}
    assert by_topic == {"m.one": 1, "m.two": 1, "jobs": 1}
    buckets = [s for s in families["pybroker_fsync_duration_seconds"].samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 1


@pytest.mark.parametrize(
    "accept", [PROMETHEUS_ACCEPT, "application/openmetrics-text; version=1.0.0"], ids=["prometheus", "plain"]
)
async def test_openmetrics_is_negotiated_and_parses(tmp_path: Path, accept: str) -> None:
    (reply,) = await scrape(tmp_path, [accept])
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/openmetrics-text; version=")
    text = reply.body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_parser.text_string_to_metric_families(text)}
    assert {name: f.type for name, f in families.items()} == FAMILIES
    assert {name: f.unit for name, f in families.items() if f.unit} == UNITS
    for name, family in families.items():
        assert family.samples, f"{name} has no samples"
        if family.type == "counter":
            assert all(s.name == name + "_total" for s in family.samples), family
    (info,) = families["pybroker"].samples
    assert info.name == "pybroker_info" and info.labels["storage"] == "file"


async def test_promtool_check_metrics(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install -y prometheus)")
    (reply,) = await scrape(tmp_path, [None])
    with trio.fail_after(30):
        result = await trio.run_process(
            [promtool, "check", "metrics"], stdin=reply.body, capture_stdout=True, capture_stderr=True, check=False
        )
    output = (result.stdout + result.stderr).decode()
    # promtool prints one line per problem ("no help text", "counter metrics
    # should have _total suffix", ...) and exits non-zero.
    assert result.returncode == 0 and output.strip() == "", output
