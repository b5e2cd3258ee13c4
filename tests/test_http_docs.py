"""docs/http.md against the server: every route the HTTP side registers is
documented (a ``### METHOD /path`` heading with a curl example), nothing
documented is missing from the server, every error code the handlers can
answer is in the table, and the curl examples run against a real
``pybroker serve``."""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import pytest
import trio

import pybroker

from pybroker.server.config import Config
from pybroker.server.http import access, messages
from pybroker.server.server import Server

from helpers.procs import find_event, spawn

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "http.md"
HEADING = re.compile(r"^### ([A-Z]+) (\S+)", re.M)
TIMEOUT = 10.0


def sections() -> dict[tuple[str, str], str]:
    """(method, path) of each ``### METHOD /path`` heading, with its text."""
    text = DOC.read_text(encoding="utf-8")
    found = list(HEADING.finditer(text))
    out = {}
    for i, match in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        body = text[match.end() : end].split("\n## ", 1)[0]
        out[(match.group(1), match.group(2))] = body
    return out


def registered() -> set[tuple[str, str]]:
    server = Server(Config(storage="memory", host="127.0.0.1", port=0, http_port=0))
    try:
        assert server.http is not None
        return {
            (method, "/" + "/".join(route.pattern))
            for route in server.http.routes
            for method in route.methods
        }
    finally:
        server.broker.store.close()


def test_every_route_is_documented_with_a_curl_example() -> None:
    documented = sections()
    routes = registered()
    assert routes, "no routes registered?"
    missing = routes - set(documented)
    assert not missing, f"routes not in docs/http.md: {sorted(missing)}"
    stale = {key for key in documented if key[1].startswith("/")} - routes
    assert not stale, f"documented but not served: {sorted(stale)}"
    assert ("OPTIONS", "(every") in documented
    for key, body in documented.items():
        assert re.search(r"```sh\n(?:.*\n)*?curl ", body), f"{key} has no curl example"


def test_every_error_code_is_documented() -> None:
    table = {
        (int(m.group(1)), m.group(2))
        for m in re.finditer(r"^\| (\d{3}) \| `([a-z_]+)` \|", DOC.read_text(encoding="utf-8"), re.M)
    }
    codes = set(messages.ERROR_CODES.items())
    codes |= {(status, code) for status, code in access._STATUS.values()}
    # Codes the handlers name where they raise (HttpError(status, ..., code=...)).
    for source in (ROOT / "broker" / "http").glob("*.py"):
        for call in source.read_text().split("HttpError(")[1:]:
            status = re.match(r"\s*(\d{3}),", call)
            code = re.search(r'\bcode="([a-z_]+)"', call[:400])
            if status and code:
                codes.add((int(status.group(1)), code.group(1)))
    assert ("origin_not_allowed" in {c for _, c in codes}) and ("topic_not_found" in {c for _, c in codes})
    assert codes <= table, f"not in docs/http.md's table: {sorted(codes - table)}"


async def test_the_curl_examples_run(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    commands = [c.strip() for block in blocks for c in re.split(r"(?<!\\)\n", block) if c.strip()]
    assert len(commands) >= 15
    # The publishing examples first: the others read what they published.
    commands.sort(key=lambda c: 0 if " -d " in c or "--data-binary" in c else 1)
    (tmp_path / "invoice.pdf").write_bytes(b"%PDF-1.4 not really\x00\xff")
    args = [
        "serve", "--port", "0", "--data-dir", str(tmp_path / "data"), "--log-format", "json",
        "--http-cors-origin", "https://app.example.com",
    ]
    async with spawn(args, "serve", cwd=tmp_path) as child:
        listening = await child.stderr.wait_for(find_event("listening"))
        port = listening["http_port"]
        # The group the consumer-group examples name (no HTTP route creates one).
        async with pybroker.connect(listening["url"]) as c:
            await c.create_group("billing", "orders.>")
        for command in commands:
            assert command.startswith("curl "), command
            streaming = " -sN " in command
            line = command.replace("localhost:7421", f"127.0.0.1:{port}").replace("\\\n", " ")
            if streaming:
                line = line.replace("curl ", "curl --max-time 1 ", 1)
            with trio.fail_after(TIMEOUT):
                result = await trio.run_process(
                    ["bash", "-c", line], cwd=tmp_path, capture_stdout=True, capture_stderr=True, check=False
                )
            out = result.stdout.decode("utf-8", "replace")
            # A stream runs until curl's --max-time (exit 28); the rest succeed.
            assert result.returncode == (28 if streaming else 0), (command, result)
            assert '"error"' not in out, (command, out)
            if "OPTIONS" in command:
                assert out.startswith("HTTP/1.1 204"), out
            elif streaming:
                assert out.startswith("retry: "), out
            else:
                assert out.strip(), command
        child.process.send_signal(signal.SIGTERM)
        assert await child.wait(TIMEOUT) == 0
