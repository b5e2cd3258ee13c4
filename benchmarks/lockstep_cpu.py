"""Broker CPU per message with one message per PUBLISH frame, in lockstep.

    python benchmarks/lockstep_cpu.py                     # paced and durable, fsync never and always
    python benchmarks/lockstep_cpu.py --modes dedup       # durable with flag DEDUP on every frame
    python benchmarks/lockstep_cpu.py --python ../other/.venv/bin/python   # another tree's broker

`pybroker bench latency --per-frame 1` and `bench durable --batch 1` give
rates, latencies and CPU; on a machine others are loading their figures
move with the neighbours, and so does the broker's CPU per message, because
a starved broker finds more frames per read. Here the batching is fixed by
the load itself, whatever the machine does: every step writes its PUBLISH
frames in one write and waits until every answer and delivery of the step
has arrived before the next. What moves with the load is then the time a
step takes, not the work it gives the broker.

- ``paced``: 10 one-message PUBLISH frames (128 B) per step to 10 raw
  subscribers (what `bench latency --per-frame 1` offers per 1 ms tick).
- ``durable``: 256 one-message PUBLISH frames per step, no subscribers (a
  window of 256 in flight, refilled a window at a time).
- ``dedup``: as ``durable``, each frame with flag DEDUP and a msg-id of its
  own (what the client library sends by default).

The broker (``PYTHON -m pybroker serve`` on a temporary data directory) is
pinned to the first CPU and this process to the second. Broker CPU is
utime + stime from /proc over the measured steps (the fsync thread's
included), divided by the messages; "user" is utime alone. Every PUBACK and
DELIVER byte of a step is awaited, so nothing is counted that was not done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from pybroker.protocol import (
    NEED_DATA,
    Connection,
    Hello,
    Role,
    Subscribe,
    encode_batch,
    encode_batch_from_records,
    encode_publish,
    encode_record,
    with_msg_id,
)

#: PUBACK frame: header 6 + body 29 (protocol.md, "PUBACK").
PUBACK_BYTES = 35
#: DELIVER frame without topic and batch: header 6 + sub_id, base, timestamp, topic length 22.
DELIVER_FIXED_BYTES = 28
TOPIC = "lockstep"


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _ticks(), int(fields[12]) / _ticks()


class Broker:
    def __init__(self, python: str, fsync: str, pin: bool) -> None:
        self.dir = tempfile.mkdtemp(prefix="lockstep-")
        self.log_path = os.path.join(self.dir, "broker.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [python, "-m", "pybroker", "serve", "--port", "0", "--no-http", "--data-dir",
                 os.path.join(self.dir, "data"), "--fsync", fsync, "--log-format", "json"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )
        if pin:
            os.sched_setaffinity(self.proc.pid, {0})
        deadline = time.monotonic() + 30
        self.address: tuple[str, int] | None = None
        while self.address is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise SystemExit(f"the broker did not start; see {self.log_path}")
            with open(self.log_path) as f:
                for line in f:
                    if '"listening"' in line:
                        host, port = json.loads(line)["url"].split("//")[1].rsplit(":", 1)
                        self.address = (host, int(port))
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _next(sock: socket.socket, conn: Connection) -> object:
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        data = sock.recv(65536)
        if not data:
            raise SystemExit("the broker closed a connection")
        conn.receive_data(data)


def _open(address: tuple[str, int], name: str) -> tuple[socket.socket, Connection]:
    sock = socket.create_connection(address, timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(Role.CLIENT)
    sock.sendall(conn.send(Hello(client_name=name)))
    _next(sock, conn)  # WELCOME
    return sock, conn


def _drain(sock: socket.socket, size: int) -> None:
    got = 0
    while got < size:
        data = sock.recv(min(size - got, 1 << 20))
        if not data:
            raise SystemExit("the broker closed a connection")
        got += len(data)


def run(python: str, mode: str, fsync: str, steps: int, pin: bool) -> dict[str, float | int | str]:
    per_step, subscribers = (10, 10) if mode == "paced" else (256, 0)
    broker = Broker(python, fsync, pin)
    try:
        assert broker.address is not None
        subs = []
        for i in range(subscribers):
            sock, conn = _open(broker.address, f"lockstep-sub-{i}")
            sock.sendall(conn.send(Subscribe(1, TOPIC)))
            _next(sock, conn)  # SUBACK
            subs.append(sock)
        pub, _ = _open(broker.address, "lockstep-pub")
        batch = encode_batch([b"x" * 128])
        request_id = 0
        deliver_bytes = (DELIVER_FIXED_BYTES + len(TOPIC) + len(batch)) * per_step

        record = encode_record(b"x" * 128)

        def step() -> None:
            nonlocal request_id
            frames = []
            for _ in range(per_step):
                request_id += 1
                if mode == "dedup":
                    named = encode_batch_from_records([with_msg_id(record, f"lockstep.{request_id}")])
                    frames.append(encode_publish(request_id, TOPIC, named, dedup=True))
                else:
                    frames.append(encode_publish(request_id, TOPIC, batch))
            pub.sendall(b"".join(frames))
            _drain(pub, PUBACK_BYTES * per_step)
            for sock in subs:
                _drain(sock, deliver_bytes)

        for _ in range(min(200, steps)):
            step()  # warm-up: imports, first segment, caches
        user0, sys0 = _cpu(broker.proc.pid)
        t0 = time.monotonic()
        for _ in range(steps):
            step()
        seconds = time.monotonic() - t0
        user1, sys1 = _cpu(broker.proc.pid)
        messages = steps * per_step
        return {
            "mode": mode, "fsync": fsync, "messages": messages,
            "cpu_us_per_msg": (user1 - user0 + sys1 - sys0) / messages * 1e6,
            "user_us_per_msg": (user1 - user0) / messages * 1e6,
            "msg_per_s": messages / seconds,
            "loadavg": os.getloadavg()[0],
        }
    finally:
        broker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python whose pybroker serves (default: this one)")
    parser.add_argument("--modes", default="paced,durable")
    parser.add_argument("--fsync", default="never,always")
    parser.add_argument("--paced-steps", type=int, default=2000)
    parser.add_argument("--durable-steps", type=int, default=200)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    args = parser.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[1]})
    else:
        args.pin = False
    print(f"{'mode':8} {'fsync':6} {'messages':>9} {'CPU µs/msg':>10} {'user µs/msg':>11} {'msg/s':>9} {'load':>5}")
    for mode in args.modes.split(","):
        for fsync in args.fsync.split(","):
            steps = args.paced_steps if mode == "paced" else args.durable_steps
            r = run(args.python, mode, fsync, steps, args.pin)
            print(f"{mode:8} {fsync:6} {r['messages']:>9,} {r['cpu_us_per_msg']:>10.1f} {r['user_us_per_msg']:>11.1f} "
                  f"{r['msg_per_s']:>9,.0f} {r['loadavg']:>5.2f}", flush=True)


if __name__ == "__main__":
    main()
