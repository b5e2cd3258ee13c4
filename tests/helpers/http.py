"""Requests to the broker's HTTP side with the standard library's
``http.client``, each in a worker thread and bounded in time."""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

#: Bound on one request (the socket's timeout; the thread gets 5 s more).
TIMEOUT = 10.0
JSON_HEADERS = {"content-type": "application/json"}

T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(TIMEOUT + 5):
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


async def request(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    def run() -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    return await in_thread(run)


async def get_json(port: int, path: str) -> Any:
    reply = await request(port, "GET", path)
    assert reply.status == 200, reply
    return reply.json()


async def post_json(port: int, path: str, value: Any) -> Reply:
    return await request(port, "POST", path, json.dumps(value), JSON_HEADERS)


def assert_error(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    """An error answer: ``status``, and a JSON body saying what and why."""
    assert reply.status == status, reply
    body = reply.json()
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["code"], str) and body["code"], body
    assert body["status"] == status, body
    if code is not None:
        assert body["code"] == code, body
    return body  # type: ignore[no-any-return]


async def http_request(
    port: int, method: str, path: str, *, auth: str | None = None, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    """A request with an Authorization header and a JSON body, both
    optional: (status, headers, the body decoded if it is JSON, else bytes)."""
    headers = dict(JSON_HEADERS) if body is not None else {}
    if auth is not None:
        headers["authorization"] = auth
    reply = await request(port, method, path, None if body is None else json.dumps(body), headers)
    if reply.headers.get("content-type", "").startswith("application/json"):
        return reply.status, reply.headers, json.loads(reply.body)
    return reply.status, reply.headers, reply.body


def basic(user: str, password: str) -> str:
    """An ``Authorization`` value for HTTP Basic."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
