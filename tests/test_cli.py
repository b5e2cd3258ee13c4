"""The ``pybroker`` command line, run as real subprocesses.

``pybroker serve --port 0 --log-format json`` is started once per test; the
port comes from its JSON "listening" log line on stderr. ``pub`` and ``sub``
run against it. Every wait is bounded, and every process a test starts is
killed in a ``finally`` if it is still running.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from pybroker.server import __version__

from helpers.procs import PYBROKER, Broker, Child, child_env, json_events, run, serve, spawn


#: Bound on a one-shot command (pub, --version) and on any single wait.
TIMEOUT = 20.0
#: How many times the live-subscription test publishes a probe.
MAX_PROBES = 30


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    async with serve(tmp_path) as b:
        yield b


_PLAIN = re.compile(r"^(?P<topic>\S+) \[(?P<offset>\d+)\](?P<headers>(?: \S+=\S*)*) (?P<payload>.*)$")


def parse_plain(line: str) -> tuple[str, int, str]:
    m = _PLAIN.match(line)
    assert m is not None, f"not a `sub` line: {line!r}"
    return m["topic"], int(m["offset"]), m["payload"]


async def pub(broker: Broker, topic: str, message: str, *extra: str) -> int:
    """``pybroker pub``; returns the offset it printed."""
    result = await run(["pub", topic, message, "--url", broker.url, *extra])
    out = result.stdout.decode()
    assert result.returncode == 0, (result.returncode, out, result.stderr.decode())
    m = re.fullmatch(rf"published to {re.escape(topic)} at offset (\d+) \((\w+)\)\n", out)
    assert m is not None, out
    assert m[2] in ("memory", "os", "disk"), out
    return int(m[1])


async def pub_lines(broker: Broker, topic: str, lines: list[str]) -> tuple[int, int]:
    """``pybroker pub`` with one message per stdin line; returns (first, last) offsets."""
    data = "".join(f"{line}\n" for line in lines).encode()
    result = await run(["pub", topic, "--url", broker.url], stdin=data)
    out = result.stdout.decode()
    assert result.returncode == 0, (result.returncode, out, result.stderr.decode())
    m = re.fullmatch(
        rf"published {len(lines)} messages to {re.escape(topic)}, offsets (\d+)\.\.(\d+)\n", out
    )
    assert m is not None, out
    return int(m[1]), int(m[2])


async def sub_once(broker: Broker, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``pybroker sub ... --count N`` for messages that already exist."""
    result = await run(["sub", *args, "--url", broker.url])
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr.decode())
    return result


# --------------------------------------------------------------------------
# Tests


async def test_version() -> None:
    result = await run(["--version"])
    assert result.returncode == 0, result
    assert result.stdout.decode().strip() == f"pybroker {__version__}"


async def test_no_command_is_a_usage_error() -> None:
    result = await run([])
    assert result.returncode == 2, result
    assert b"usage:" in result.stderr


async def test_pub_prints_the_offset(broker: Broker) -> None:
    assert await pub(broker, "cli.one", "first") == 0
    assert await pub(broker, "cli.one", "second") == 1
    assert await pub(broker, "cli.other", "elsewhere") == 0
    assert await pub(broker, "cli.one", "third", "-H", "k=v", "--header", "trace=abc") == 2
    result = await sub_once(broker, "cli.one", "--from", "earliest", "--count", "3")
    lines = result.stdout.decode().splitlines()
    assert [parse_plain(line) for line in lines] == [
        ("cli.one", 0, "first"),
        ("cli.one", 1, "second"),
        ("cli.one", 2, "third"),
    ]
    assert lines[2] == "cli.one [2] k=v trace=abc third"


async def test_pub_delay_schedules_and_sub_receives_it_when_due(broker: Broker) -> None:
    before = time.time()
    result = await run(["pub", "cli.later", "remind", "--delay", "0.5", "--url", broker.url])
    assert result.returncode == 0, result
    out = result.stdout.decode()
    m = re.fullmatch(r"scheduled for cli\.later at (\S+) \((\w+)\)\n", out)
    assert m is not None, out
    due = dt.datetime.fromisoformat(m[1]).timestamp()
    assert before + 0.5 - 0.01 <= due <= time.time() + 0.5 + 0.01
    result = await sub_once(broker, "cli.later", "--from", "earliest", "--count", "1", "--json")
    (line,) = result.stdout.decode().splitlines()
    msg = json.loads(line)
    assert msg["payload"] == "remind" and msg["offset"] == 0
    assert dt.datetime.fromisoformat(msg["timestamp"]).timestamp() >= due - 0.002


