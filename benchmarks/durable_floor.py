"""The floor under durable one-message publishing in Python (issue 17).

    python benchmarks/durable_floor.py --repeat 3

Issue 17 asks for 350,000 acknowledged msg/s with one message per PUBLISH,
256 in flight and fsync always, from a broker on one of this machine's two
cores: 2.86 µs of broker CPU per message, everything included. This script
measures what the least a Trio process can do per message costs here, next
to pybroker, under the same load (`pybroker bench durable --batch 1
--window 256 --policies always`, pinned to the second CPU):

- the **floor**: a durable relay of about 60 lines (below, `--serve`): it
  reads frames, takes each PUBLISH's batch, appends the batches of one read
  to one file with one `writev`, and answers their PUBACKs (durability
  DISK) once a group-commit `fdatasync` covering them has returned. The
  fdatasync runs off the event loop in pybroker's own fsync thread
  (`SyncThread`, the cheapest hand-off the broker has). No topics, checks,
  subscribers, indexes or recovery: nothing a broker needs beyond that.
- **pybroker**: `pybroker serve --fsync always`, pinned the same way.

Each is started fresh per round, alternating, and the table gives acked
msg/s and the target's CPU per message (utime + stime of all its threads,
from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pybroker.server.bench.procs import child_env, loadavg, start_broker, stop_process  # noqa: E402

HEADER = struct.Struct(">IBB")  # body size, type, flags
PUBACK = struct.Struct(">IBBQQIQB")  # frame header, request_id, base, count, timestamp, durability
STORED = struct.Struct(">QIQ")  # base offset, count, timestamp before each stored batch
U32, U64 = struct.Struct(">I"), struct.Struct(">Q")


# -- the floor: a minimal durable relay --------------------------------------


def serve_floor(port: int, data_dir: str) -> None:
    import trio

    from pybroker.protocol import Durability, FrameType, Goodbye, Pong, Welcome, encode_event
    from pybroker.server.storage.syncthread import SyncThread

    welcome = encode_event(Welcome("floor", "floor", {"max_frame_bytes": 4 * 1024 * 1024}))
    fd = os.open(os.path.join(data_dir, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    syncer = SyncThread("floor fsync")
    state: dict[str, Any] = {"next": 0, "pending": [], "wake": trio.Event()}

    class Peer:
        def __init__(self, stream: trio.SocketStream) -> None:
            self.stream, self.out, self.wake = stream, [], trio.Event()

        def queue(self, data: bytes) -> None:
            self.out.append(data)
            self.wake.set()

        async def writer(self) -> None:
            while True:
                if self.out:
                    data, self.out = b"".join(self.out), []
                    await self.stream.send_all(data)
                else:
                    self.wake = trio.Event()
                    await self.wake.wait()

    async def committer() -> None:
        # Group commit: everything written since the last fdatasync is
        # covered by the next; its PUBACKs go out once it returned.
        while True:
            if not state["pending"]:
                state["wake"] = trio.Event()
                await state["wake"].wait()
                continue
            covered, state["pending"] = state["pending"], []
            await syncer.run(os.fdatasync, fd)
            for peer, acks in covered:
                peer.queue(acks)

    async def handle(stream: trio.SocketStream) -> None:
        peer = Peer(stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.writer)
            buf = bytearray()
            try:
                while True:
                    data = await stream.receive_some(1 << 20)
                    if not data:
                        return
                    buf += data
                    pos, now = 0, time.time_ns() // 1000
                    writes: list[bytes] = []
                    acks: list[bytes] = []
                    with memoryview(buf) as view:
                        while len(buf) - pos >= 6:
                            size, ftype, _ = HEADER.unpack_from(view, pos)
                            end = pos + 6 + size
                            if end > len(buf):
                                break
                            start = pos + 6
                            if ftype == FrameType.PUBLISH:
                                request_id = U64.unpack_from(view, start)[0]
                                tlen = int.from_bytes(view[start + 8 : start + 10], "big")
                                batch = bytes(view[start + 10 + tlen : end])
                                count = U32.unpack_from(batch, 0)[0]
                                base = state["next"]
                                state["next"] = base + count
                                writes.append(STORED.pack(base, count, now))
                                writes.append(batch)
                                if request_id:
                                    acks.append(
                                        PUBACK.pack(29, FrameType.PUBACK, 0, request_id, base, count, now, Durability.DISK)
                                    )
                            elif ftype == FrameType.HELLO:
                                peer.queue(welcome)
                            elif ftype == FrameType.PING:
                                peer.queue(encode_event(Pong(U64.unpack_from(view, start)[0])))
                            elif ftype == FrameType.GOODBYE:
                                peer.queue(encode_event(Goodbye()))
                            pos = end
                    del buf[:pos]
                    if writes:
                        os.writev(fd, writes)
                        state["pending"].append((peer, b"".join(acks)))
                        state["wake"].set()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                nursery.cancel_scope.cancel()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer)
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            bound = listeners[0].socket.getsockname()
            print(json.dumps({"url": f"pybroker://{bound[0]}:{bound[1]}"}), flush=True)
            await trio.serve_listeners(handle, listeners)

    trio.run(main)


# -- the comparison -------------------------------------------------------------


def start_floor(workdir: Path, cpu: int | None) -> tuple[subprocess.Popen[bytes], str]:
    out_path = workdir / "floor.out"
    with open(out_path, "wb") as out, open(workdir / "floor.err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--data-dir", str(workdir)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env(),
        )
    if cpu is not None:
        os.sched_setaffinity(proc.pid, {cpu})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = out_path.read_text().strip()
        if text:
            return proc, json.loads(text.splitlines()[0])["url"]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc, 5)
    raise SystemExit(f"durable_floor: the floor relay did not start: {(workdir / 'floor.err').read_text()}")


def load(url: str, pid: int, duration: float, workdir: Path, cpus: set[int] | None) -> dict[str, Any]:
    out = workdir / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "pybroker", "bench", "durable", "--url", url, "--broker-pid", str(pid), "--no-pin",
         "--batch", "1", "--window", "256", "--policies", "always", "--duration", str(duration),
         "--json", str(out), "--quiet"],
        check=True, stdout=subprocess.DEVNULL, env=child_env(), timeout=duration + 120,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    row: dict[str, Any] = json.loads(out.read_text())["scenarios"]["durable"]["rows"][0]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="run the floor relay itself (used by the comparison)")
    parser.add_argument("--data-dir", default=None, help="with --serve: where its log file goes")
    parser.add_argument("--port", type=int, default=0, help="with --serve: the port (0: any)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (floor, pybroker, ...)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of load per run")
    args = parser.parse_args(argv)
    if args.serve:
        serve_floor(args.port, args.data_dir or tempfile.mkdtemp(prefix="floor-"))
        return 0
    cpus = sorted(os.sched_getaffinity(0))
    target_cpu, load_cpus = (cpus[0], set(cpus[1:])) if len(cpus) > 1 else (None, None)
    print(f"load {loadavg()}; 1 message per PUBLISH, 256 in flight, fsync always", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for i in range(args.repeat):
        for kind in ("floor", "pybroker"):
            with tempfile.TemporaryDirectory(prefix=f"{kind}-") as tmp:
                workdir = Path(tmp)
                if kind == "floor":
                    proc, url = start_floor(workdir, target_cpu)
                    try:
                        row = load(url, proc.pid, args.duration, workdir, load_cpus)
                    finally:
                        stop_process(proc, 5)
                else:
                    target = start_broker(workdir, ["--fsync", "always", "--no-http"],
                                          [target_cpu] if target_cpu is not None else None)
                    try:
                        assert target.pid is not None
                        row = load(target.url, target.pid, args.duration, workdir, load_cpus)
                    finally:
                        target.stop()
            row = dict(row, kind=kind, round=i + 1)
            rows.append(row)
            print(f"  round {i + 1} {kind}: {row['acked_per_s']:,.0f} acked msg/s, "
                  f"{row['cpu_us_per_message']:.2f} µs/msg at {row['cpu_cores']:.2f} core", file=sys.stderr)
    print("| round | target | acked msg/s | target cores | target µs CPU per message | verified |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['round']} | {row['kind']} | {row['acked_per_s']:,.0f} | {row['cpu_cores']:.2f} | "
              f"{row['cpu_us_per_message']:.2f} | {row['verified']} |")
    for kind in ("floor", "pybroker"):
        mine = [r for r in rows if r["kind"] == kind]
        print(f"median {kind}: {statistics.median(r['acked_per_s'] for r in mine):,.0f} acked msg/s, "
              f"{statistics.median(r['cpu_us_per_message'] for r in mine):.2f} µs/msg")
    print(f"(load average at the end: {loadavg()})")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
