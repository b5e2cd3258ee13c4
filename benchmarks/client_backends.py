"""The client library's own speed under Trio and under asyncio.

    python benchmarks/client_backends.py                 # both backends, 3 rounds
    python benchmarks/client_backends.py --backends trio --repeat 5
    python benchmarks/client_backends.py --python /other/checkout/.venv/bin/python,.venv/bin/python

Starts one ``pybroker serve`` (fsync never, no HTTP) on a temporary data
directory, then for each round and backend runs, in a fresh process:

- publish: ``send()`` of 128-byte messages in a loop (``--messages``,
  max_pending 65536), then ``flush()``, keeping no PendingAck (a closing
  publish checks that exactly ``--messages`` were stored);
- publish, acks kept: the same, keeping every PendingAck and checking the
  offsets in order afterwards (the garbage collector then walks a million
  live objects: this is what that costs);
- callbacks: for each count in ``--subscriptions`` (1 and 10), that many
  callback subscriptions in one client replaying a topic of ``--replay``
  messages from offset 0 (every subscription gets every message).

Each figure is given per wall-clock second and per CPU second of the client
process: on a shared machine the second one moves much less with the load
(the load averages are printed with each run). With 2 or more CPUs the
broker is pinned to the first, clients to the second. ``--python`` runs the
clients with each of several interpreters in turn, A B A B within each
round, e.g. a checkout before a change against one after it (each must
have pybroker installed; the broker is this one's). Nothing is asserted;
each run checks its own counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

PUBLISH_TOPIC = "bench.clients.publish"
REPLAY_TOPIC = "bench.clients.replay"


async def _publish(url: str, n: int, size: int, keep: bool) -> dict[str, float]:
    import pybroker

    payload = b"x" * size
    async with pybroker.connect(url, max_pending=65536) as c:
        first = (await c.publish(PUBLISH_TOPIC, b"warm-up")).offset + 1
        t0, c0 = time.perf_counter(), time.process_time()
        if keep:
            pendings = [await c.send(PUBLISH_TOPIC, payload) for _ in range(n)]
        else:
            # What a publisher that does not look at each ack does (and
            # what nats.py's publish() offers): nothing kept per message.
            for _ in range(n):
                await c.send(PUBLISH_TOPIC, payload)
        await c.flush()
        t1, c1 = time.perf_counter(), time.process_time()
        # Every message stored, none twice: the next offset is first + n
        # (this run is the topic's only publisher).
        after = (await c.publish(PUBLISH_TOPIC, b"check")).offset
    assert after == first + n, f"{after - first} messages stored, {n} sent"
    if keep:
        offsets = [p.result().offset for p in pendings]
        assert offsets == list(range(first, first + n)), "acks out of order"
    return {"wall": n / (t1 - t0), "cpu": n / (c1 - c0)}


async def _callbacks(url: str, m: int, subscriptions: int) -> dict[str, float]:
    import pybroker

    done = anyio.Event()
    counts = [0] * subscriptions
    finished = 0

    def callback_for(i: int) -> object:
        def on_message(msg: "pybroker.Message") -> None:
            nonlocal finished
            assert msg.offset == counts[i], (msg.offset, counts[i])
            counts[i] += 1
            if counts[i] == m:
                finished += 1
                if finished == subscriptions:
                    done.set()

        return on_message

    async with pybroker.connect(url) as c:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(subscriptions):
            await c.subscribe(REPLAY_TOPIC, callback_for(i), start=0, window=65536)  # type: ignore[arg-type]
        with anyio.fail_after(600):
            await done.wait()
        t1, c1 = time.perf_counter(), time.process_time()
    total = m * subscriptions
    return {"wall": total / (t1 - t0), "cpu": total / (c1 - c0)}


def _worker(argv: list[str]) -> None:
    role, backend, url, n, extra = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    if role in ("publish", "publish-kept"):
        result = anyio.run(_publish, url, n, extra, role == "publish-kept", backend=backend)
    else:
        result = anyio.run(_callbacks, url, n, extra, backend=backend)
    print(json.dumps(result))


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if (os.cpu_count() or 1) >= 2 else []


def _start_broker(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = data_dir.parent / "broker.log"
    command = [
        *_pin(0), sys.executable, "-m", "pybroker", "serve", "--port", "0", "--no-http",
        "--fsync", "never", "--data-dir", str(data_dir), "--log-format", "json",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "listening":
                return proc, str(json.loads(line)["url"])
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the broker did not start:\n{log.read_text(errors='replace')}")


def _run(python: str, role: str, backend: str, url: str, n: int, extra: int) -> dict[str, float]:
    command = [*_pin(1), python, __file__, "--worker", role, backend, url, str(n), str(extra)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{role} under {backend} ({python}) failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _label(role: str, extra: int) -> str:
    if role == "publish":
        return "send()/s, one process"
    if role == "publish-kept":
        return "send()/s, every ack kept"
    return f"callbacks/s, {extra} subscription{'s' if extra != 1 else ''}"


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="trio,asyncio")
    parser.add_argument("--messages", type=int, default=1_000_000, help="send() calls per publish run")
    parser.add_argument("--replay", type=int, default=300_000, help="messages each subscription replays")
    parser.add_argument("--subscriptions", default="1,10", help="callback subscriptions per run, a list")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--python", default=sys.executable,
        help="interpreters to run the clients with, comma-separated, alternated within each round",
    )
    args = parser.parse_args()
    backends = args.backends.split(",")
    pythons = args.python.split(",")
    runs = [("publish", args.messages, args.size), ("publish-kept", args.messages, args.size)]
    runs += [("callbacks", args.replay, int(k)) for k in args.subscriptions.split(",")]
    rows: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pybroker-client-bench-") as tmp:
        proc, url = _start_broker(Path(tmp) / "data")
        try:
            # The topic the callback runs replay: exactly --replay messages.
            anyio.run(_fill, url, args.replay, args.size, backend=backends[0])
            for round_no in range(args.repeat):
                for backend in backends:
                    for role, n, extra in runs:
                        for python in pythons:
                            result = _run(python, role, backend, url, n, extra)
                            result["load"] = os.getloadavg()[0]
                            rows.setdefault((python, _label(role, extra), backend), []).append(result)
                            print(
                                f"round {round_no + 1}: {_label(role, extra):28} {backend:7}"
                                f" {result['wall']:>10,.0f}/s wall {result['cpu']:>10,.0f}/s per CPU second"
                                f"  load {result['load']:.2f}"
                                + (f"  {python}" if len(pythons) > 1 else ""),
                                file=sys.stderr,
                            )
        finally:
            proc.terminate()
            proc.wait(30)
    loads = [r["load"] for results in rows.values() for r in results]
    print(f"load average (1 min) during the runs: {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs")
    header = f"{'what':30} {'backend':8} {'per wall s (median, min-max)':>34} {'per CPU s (median, min-max)':>34}"
    for python in pythons:
        if len(pythons) > 1:
            print(f"\n{python}")
        print(header)
        for (who, what, backend), results in rows.items():
            if who != python:
                continue
            cells = []
            for key in ("wall", "cpu"):
                values = [r[key] for r in results]
                cells.append(f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})")
            print(f"{what:30} {backend:8} {cells[0]:>34} {cells[1]:>34}")


async def _fill(url: str, n: int, size: int) -> None:
    import pybroker

    async with pybroker.connect(url) as c:
        for i in range(n):
            await c.send(REPLAY_TOPIC, b"%d" % i + b"." * max(0, size - 7))
        await c.flush()


if __name__ == "__main__":
    main()