async def test_pub_reads_lines_from_stdin(broker: Broker) -> None:
    lines = ["alpha", "beta with spaces", "", "gamma ünïcode"]
    assert await pub_lines(broker, "cli.stdin", lines) == (0, 3)
    assert await pub_lines(broker, "cli.stdin", ["delta"]) == (4, 4)
    # '-' means stdin too.
    result = await run(["pub", "cli.stdin", "-", "--url", broker.url], stdin=b"epsilon\n")
    assert result.returncode == 0, result
    assert result.stdout.decode() == "published 1 messages to cli.stdin, offsets 5..5\n"
    result = await sub_once(broker, "cli.stdin", "--from", "earliest", "--count", "6")
    got = [parse_plain(line) for line in result.stdout.decode().splitlines()]
    assert got == [
        ("cli.stdin", i, text)
        for i, text in enumerate([*lines, "delta", "epsilon"])
    ]


async def test_pub_with_empty_stdin(broker: Broker) -> None:
    result = await run(["pub", "cli.empty", "--url", broker.url], stdin=b"")
    assert result.returncode == 0, result
    assert result.stdout.decode() == "nothing to publish (stdin was empty)\n"


async def test_sub_prints_messages_published_after_it_subscribed(broker: Broker) -> None:
    """A live ``sub --count N``: probes until it prints, then data."""
    count = 6
    async with spawn(
        ["sub", "cli.live.>", "--url", broker.url, "--count", str(count)], "sub"
    ) as sub:
        # Messages published before the subscription is active are not
        # printed; publish probes until the first one shows up (bounded).
        probes = 0
        first: tuple[str, int, str] | None = None
        while first is None:
            assert probes < MAX_PROBES, f"sub printed nothing: {sub.stderr.text()}"
            await pub(broker, "cli.live.probe", f"probe-{probes}")
            probes += 1
            with trio.move_on_after(1.0):
                line = await sub.stdout.wait_for(lambda lines: lines[0] if lines else None)
                first = parse_plain(line)
            assert sub.returncode is None, sub.stderr.text()
        # The subscriber now sees every later message; it prints the probes
        # from the first it saw on, then data, until it has `count` lines.
        first_probe = int(first[2].removeprefix("probe-"))
        seen_probes = probes - first_probe
        data_needed = max(0, count - seen_probes)
        for i in range(count):
            if sub.returncode is not None:
                break
            await pub(broker, "cli.live.data", f"data-{i}")
        assert await sub.wait() == 0, sub.stderr.text()
    got = [parse_plain(line) for line in sub.stdout.lines if line]
    expected = [
        ("cli.live.probe", p, f"probe-{p}") for p in range(first_probe, probes)
    ][:count] + [("cli.live.data", i, f"data-{i}") for i in range(data_needed)]
    assert got == expected
    assert sub.stderr.text() == ""


async def test_sub_from_earliest_and_from_offset(broker: Broker) -> None:
    words = [f"word-{i}" for i in range(8)]
    assert await pub_lines(broker, "cli.replay", words[:5]) == (0, 4)
    assert await pub_lines(broker, "cli.replay", words[5:]) == (5, 7)

    result = await sub_once(broker, "cli.replay", "--from", "earliest", "--count", "8")
    got = [parse_plain(line) for line in result.stdout.decode().splitlines()]
    assert got == [("cli.replay", i, w) for i, w in enumerate(words)]

    # An offset inside a stored batch: the messages before it are skipped.
    result = await sub_once(broker, "cli.replay", "--from-offset", "3", "--count", "3")
    got = [parse_plain(line) for line in result.stdout.decode().splitlines()]
    assert got == [("cli.replay", i, words[i]) for i in (3, 4, 5)]

    # A wildcard pattern from earliest reads every matching topic.
    assert await pub(broker, "cli.replay2", "other") == 0
    result = await sub_once(broker, "cli.*", "--from", "earliest", "--count", "9")
    got = [parse_plain(line) for line in result.stdout.decode().splitlines()]
    assert sorted(got) == sorted(
        [("cli.replay", i, w) for i, w in enumerate(words)] + [("cli.replay2", 0, "other")]
    )


