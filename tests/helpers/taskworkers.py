"""Task-queue workers (Celery, Dramatiq) as subprocesses, started the way
users start them, and the reports their tasks publish (see
``helpers.celery_app`` and ``helpers.dramatiq_app``).

Every wait is bounded; every worker is SIGKILLed on the way out if it is
still running."""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

import pybroker

from .procs import Child, spawn_argv

#: tests/, the folder the workers run in (``helpers`` is importable there).
TESTS = Path(__file__).resolve().parent.parent
#: Bound on a worker's start (Python, Celery or Dramatiq, connecting).
START_TIMEOUT = 60.0
#: Bound on any other single wait.
TIMEOUT = 60.0


#: The topic the test apps' tasks publish their reports to.
REPORTS = "taskq.reports"


def worker_ready(lines: list[str]) -> bool:
    """The test apps' workers say so on stderr once they consume."""
    return any("taskq worker ready" in line for line in lines)


@asynccontextmanager
async def app_worker(args: Sequence[str], name: str, url: str, env: Mapping[str, str] | None = None) -> AsyncIterator[Child]:
    """A worker of the test apps (helpers.celery_app, helpers.dramatiq_app)
    on the broker at ``url``, reporting to REPORTS, once it is ready."""
    environment = {"TASKQ_BROKER": url, "TASKQ_REPORTS": REPORTS, **(env or {})}
    async with spawn_worker(args, name, environment, worker_ready) as child:
        yield child


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
    async with spawn_argv([sys.executable, *args], name, cwd=cwd, env=env, own_session=True) as child:
        await child.stderr.wait_for(lambda lines: True if ready(lines) else None, START_TIMEOUT)
        yield child


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
