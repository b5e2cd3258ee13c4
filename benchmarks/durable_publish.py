"""Durable publish throughput per fsync policy: acknowledged messages per second.

    python benchmarks/durable_publish.py --messages 300000 --size 128

For each policy (always, interval, never) it starts `pybroker serve` with
the file log in a fresh temporary directory, then runs one pipelined
publisher process (send() in a loop, then flush) and reports acknowledged
messages per second, the durability the acks carried, and how many fsync
calls the broker made (from strace-free counting: the committer's rounds are
not exposed yet, so this reports wall-clock rates only). Every ack is checked:
offsets contiguous, one per message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, start_broker, stop_broker  # noqa: E402

HERE = Path(__file__).resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--max-pending", type=int, default=100_000, help="unacknowledged messages the publisher allows")
    parser.add_argument("--policies", default="always,interval,never")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = trio.run(publish, args.child, "bench.durable", args.messages, args.size, args.max_pending)
        print(json.dumps(result))
        return
    for policy in args.policies.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            broker, url = start_broker(tmp, "--fsync", policy)
            try:
                out = subprocess.run(
                    [sys.executable, str(HERE), "--messages", str(args.messages), "--size", str(args.size),
                     "--max-pending", str(args.max_pending), "--child", url],
                    stdout=subprocess.PIPE, check=True, timeout=600,
                )
            finally:
                stop_broker(broker)
            r = json.loads(out.stdout)
            rate = args.messages / (r["acked"] - r["start"])
            print(
                f"fsync={policy:<8} {args.size} B, {args.max_pending} in flight: {rate:>10,.0f} acked msg/s  "
                f"acks {r['durability']}  {'offsets contiguous' if r['in_order'] else 'OFFSETS WRONG'}",
                flush=True,
            )


if __name__ == "__main__":
    main()
