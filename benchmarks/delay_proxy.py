"""A TCP proxy on loopback that delays what the server sends back by a
fixed time: a local SeaweedFS made to answer like a distant object store.

    python benchmarks/delay_proxy.py --port P --target 127.0.0.1:8333 --delay-ms 20

Requests go through at once; each chunk of the server's answer is
forwarded ``--delay-ms`` after it arrived, in order, so every request
takes that much longer and requests on different connections overlap as
they would over a real network. Used by ``cluster_publish.py
--store-delay-ms`` (docs/cluster.md §12 models S3's PUT latency). Prints
``ready`` once it listens. Bounded: at most 256 chunks of 64 KiB waiting
per connection (the server is then read no faster than it is forwarded).
"""

from __future__ import annotations

import argparse
import sys

import trio

CHUNK = 64 * 1024
#: Chunks waiting for their time, per connection.
QUEUED = 256


async def forward(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    while data := await source.receive_some(CHUNK):
        await sink.send_all(data)
    await sink.send_eof()


async def delayed(source: trio.SocketStream, sink: trio.SocketStream, delay: float) -> None:
    send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUED)

    async def read() -> None:
        async with send:
            while data := await source.receive_some(CHUNK):
                await send.send((trio.current_time() + delay, data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                await sink.send_all(data)
    await sink.send_eof()


async def handle(client: trio.SocketStream, host: str, port: int, delay: float) -> None:
    try:
        server = await trio.open_tcp_stream(host, port)
    except OSError:
        await client.aclose()
        return
    async with client, server:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward, client, server)
                nursery.start_soon(delayed, server, client, delay)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # one side went away


async def serve(listen: int, host: str, port: int, delay: float) -> None:
    listeners = await trio.open_tcp_listeners(listen, host="127.0.0.1")
    print("ready", flush=True)
    await trio.serve_listeners(lambda stream: handle(stream, host, port, delay), listeners)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="host:port of the server")
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    trio.run(serve, args.port, host, int(port), args.delay_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