async def test_sub_json_output(broker: Broker) -> None:
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    assert await pub(broker, "cli.json", "plain") == 0
    assert await pub(broker, "cli.json", 'quote " and ünïcode', "-H", "kind=test") == 1
    result = await sub_once(broker, "cli.json", "--from", "earliest", "--count", "2", "--json")
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(records) == 2
    for offset, record in enumerate(records):
        # Each `pub` is one batch, named for exactly-once publishing.
        assert set(record) == {"topic", "offset", "timestamp", "headers", "msg_id", "payload"}, record
        assert isinstance(record["msg_id"], str) and record["msg_id"]
        assert record["topic"] == "cli.json"
        assert record["offset"] == offset
        stamp = dt.datetime.fromisoformat(record["timestamp"])
        assert stamp.tzinfo is not None and stamp > before
    assert records[0]["payload"] == "plain" and records[0]["headers"] == {}
    assert records[1]["payload"] == 'quote " and ünïcode'
    assert records[1]["headers"] == {"kind": "test"}


async def test_pub_bad_topic_fails(broker: Broker) -> None:
    result = await run(["pub", "bad..topic", "message", "--url", broker.url])
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.decode()
    assert "pybroker pub" in err and "topic" in err, err
    assert result.stdout == b""


async def test_pub_wildcard_topic_fails(broker: Broker) -> None:
    result = await run(["pub", "orders.*", "message", "--url", broker.url])
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    assert "pybroker pub" in result.stderr.decode()


async def test_sub_bad_pattern_fails(broker: Broker) -> None:
    result = await run(["sub", "a.>.b", "--url", broker.url, "--count", "1"], timeout=TIMEOUT)
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    err = result.stderr.decode()
    assert "pybroker sub" in err and "a.>.b" in err, err
    assert result.stdout == b""


async def test_sub_offset_with_wildcard_fails(broker: Broker) -> None:
    result = await run(["sub", "cli.*", "--from-offset", "0", "--url", broker.url, "--count", "1"])
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    assert "pybroker sub" in result.stderr.decode()


async def test_pub_bad_header_fails(broker: Broker) -> None:
    result = await run(["pub", "cli.h", "m", "-H", "no-equals-sign", "--url", broker.url])
    assert result.returncode != 0, result
    assert "KEY=VALUE" in result.stderr.decode()


async def test_pub_without_a_broker_fails(tmp_path: Path) -> None:
    # A port nobody listens on: bind one, then close it.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = await run(["pub", "cli.x", "m", "--url", f"pybroker://127.0.0.1:{port}"])
    assert result.returncode == 1, result
    assert result.stderr.decode().startswith(f"pybroker pub: cannot connect to the broker at 127.0.0.1:{port}:"), result.stderr
    assert b"Traceback" not in result.stderr


async def test_bad_url_fails(broker: Broker) -> None:
    result = await run(["pub", "cli.x", "m", "--url", f"http://127.0.0.1:{broker.port}"])
    assert result.returncode != 0, result
    assert b"Traceback" not in result.stderr, result.stderr.decode()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_stops_cleanly_on_signal(tmp_path: Path, signum: signal.Signals) -> None:
    async with serve(tmp_path) as broker:
        # Fully up (and serving) before the signal.
        assert await pub(broker, "cli.sig", "before") == 0
        broker.child.process.send_signal(signum)
        code = await broker.child.wait()
        assert code == 0, broker.child.stderr.text()
        events = json_events(broker.child.stderr.lines)
        names = [e.get("event") for e in events]
        assert "stopped" in names, names
        received = [e for e in events if e.get("event") == "signal received, shutting down"]
        assert [e.get("signal") for e in received] == [signum.name], events
        assert names.index("stopped") > names.index("listening")
        assert not [e for e in events if e.get("level") in ("error", "critical")], events
        assert "Traceback" not in broker.child.stderr.text()


async def stop_once_sub_is_live(broker: Broker, sub: Child, topic: str) -> None:
    """Publish probes to ``topic`` until ``sub`` prints one, then SIGTERM the
    broker and wait for its clean exit."""
    for i in range(MAX_PROBES):
        await pub(broker, topic, f"probe-{i}")
        with trio.move_on_after(1.0):
            await sub.stdout.wait_for(lambda lines: lines or None)
            break
    else:
        raise AssertionError(f"sub printed nothing: {sub.stderr.text()}")
    broker.child.process.send_signal(signal.SIGTERM)
    assert await broker.child.wait() == 0, broker.child.stderr.text()


async def test_serve_stops_with_a_subscriber_connected(tmp_path: Path) -> None:
    async with serve(tmp_path) as broker:
        async with spawn(["sub", ">", "--url", broker.url, "--no-reconnect"], "sub") as sub:
            await stop_once_sub_is_live(broker, sub, "cli.stop")
            assert "stopped" in [e.get("event") for e in json_events(broker.child.stderr.lines)]
            # The subscriber notices (GOODBYE / EOF) and exits by itself.
            await sub.wait()
            assert "Traceback" not in sub.stderr.text()


