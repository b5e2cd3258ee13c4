"""CORS on the HTTP side, header by header, against a real broker: who gets
``Access-Control-Allow-Origin``, preflights, and the ``--http-cors-origin``
flag of ``pybroker serve``. (A real browser's EventSource from another
origin: tests/test_http_browser.py.)"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from pybroker.server.config import HttpSettings
from pybroker.server.testing import running_broker

from helpers.auth import user_entry, write_users
from helpers.http import assert_error, request
from helpers.procs import find_event, run, spawn

APP = "http://app.example:8080"
OTHER = "http://evil.example"
TIMEOUT = 10.0
TOKEN = "a-token-of-enough-length-1234"


async def test_no_cors_by_default(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        reply = await request(port, "GET", "/v1/topics", headers={"origin": APP})
        assert reply.status == 200 and not any(h.startswith("access-control-") for h in reply.headers)
        assert "vary" not in reply.headers
        preflight = {"origin": APP, "access-control-request-method": "POST"}
        reply = await request(port, "OPTIONS", "/v1/topics/t/messages", headers=preflight)
        assert_error(reply, 403, "origin_not_allowed")
        assert "access-control-allow-origin" not in reply.headers
        # OPTIONS that is no preflight: which methods the path takes.
        reply = await request(port, "OPTIONS", "/v1/topics/t/messages")
        assert reply.status == 204 and reply.body == b"" and "content-length" not in reply.headers
        assert reply.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, POST"
        assert_error(await request(port, "OPTIONS", "/nope"), 404)


async def test_listed_origins_only(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path, http=HttpSettings(cors_origins=(APP, "https://Two.Example"))) as server:
        port = server.http_port
        assert port is not None
        for origin in (APP, "https://two.example"):
            reply = await request(port, "GET", "/v1/topics", headers={"origin": origin})
            assert reply.status == 200
            assert reply.headers["access-control-allow-origin"] == origin
            assert reply.headers["access-control-allow-credentials"] == "true"
            assert reply.headers["vary"] == "origin"
        # Another origin is served (CORS is no access control) without the
        # headers that would let its page read the answer.
        reply = await request(port, "GET", "/v1/topics", headers={"origin": OTHER})
        assert reply.status == 200 and "access-control-allow-origin" not in reply.headers
        assert reply.headers["vary"] == "origin"
        # Errors, publishes and event streams carry them too.
        reply = await request(port, "GET", "/v1/topics/no.such", headers={"origin": APP})
        assert_error(reply, 404)
        assert reply.headers["access-control-allow-origin"] == APP
        reply = await request(
            port, "POST", "/v1/topics/c.t/messages", b"hi",
            {"origin": APP, "content-type": "text/plain", "x-pybroker-header-a": "b"},
        )
        assert reply.status == 200 and reply.headers["access-control-allow-origin"] == APP
        reply = await request(port, "HEAD", "/v1/topics/c.t/events", headers={"origin": APP})
        assert reply.status == 200 and reply.headers["access-control-allow-origin"] == APP
        assert reply.headers["content-type"].startswith("text/event-stream")
        # /metrics varies by Accept and by Origin.
        reply = await request(port, "GET", "/metrics", headers={"origin": APP})
        assert reply.headers["vary"] == "accept, origin"

        preflight = {
            "origin": APP,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-pybroker-header-source, authorization",
        }
        reply = await request(port, "OPTIONS", "/v1/topics/c.t/messages", headers=preflight)
        assert reply.status == 204, reply
        assert reply.headers["access-control-allow-origin"] == APP
        assert reply.headers["access-control-allow-methods"] == "DELETE, GET, HEAD, OPTIONS, POST"
        assert reply.headers["access-control-allow-headers"] == preflight["access-control-request-headers"]
        assert reply.headers["access-control-allow-credentials"] == "true"
        assert int(reply.headers["access-control-max-age"]) > 0
        reply = await request(port, "OPTIONS", "/v1/topics/c.t/messages", headers={**preflight, "origin": OTHER})
        assert_error(reply, 403, "origin_not_allowed")


async def test_any_origin(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path, http=HttpSettings(cors_origins=("*",))) as server:
        port = server.http_port
        assert port is not None
        reply = await request(port, "GET", "/v1/topics", headers={"origin": OTHER})
        assert reply.headers["access-control-allow-origin"] == "*"
        # "*" may not go with credentials, and the answer does not vary.
        assert "access-control-allow-credentials" not in reply.headers and "vary" not in reply.headers
        preflight = {"origin": OTHER, "access-control-request-method": "GET"}
        reply = await request(port, "OPTIONS", "/v1/topics/x/events", headers=preflight)
        assert reply.status == 204 and reply.headers["access-control-allow-origin"] == "*"


async def test_preflight_needs_no_credentials(tmp_path: Path) -> None:
    users = write_users(tmp_path, {"reader": user_entry(token=TOKEN, subscribe=[">"])})
    async with running_broker(data_dir=tmp_path / "data", auth_file=users, http=HttpSettings(cors_origins=(APP,))) as server:
        port = server.http_port
        assert port is not None
        preflight = {
            "origin": APP,
            "access-control-request-method": "GET",
            "access-control-request-headers": "authorization",
        }
        reply = await request(port, "OPTIONS", "/v1/topics", headers=preflight)
        assert reply.status == 204 and reply.headers["access-control-allow-headers"] == "authorization"
        # The request itself needs them; its 401 is readable by the page.
        reply = await request(port, "GET", "/v1/topics", headers={"origin": APP})
        assert_error(reply, 401)
        assert reply.headers["access-control-allow-origin"] == APP
        reply = await request(port, "GET", "/v1/topics", headers={"origin": APP, "authorization": f"Bearer {TOKEN}"})
        assert reply.status == 200 and reply.headers["access-control-allow-origin"] == APP


async def test_cli_flag(tmp_path: Path) -> None:
    args = [
        "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--log-format", "json",
        "--http-cors-origin", APP, "--http-cors-origin", "https://two.example",
    ]
    async with spawn(args, "serve", cwd=tmp_path) as child:
        listening = await child.stderr.wait_for(find_event("listening"))
        port = listening["http_port"]
        for origin in (APP, "https://two.example"):
            reply = await request(port, "GET", "/healthz", headers={"origin": origin})
            assert reply.headers["access-control-allow-origin"] == origin
        reply = await request(port, "GET", "/healthz", headers={"origin": OTHER})
        assert "access-control-allow-origin" not in reply.headers
        child.process.send_signal(signal.SIGTERM)
        assert await child.wait(TIMEOUT) == 0


@pytest.mark.parametrize("origin", ["http://app.example/", "app.example", "ftp://x", "http://a/b", "http://"])
async def test_cli_refuses_what_is_no_origin(origin: str) -> None:
    result = await run(["serve", "--port", "0", "--storage", "memory", "--http-cors-origin", origin])
    assert result.returncode == 2, result
    assert "--http-cors-origin" in result.stderr.decode() and "not an origin" in result.stderr.decode()
