"""The ``pybroker`` command at its edges, run as users run it: bytes that
are not UTF-8, a file as one message, times people type, a reader that
goes away, brokers that cannot be reached or listen on TLS, ports in use,
and help for every flag."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
from pathlib import Path

import pytest
import trio

import pybroker
from pybroker.server.bench.cli import build_parser as bench_parser
from pybroker.server.cli import build_parser
from pybroker.server.cli.tools import failure
from pybroker.server.testing import running_broker

from helpers.certs import Certs
from helpers.procs import PYBROKER, Broker, child_env, run, serve

TIMEOUT = 20.0


@pytest.fixture
async def broker(tmp_path: Path) -> Broker:  # type: ignore[misc]
    async with serve(tmp_path) as b:
        yield b


async def payloads(url: str, topic: str, n: int) -> list[bytes]:
    """The first ``n`` messages of ``topic``, as bytes."""
    out: list[bytes] = []
    with trio.fail_after(TIMEOUT):
        async with pybroker.connect(url) as c:
            async with c.subscribe(topic, start="earliest") as sub:
                async for msg in sub:
                    out.append(msg.payload)
                    if len(out) == n:
                        return out
    return out


async def test_lines_that_are_not_utf8_are_published_as_bytes(broker: Broker) -> None:
    result = await run(["pub", "raw.lines", "--url", broker.url], stdin=b"\xff\xfe\n\x80abc\nplain\n")
    assert result.returncode == 0, result.stderr.decode()
    assert b"published 3 messages" in result.stdout
    assert await payloads(broker.url, "raw.lines", 3) == [b"\xff\xfe", b"\x80abc", b"plain"]


async def test_an_argument_keeps_its_bytes(broker: Broker) -> None:
    # The bytes the shell passed, whatever the locale made of them.
    result = await run(["pub", "raw.arg", os.fsdecode(b"caf\xe9"), "--url", broker.url])
    assert result.returncode == 0, result.stderr.decode()
    assert await payloads(broker.url, "raw.arg", 1) == [b"caf\xe9"]


async def test_file_and_raw_stdin_are_one_message_each(broker: Broker, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 40 + b"\n\n\x00end"  # newlines and NULs inside
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    first = await run(["pub", "raw.file", "--file", str(path), "--url", broker.url])
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout.decode().startswith("published to raw.file at offset 0 (")
    second = await run(["pub", "raw.file", "--raw", "--url", broker.url], stdin=blob[::-1])
    assert second.returncode == 0, second.stderr.decode()
    third = await run(["pub", "raw.file", "--file", "-", "--url", broker.url], stdin=b"a\nb\n")
    assert third.returncode == 0, third.stderr.decode()
    assert await payloads(broker.url, "raw.file", 3) == [blob, blob[::-1], b"a\nb\n"]


async def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = await run(["pub", "raw.file", "--file", str(tmp_path / "nope"), "--url", "pybroker://127.0.0.1:1"])
    assert result.returncode == 1
    assert f"cannot read {tmp_path / 'nope'}: No such file or directory" in result.stderr.decode()


async def test_since_takes_iso_times_and_durations_and_refuses_the_rest(broker: Broker) -> None:
    bad = await run(["sub", "t.x", "--since", "yesterday", "--url", broker.url])
    assert bad.returncode == 2
    err = bad.stderr.decode()
    assert "not a time: 'yesterday'" in err and "Traceback" not in err
    result = await run(["pub", "t.since", "--url", broker.url], stdin=b"one\ntwo\n")
    assert result.returncode == 0
    for since in ("10m", "1d", "2000-01-01T00:00"):
        got = await run(["sub", "t.since", "--since", since, "--count", "2", "--url", broker.url])
        assert got.returncode == 0, got.stderr.decode()
        assert got.stdout.decode().splitlines() == ["t.since [0] one", "t.since [1] two"]


async def test_sub_into_a_closed_pipe_exits_quietly(broker: Broker) -> None:
    """`pybroker sub ... | head -2`: once the reader has gone, the command
    ends with status 0 and says nothing about broken pipes."""
    result = await run(["pub", "pipe.t", "--url", broker.url], stdin=b"".join(b"m%d\n" % i for i in range(5)))
    assert result.returncode == 0
    read_end, write_end = os.pipe()
    process = await trio.lowlevel.open_process(
        [*PYBROKER, "sub", "pipe.t", "--from", "earliest", "--url", broker.url],
        stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=child_env(),
    )
    os.close(write_end)
    try:
        with trio.fail_after(TIMEOUT):
            seen = b""
            while seen.count(b"\n") < 2:
                chunk = await trio.to_thread.run_sync(os.read, read_end, 4096)
                assert chunk, "sub ended before printing"
                seen += chunk
            os.close(read_end)  # what head does after two lines
            read_end = -1
            async with pybroker.connect(broker.url) as c:
                # Lines after the reader left: the next print meets the closed pipe.
                for i in range(20):
                    await c.publish("pipe.t", b"later %d" % i)
                    if process.poll() is not None:
                        break
            code = await process.wait()
        assert process.stderr is not None
        err = await process.stderr.receive_some(65536)
    finally:
        if read_end >= 0:
            os.close(read_end)
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 0, err
    assert b"Broken pipe" not in err and b"Traceback" not in err, err


async def test_an_unreachable_broker_is_named() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        result = await run(["pub", "t.x", "hi", "--url", f"pybroker://127.0.0.1:{port}"])
    assert result.returncode == 1
    assert f"cannot connect to the broker at 127.0.0.1:{port}: Connection refused" in result.stderr.decode()


async def test_a_url_of_several_unreachable_brokers_is_named() -> None:
    with socket.socket() as s, socket.socket() as t:
        s.bind(("127.0.0.1", 0))
        t.bind(("127.0.0.1", 0))  # both bound, neither listening: refused
        url = f"pybroker://127.0.0.1:{s.getsockname()[1]},127.0.0.1:{t.getsockname()[1]}"
        result = await run(["pub", "t.x", "hi", "--url", url])
    assert result.returncode == 1
    assert f"cannot connect to any of the brokers at {url}: Connection refused" in result.stderr.decode()


def test_a_name_that_does_not_resolve_is_named() -> None:
    # The error getaddrinfo raises, without asking a resolver.
    exc = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert failure("pybroker://nosuchhost.invalid:7420", exc) == (
        "cannot resolve the broker's host 'nosuchhost.invalid' (pybroker://nosuchhost.invalid:7420): "
        "Name or service not known"
    )


async def test_plain_connection_to_a_tls_port_suggests_pybrokers(certs: Certs) -> None:
    async with running_broker(tls_cert=certs.cert_file, tls_key=certs.key_file) as server:
        result = await run(["pub", "t.x", "hi", "--url", f"pybroker://127.0.0.1:{server.port}"])
    assert result.returncode == 1
    assert f"use pybrokers://127.0.0.1:{server.port}" in result.stderr.decode()


async def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        tcp = await run(["serve", "--port", str(port), "--no-http", "--data-dir", str(tmp_path / "a")])
        http = await run(["serve", "--port", "0", "--http-port", str(port), "--data-dir", str(tmp_path / "b")])
    assert tcp.returncode == 1 and http.returncode == 1
    assert f"cannot listen for TCP on 127.0.0.1:{port}: Address already in use (choose another with --port" in tcp.stderr.decode()
    assert f"cannot listen for HTTP on 127.0.0.1:{port}: Address already in use (choose another with --http-port" in http.stderr.decode()


def _flags_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _flags_without_help(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_flag_and_argument_has_help() -> None:
    assert _flags_without_help(build_parser(), "pybroker") == []
    assert _flags_without_help(bench_parser(), "pybroker bench") == []
