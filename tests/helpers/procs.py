"""``pybroker`` as a subprocess, started the way users start it.

- ``run``: one command to completion (``pub``, ``auth check``, a ``serve``
  that must refuse to start), output captured.
- ``spawn`` / ``serve``: a long-running command with its output read line
  by line as it comes (``serve`` waits for its "listening" record).
- ``BrokerProcess``: ``pybroker serve`` on one data directory, SIGKILLed or
  stopped and started again, each start logging to its own file.

Every wait is bounded and every process is killed on the way out if it is
still running. Children get this process's environment without the
``PYBROKER_*`` settings that would point them at another broker or user.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import trio

#: Bound on a one-shot command and on any single wait.
TIMEOUT = 20.0
#: Starting a broker subprocess (Python start-up, recovery, bind).
START_TIMEOUT = 30.0

T = TypeVar("T")


def pybroker_command() -> list[str]:
    """The installed console script next to this Python, else ``-m pybroker``."""
    bindir = Path(sys.executable).parent
    for name in ("pybroker", "pybroker.exe"):
        script = bindir / name
        if script.is_file() and os.access(script, os.X_OK):
            return [str(script)]
    return [sys.executable, "-m", "pybroker"]


PYBROKER = pybroker_command()

#: Variables a developer's shell may set that would change what a child does.
_UNSET = ("PYBROKER_URL", "PYBROKER_TOKEN", "PYBROKER_USER", "PYBROKER_PASSWORD")


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, with ``env`` on top."""
    environment = dict(os.environ)
    for key in _UNSET:
        environment.pop(key, None)
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(env or {})
    return environment


async def _kill_now(process: trio.Process) -> None:
    """deliver_cancel for run_process: no 5-second grace, no warning."""
    process.kill()


async def run(
    args: Sequence[str],
    *,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``pybroker ARGS`` to completion (bounded), capturing its output."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*PYBROKER, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=cwd,
            env=child_env(env),
            deliver_cancel=_kill_now,
        )


def json_events(lines: Sequence[str]) -> list[dict[str, Any]]:
    """The JSON log records among ``lines`` (non-JSON lines are skipped)."""
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def find_event(name: str) -> Callable[[list[str]], dict[str, Any] | None]:
    """For ``Lines.wait_for``: the first JSON record whose event is ``name``."""

    def found(lines: list[str]) -> dict[str, Any] | None:
        for record in json_events(lines):
            if record.get("event") == name:
                return record
        return None

    return found


class Lines:
    """Lines read from a child's pipe by a background task."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.eof = False
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        buf = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
                buf += data
                *complete, buf = buf.split(b"\n")
                for line in complete:
                    self.lines.append(line.decode("utf-8", "replace"))
                if complete:
                    self._changed.set()
        if buf:
            self.lines.append(buf.decode("utf-8", "replace"))
        self.eof = True
        self._changed.set()

    async def wait_for(self, found: Callable[[list[str]], T | None], timeout: float = TIMEOUT) -> T:
        """Wait until ``found(lines)`` is not None (bounded); return it."""
        with trio.fail_after(timeout):
            while True:
                result = found(self.lines)
                if result is not None:
                    return result
                if self.eof:
                    raise AssertionError(f"{self.name} ended without it: {self.text()}")
                self._changed = trio.Event()
                await self._changed.wait()

    async def wait_eof(self, timeout: float = TIMEOUT) -> None:
        with trio.fail_after(timeout):
            while not self.eof:
                self._changed = trio.Event()
                await self._changed.wait()

    def text(self) -> str:
        return "\n".join(self.lines)


class Child:
    """A long-running ``pybroker`` subprocess with its output piped."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.stdout = Lines(f"{name} stdout")
        self.stderr = Lines(f"{name} stderr")

    async def wait(self, timeout: float = TIMEOUT) -> int:
        with trio.fail_after(timeout):
            code = await self.process.wait()
        await self.stdout.wait_eof()
        await self.stderr.wait_eof()
        return code

    @property
    def returncode(self) -> int | None:
        return self.process.returncode


