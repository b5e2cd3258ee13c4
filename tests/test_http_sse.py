"""Server-Sent Events over a pattern (``GET /v1/events?pattern=...``): every
matching topic, topics created later, events naming their topic, and
resuming every topic from ``Last-Event-ID`` the way an EventSource does
(the reader, helpers/sse.py, keeps the last id exactly as the HTML spec
says a browser does: any block's ``id:`` field, events or not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import pybroker
from pybroker.server.http.sse import MAX_ID_BYTES, format_id, parse_id
from pybroker.server.http.messages import HttpError
from pybroker.server.testing import running_broker

from helpers.auth import user_entry, write_users
from helpers.http import assert_error, post_json, request
from helpers.sse import events, stream


def where(evs: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(e["data"]["topic"], e["data"]["offset"]) for e in evs]


async def test_every_matching_topic_and_resume_on_each(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        async with pybroker.connect(server.url) as c:
            await c.publish("orders.eu", b"before")  # not sent: the stream starts with new ones
            async with stream(port, "/v1/events?pattern=orders.*") as reader:
                await c.publish("orders.eu", b"eu 1")
                await c.publish("orders.us", b"us 0")  # a topic created after the stream started
                await c.publish("other.x", b"not matched")
                await c.publish("orders.eu.deep", b"not matched either")
                await c.publish("orders.eu", b"eu 2")
                first = await events(reader, 3)
                last_id = reader.last_event_id
                detail = (await request(port, "GET", "/v1/topics/orders.eu")).json()
            assert where(first) == [("orders.eu", 1), ("orders.us", 0), ("orders.eu", 2)]
            assert [e["data"]["payload"] for e in first] == ["eu 1", "us 0", "eu 2"]
            assert {"transport": "sse", "pattern": "orders.*"}.items() <= detail["subscriptions"][0].items()
            since, positions = parse_id(last_id, "orders.*")
            assert positions == {"orders.eu": 2, "orders.us": 0} and since > 0

            # Away: more on both, and a topic that did not exist yet.
            await c.publish("orders.us", b"us 1")
            await c.publish("orders.eu", b"eu 3")
            await c.publish("orders.jp", b"jp 0")
            async with stream(port, "/v1/events?pattern=orders.*", last_id) as reader:
                resumed = await events(reader, 3)
                await c.publish("orders.eu", b"eu 4")
                live = await events(reader, 1)
            assert sorted(where(resumed)) == [("orders.eu", 3), ("orders.jp", 0), ("orders.us", 1)]
            assert where(live) == [("orders.eu", 4)]
            assert parse_id(reader.last_event_id, "orders.*") == (
                since, {"orders.eu": 4, "orders.us": 1, "orders.jp": 0},
            )


async def test_a_stream_that_got_nothing_resumes_from_its_start(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        async with pybroker.connect(server.url) as c:
            await c.publish("jobs.a", b"old")
            async with stream(port, "/v1/events?pattern=jobs.>") as reader:
                # The opening block carries an id (no event): what a browser
                # would send back had the stream dropped now.
                pass
            opening_id = reader.last_event_id
            assert opening_id.startswith("@"), reader.last_event_id
            await c.publish("jobs.a", b"missed a")
            await c.publish("jobs.b.c", b"missed b")
            async with stream(port, "/v1/events?pattern=jobs.>", opening_id) as reader:
                got = await events(reader, 2)
        assert sorted(where(got)) == [("jobs.a", 1), ("jobs.b.c", 0)]


async def test_from_earliest_and_long_backlogs_in_order(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        for topic in ("bulk.a", "bulk.b"):
            for part in range(2):  # 1,800 per topic: several writes of at most 1,000 events
                body = {"messages": [{"payload": f"{topic} {part * 900 + i}"} for i in range(900)]}
                assert (await post_json(port, f"/v1/topics/{topic}/messages", body)).status == 200
        async with stream(port, "/v1/events?pattern=bulk.*&from=earliest") as reader:
            got = await events(reader, 3600)
    for topic in ("bulk.a", "bulk.b"):
        offsets = [e["data"]["offset"] for e in got if e["data"]["topic"] == topic]
        assert offsets == list(range(1800)), topic
    assert all(e["data"]["payload"] == f"{e['data']['topic']} {e['data']['offset']}" for e in got)


async def test_lost_messages_are_reported_per_topic() -> None:
    async with running_broker(memory_retention_bytes=1024) as server:
        port = server.http_port
        assert port is not None
        async with pybroker.connect(server.url) as c:
            for i in range(50):
                await c.publish("gone.t", b"%04d" % i + b"x" * 100)
        first = server.broker.router.topics["gone.t"].log.first_offset
        assert first > 0
        # Resuming after offset 0: 1 .. first-1 are gone.
        async with stream(port, "/v1/events?pattern=gone.*", "@0,gone.t=0") as reader:
            lost, after = await events(reader, 2)
    assert lost == {"event": "lost", "data": {"topic": "gone.t", "from": 1, "to": first - 1, "reason": "retention"}}
    assert (after["data"]["topic"], after["data"]["offset"]) == ("gone.t", first)


async def test_bad_pattern_requests(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        assert_error(await request(port, "GET", "/v1/events"), 400)
        assert_error(await request(port, "GET", "/v1/events?pattern="), 400)
        assert_error(await request(port, "GET", "/v1/events?pattern=a..b"), 400, "bad_pattern")
        assert_error(await request(port, "GET", "/v1/events?pattern=a.>.b"), 400, "bad_pattern")
        assert_error(await request(port, "GET", "/v1/events?pattern=a.*&from=5"), 400)
        assert_error(await request(port, "GET", "/v1/events?pattern=a.*&x=1"), 400)
        assert_error(await request(port, "GET", "/v1/events?pattern=_inbox.*"), 403, "permission_denied")
        for bad_id in ["41", "@x", "@1,b.c=1", "@1,a.b", "@1,a.b=-1", "@1,%ff=1", "@1,=3"]:
            reply = await request(port, "GET", "/v1/events?pattern=a.*", headers={"last-event-id": bad_id})
            assert_error(reply, 400)
        assert_error(await request(port, "POST", "/v1/events?pattern=a.*", "{}"), 405)


async def test_patterns_need_read_permission_on_the_whole_pattern(tmp_path: Path) -> None:
    token = "a-token-of-enough-length-5678"
    users = write_users(tmp_path, {"eu": user_entry(token=token, subscribe=["orders.eu", "orders.eu.>"])})
    async with running_broker(data_dir=tmp_path / "data", auth_file=users) as server:
        port = server.http_port
        assert port is not None
        auth = {"authorization": f"Bearer {token}"}
        reply = await request(port, "GET", "/v1/events?pattern=orders.*", headers=auth)
        assert_error(reply, 403, "permission_denied")
        reply = await request(port, "HEAD", "/v1/events?pattern=orders.eu.>", headers=auth)
        assert reply.status == 200
        assert_error(await request(port, "GET", "/v1/events?pattern=orders.eu.>"), 401)


@pytest.mark.parametrize("name", ["a,b=c", "we%ird@x", "ü.topic", "x.@1", 'q"uote'])
def test_event_ids_round_trip_any_topic_name(name: str) -> None:
    text = format_id(123, {"a.b": 1, name: 7})
    assert text.isascii() and "\n" not in text and text.startswith("@123,")
    assert parse_id(text, ">") == (123, {"a.b": 1, name: 7})
    assert quote(name, safe=".-_~") in text


def test_event_ids_are_bounded_most_recent_first() -> None:
    last_sent = {f"topic.{i:04d}.{'x' * 40}": i for i in range(500)}
    text = format_id(5, last_sent)
    assert len(text) <= MAX_ID_BYTES
    since, kept = parse_id(text, ">")
    assert since == 5 and 0 < len(kept) < 500
    # The most recently sent (last in the dict) are the ones kept.
    assert list(kept) == list(reversed(list(last_sent)))[: len(kept)]
    with pytest.raises(HttpError):
        parse_id(text, "other.>")