async def test_sub_reconnects_and_resumes_across_a_restart(tmp_path: Path) -> None:
    """By default `sub` rides over a broker restart (same port, same data)
    and prints what was published while it was away, then what comes live."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with serve(tmp_path, "--port", str(port), "--http-port", "0") as broker:
        async with spawn(["sub", "cli.re.>", "--url", broker.url], "sub") as sub:
            await stop_once_sub_is_live(broker, sub, "cli.re.probe")
            async with serve(tmp_path, "--port", str(port), "--http-port", "0") as again:
                assert await pub(again, "cli.re.away", "while-away") == 0
                await sub.stdout.wait_for(
                    lambda lines: any(line.endswith(" while-away") for line in lines) or None
                )
                assert await pub(again, "cli.re.live", "live") == 0
                await sub.stdout.wait_for(
                    lambda lines: any(line.endswith(" live") for line in lines) or None
                )
            assert "Traceback" not in sub.stderr.text()


async def test_serve_port_in_use_fails(tmp_path: Path) -> None:
    async with serve(tmp_path / "first") as first:
        result = await run(
            ["serve", "--port", str(first.port), "--data-dir", str(tmp_path / "second")],
            cwd=tmp_path,
        )
        assert result.returncode == 1, result
        err = result.stderr.decode()
        # main() turns an OSError into one line "pybroker: <error>".
        assert "pybroker: " in err and "in use" in err, err
        assert "Traceback" not in err, err
        assert await pub(first, "cli.still", "up") == 0


def _read_until(process: subprocess.Popen[bytes], marker: bytes, deadline: float) -> bytes:
    """Read the child's stderr until ``marker`` appears (bounded); no lag."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while marker not in buf:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} in time: {buf!r}"
            if sel.select(remaining):
                chunk = os.read(fd, 65536)
                assert chunk, f"stderr ended without {marker!r}: {buf!r}"
                buf += chunk
    return buf


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_signal_as_soon_as_it_is_listening(tmp_path: Path, signum: signal.Signals) -> None:
    """A supervisor may stop the broker the moment it reports "listening":
    that must be a graceful stop too (exit 0, "stopped"), not a kill.

    Plain subprocess and a tight read loop, so the signal follows the log
    line within microseconds (as it does from a supervisor)."""
    for attempt in range(3):
        args = ["serve", "--port", "0", "--data-dir", str(tmp_path / f"data-{attempt}")]
        process = subprocess.Popen(
            [*PYBROKER, *args, "--log-format", "json"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=tmp_path,
            env=child_env(),
        )
        try:
            head = _read_until(process, b'"listening"', time.monotonic() + TIMEOUT)
            process.send_signal(signum)
            _, rest = process.communicate(timeout=TIMEOUT)
            stderr = (head + rest).decode("utf-8", "replace")
            names = [e.get("event") for e in json_events(stderr.splitlines())]
            assert (process.returncode, "stopped" in names) == (0, True), (
                f"attempt {attempt}: exit code {process.returncode}, log events {names}, "
                f"stderr tail {stderr[-600:]!r}"
            )
            assert "Traceback" not in stderr
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=TIMEOUT)


async def test_sub_group_shares_work_and_acks(broker: Broker) -> None:
    """Two `pybroker sub --group` processes split a backlog between them;
    a third run of the same group finds nothing left: every message was
    acknowledged once printed."""
    words = [f"job-{i}" for i in range(10)]
    assert await pub_lines(broker, "cli.jobs", words) == (0, 9)
    first = await sub_once(
        broker, "cli.jobs", "--group", "cli-workers", "--from", "earliest", "--count", "4"
    )
    second = await sub_once(broker, "cli.jobs", "--group", "cli-workers", "--count", "6")
    got = [parse_plain(line) for line in (first.stdout + second.stdout).decode().splitlines()]
    assert sorted(got) == [("cli.jobs", i, w) for i, w in enumerate(words)]
    # The group's position moved past everything: a new member gets only new jobs.
    assert await pub(broker, "cli.jobs", "job-10") == 10
    third = await sub_once(broker, "cli.jobs", "--group", "cli-workers", "--count", "1")
    assert [parse_plain(line) for line in third.stdout.decode().splitlines()] == [
        ("cli.jobs", 10, "job-10")
    ]
