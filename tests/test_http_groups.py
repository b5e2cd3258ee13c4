"""Consumer groups over HTTP (docs/http.md, "Consumer groups"): the same
documents as the protocol's GROUPS, the same rules, paged the same way."""

from __future__ import annotations

from pathlib import Path

import pybroker
from pybroker.server.config import Limits
from pybroker.server.testing import running_broker

from helpers.http import assert_error, get_json, request


async def test_groups_are_listed_inspected_and_counted_per_topic(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        assert (await get_json(port, "/v1/groups")) == {"groups": []}
        async with pybroker.connect(server.url) as c:
            await c.create_group("billing", "orders.>")
            await c.subscribe("orders.>", lambda m: None, group="audit")
            await c.publish("orders.eu", b"1")
            listing = await get_json(port, "/v1/groups")
            assert [g["group"] for g in listing["groups"]] == ["audit", "billing"]
            assert "next" not in listing
            audit = await get_json(port, "/v1/groups/audit")
            assert audit["members"] == 1 and audit["pattern"] == "orders.>"
            # The protocol's document, field for field.
            assert set(audit) == set(await c.groups("inspect", "audit"))
            topic = await get_json(port, "/v1/topics/orders.eu")
            assert topic["consumer_groups"] == ["audit", "billing"]
            (summary,) = (await get_json(port, "/v1/topics"))["topics"]
            assert summary["consumer_groups"] == 2 and summary["subscriptions"] == 0
        assert_error(await request(port, "GET", "/v1/groups/nobody"), 404, "group_not_found")
        assert_error(await request(port, "GET", "/v1/groups?page=2"), 400, "bad_request")


async def test_a_long_group_listing_pages_with_after(tmp_path: Path) -> None:
    names = [f"g{i:03d}-{'x' * 40}" for i in range(60)]
    async with running_broker(data_dir=tmp_path, limits=Limits(max_frame_bytes=4096)) as server:
        port = server.http_port
        assert port is not None
        async with pybroker.connect(server.url) as c:
            for name in names:
                await c.create_group(name, "jobs.>")
        seen: list[str] = []
        after = ""
        for _ in range(len(names)):
            page = await get_json(port, "/v1/groups" + (f"?after={after}" if after else ""))
            seen += [g["group"] for g in page["groups"]]
            if "next" not in page:
                break
            after = page["next"]
        assert seen == names
        assert after  # it did take more than one page
