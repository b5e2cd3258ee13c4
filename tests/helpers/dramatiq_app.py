"""The Dramatiq app the Dramatiq tests' workers run (``dramatiq
helpers.dramatiq_app``, from tests/), on the pybroker named by
``TASKQ_BROKER``. Its actors report what they did by publishing JSON to
``TASKQ_REPORTS`` on that broker (see helpers.taskworkers)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage, Middleware

import pybroker.sync
from pybroker.contrib.dramatiq import PybrokerBroker

broker = PybrokerBroker(os.environ.get("TASKQ_BROKER", "pybroker://127.0.0.1:7420"))
broker.add_middleware(CurrentMessage())


class _SayReady(Middleware):
    """Tells the test this worker process consumes (its last boot step)."""

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        print(f"taskq worker ready pid={os.getpid()}", file=sys.stderr, flush=True)


broker.add_middleware(_SayReady())
dramatiq.set_broker(broker)

_lock = threading.Lock()
_client: pybroker.sync.Client | None = None
#: Longest a victim actor blocks (its worker is SIGKILLed long before).
HOLD_BOUND = 60.0


def report(event: str, **fields: Any) -> None:
    """Queue one report for the broker (batched; flushed at exit)."""
    global _client
    with _lock:
        if _client is None:
            _client = pybroker.sync.connect(os.environ["TASKQ_BROKER"], name="taskq-report", linger=0.01)
    body = {"event": event, "pid": os.getpid(), "at": time.time(), **fields}
    _client.send(os.environ["TASKQ_REPORTS"], json.dumps(body).encode())


def _deliveries() -> int:
    message = CurrentMessage.get_current_message()
    return int(message._pybroker_message.deliveries) if message is not None else 0


@dramatiq.actor(actor_name="touch", max_retries=0)
def touch(key: str) -> None:
    report("done", key=key)


@dramatiq.actor(actor_name="flaky", max_retries=2, min_backoff=1000, max_backoff=1000)
def flaky(key: str) -> None:
    """Always fails: retried twice (1 s backoff, through the delay queue),
    then dead-lettered."""
    message = CurrentMessage.get_current_message()
    retries = message.options.get("retries", 0) if message is not None else -1
    report("attempt", key=key, retries=retries)
    raise RuntimeError(f"{key} failed")


@dramatiq.actor(actor_name="hold", max_retries=0)
def hold(key: str) -> None:
    """In a worker started with TASKQ_VICTIM set, blocks (bounded) so that
    the test can SIGKILL it mid-task; elsewhere, completes."""
    deliveries = _deliveries()
    report("started", key=key, deliveries=deliveries)
    if os.environ.get("TASKQ_VICTIM"):
        threading.Event().wait(HOLD_BOUND)
    report("done", key=key, deliveries=deliveries)
