"""Memory and scale: broker RSS idle, with idle subscriber connections, with a stalled subscriber.

    python benchmarks/memory.py --connections 1000,10000

The same as `pybroker bench memory ...` (every option: --help). The code
lives in broker/bench/ so the installed command has it too; this script runs
it from this source tree. See benchmarks/README.md.

    python benchmarks/memory.py --objects 500

Where an idle connection's bytes go instead: a broker in this process (file
store in a temporary directory), ``N`` idle subscriber connections (HELLO +
SUBSCRIBE, then silence) opened by another process, and tracemalloc's
difference between before and after them, per connection, grouped by the
innermost line of the broker (or the client codec) that allocated it. The
connections are counted once parked (broker/session/parking.py).
"""

from __future__ import annotations

import argparse
import gc
import linecache
import subprocess
import sys
import tempfile
import tracemalloc
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402

from pybroker.protocol import Hello, Subscribe, encode_event  # noqa: E402
from pybroker.server.bench import main  # noqa: E402
from pybroker.server.server import Server  # noqa: E402
from pybroker.server.testing import running_broker  # noqa: E402

#: Frames of a traceback kept per allocation.
DEPTH = 40
#: Connections opened and closed before the baseline (first-use allocations).
WARM_UP = 20

_CLIENT = r"""
import socket, sys
host, port, count, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bytes.fromhex(sys.argv[4])
held = []
for _ in range(count):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(frames)
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


async def _open(server: Server, count: int) -> trio.Process:
    frames = encode_event(Hello("idle")) + encode_event(Subscribe(1, "bench.idle"))
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CLIENT, "127.0.0.1", str(server.port), str(count), frames.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    said = b""
    with trio.fail_after(120):
        while b"ready" not in said:
            chunk = await child.stdout.receive_some(64)
            if not chunk:
                raise SystemExit("the client process ended early")
            said += chunk
        while len(server.lot.parked) < count or any(s.outbox.queued_bytes for s in server.sessions):
            await trio.sleep(0.05)
    return child


async def _close(server: Server, child: trio.Process) -> None:
    assert child.stdin is not None and child.stdout is not None
    await child.stdin.aclose()
    await child.stdout.aclose()
    with trio.fail_after(60):
        await child.wait()
        while server.sessions:
            await trio.sleep(0.05)


def _where(trace: tracemalloc.Traceback) -> str:
    """The innermost line of ours in ``trace``, and the line that allocated."""
    ours = [f for f in reversed(trace) if "/broker/" in f.filename or "/client/" in f.filename]
    inner = trace[-1]

    def name(frame: tracemalloc.Frame) -> str:
        code = linecache.getline(frame.filename, frame.lineno).strip()
        return f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno} {code[:70]}"

    if not ours:
        return f"(elsewhere) {name(inner)}"
    if ours[0] is inner:
        return name(inner)
    return f"{name(ours[0])}  <- {Path(inner.filename).name}:{inner.lineno}"


async def objects(count: int, top: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with running_broker(data_dir=Path(tmp), idle_timeout=3600, max_connections=count + 100) as server:
            server.lot.park_after = 0.05
            server.lot.sweep = 0.02
            await _close(server, await _open(server, WARM_UP))
            tracemalloc.start(DEPTH)
            gc.collect()
            before = tracemalloc.take_snapshot()
            child = await _open(server, count)
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            await _close(server, child)
    sizes: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    for stat in after.compare_to(before, "traceback"):
        key = _where(stat.traceback)
        sizes[key] += stat.size_diff
        blocks[key] += stat.count_diff
    total = sum(sizes.values())
    print(f"{count:,} idle subscriber connections: {total / count:,.0f} B of Python objects each (tracemalloc)")
    print(f"{'B each':>8} {'blocks':>6}  where (innermost line of the broker or codec <- allocating line)")
    for key, size in sizes.most_common(top):
        print(f"{size / count:8.0f} {blocks[key] / count:6.1f}  {key}")


if __name__ == "__main__":
    if "--objects" in sys.argv:
        parser = argparse.ArgumentParser(description="Python objects per idle connection (tracemalloc)")
        parser.add_argument("--objects", type=int, required=True, metavar="N", help="idle connections to open")
        parser.add_argument("--top", type=int, default=30, help="lines to show")
        args = parser.parse_args()
        trio.run(objects, args.objects, args.top)
        sys.exit(0)
    sys.exit(main(["memory", *sys.argv[1:]]))
