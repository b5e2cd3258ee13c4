"""The dashboard in a real headless browser: Debian's chromium driven by Playwright.

The page loads, a topic appears after a publish, and its message rate
moves while messages flow. Playwright's sync API runs in a worker thread
(it has its own event loop); the broker and a TCP publisher run in Trio.

Needs the ``browser`` extra (``pip install -e '.[browser]'``) and Debian's
``chromium`` package at /usr/bin/chromium; skipped, saying which is
missing, otherwise. ``playwright install`` is never used: the browser is
the system's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio

import pybroker as client
from pybroker.server.testing import running_broker

from helpers.browser import CHROMIUM, CHROMIUM_ARGS, playwright_sync_api

TOPIC = "dash.orders"
#: Bound on the whole browser session, and on each wait inside it (ms).
TIMEOUT = 60.0
WAIT_MS = 20_000

sync_api = playwright_sync_api()


def _rate(page: Any) -> float:
    value = page.get_attribute(f'tr[data-topic="{TOPIC}"] td.rate-in', "data-value")
    return float(value) if value else 0.0


def _watch_dashboard(url: str, screenshot: Path) -> dict[str, Any]:
    """Drive the browser; return what it saw (the assertions run in the test)."""
    seen: dict[str, Any] = {"errors": []}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
            page.goto(url)
            seen["title"] = page.title()
            page.wait_for_function("document.getElementById('status').textContent === 'ready'")
            seen["tcp_port_shown"] = page.text_content("#server")
            # The publisher starts once the page is up: the topic appears...
            page.wait_for_selector(f'tr[data-topic="{TOPIC}"]')
            # ... and its rate moves off zero while messages flow.
            page.wait_for_function(
                f"""() => {{
                    const cell = document.querySelector('tr[data-topic="{TOPIC}"] td.rate-in');
                    return cell && Number(cell.dataset.value) > 0;
                }}"""
            )
            rates = [_rate(page)]
            counts = [int(page.text_content(f'tr[data-topic="{TOPIC}"] td.messages') or 0)]
            # A few more polls (the page polls once a second): still moving.
            for _ in range(3):
                page.wait_for_function(
                    f"""(before) => {{
                        const cell = document.querySelector('tr[data-topic="{TOPIC}"] td.messages');
                        return cell && Number(cell.textContent) > before;
                    }}""",
                    arg=counts[-1],
                )
                rates.append(_rate(page))
                counts.append(int(page.text_content(f'tr[data-topic="{TOPIC}"] td.messages') or 0))
            seen["rates"] = rates
            seen["counts"] = counts
            seen["rate_text"] = page.text_content(f'tr[data-topic="{TOPIC}"] td.rate-in')
            seen["rate_out"] = float(
                page.get_attribute(f'tr[data-topic="{TOPIC}"] td.rate-out', "data-value") or 0
            )
            seen["subscriptions"] = page.text_content(f'tr[data-topic="{TOPIC}"] td.subscriptions')
            seen["total_rate"] = page.text_content("#rate-in-total")
            seen["topic_count"] = page.text_content("#topic-count")
            seen["tcp_connections"] = page.text_content("#tcp-connections")
            # The chart drew something: non-transparent pixels on the canvas.
            seen["painted"] = page.evaluate(
                """() => {
                    const c = document.getElementById('chart');
                    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0;
                    for (let i = 3; i < data.length; i += 4) if (data[i]) n++;
                    return n;
                }"""
            )
            seen["legend"] = page.text_content("#legend")
            # The consumer-groups panel: the group, its member, work done.
            page.wait_for_function(
                """() => {
                    const cell = document.querySelector('tr[data-group="workers"] td.acked');
                    return cell && Number(cell.textContent) > 0;
                }"""
            )
            seen["group_pattern"] = page.text_content('tr[data-group="workers"] td:nth-child(2)')
            seen["group_members"] = page.text_content('tr[data-group="workers"] td.members')
            seen["group_oldest"] = page.text_content('tr[data-group="workers"] td.oldest')
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return seen


async def test_dashboard_shows_topics_and_moving_rates(tmp_path: Path) -> None:
    async with running_broker() as server:
        assert server.http_port is not None
        url = f"http://127.0.0.1:{server.http_port}/"
        async with client.connect(server.url, name="dashboard-publisher") as c:
            received = 0

            def count(msg: client.Message) -> None:
                nonlocal received
                received += 1

            await c.subscribe(TOPIC, count)
            # A consumer group on the same topic, for the groups panel.
            await c.subscribe(TOPIC, lambda msg: None, group="workers")

            async def publish_while_watched() -> None:
                # Wait until the page has polled once with no topic, then flow.
                with trio.fail_after(TIMEOUT):
                    while server.http is not None and server.http.requests_by_status[200] < 3:
                        await trio.sleep(0.05)
                for _ in range(int(TIMEOUT / 0.05)):  # bounded: stops on its own
                    for i in range(20):
                        await c.send(TOPIC, b"order %d" % i)
                    await c.flush()
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(publish_while_watched)
                with trio.fail_after(TIMEOUT + 10):
                    seen = await trio.to_thread.run_sync(
                        _watch_dashboard, url, tmp_path / "dashboard.png", abandon_on_cancel=True
                    )
                nursery.cancel_scope.cancel()

    assert seen["errors"] == []
    assert seen["title"] == "pybroker"
    assert f"tcp :{server.port}" in seen["tcp_port_shown"]
    assert all(r > 0 for r in seen["rates"]), seen
    assert seen["counts"] == sorted(seen["counts"]) and seen["counts"][-1] > seen["counts"][0], seen
    assert seen["rate_text"] not in ("", "0"), seen
    assert seen["rate_out"] > 0 and seen["subscriptions"] == "1", seen
    assert received > 0
    assert seen["total_rate"] not in ("", "0", "–"), seen
    assert seen["topic_count"] == "1" and seen["tcp_connections"] == "1", seen
    assert seen["painted"] > 100, seen
    assert seen["group_pattern"] == TOPIC and seen["group_members"] == "1", seen
    assert re.fullmatch(r"–|\d+\.\d s", seen["group_oldest"] or ""), seen
    assert TOPIC in seen["legend"], seen
    assert (tmp_path / "dashboard.png").stat().st_size > 0