@asynccontextmanager
async def spawn(
    args: Sequence[str],
    name: str,
    cwd: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> AsyncIterator[Child]:
    """Start ``pybroker ARGS``; it is killed on exit if still running.
    ``preexec_fn`` runs in the child before it executes (resource limits)."""
    async with spawn_argv([*PYBROKER, *args], name, cwd=cwd, preexec_fn=preexec_fn) as child:
        yield child


def kill_session(process: trio.Process) -> None:
    """SIGKILL a process started in a session of its own, and every process
    it started (a worker command that forks would leave children holding
    its pipes open)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _kill_session_now(process: trio.Process) -> None:
    kill_session(process)


@asynccontextmanager
async def spawn_argv(
    argv: Sequence[str],
    name: str,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    own_session: bool = False,
) -> AsyncIterator[Child]:
    """Start ``argv`` with its output pumped into a Child; on exit it is
    killed if still running (``own_session``: in a session of its own, it
    and everything it started are SIGKILLed)."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                cwd=cwd,
                env=child_env(env),
                deliver_cancel=_kill_session_now if own_session else _kill_now,
                preexec_fn=preexec_fn,
                start_new_session=own_session,
            )
        )
        child = Child(process, name)
        assert process.stdout is not None and process.stderr is not None
        nursery.start_soon(child.stdout.pump, process.stdout)
        nursery.start_soon(child.stderr.pump, process.stderr)
        try:
            yield child
        finally:
            if own_session:
                kill_session(process)
            elif process.returncode is None:
                process.kill()
            with trio.move_on_after(TIMEOUT) as scope:
                await process.wait()
                await child.stdout.wait_eof()
                await child.stderr.wait_eof()
            if scope.cancelled_caught:
                nursery.cancel_scope.cancel()


class Broker:
    """A ``pybroker serve`` started by ``serve``: its process and where it listens."""

    def __init__(self, child: Child, url: str, port: int, data_dir: Path) -> None:
        self.child = child
        self.url = url
        self.port = port
        self.data_dir = data_dir


@asynccontextmanager
async def serve(tmp_path: Path, *extra: str) -> AsyncIterator[Broker]:
    """``pybroker serve --port 0`` on ``tmp_path/data``, once it listens."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_dir = tmp_path / "data"
    args = ["serve", "--port", "0", "--data-dir", str(data_dir), "--log-format", "json", *extra]
    async with spawn(args, "serve", cwd=tmp_path) as child:
        listening = await child.stderr.wait_for(find_event("listening"))
        port = listening["port"]
        assert isinstance(port, int) and 0 < port < 65536, listening
        url = listening["url"]
        assert url == f"pybroker://127.0.0.1:{port}", listening
        assert listening["data_dir"] == str(data_dir), listening
        yield Broker(child, url, port, data_dir)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a broker's stderr log (others skipped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    complete = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # still being written
        complete.append(line)
    return json_events(complete)


class BrokerProcess:
    """``pybroker serve --port 0 --data-dir DIR --log-format json ...``,
    restartable on the same data directory; each start logs to its own file."""

    def __init__(self, data_dir: Path, work_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.work_dir = work_dir
        self.extra = extra
        self.proc: anyio.abc.Process | None = None
        self.starts = 0
        self.log_path: Path = work_dir / "broker-0.log"
        self.url = ""

    async def start(self) -> str:
        assert self.proc is None, "already running"
        self.log_path = self.work_dir / f"broker-{self.starts}.log"
        self.starts += 1
        command = [
            *PYBROKER,
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(self.data_dir),
            "--log-format",
            "json",
            *self.extra,
        ]
        with open(self.log_path, "wb") as log_file:
            self.proc = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                cwd=self.work_dir,
                env=child_env(),
            )
        with anyio.move_on_after(START_TIMEOUT):
            for _ in range(int(START_TIMEOUT / 0.02) + 1):
                for record in read_json_lines(self.log_path):
                    if record.get("event") == "listening":
                        self.url = str(record["url"])
                        assert int(record["port"]) > 0
                        assert self.url.endswith(f":{record['port']}")
                        return self.url
                if self.proc.returncode is not None:
                    break
                await anyio.sleep(0.02)
        log = self.log_path.read_text(errors="replace")
        await self.kill()
        raise AssertionError(f"broker did not start listening:\n{log}")

    def log_records(self) -> list[dict[str, Any]]:
        return read_json_lines(self.log_path)

    async def kill(self) -> int | None:
        """SIGKILL (no shutdown code runs) and reap; return the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(10):
                await proc.wait()
        return proc.returncode

    async def stop(self) -> int | None:
        """SIGTERM (graceful shutdown) and reap; SIGKILL if it hangs."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with anyio.move_on_after(15):
            await proc.wait()
        if proc.returncode is None:
            await self.kill()
            raise AssertionError("broker did not stop within 15 s of SIGTERM")
        self.proc = None
        return proc.returncode


@asynccontextmanager
async def broker_process(data_dir: Path, work_dir: Path, *extra: str) -> AsyncIterator[BrokerProcess]:
    """A BrokerProcess (not started yet), killed on the way out."""
    broker = BrokerProcess(data_dir, work_dir, *extra)
    try:
        yield broker
    finally:
        await broker.kill()
