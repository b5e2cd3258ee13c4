"""Consumer-group throughput: jobs acknowledged per second.

    python benchmarks/group_throughput.py --jobs 200000 --workers 2 --max-ack-pending 1000

Starts ``pybroker serve`` from this source tree on a temporary data
directory (fsync ``always`` unless ``--broker-args`` says otherwise),
creates group ``bench`` on topic ``jobs`` (a member joins and leaves, so the
group exists with its cursor at 0), publishes ``--jobs`` small messages,
then starts ``--workers`` worker processes that join the group with the
client library, each with ``--max-ack-pending`` as its own prefetch (a
member's max_ack_pending is its own), and acknowledge every job from a
plain callback (auto ack).

Jobs acked per second = jobs / (first job received by any worker -> last
job received by any worker), on the one ``time.time()`` clock of this
machine. The run is verified against the broker's own counters: ``acked``
must equal ``--jobs`` with nothing pending; ``redelivered`` is printed.
Not part of ``pybroker bench`` (which has no group scenario yet).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

import pybroker as client  # noqa: E402

TOPIC, GROUP = "jobs", "bench"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_broker(data: Path, log: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    command = [sys.executable, "-m", "pybroker", "serve", "--port", "0", "--no-http",
               "--data-dir", str(data), "--log-format", "json", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"listening"' in line:
                return proc, str(json.loads(line)["url"])
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"broker did not start:\n{log.read_text(errors='replace')}")


async def prepare(url: str, jobs: int, max_ack_pending: int) -> None:
    async with client.connect(url, name="bench-setup") as c:
        async with c.subscribe(TOPIC, group=GROUP, start="earliest", max_ack_pending=max_ack_pending):
            pass  # the group now exists, without members, at offset 0
        payload = b"x" * 64
        for i in range(jobs):
            await c.send(TOPIC, payload)
        await c.flush()


async def poll(url: str, jobs: int, timeout: float) -> dict[str, object]:
    async with client.connect(url, name="bench-poll") as c:
        with trio.fail_after(timeout):
            for _ in range(int(timeout / 0.05) + 1):
                info = await c.groups("inspect", GROUP)
                if int(info["acked"]) >= jobs and int(info["pending"]) == 0:
                    return info
                await trio.sleep(0.05)
    raise AssertionError("unreachable")


async def worker(url: str, out: Path, max_ack_pending: int) -> None:
    """Join the group, ack every job; on SIGTERM write first/last/count."""
    seen = [0.0, 0.0, 0]

    def handle(msg: client.Message) -> None:
        now = time.time()
        if not seen[2]:
            seen[0] = now
        seen[1] = now
        seen[2] += 1

    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with client.connect(url, name="bench-worker") as c:
            await c.subscribe(TOPIC, handle, group=GROUP, max_ack_pending=max_ack_pending)
            async for _ in signals:
                break
    out.write_text(json.dumps({"first": seen[0], "last": seen[1], "count": seen[2]}))


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        broker, url = start_broker(work / "data", work / "broker.log", shlex.split(args.broker_args))
        workers: list[subprocess.Popen[bytes]] = []
        try:
            trio.run(prepare, url, args.jobs, args.max_ack_pending)
            outs = [work / f"worker-{i}.json" for i in range(args.workers)]
            for out in outs:
                workers.append(subprocess.Popen(
                    [sys.executable, __file__, "--worker", url, "--out", str(out),
                     "--max-ack-pending", str(args.max_ack_pending)], env=_env()))
            info = trio.run(poll, url, args.jobs, args.timeout)
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                w.wait(timeout=30)
            results = [json.loads(out.read_text()) for out in outs]
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                broker.kill()
        busy = [r for r in results if r["count"]]
        seconds = max(r["last"] for r in busy) - min(r["first"] for r in busy)
        received = sum(r["count"] for r in results)
        return {
            "jobs": args.jobs,
            "workers": args.workers,
            "max_ack_pending": args.max_ack_pending,
            "received": received,
            "acked": info["acked"],
            "redelivered": info["redelivered"],
            "seconds": seconds,
            "acked_per_second": args.jobs / seconds if seconds > 0 else float("inf"),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-ack-pending", type=int, default=1000, help="per member")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--broker-args", default="", help="extra `pybroker serve` flags")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trio.run(worker, args.worker, Path(args.out), args.max_ack_pending)
        return 0
    status = 0
    for _ in range(args.repeat):
        result = run(args)
        ok = result["acked"] == args.jobs and result["received"] >= args.jobs
        status |= not ok
        print(
            f"{result['jobs']:,} jobs, {result['workers']} workers, max_ack_pending {result['max_ack_pending']}: "
            f"{result['acked_per_second']:,.0f} jobs acked/s ({result['seconds']:.2f} s; "
            f"redelivered {result['redelivered']}){'' if ok else ' NOT VERIFIED'}",
            flush=True,
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
