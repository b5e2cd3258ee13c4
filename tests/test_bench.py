"""``pybroker bench`` smoke tests: every scenario at a tiny size, as a subprocess.

No performance assertions: each run must exit 0, print its verified-delivery
line and write JSON saying every run was verified. Every subprocess is
bounded by a timeout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from helpers.procs import PYBROKER, child_env


#: Bound on one bench invocation (they take a few seconds each).
TIMEOUT = 90.0


def bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [*PYBROKER, "bench", *args, "--json", str(out), "--workdir", str(tmp_path), "--quiet"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\nVerified: " in proc.stdout, proc.stdout
    assert "NOT VERIFIED" not in proc.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["verified"] is True and data["problems"] == []
    assert data["command"].startswith("pybroker bench ")
    return proc.stdout, data


def test_fanout_with_relay(tmp_path: Path) -> None:
    stdout, data = bench(tmp_path, "fanout", "--subscribers", "2", "--sizes", "128", "--messages", "2000")
    (row,) = data["scenarios"]["fanout"]["rows"]
    assert (row["subscribers"], row["size"], row["mode"]) == (2, 128, "raw")
    for kind in ("pybroker", "relay"):
        assert row[kind]["verified"] and row[kind]["delivered"] == 2 * 2000 == 2 * row[kind]["published"]
        assert row[kind]["delivered_per_s"] > 0
    assert row["ratio"] > 0
    assert "pybroker/relay" in stdout and " raw " in stdout


def test_fanout_decode_mode_and_client_publisher(tmp_path: Path) -> None:
    _, data = bench(
        tmp_path, "fanout", "--subscribers", "2", "--sizes", "16", "--messages", "2000",
        "--mode", "decode", "--publisher", "client", "--no-relay",
    )
    (row,) = data["scenarios"]["fanout"]["rows"]
    assert row["mode"] == "decode" and "relay" not in row
    assert row["pybroker"]["delivered"] == 4000


def test_durable(tmp_path: Path) -> None:
    stdout, data = bench(tmp_path, "durable", "--messages", "2000")
    rows = data["scenarios"]["durable"]["rows"]
    assert [r["policy"] for r in rows] == ["always", "interval", "never"]
    assert all(r["acked"] == 2000 and r["verified"] for r in rows)
    assert rows[0]["ack_durability"] == {"DISK": 2000}
    assert "acked msg/s" in stdout


def test_latency(tmp_path: Path) -> None:
    _, data = bench(
        tmp_path, "latency", "--rate", "500", "--duration", "1", "--warmup", "0.2", "--subscribers", "2"
    )
    rows = data["scenarios"]["latency"]["rows"]
    assert [r["target"] for r in rows] == ["pybroker", "relay"]
    for r in rows:
        assert r["verified"] and r["samples"] > 0
        assert 0 < r["p50_us"] <= r["p99_us"] <= r["p99.9_us"] <= r["max_us"]


def test_latency_one_message_per_frame(tmp_path: Path) -> None:
    """--per-frame 1: a PUBLISH frame per message; every message of the
    measured window is sampled by both raw subscribers."""
    stdout, data = bench(
        tmp_path, "latency", "--rate", "500", "--duration", "1.5", "--warmup", "0.2", "--subscribers", "2",
        "--per-frame", "1", "--no-relay",
    )
    result = data["scenarios"]["latency"]
    assert result["per_frame"] == 1
    (row,) = result["rows"]
    assert row["verified"] and row["published"] == row["publish_frames"] == 750
    # Both subscribers sample every message published after the warm-up
    # (about 650 of the 750): one sample per message, not per frame read.
    assert 2 * 500 <= row["samples"] <= 2 * 750 and row["samples"] % 2 == 0
    assert row["cpu_us_per_message"] is None or row["cpu_us_per_message"] > 0
    assert "one message per PUBLISH frame" in stdout and "target CPU µs/msg" in stdout


def test_durable_one_message_per_frame(tmp_path: Path) -> None:
    _, data = bench(tmp_path, "durable", "--messages", "2000", "--batch", "1", "--window", "256", "--policies", "always")
    (row,) = data["scenarios"]["durable"]["rows"]
    assert row["acked"] == 2000 and row["ack_durability"] == {"DISK": 2000} and row["verified"]
    assert data["scenarios"]["durable"]["in_flight_messages"] == 256


def test_per_frame_is_for_the_fast_publisher(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*PYBROKER, "bench", "latency", "--per-frame", "1", "--publisher", "client", "--workdir", str(tmp_path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT, env=child_env(),
    )
    assert proc.returncode == 2 and "--per-frame is for the fast publisher" in proc.stderr


def test_memory(tmp_path: Path) -> None:
    stdout, data = bench(
        tmp_path, "memory", "--connections", "20", "--conn-procs", "2",
        "--stall-messages", "20000", "--stall-subscribers", "3", "--sample-interval", "0.1",
    )
    result = data["scenarios"]["memory"]
    idle, opened, closed = result["idle"]
    assert idle["rss_kb"] > 0 and opened["connections"] == 20 and "problem" not in opened
    stalled = result["stalled"]
    assert stalled["verified"] and stalled["stalled_received"] == 20000
    assert stalled["samples"] and "RSS MiB" in stdout
