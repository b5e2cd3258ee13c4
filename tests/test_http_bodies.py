"""Publishing raw bodies over HTTP: ``text/plain`` and
``application/octet-stream`` are one message, bytes unchanged, headers from
``X-Pybroker-Header-*``; JSON as before. Checked by reading the messages
back over TCP with the client library, and with curl itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.server.testing import running_broker

from helpers.http import assert_error, post_json, request

TIMEOUT = 10.0


async def read_back(url: str, topic: str, n: int) -> list[pybroker.Message]:
    async with pybroker.connect(url) as c:
        async with c.subscribe(topic, start="earliest") as sub:
            got: list[pybroker.Message] = []
            with trio.fail_after(TIMEOUT):
                async for msg in sub:
                    got.append(msg)
                    if len(got) == n:
                        break
    return got


async def test_raw_bodies_are_one_message_with_their_bytes(tmp_path: Path) -> None:
    every_byte = bytes(range(256)) * 3 + b"\r\n\n{\"not\": json"
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        path = "/v1/topics/raw.t/messages"
        one = await request(
            port, "POST", path, every_byte,
            {
                "content-type": "application/octet-stream",
                "X-Pybroker-Header-Source": "webhook",
                # Sent as UTF-8 bytes on the wire: read back as text.
                "x-pybroker-header-trace-id": "é-1".encode(),
            },
        )
        assert one.status == 200, one
        assert one.json() | {"timestamp_us": 0} == {
            "topic": "raw.t", "offset": 0, "base_offset": 0, "last_offset": 0, "count": 1,
            "durability": "disk", "timestamp_us": 0,
        }
        # A charset is not applied: the bytes are kept as they came.
        latin = "café".encode("latin-1")
        two = await request(port, "POST", path, latin, {"content-type": "text/plain; charset=ISO-8859-1"})
        assert two.json()["offset"] == 1
        empty = await request(port, "POST", path, b"", {"content-type": "text/plain"})
        assert empty.json()["offset"] == 2
        # JSON is as before: the body is parsed, headers are in it.
        three = await post_json(port, path, {"payload": "json", "headers": {"k": "v"}})
        assert three.json()["offset"] == 3
        got = await read_back(server.url, "raw.t", 4)
    assert [m.payload for m in got] == [every_byte, latin, b"", b"json"]
    assert dict(got[0].headers) == {"source": "webhook", "trace-id": "é-1"}
    assert [dict(m.headers) for m in got[1:]] == [{}, {}, {"k": "v"}]


async def test_raw_bodies_refused(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path) as server:
        port = server.http_port
        assert port is not None
        path = "/v1/topics/refused.t/messages"
        for ctype in ["text/html", "application/x-www-form-urlencoded", "image/png"]:
            body = assert_error(await request(port, "POST", path, b"x", {"content-type": ctype}), 415)
            assert "text/plain or application/octet-stream" in body["error"]
        # Message headers from request headers are for raw bodies only.
        reply = await request(
            port, "POST", path, json.dumps({"payload": "x"}),
            {"content-type": "application/json", "x-pybroker-header-a": "b"},
        )
        assert_error(reply, 400)
        raw = {"content-type": "application/octet-stream"}
        not_utf8 = {**raw, "x-pybroker-header-a": b"\xff\xfe"}
        assert_error(await request(port, "POST", path, b"x", not_utf8), 400)
        assert_error(await request(port, "POST", path, b"x", {**raw, "x-pybroker-header-": "v"}), 400)
        # A raw body over the limit is refused like a JSON one.
        too_big = b"x" * (1024 * 1024 + 1)
        assert_error(await request(port, "POST", path, too_big, raw), 413)
        assert "refused.t" not in server.broker.router.topics


async def test_curl_data_binary_from_a_file(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    payload = bytes(range(256)) * 10
    (tmp_path / "body.bin").write_bytes(payload)
    async with running_broker(data_dir=tmp_path / "data") as server:
        port = server.http_port
        assert port is not None
        with trio.fail_after(TIMEOUT):
            result = await trio.run_process(
                [
                    curl, "-sS", "--data-binary", f"@{tmp_path / 'body.bin'}",
                    "-H", "content-type: application/octet-stream",
                    "-H", "x-pybroker-header-source: curl",
                    f"http://127.0.0.1:{port}/v1/topics/curl.t/messages",
                ],
                capture_stdout=True, capture_stderr=True, check=False,
            )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["offset"] == 0
        (msg,) = await read_back(server.url, "curl.t", 1)
    assert msg.payload == payload and dict(msg.headers) == {"source": "curl"}
