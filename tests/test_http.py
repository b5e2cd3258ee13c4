"""The HTTP side against a real broker: health, metrics, JSON API, SSE, bad input.

Every test starts the broker with ``running_broker`` (TCP and HTTP on
127.0.0.1, free ports) and talks to it with the standard library's
``http.client`` (run in a worker thread) or, for malformed requests, raw
Trio sockets. TCP clients use the project's client library. Every wait is
bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import trio

import pybroker as client
from pybroker.server.config import Config, HttpSettings
from pybroker.server.server import Server
from pybroker.server.testing import running_broker

from helpers.http import JSON_HEADERS, Reply, assert_error, get_json, in_thread, post_json, request
from helpers.procs import find_event, run, spawn


prometheus_parser = pytest.importorskip(
    "prometheus_client.parser", reason="prometheus_client is a test dependency (pip install -e '.[test]')"
)

#: Bound on any one wait for the broker.
TIMEOUT = 10.0

async def raw_exchange(port: int, data: bytes, *, wait_eof: bool = True) -> bytes:
    """Send ``data`` on a fresh connection and read until EOF."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if data:
                await stream.send_all(data)
            received = b""
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break  # reset after the answer: what we have is the answer
                if not chunk:
                    break
                received += chunk
                if not wait_eof and b"\r\n\r\n" in received:
                    break
            return received


def parse_raw(raw: bytes) -> Reply:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return Reply(status, headers, rest[:length])


