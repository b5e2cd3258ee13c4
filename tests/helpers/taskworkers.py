"""Task-queue workers (Celery, Dramatiq) as subprocesses, started the way
users start them, and the reports their tasks publish (see
``helpers.celery_app`` and ``helpers.dramatiq_app``).

Every wait is bounded; every worker is SIGKILLed on the way out if it is
still running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import trio

import pybroker

from .procs import Child, child_env

#: tests/, the folder the workers run in (``helpers`` is importable there).
TESTS = Path(__file__).resolve().parent.parent
#: Bound on a worker's start (Python, Celery or Dramatiq, connecting).
START_TIMEOUT = 60.0
#: Bound on any other single wait.
TIMEOUT = 60.0


def _kill_group(process: trio.Process) -> None:
    """SIGKILL the worker and every process it started (its own session:
    Dramatiq's command forks the worker processes, which would outlive
    their parent and hold its pipes open)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _kill_now(process: trio.Process) -> None:
    _kill_group(process)


@asynccontextmanager
async def spawn_worker(
    args: Sequence[str],
    name: str,
    env: Mapping[str, str],
    ready: Callable[[list[str]], bool],
    cwd: Path = TESTS,
) -> AsyncIterator[Child]:
    """``python ARGS`` in ``cwd`` (tests/ unless told; a session of its
    own), yielded once ``ready(stderr lines)``; on exit it and its children
    are SIGKILLed."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                cwd=cwd,
                env=child_env(env),
                deliver_cancel=_kill_now,
                start_new_session=True,
            )
        )
        child = Child(process, name)
        assert process.stdout is not None and process.stderr is not None
        nursery.start_soon(child.stdout.pump, process.stdout)
        nursery.start_soon(child.stderr.pump, process.stderr)
        try:
            await child.stderr.wait_for(lambda lines: True if ready(lines) else None, START_TIMEOUT)
            yield child
        finally:
            _kill_group(process)
            with trio.move_on_after(TIMEOUT) as scope:
                await process.wait()
                await child.stdout.wait_eof()
                await child.stderr.wait_eof()
            if scope.cancelled_caught:
                nursery.cancel_scope.cancel()


class Reports:
    """The JSON reports tasks publish to one topic, as they arrive."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.items: list[dict[str, Any]] = []
        #: How many reports of each event came (a wait looks at this, not
        #: at every item again: 10,000 reports stay linear).
        self.counts: Counter[str] = Counter()
        self._changed = trio.Event()

    def add(self, msg: pybroker.Message) -> None:
        report = json.loads(msg.payload)
        self.items.append(report)
        self.counts[report["event"]] += 1
        self._changed.set()

    def of(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.items if r["event"] == event]

    async def wait_for(self, enough: Callable[[list[dict[str, Any]]], bool], timeout: float = TIMEOUT) -> None:
        """Until ``enough(self.items)`` (bounded)."""
        with trio.fail_after(timeout):
            while not enough(self.items):
                self._changed = trio.Event()
                await self._changed.wait()

    async def wait_count(self, event: str, n: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        await self.wait_for(lambda items: self.counts[event] >= n, timeout)
        return self.of(event)


@asynccontextmanager
async def reports(client: pybroker.Client, topic: str) -> AsyncIterator[Reports]:
    """Collect ``topic``'s reports from now on (subscribed on return)."""
    collected = Reports(topic)
    sub = await client.subscribe(topic, collected.add, window=100_000)
    try:
        yield collected
    finally:
        if not client.closed:
            await sub.unsubscribe()


def sync_client_threads() -> list[str]:
    """Names of the blocking clients' threads alive in this process (a
    test that leaves one behind leaves a client that may go on trying to
    reconnect, drawing on the global random state, after its broker is
    gone)."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("pybroker-sync"))
