"""Fan-out throughput: 1 publisher, N subscribers, each in its own process.

    python benchmarks/fanout.py --subscribers 10 --messages 200000 --size 128

Starts `pybroker serve` on a free port, N subscriber processes and one
publisher process, all on loopback. Every subscriber checks it received every
offset 0..M-1 of the topic in order, once. Reports delivered messages per
second (all subscribers together) from the publisher's first send to the last
subscriber's last message, and the publisher's acknowledged rate.

Subscriber modes: ``decode`` goes through the client library and builds a
Message per message (what an application pays); ``raw`` counts messages from
batch headers using the codec alone (what the broker can push).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_broker, stop_broker  # noqa: E402

HERE = Path(__file__).resolve()
TOPIC = "bench.fanout"


# -- child processes -------------------------------------------------------


async def run_subscriber(url: str, messages: int, mode: str, ready_file: str) -> None:
    if mode == "raw":
        result = await _raw_subscriber(url, messages, ready_file)
    else:
        result = await _decode_subscriber(url, messages, ready_file)
    print(json.dumps(result), flush=True)


async def _decode_subscriber(url: str, messages: int, ready_file: str) -> dict[str, object]:
    import client

    expected = 0
    ok = True
    first = last = 0.0
    async with client.connect(url, name="bench-sub") as c:
        async with c.subscribe(TOPIC, window=100_000) as sub:
            Path(ready_file).touch()
            with trio.move_on_after(120):
                async for msg in sub:
                    if expected == 0:
                        first = time.time()
                    if msg.offset != expected:
                        ok = False
                    expected += 1
                    if expected >= messages:
                        break
            last = time.time()
    return {"received": expected, "in_order": ok, "first": first, "last": last}


async def _raw_subscriber(url: str, messages: int, ready_file: str) -> dict[str, object]:
    """Speak the protocol with the codec alone; count messages per batch header."""
    from client import parse_url
    from client.protocol import (
        NEED_DATA, Connection, Deliver, Hello, Role, SubAck, Subscribe, Welcome, batch_count,
    )

    host, port = parse_url(url)
    stream = await trio.open_tcp_stream(host, port)
    conn = Connection(Role.CLIENT)
    await stream.send_all(conn.send(Hello("bench-raw-sub")))
    expected = 0
    ok = True
    first = last = 0.0
    subscribed = False
    with trio.move_on_after(120):
        while expected < messages:
            event = conn.next_event()
            if event is NEED_DATA:
                data = await stream.receive_some(1 << 20)
                if not data:
                    break
                conn.receive_data(data)
            elif isinstance(event, Welcome):
                await stream.send_all(conn.send(Subscribe(1, TOPIC)))
            elif isinstance(event, SubAck) and not subscribed:
                subscribed = True
                Path(ready_file).touch()
            elif isinstance(event, Deliver):
                if expected == 0:
                    first = time.time()
                if event.base_offset != expected:
                    ok = False
                expected = event.base_offset + batch_count(event.batch)
    last = time.time()
    await stream.aclose()
    return {"received": expected, "in_order": ok, "first": first, "last": last}


async def run_publisher(url: str, messages: int, size: int) -> None:
    import client

    payload = b"x" * size
    async with client.connect(url, name="bench-pub", max_pending=100_000) as c:
        start = time.time()
        for _ in range(messages):
            await c.send(TOPIC, payload)
        await c.flush()
        end = time.time()
    print(json.dumps({"start": start, "acked": end}), flush=True)


# -- the parent ------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--mode", choices=("decode", "raw"), default="raw")
    parser.add_argument("--url", help="use a running broker instead of starting one")
    parser.add_argument("--broker-args", nargs="*", default=[], help="extra `pybroker serve` flags, e.g. --fsync never (prefix with --broker-args=)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, url = args.child[0], args.child[1]
        if role == "sub":
            trio.run(run_subscriber, url, args.messages, args.mode, args.child[2])
        else:
            trio.run(run_publisher, url, args.messages, args.size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        broker = None
        url = args.url
        if url is None:
            broker, url = start_broker(tmp, *args.broker_args)
        try:
            report(run(url, args, tmp), args)
        finally:
            if broker is not None:
                stop_broker(broker)


def run(url: str, args: argparse.Namespace, tmp: str) -> dict[str, object]:
    common = [sys.executable, str(HERE), "--messages", str(args.messages), "--size", str(args.size),
              "--mode", args.mode]
    env = dict(os.environ)
    subs = []
    for i in range(args.subscribers):
        ready = os.path.join(tmp, f"ready-{i}")
        subs.append((ready, subprocess.Popen(common + ["--child", "sub", url, ready], stdout=subprocess.PIPE, env=env)))
    deadline = time.monotonic() + 30
    while not all(os.path.exists(r) for r, _ in subs):
        if time.monotonic() > deadline:
            raise SystemExit("subscribers did not get ready")
        time.sleep(0.02)
    pub = subprocess.run(common + ["--child", "pub", url], stdout=subprocess.PIPE, env=env, timeout=300, check=True)
    pub_result = json.loads(pub.stdout)
    results = []
    for _, proc in subs:
        out, _ = proc.communicate(timeout=180)
        results.append(json.loads(out))
    return {"publisher": pub_result, "subscribers": results}


def report(result: dict[str, object], args: argparse.Namespace) -> None:
    pub = result["publisher"]
    subs = result["subscribers"]
    assert isinstance(pub, dict) and isinstance(subs, list)
    complete = all(s["received"] == args.messages and s["in_order"] for s in subs)
    delivered = sum(int(s["received"]) for s in subs)
    end = max(float(s["last"]) for s in subs)
    elapsed = end - float(pub["start"])
    pub_elapsed = float(pub["acked"]) - float(pub["start"])
    print(
        f"fan-out {args.size} B, {args.subscribers} subscribers ({args.mode}), {args.messages} messages: "
        f"{delivered / elapsed:,.0f} delivered msg/s; publisher {args.messages / pub_elapsed:,.0f} acked msg/s; "
        f"{'every subscriber got every message in order' if complete else 'INCOMPLETE: ' + json.dumps(subs)}"
    )


if __name__ == "__main__":
    main()
