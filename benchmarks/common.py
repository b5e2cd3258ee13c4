"""Shared by the benchmark scripts: start `pybroker serve`, time a publisher."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def start_broker(data_dir: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start `pybroker serve` on a free loopback port; return (process, url)."""
    log_path = Path(data_dir) / "broker.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "serve", "--port", "0",
         "--data-dir", str(Path(data_dir) / "data"), "--log-format", "json", *extra],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if '"listening"' in line:
                return proc, json.loads(line)["url"]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"broker did not start:\n{log_path.read_text()}")


def stop_broker(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


async def publish(url: str, topic: str, messages: int, size: int, max_pending: int) -> dict[str, Any]:
    """Pipelined publisher: send() in a loop, then flush; every ack checked."""
    import client

    payload = b"x" * size
    durabilities: dict[str, int] = {}
    async with client.connect(url, name="bench-pub", max_pending=max_pending) as c:
        start = time.time()
        pending = [await c.send(topic, payload) for _ in range(messages)]
        await c.flush()
        end = time.time()
        offsets = []
        for p in pending:
            ack = p.result()
            offsets.append(ack.offset)
            durabilities[ack.durability.name] = durabilities.get(ack.durability.name, 0) + 1
    in_order = offsets == list(range(offsets[0], offsets[0] + messages)) if offsets else False
    return {"start": start, "acked": end, "in_order": in_order, "durability": durabilities}
