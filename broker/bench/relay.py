"""The reference ceiling: a minimal batch-forwarding Trio relay.

Like peers.md's "trio-batch": one implicit topic, no matching, no storage,
no flow control beyond a bound per connection, no validation beyond framing.
Every PUBLISH is forwarded to every subscriber as its own small DELIVER
header followed by the batch as one shared ``bytes`` object, and each
connection's writer joins what is queued into one ``send_all`` per wake-up
(write coalescing). It speaks just enough of protocol.md (HELLO/WELCOME,
SUBSCRIBE/SUBACK, UNSUBSCRIBE/UNSUBACK, PUBLISH -> PUBACK + DELIVER,
PING/PONG, GOODBYE; CREDIT is ignored) for the load processes of
`pybroker bench`, raw or through the client library, to drive it unchanged,
so pybroker's figures can be given as a fraction of it, measured side by side.

    python -m pybroker.server.bench.relay --port 0    # prints {"url": ...} on stdout
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time

import trio

from pybroker.protocol import FrameType, Goodbye, Pong, SubAck, UnsubAck, Welcome, encode_event

HEADER = struct.Struct(">IBB")  # body size, type, flags
DELIVER = struct.Struct(">IBBIQQH")  # frame header, sub_id, base offset, timestamp, topic length
PUBACK = struct.Struct(">IBBQQIQB")  # frame header, request_id, base, count, timestamp, durability
U32, U64 = struct.Struct(">I"), struct.Struct(">Q")
#: Bytes queued for one connection before publishers wait for it to drain.
QUEUE_LIMIT = 16 * 1024 * 1024
WELCOME = encode_event(Welcome("relay", "relay", {"max_frame_bytes": 4 * 1024 * 1024}))


class Peer:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.wake = trio.Event()
        self.room = trio.Event()
        self.closing = False

    def queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)
        self.wake.set()

    async def writer(self) -> None:
        try:
            while True:
                if self.out:
                    data, self.out, self.out_bytes = b"".join(self.out), [], 0
                    self.room.set()
                    await self.stream.send_all(data)
                elif self.closing:
                    return
                else:
                    self.wake = trio.Event()
                    await self.wake.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.closing = True
            self.room.set()


class Relay:
    def __init__(self) -> None:
        self.subscribers: list[tuple[Peer, int]] = []
        self.next_offset = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        peer = Peer(stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.writer)
            try:
                await self.read(peer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.subscribers = [s for s in self.subscribers if s[0] is not peer]
                peer.closing = True
                peer.wake.set()
                nursery.cancel_scope.deadline = trio.current_time() + 5
        await trio.aclose_forcefully(stream)

    async def read(self, peer: Peer) -> None:
        buf = bytearray()
        while True:
            data = await peer.stream.receive_some(1 << 20)
            if not data:
                return
            buf += data
            pos, now = 0, time.time_ns() // 1000
            with memoryview(buf) as view:  # slices of it copy once, not twice
                while len(buf) - pos >= 6:
                    size, ftype, _ = HEADER.unpack_from(view, pos)
                    end = pos + 6 + size
                    if end > len(buf):
                        break
                    if not self.frame(peer, ftype, view, pos + 6, end, now):
                        return
                    pos = end
            del buf[:pos]
            for sub, _ in self.subscribers:  # backpressure: bounded queues
                while sub.out_bytes > QUEUE_LIMIT and not sub.closing:
                    sub.room = trio.Event()
                    await sub.room.wait()

    def frame(self, peer: Peer, ftype: int, buf: memoryview, start: int, end: int, now: int) -> bool:
        """Act on one frame; False means stop reading (GOODBYE)."""
        if ftype == FrameType.PUBLISH:
            request_id = U64.unpack_from(buf, start)[0]
            tlen = int.from_bytes(buf[start + 8 : start + 10], "big")
            topic = bytes(buf[start + 10 : start + 10 + tlen])
            batch = bytes(buf[start + 10 + tlen : end])  # the one copy all subscribers share
            count = U32.unpack_from(batch, 0)[0]
            base, self.next_offset = self.next_offset, self.next_offset + count
            size = 20 + 2 + tlen + len(batch)
            for sub, sub_id in self.subscribers:
                sub.out.append(DELIVER.pack(size, FrameType.DELIVER, 0, sub_id, base, now, tlen) + topic)
                sub.out.append(batch)
                sub.out_bytes += size + 6
                sub.wake.set()
            if request_id:
                peer.queue(PUBACK.pack(29, FrameType.PUBACK, 0, request_id, base, count, now, 0))
        elif ftype == FrameType.HELLO:
            peer.queue(WELCOME)
        elif ftype == FrameType.SUBSCRIBE:
            sub_id = U32.unpack_from(buf, start)[0]
            self.subscribers.append((peer, sub_id))
            peer.queue(encode_event(SubAck(sub_id)))
        elif ftype == FrameType.UNSUBSCRIBE:
            sub_id = U32.unpack_from(buf, start)[0]
            self.subscribers = [s for s in self.subscribers if s != (peer, sub_id)]
            peer.queue(encode_event(UnsubAck(sub_id)))
        elif ftype == FrameType.PING:
            peer.queue(encode_event(Pong(U64.unpack_from(buf, start)[0])))
        elif ftype == FrameType.GOODBYE:
            peer.queue(encode_event(Goodbye()))
            return False
        return True  # CREDIT, PONG, anything else: ignored


async def serve(host: str, port: int) -> None:
    relay = Relay()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()
    print(json.dumps({"url": f"pybroker://{bound[0]}:{bound[1]}"}), flush=True)
    await trio.serve_listeners(relay.handle, listeners)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7430)
    args = parser.parse_args(argv)
    try:
        trio.run(serve, args.host, args.port)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