class SseReader:
    """A blocking Server-Sent Events reader on http.client (use from a thread)."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.comments: list[str] = []
        self.retry: int | None = None

    def block(self) -> dict[str, str] | None:
        """The next block up to a blank line (None at EOF)."""
        fields: dict[str, str] = {}
        seen = False
        for _ in range(10_000):
            line = self.resp.readline()
            if not line:
                return None
            text = line.decode("utf-8").rstrip("\r\n")
            if not text:
                if seen:
                    return fields
                continue
            seen = True
            if text.startswith(":"):
                self.comments.append(text[1:].strip())
                continue
            name, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data" and "data" in fields:
                fields["data"] += "\n" + value
            elif name == "retry":
                self.retry = int(value)
            else:
                fields[name] = value
        raise AssertionError("endless SSE block")

    def event(self) -> dict[str, Any] | None:
        """The next dispatched event: {"id", "event", "data" (parsed JSON)}."""
        for _ in range(1000):
            fields = self.block()
            if fields is None:
                return None
            if "data" in fields:
                return {
                    "id": fields.get("id"),
                    "event": fields.get("event", "message"),
                    "data": json.loads(fields["data"]),
                }
        raise AssertionError("no event in 1000 blocks")

    def close(self) -> None:
        # The response holds the socket open (makefile) until it is closed too.
        self.resp.close()
        self.conn.close()


@asynccontextmanager
async def sse(port: int, path: str, headers: dict[str, str] | None = None) -> AsyncIterator[SseReader]:
    reader = await in_thread(lambda: SseReader(port, path, headers))
    try:
        assert reader.status == 200, reader.resp.read()
        assert reader.resp.getheader("content-type", "").startswith("text/event-stream")
        # The opening comment: the subscription is registered by now.
        opening = await in_thread(reader.block)
        assert opening is not None and reader.comments, opening
        yield reader
    finally:
        await in_thread(reader.close)


async def sse_events(reader: SseReader, n: int) -> list[dict[str, Any]]:
    events = []
    for _ in range(n):
        event = await in_thread(reader.event)
        assert event is not None, f"stream ended after {events}"
        events.append(event)
    return events


# -- health -----------------------------------------------------------------


async def test_healthz_and_readyz() -> None:
    async with running_broker() as server:
        assert server.http_port is not None and server.http_port != server.port
        health = await get_json(server.http_port, "/healthz")
        assert health == {"status": "ok"}
        ready = await get_json(server.http_port, "/readyz")
        assert ready == {"status": "ready"}
        head = await request(server.http_port, "HEAD", "/healthz")
        assert head.status == 200 and head.body == b""
        assert int(head.headers["content-length"]) > 0


async def test_readyz_is_503_until_the_broker_listens() -> None:
    # The HTTP side alone, before Server.serve has opened the TCP listener.
    server = Server(Config(storage="memory", host="127.0.0.1", port=0, http_port=0))
    assert server.http is not None and not server.ready
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.http.serve)
        reply = await request(port, "GET", "/readyz")
        assert_error(reply, 503, "not_ready")
        assert (await get_json(port, "/healthz"))["status"] == "ok"
        server.http.shutdown()
    server.broker.store.close()


async def test_http_can_be_disabled() -> None:
    async with running_broker(http_port=None) as server:
        assert server.http is None and server.http_port is None
        async with client.connect(server.url) as c:
            await c.publish("no.http", b"x")
    async with running_broker(http_port=-1) as server:
        assert server.http is None and server.http_port is None


# -- metrics ----------------------------------------------------------------


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(parsed: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matches = [v for lab, v in parsed.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, parsed.get(name))
    return matches[0]


async def test_metrics_parse_and_count(tmp_path: Path) -> None:
    weird = 'we"ird\\topic'  # a valid topic name that needs escaping as a label
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        async with client.connect(server.url, name="metrics-test") as c:
            received: list[client.Message] = []
            await c.subscribe("m.>", received.append)
            for i in range(5):
                await c.publish("m.tcp", b"tcp %d" % i)
            reply = await post_json(port, "/v1/topics/m.http/messages", {"messages": [{"payload": "a"}, {"payload": "b"}]})
            assert reply.status == 200, reply
            reply = await post_json(port, f"/v1/topics/{quote(weird, safe='')}/messages", {"payload": "w"})
            assert reply.status == 200, reply
            with trio.fail_after(TIMEOUT):
                while len(received) < 7:
                    await trio.sleep(0.01)

            # A subscriber that stops reading: its lag shows.
            async with client.connect(server.url, name="laggard") as slow:
                sub = await slow.subscribe("m.slow", window=2)
                for i in range(20):
                    await c.publish("m.slow", b"slow %d" % i)
                metrics = await request(port, "GET", "/metrics")
                await sub.unsubscribe()

    assert metrics.status == 200
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    parsed = samples(metrics.body.decode("utf-8"))
    assert value(parsed, "pybroker_topic_messages_in_total", topic="m.tcp") == 5
    assert value(parsed, "pybroker_topic_messages_in_total", topic="m.http") == 2
    assert value(parsed, "pybroker_topic_messages_in_total", topic=weird) == 1
    assert value(parsed, "pybroker_topic_messages_out_total", topic="m.tcp") == 5
    assert value(parsed, "pybroker_topic_in_bytes_total", topic="m.tcp") > 0
    assert value(parsed, "pybroker_topic_out_bytes_total", topic="m.http") > 0
    assert value(parsed, "pybroker_topic_log_bytes", topic="m.tcp") > 0
    assert value(parsed, "pybroker_topic_next_offset", topic="m.slow") == 20
    assert value(parsed, "pybroker_topics") == 4
    assert value(parsed, "pybroker_connections", transport="tcp") == 2
    assert value(parsed, "pybroker_connections", transport="http") >= 1
    assert value(parsed, "pybroker_connections_opened_total", transport="tcp") == 2
    # 5 + 20 TCP publishes and 2 HTTP ones, all fsynced before their ack.
    assert value(parsed, "pybroker_publish_acks_total", durability="disk") == 27
    assert value(parsed, "pybroker_publish_acks_total", durability="memory") == 0
    assert value(parsed, "pybroker_fsyncs_total") >= 1
    buckets = [(lab["le"], v) for lab, v in parsed["pybroker_fsync_duration_seconds_bucket"]]
    assert buckets[-1][0] == "+Inf"
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "histogram buckets are cumulative"
    assert buckets[-1][1] == value(parsed, "pybroker_fsync_duration_seconds_count") >= 1
    assert value(parsed, "pybroker_fsync_duration_seconds_sum") > 0
    lag = value(parsed, "pybroker_subscription_lag_messages", topic="m.slow", client="laggard")
    assert 0 < lag <= 20
    assert value(parsed, "pybroker_topic_max_lag_messages", topic="m.slow") == lag
    assert value(parsed, "pybroker_subscription_lag_messages", topic="m.tcp", client="metrics-test") == 0
    assert value(parsed, "pybroker_http_requests_total", code="200") >= 2
    assert value(parsed, "pybroker_ready") == 1


async def test_metrics_with_memory_storage_have_no_fsync_figures() -> None:
    async with running_broker() as server:
        assert server.http_port is not None
        async with client.connect(server.url) as c:
            await c.publish("mem.t", b"x")
        text = (await request(server.http_port, "GET", "/metrics")).body.decode()
    parsed = samples(text)
    assert value(parsed, "pybroker_publish_acks_total", durability="memory") == 1
    assert "pybroker_fsyncs_total" not in parsed
    assert value(parsed, "pybroker_info", storage="memory") == 1


# -- JSON API -----------------------------------------------------------------


async def test_topics_listing_and_detail_with_subscriptions() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        assert await get_json(port, "/v1/topics") == {"topics": []}
        async with client.connect(server.url, name="lister") as c:
            for i in range(3):
                await c.publish("list.a", b"%d" % i)
            await c.publish("list.b", b"x")
            await c.subscribe("list.*", lambda m: None)
            listing = await get_json(port, "/v1/topics")
            names = [t["name"] for t in listing["topics"]]
            assert names == ["list.a", "list.b"]
            a = listing["topics"][0]
            assert (a["first_offset"], a["last_offset"], a["next_offset"], a["messages"]) == (0, 2, 3, 3)
            assert a["bytes"] > 0 and a["messages_in"] == 3 and a["subscriptions"] == 1
            assert isinstance(a["message_rate"], float)
            async with sse(port, "/v1/topics/list.a/events"):
                detail = await get_json(port, "/v1/topics/list.a")
        assert detail["name"] == "list.a" and detail["last_offset"] == 2
        subs = {s["transport"]: s for s in detail["subscriptions"]}
        assert subs["tcp"]["client"] == "lister" and subs["tcp"]["pattern"] == "list.*"
        assert subs["tcp"]["lag"] == 0
        assert subs["sse"]["pattern"] == "list.a" and subs["sse"]["position"] == 3
        assert detail["consumer_groups"] == []  # the names of the groups reading it
        info = await get_json(port, "/v1/broker")
        assert info["topics"] == 2 and info["ready"] is True and info["consumer_groups"] == 0
        assert info["tcp"]["port"] == server.port and info["http"]["port"] == port


async def test_publish_one_and_many_then_fetch(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        one = await post_json(port, "/v1/topics/pub.t/messages", {"payload": "héllo", "headers": {"k": "v"}})
        assert one.status == 200, one
        body = one.json()
        assert body["offset"] == 0 and body["count"] == 1 and body["durability"] == "disk"
        assert server.broker.store.fsyncs >= 1  # type: ignore[attr-defined]
        raw = bytes(range(256))
        many = await post_json(
            port,
            "/v1/topics/pub.t/messages",
            {"messages": [{"payload": "two"}, {"payload_base64": base64.b64encode(raw).decode()}, {"payload": ""}]},
        )
        assert many.json() | {"timestamp_us": 0} == {
            "topic": "pub.t", "base_offset": 1, "last_offset": 3, "count": 3,
            "durability": "disk", "timestamp_us": 0,
        }
        fetched = await get_json(port, "/v1/topics/pub.t/messages")
        msgs = fetched["messages"]
        assert [m["offset"] for m in msgs] == [0, 1, 2, 3]
        assert msgs[0]["payload"] == "héllo" and msgs[0]["headers"] == {"k": "v"}
        assert base64.b64decode(msgs[2]["payload_base64"]) == raw and "payload" not in msgs[2]
        assert msgs[3]["payload"] == ""
        assert fetched["next_offset"] == 4 and fetched["first_offset"] == 0
        # From inside a batch, with a limit.
        part = await get_json(port, "/v1/topics/pub.t/messages?from=2&limit=1")
        assert [m["offset"] for m in part["messages"]] == [2] and part["next_offset"] == 3
        past = await get_json(port, "/v1/topics/pub.t/messages?from=99")
        assert past["messages"] == [] and past["end_offset"] == 4
        # And the TCP side reads the same messages.
        async with client.connect(server.url) as c:
            async with c.subscribe("pub.t", start="earliest") as sub:
                got = []
                with trio.fail_after(TIMEOUT):
                    async for msg in sub:
                        got.append(msg.payload)
                        if len(got) == 4:
                            break
        assert got == ["héllo".encode(), b"two", raw, b""]


async def test_http_publish_reaches_tcp_subscriber() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        async with client.connect(server.url) as c:
            async with c.subscribe("bridge.>") as sub:
                reply = await post_json(port, "/v1/topics/bridge.in/messages", {"payload": "from http", "headers": {"via": "rest"}})
                assert reply.status == 200, reply
                with trio.fail_after(TIMEOUT):
                    msg = await sub.__anext__()
        assert (msg.topic, msg.payload, dict(msg.headers), msg.offset) == (
            "bridge.in", b"from http", {"via": "rest"}, 0,
        )


# -- Server-Sent Events ---------------------------------------------------------


async def test_tcp_publish_appears_on_sse_and_resumes(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        async with client.connect(server.url) as c:
            for i in range(3):
                await c.publish("sse.t", b"old %d" % i)
            # No start given: only what is published from now on.
            async with sse(port, "/v1/topics/sse.t/events") as reader:
                assert reader.retry is not None
                for i in range(3):
                    await c.publish("sse.t", b"new %d" % i, headers={"n": str(i)})
                events = await sse_events(reader, 3)
            assert [e["id"] for e in events] == ["3", "4", "5"]
            assert [e["data"]["payload"] for e in events] == ["new 0", "new 1", "new 2"]
            assert events[0]["data"]["headers"] == {"n": "0"} and events[0]["data"]["topic"] == "sse.t"

            # EventSource reconnecting after id 4: resumes at 5, then live.
            async with sse(port, "/v1/topics/sse.t/events", {"last-event-id": "4"}) as reader:
                first = await sse_events(reader, 1)
                await c.publish("sse.t", b"after")
                second = await sse_events(reader, 1)
            assert [e["id"] for e in first + second] == ["5", "6"]
            assert second[0]["data"]["payload"] == "after"

            # ?from= replays from an offset (Last-Event-ID wins when both are given).
            async with sse(port, "/v1/topics/sse.t/events?from=1") as reader:
                replay = await sse_events(reader, 6)
            assert [int(e["id"]) for e in replay] == [1, 2, 3, 4, 5, 6]
            async with sse(port, "/v1/topics/sse.t/events?from=0", {"last-event-id": "5"}) as reader:
                assert [e["id"] for e in await sse_events(reader, 1)] == ["6"]


async def test_sse_on_a_topic_created_later_and_binary_payloads() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        async with sse(port, "/v1/topics/later.t/events") as reader:
            assert "later.t" not in server.broker.router.topics
            async with client.connect(server.url) as c:
                await c.publish("later.t", b"\xff\x00binary")
                await c.publish("later.t", b"text")
            events = await sse_events(reader, 2)
        assert [e["id"] for e in events] == ["0", "1"]
        assert base64.b64decode(events[0]["data"]["payload_base64"]) == b"\xff\x00binary"
        assert events[1]["data"]["payload"] == "text"
        # The stream's subscription is gone once the client left.
        with trio.fail_after(TIMEOUT):
            while server.broker.router.topics["later.t"].subs:
                await trio.sleep(0.01)


async def test_sse_catches_up_on_a_long_backlog_in_order() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        for part in range(3):  # batches of 900: the stream sends 1000 events at most per step
            body = {"messages": [{"payload": f"m{part * 900 + i}"} for i in range(900)]}
            assert (await post_json(port, "/v1/topics/backlog.t/messages", body)).status == 200
        async with sse(port, "/v1/topics/backlog.t/events?from=5") as reader:
            events = await sse_events(reader, 2700 - 5)
        assert [int(e["id"]) for e in events] == list(range(5, 2700))
        assert all(e["data"]["payload"] == f"m{e['id']}" for e in events)


async def test_sse_reports_messages_lost_to_retention() -> None:
    async with running_broker(memory_retention_bytes=1024) as server:
        port = server.http_port
        assert port is not None
        async with client.connect(server.url) as c:
            for i in range(50):
                await c.publish("lost.t", b"%04d" % i + b"x" * 100)
        first = server.broker.router.topics["lost.t"].log.first_offset
        assert first > 0
        async with sse(port, "/v1/topics/lost.t/events?from=0") as reader:
            lost, after = await sse_events(reader, 2)
        assert lost["event"] == "lost" and lost["data"] == {"topic": "lost.t", "from": 0, "to": first - 1, "reason": "retention"}
        assert after["event"] == "message" and int(after["id"]) == first


async def test_sse_stream_ends_when_the_broker_stops() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        reader = await in_thread(lambda: SseReader(port, "/v1/topics/stop.t/events"))
        assert reader.status == 200
        assert await in_thread(reader.block) is not None
        # An idle keep-alive connection too: neither may hold up the shutdown.
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
    assert trio.current_time() - started < TIMEOUT
    assert await in_thread(reader.event) is None  # EOF after the last chunk
    await in_thread(reader.close)
    await idle.aclose()


# -- bad input ------------------------------------------------------------------


async def test_unknown_paths_and_wrong_methods() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        assert_error(await request(port, "GET", "/nope"), 404, "not_found")
        assert_error(await request(port, "GET", "/v1/topics/"), 404)
        assert_error(await request(port, "GET", "/v1/topics/a/b/c/d"), 404)
        assert_error(await request(port, "GET", "/v1/topics/no.such.topic"), 404, "topic_not_found")
        assert_error(await request(port, "GET", "/v1/topics/no.such/messages"), 404, "topic_not_found")
        reply = await request(port, "DELETE", "/v1/topics")
        assert_error(reply, 405, "method_not_allowed")
        assert reply.headers["allow"] == "GET, HEAD, OPTIONS"
        reply = await request(port, "PUT", "/v1/topics/x/messages", "{}", JSON_HEADERS)
        assert_error(reply, 405)
        assert reply.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, POST"
        assert_error(await request(port, "POST", "/healthz", "{}", JSON_HEADERS), 405)
        # Bad topic names in the path.
        assert_error(await request(port, "GET", "/v1/topics/a..b"), 400, "bad_topic")
        assert_error(await post_json(port, "/v1/topics/a.*/messages", {"payload": "x"}), 400, "bad_topic")
        assert_error(await request(port, "GET", "/v1/topics/a%20b/events"), 400, "bad_topic")
        assert_error(await request(port, "GET", "/v1/topics/%ff/messages"), 400)


async def test_bad_query_values() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        assert (await post_json(port, "/v1/topics/q.t/messages", {"payload": "x"})).status == 200
        base = "/v1/topics/q.t/messages"
        for query in [
            "from=-1", "from=abc", "from=", "from=1.5", "from=99999999999999999999999",
            "limit=0", "limit=100000", "limit=ten", "limit=-5",
            "frm=1", "from=1&from=2", "from=%ff",
        ]:
            assert_error(await request(port, "GET", f"{base}?{query}"), 400)
        assert_error(await request(port, "GET", "/v1/topics/q.t/events?from=x"), 400)
        assert_error(await request(port, "GET", "/v1/topics/q.t/events", headers={"last-event-id": "nope"}), 400)
        assert_error(await request(port, "GET", "/v1/topics?x=1"), 400)
        # Good values still work on the same broker.
        assert len((await get_json(port, f"{base}?from=0&limit=1000"))["messages"]) == 1


async def test_bad_publish_bodies() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        path = "/v1/topics/bad.t/messages"
        assert_error(await request(port, "POST", path, "{not json", JSON_HEADERS), 400)
        assert_error(await request(port, "POST", path, b"\xff\xfe", JSON_HEADERS), 400)
        assert_error(await request(port, "POST", path, "", JSON_HEADERS), 400)
        assert_error(await request(port, "POST", path, '{"payload": "x"}', {"content-type": "text/html"}), 415)
        assert_error(
            await request(port, "POST", path, "payload=x", {"content-type": "application/x-www-form-urlencoded"}), 415
        )
        for body in [
            [], "text", {}, {"payload": 1}, {"payload": "x", "payload_base64": "eA=="},
            {"payload_base64": "not base64!"}, {"payload": "x", "headers": {"k": 1}},
            {"payload": "x", "headers": ["k"]}, {"payload": "x", "headers": {"": "v"}},
            {"payload": "x", "extra": 1}, {"messages": []}, {"messages": "x"},
            {"messages": [{"payload": "ok"}, {"nope": 1}]}, {"messages": [{"payload": "x"}], "payload": "y"},
            {"payload": "\ud800"},
        ]:
            assert_error(await post_json(port, path, body), 422)
        # Nothing of it was published.
        assert "bad.t" not in server.broker.router.topics
        assert (await post_json(port, path, {"payload": "fine"})).json()["offset"] == 0


async def test_too_many_messages_in_one_request() -> None:
    limits = Config().limits
    async with running_broker(limits=attrs.evolve(limits, max_batch_messages=3)) as server:
        port = server.http_port
        assert port is not None
        body = {"messages": [{"payload": str(i)} for i in range(4)]}
        assert_error(await post_json(port, "/v1/topics/lim.t/messages", body), 422)
        body = {"messages": [{"payload": str(i)} for i in range(3)]}
        assert (await post_json(port, "/v1/topics/lim.t/messages", body)).status == 200


async def test_a_published_batch_must_fit_a_subscribers_deliver() -> None:
    # protocol.md: a DELIVER body holds sub_id 4, base offset 8, timestamp 8,
    # the topic as a str16 (2 + its bytes) and the batch; a one-message batch
    # is 8 + 6 + the payload with no headers.
    limits = attrs.evolve(Config().limits, max_frame_bytes=2000)
    topic = "fit.ü"
    largest_batch = 2000 - 22 - len(topic.encode())
    largest_payload = largest_batch - 14
    async with running_broker(limits=limits) as server:
        port = server.http_port
        assert port is not None
        path = "/v1/topics/" + quote(topic) + "/messages"
        too_big = await post_json(port, path, {"payload": "x" * (largest_payload + 1)})
        body = assert_error(too_big, 413)
        assert f"the batch is {largest_batch + 1} bytes, limit {largest_batch}" in body["error"]
        ok = await post_json(port, path, {"payload": "x" * largest_payload})
        assert ok.status == 200, ok
        assert ok.json()["offset"] == 0
        # ...and it reaches a subscriber in one DELIVER of exactly the limit.
        async with client.connect(server.url) as c:
            sub = await c.subscribe(topic, start="earliest")
            with trio.fail_after(TIMEOUT):
                msg = await sub.__anext__()
        assert msg.offset == 0 and msg.payload == b"x" * largest_payload


async def test_oversized_bodies_get_413() -> None:
    async with running_broker(http=HttpSettings(max_body_bytes=1024)) as server:
        port = server.http_port
        assert port is not None
        path = "/v1/topics/big.t/messages"
        big = json.dumps({"payload": "x" * 5000})
        assert_error(await request(port, "POST", path, big, JSON_HEADERS), 413, "payload_too_large")
        # Announced far over the limit and never sent: answered without reading.
        raw = await raw_exchange(
            port,
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n",
        )
        assert_error(parse_raw(raw), 413)
        # Chunked, no length announced: cut off once over the limit.
        chunk = b"x" * 600
        raw = await raw_exchange(
            port,
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3
            + b"0\r\n\r\n",
        )
        assert_error(parse_raw(raw), 413)
        assert "big.t" not in server.broker.router.topics
        # Under the limit is fine.
        assert (await post_json(port, path, {"payload": "x" * 500})).status == 200


async def test_malformed_requests_get_400_with_json() -> None:
    async with running_broker(http=HttpSettings(max_header_bytes=4096)) as server:
        port = server.http_port
        assert port is not None
        for data in [
            b"GARBAGE\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nNo colon here\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
            b"GET healthz HTTP/1.1\r\nHost: a\r\n\r\n",  # not a path
            b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
        ]:
            reply = parse_raw(await raw_exchange(port, data))
            assert_error(reply, 400)
            assert reply.headers.get("connection") == "close", reply
        # Request line plus headers over the limit.
        huge = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n"
        assert_error(parse_raw(await raw_exchange(port, huge)), 431, "headers_too_large")
        # The broker still answers.
        assert (await get_json(port, "/healthz"))["status"] == "ok"


async def test_keep_alive_and_pipelining() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        assert server.http is not None

        def three_on_one_connection() -> list[int]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            try:
                statuses = []
                for path in ["/healthz", "/nope", "/v1/topics"]:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    resp.read()
                    statuses.append(resp.status)
                return statuses
            finally:
                conn.close()

        before = server.http.connections_total
        assert await in_thread(three_on_one_connection) == [200, 404, 200]
        assert server.http.connections_total == before + 1
        raw = await raw_exchange(
            port,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        assert raw.count(b"HTTP/1.1 200 OK") == 2, raw
        assert b'{"status":"ok"}' in raw and b'{"status":"ready"}' in raw


async def test_expect_100_continue() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        body = b'{"payload": "after 100"}'
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(
                    b"POST /v1/topics/cont.t/messages HTTP/1.1\r\nHost: a\r\n"
                    b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
                )
                interim = b""
                while b"\r\n\r\n" not in interim:
                    interim += await stream.receive_some(4096)
                assert interim.startswith(b"HTTP/1.1 100 "), interim
                await stream.send_all(body)
                rest = interim.partition(b"\r\n\r\n")[2]
                while chunk := await stream.receive_some(4096):
                    rest += chunk
        assert parse_raw(rest).json()["offset"] == 0


async def test_stuck_http_clients_are_timed_out_and_tcp_is_undisturbed() -> None:
    settings = HttpSettings(request_timeout=0.5, keepalive_timeout=0.5)
    async with running_broker(http=settings) as server:
        port = server.http_port
        assert port is not None
        async with client.connect(server.url) as c:
            async with c.subscribe("steady.t") as sub:
                got: list[int] = []

                async def stuck_clients() -> tuple[bytes, bytes, bytes]:
                    async with trio.open_nursery() as nursery:
                        results: dict[str, bytes] = {}

                        async def one(key: str, data: bytes) -> None:
                            results[key] = await raw_exchange(port, data)

                        # Half a request; nothing at all; a body that never ends.
                        nursery.start_soon(one, "half", b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
                        nursery.start_soon(one, "silent", b"")
                        nursery.start_soon(
                            one,
                            "body",
                            b"POST /v1/topics/s.t/messages HTTP/1.1\r\nHost: a\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"pay",
                        )
                    return results["half"], results["silent"], results["body"]

                async def publish_and_receive() -> None:
                    for i in range(50):
                        await c.publish("steady.t", b"%d" % i)
                        got.append(int((await sub.__anext__()).payload))
                        await trio.sleep(0.01)

                with trio.fail_after(TIMEOUT * 2):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(publish_and_receive)
                        half, silent, body = await stuck_clients()
                assert got == list(range(50))
        assert_error(parse_raw(half), 408, "request_timeout")
        assert_error(parse_raw(body), 408)
        assert silent == b""  # closed without an answer: it never asked anything
        assert (await get_json(port, "/healthz"))["status"] == "ok"


async def test_connection_limit() -> None:
    async with running_broker(http=HttpSettings(max_connections=2, request_timeout=5)) as server:
        port = server.http_port
        assert port is not None
        assert server.http is not None
        a = await trio.open_tcp_stream("127.0.0.1", port)
        b = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            with trio.fail_after(TIMEOUT):
                while len(server.http.connections) < 2:
                    await trio.sleep(0.01)
            refused = parse_raw(await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"))
            assert_error(refused, 503, "unavailable")
        finally:
            await a.aclose()
            await b.aclose()
        with trio.fail_after(TIMEOUT):
            while server.http.connections:
                await trio.sleep(0.01)
        assert (await get_json(port, "/healthz"))["status"] == "ok"


# -- the command line -------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--http-port", "0"], ["--no-http"]], ids=["default", "port-0", "no-http"])
async def test_cli_serve_http_port(tmp_path: Path, extra: list[str]) -> None:
    args = ["serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--log-format", "json", *extra]
    async with spawn(args, "serve", cwd=tmp_path) as child:
        listening = await child.stderr.wait_for(find_event("listening"))
        http_port = listening["http_port"]
        if "--no-http" in extra:
            assert http_port is None
        else:
            # With --port 0 the HTTP port is a free one as well.
            assert isinstance(http_port, int) and http_port not in (0, 7421, listening["port"])
            assert (await get_json(http_port, "/readyz"))["status"] == "ready"
        child.process.send_signal(signal.SIGTERM)
        assert await child.wait(TIMEOUT) == 0


async def test_serve_help_mentions_http() -> None:
    result = await run(["serve", "--help"])
    assert result.returncode == 0, result
    out = result.stdout.decode()
    assert "--http-port" in out and "--no-http" in out and "--http-host" in out


async def test_metrics_show_consumer_groups() -> None:
    async with running_broker() as server:
        port = server.http_port
        assert port is not None
        async with client.connect(server.url) as c:
            dead: list[client.Message] = []
            await c.subscribe("dlq.g", dead.append)
            done: list[int] = []

            def work(msg: client.Message) -> None:
                if msg.payload == b"poison":
                    raise ValueError("poison")  # nak: redelivered, then dead-lettered
                done.append(msg.offset)

            await c.subscribe("q", work, group="g", max_deliver=2)
            await c.publish_many("q", [b"a", b"poison", b"b"])
            with trio.fail_after(TIMEOUT):
                while len(done) < 2 or not dead:
                    await trio.sleep(0.01)
            metrics = await request(port, "GET", "/metrics")
    parsed = samples(metrics.body.decode("utf-8"))
    assert value(parsed, "pybroker_group_members", group="g") == 1
    assert value(parsed, "pybroker_group_pending", group="g") == 0
    assert value(parsed, "pybroker_group_delivered_total", group="g") == 3
    assert value(parsed, "pybroker_group_redelivered_total", group="g") == 1
    assert value(parsed, "pybroker_group_acked_total", group="g") == 2
    assert value(parsed, "pybroker_group_dead_lettered_total", group="g") == 1
