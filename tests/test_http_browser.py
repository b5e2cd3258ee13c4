"""CORS and pattern event streams in a real browser: Debian's chromium,
driven by Playwright, runs a page served from another origin (a second,
tiny HTTP server on its own port) that opens an ``EventSource`` on the
broker and calls its JSON API with ``fetch``.

- From an allowed origin (``--http-cors-origin``) the EventSource receives
  events of every topic of its pattern; when the broker drops the stream,
  the browser reconnects by itself with ``Last-Event-ID`` and gets what was
  published meanwhile on each topic, none twice. A fetch with a custom
  header (so a preflight first) publishes.
- From an origin that is not allowed the browser blocks both.

Playwright's sync API runs in a worker thread; it calls back into Trio
(``trio.from_thread``) to publish and to drop streams. Skipped, saying why,
without the ``browser`` extra or /usr/bin/chromium (as
tests/test_http_dashboard.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import pytest
import trio

import pybroker as client
from pybroker.server.config import HttpSettings
from pybroker.server.server import Server
from pybroker.server.testing import running_broker

from helpers.browser import CHROMIUM, CHROMIUM_ARGS, playwright_sync_api

TIMEOUT = 60.0
WAIT_MS = 20_000

sync_api = playwright_sync_api()

#: The page: an EventSource on ?src, everything it sees kept on window.
PAGE = b"""<!doctype html>
<title>other origin</title>
<script>
window.got = []; window.opens = 0; window.errors = 0;
const es = new EventSource(new URLSearchParams(location.search).get('src'));
window.es = es;
es.onopen = () => { window.opens++; };
es.onmessage = (e) => { window.got.push({data: JSON.parse(e.data), id: e.lastEventId}); };
es.onerror = () => { window.errors++; };
</script>
"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def page_server() -> Iterator[str]:
    """A second origin: a tiny HTTP server serving PAGE; yields its origin."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


def streams_open(server: Server) -> int:
    """HTTP connections streaming events right now."""
    assert server.http is not None
    return sum(1 for conn in server.http.connections.values() if conn._stream_scope is not None)


def _browse(server: Server, c: client.Client, allowed: str, blocked: str) -> dict[str, Any]:
    """Drive the browser (in a worker thread); return what it saw."""
    assert server.http is not None
    http = server.http
    api = f"http://127.0.0.1:{http.port}"
    src = quote(f"{api}/v1/events?pattern=br.*", safe="")
    seen: dict[str, Any] = {"errors": [], "console": []}

    def publish(topic: str, payload: bytes) -> None:
        trio.from_thread.run(c.publish, topic, payload)

    def drop_streams() -> None:
        for conn in list(http.connections.values()):
            if conn._stream_scope is not None:
                conn.stop()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
            page.on("console", lambda msg: seen["console"].append(msg.text))
            page.goto(f"{allowed}/?src={src}")
            page.wait_for_function("window.opens === 1")
            publish("br.a", b"a0")
            publish("br.b", b"b0")
            publish("other.x", b"not matched")
            page.wait_for_function("window.got.length >= 2")
            seen["first_id"] = page.evaluate("window.got[window.got.length - 1].id")

            # The broker drops the stream; while the browser waits to
            # reconnect (retry: 2000 ms), more arrives on both topics and a new one.
            trio.from_thread.run_sync(drop_streams)
            page.wait_for_function("window.errors >= 1")  # EventSource saw it end
            publish("br.a", b"a1")
            publish("br.c", b"c0")
            seen["sse_while_away"] = trio.from_thread.run_sync(streams_open, server)
            page.wait_for_function("window.opens === 2 && window.got.length >= 4")
            seen["got"] = page.evaluate("window.got")

            # fetch with a custom header: a preflight, then the publish.
            seen["fetch_publish"] = page.evaluate(
                """async (url) => {
                    const r = await fetch(url, {method: 'POST', body: 'from the page',
                        headers: {'content-type': 'text/plain', 'x-pybroker-header-origin': 'page'}});
                    return [r.status, await r.json()];
                }""",
                f"{api}/v1/topics/br.fetched/messages",
            )
            page.close()

            # Another origin: the browser keeps both from the page.
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("console", lambda msg: seen["console"].append(msg.text))
            page.goto(f"{blocked}/?src={src}")
            page.wait_for_function("window.errors >= 1")
            seen["blocked_state"] = page.evaluate("window.es.readyState")  # 2: CLOSED, no retry
            publish("br.a", b"a2")
            seen["blocked_fetch"] = page.evaluate(
                """async (url) => {
                    try { await fetch(url); return 'read'; } catch (e) { return e.name; }
                }""",
                f"{api}/v1/topics",
            )
            seen["blocked_got"] = page.evaluate("window.got.length")
            seen["blocked_opens"] = page.evaluate("window.opens")
        finally:
            browser.close()
    return seen


async def test_event_source_and_fetch_from_another_origin(tmp_path: Path) -> None:
    with page_server() as allowed, page_server() as blocked:
        assert allowed != blocked
        async with running_broker(data_dir=tmp_path, http=HttpSettings(cors_origins=(allowed,))) as server:
            async with client.connect(server.url) as c:
                with trio.fail_after(TIMEOUT + 10):
                    seen = await trio.to_thread.run_sync(
                        _browse, server, c, allowed, blocked, abandon_on_cancel=True
                    )
                async with c.subscribe("br.fetched", start="earliest") as sub:
                    with trio.fail_after(10):
                        fetched = await sub.__anext__()

    assert seen["errors"] == [], seen
    got = [(e["data"]["topic"], e["data"]["payload"]) for e in seen["got"]]
    assert got[:2] == [("br.a", "a0"), ("br.b", "b0")], seen
    # Resumed on every topic: what came while away, none twice.
    assert sorted(got[2:]) == [("br.a", "a1"), ("br.c", "c0")], seen
    assert seen["sse_while_away"] == 0, "the browser was back before the publishes: resume not exercised"
    assert seen["first_id"].startswith("@") and "br.a=0" in seen["first_id"] and "br.b=0" in seen["first_id"]
    status, answer = seen["fetch_publish"]
    assert status == 200 and answer["offset"] == 0, seen
    assert fetched.payload == b"from the page" and dict(fetched.headers) == {"origin": "page"}

    assert seen["blocked_state"] == 2 and seen["blocked_got"] == 0 and seen["blocked_opens"] == 0, seen
    assert seen["blocked_fetch"] == "TypeError", seen
    assert any("CORS" in line for line in seen["console"]), seen["console"]
