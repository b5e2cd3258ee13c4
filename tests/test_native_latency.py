"""The native latency load generator (benchmarks/native/latload.c) and its
driver script, benchmarks/native_latency.py, against a real broker: every
subscriber's every message is counted and timed, nothing is lost or
reordered, the percentiles come out ordered, and a broker that stops
answering ends the run within its timeout. Latency values are never
asserted (performance is not a test's business)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from helpers.procs import serve

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "native" / "latload.c"
SCRIPT = ROOT / "benchmarks" / "native_latency.py"
COMPILER = shutil.which("gcc") or shutil.which("cc")

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler (gcc or cc) on PATH to build latload.c")

PERCENTILES = ("p50_us", "p90_us", "p99_us", "p99.9_us", "max_us")


async def build(tmp_path: Path) -> Path:
    assert COMPILER is not None
    exe = tmp_path / "latload"
    with trio.fail_after(60):
        await trio.run_process([COMPILER, "-O2", "-pthread", "-o", str(exe), str(SOURCE), "-lm"])
    return exe


def argv(exe: Path, port: int, *, subscribers: int, rate: int, duration: float, warmup: float,
         per_frame: int = 1, tick_us: float = 0, timeout: float = 20) -> list[str]:
    return [str(exe), "127.0.0.1", str(port), "lat.test", "128", str(subscribers), str(rate),
            str(duration), str(warmup), str(per_frame), str(tick_us), str(timeout)]


def check_complete(result: dict[str, Any], published: int, subscribers: int, sampled: int) -> None:
    assert result["published"] == published
    assert result["delivered"] == published * subscribers
    assert result["count"] == result["expected"] == sampled * subscribers
    assert result["lost"] == 0 and result["out_of_order"] == 0
    assert result["complete"] is True
    values = [result[k] for k in PERCENTILES]
    assert 0 < values[0], result
    assert values == sorted(values), result


@pytest.mark.parametrize(("fsync", "per_frame", "tick_us"), [("never", 1, 0), ("always", 1, 1000), ("never", 4, 0)])
async def test_every_message_of_every_subscriber_is_timed(
    tmp_path: Path, fsync: str, per_frame: int, tick_us: float
) -> None:
    exe = await build(tmp_path)
    async with serve(tmp_path / "broker", "--fsync", fsync) as broker:
        with trio.fail_after(60):
            proc = await trio.run_process(
                argv(exe, broker.port, subscribers=2, rate=1000, duration=1, warmup=0, per_frame=per_frame,
                     tick_us=tick_us),
                capture_stdout=True, capture_stderr=True, check=False,
            )
    assert proc.returncode == 0, proc.stderr.decode()
    check_complete(json.loads(proc.stdout), published=1000, subscribers=2, sampled=1000)


async def test_the_warm_up_is_counted_but_not_sampled(tmp_path: Path) -> None:
    exe = await build(tmp_path)
    async with serve(tmp_path / "broker", "--fsync", "never") as broker:
        with trio.fail_after(60):
            proc = await trio.run_process(
                argv(exe, broker.port, subscribers=3, rate=1000, duration=1, warmup=0.25),
                capture_stdout=True, capture_stderr=True, check=False,
            )
    assert proc.returncode == 0, proc.stderr.decode()
    # Messages 0..249 are due in the first 0.25 s.
    check_complete(json.loads(proc.stdout), published=1000, subscribers=3, sampled=750)


async def test_a_broker_that_stops_answering_ends_the_run_within_its_timeout(tmp_path: Path) -> None:
    exe = await build(tmp_path)
    async with serve(tmp_path / "broker", "--fsync", "never") as broker:
        pid = broker.child.process.pid
        os.kill(pid, signal.SIGSTOP)  # the kernel still accepts; nobody answers HELLO
        try:
            with trio.fail_after(30):
                proc = await trio.run_process(
                    argv(exe, broker.port, subscribers=2, rate=1000, duration=1, warmup=0, timeout=1),
                    capture_stdout=True, capture_stderr=True, check=False,
                )
        finally:
            os.kill(pid, signal.SIGCONT)
    assert proc.returncode == 2
    assert b"handshake" in proc.stderr, proc.stderr.decode()
    assert proc.stdout == b""


async def test_the_script_alternates_pybroker_and_the_relay(tmp_path: Path) -> None:
    out = tmp_path / "runs.json"
    with trio.fail_after(120):
        proc = await trio.run_process(
            [sys.executable, str(SCRIPT), "--repeat", "1", "--rate", "1000", "--subscribers", "2",
             "--duration", "1", "--warmup", "0.2", "--timeout", "20", "--json", str(out)],
            capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 0, proc.stderr.decode() + proc.stdout.decode()
    runs = json.loads(out.read_text())
    assert [(r["kind"], r["fsync"]) for r in runs] == [("pybroker", "never"), ("pybroker", "always"), ("relay", None)]
    for r in runs:
        check_complete(r, published=1000, subscribers=2, sampled=800)
        assert r["cores"] is not None and r["cores"] >= 0
        assert r["generator_cores"] > 0 and r["other_processes_cores"] >= 0
        assert r["load_before"] and r["load_after"]
    report = proc.stdout.decode()
    assert "median pybroker fsync never" in report and "median relay" in report
