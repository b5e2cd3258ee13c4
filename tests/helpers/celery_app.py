"""The Celery app the Celery tests' workers run (``celery -A
helpers.celery_app worker``, from tests/), on the pybroker named by
``TASKQ_BROKER``. Its tasks tell the test what they did by publishing a
JSON report to ``TASKQ_REPORTS`` on that broker: the test subscribes and
waits for the reports, rather than watching files."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready

from kombu import Connection

import pybroker.contrib.kombu  # noqa: F401  (registers pybroker:// with kombu)
from pybroker.contrib.kombu import broker_url
import pybroker.sync

app = Celery("taskq", broker=os.environ.get("TASKQ_BROKER", "pybroker://127.0.0.1:7420"), backend="rpc://")
app.conf.update(
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    task_default_queue="celery",
    # TASKQ_PREFETCH: the prefetch multiplier (Celery's default 4).
    worker_prefetch_multiplier=int(os.environ.get("TASKQ_PREFETCH", "4")),
)

_lock = threading.Lock()
_client: pybroker.sync.Client | None = None

#: Longest a victim task blocks (its worker is SIGKILLed long before).
HOLD_BOUND = 60.0


def report(event: str, **fields: Any) -> None:
    """Queue one report for the broker (sent in batches with others; the
    client flushes what is queued when the worker exits)."""
    global _client
    with _lock:
        if _client is None:
            # linger: reports from the worker threads go out in batches.
            # reconnect: reports queued while the broker restarts go out after.
            # A kombu failover URL (``;``) becomes one URL of every broker.
            url = broker_url(Connection(os.environ["TASKQ_BROKER"]))
            _client = pybroker.sync.connect(url, name="taskq-report", linger=0.01, reconnect=True)
    body = {"event": event, "pid": os.getpid(), "at": time.time(), **fields}
    _client.send(os.environ["TASKQ_REPORTS"], json.dumps(body).encode())


@worker_ready.connect
def _say_ready(**_: Any) -> None:
    # The workers log at WARNING (a line per task would slow them down
    # several times over), which hides Celery's own "ready" line.
    print("taskq worker ready", file=sys.stderr, flush=True)


@app.task(name="taskq.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="taskq.touch", ignore_result=True)
def touch(key: str) -> str:
    report("done", key=key)
    return key


@app.task(name="taskq.flaky", ignore_result=True, bind=True, acks_late=True, acks_on_failure_or_timeout=False, max_retries=2)
def flaky(self: Task, key: str) -> None:
    """Always fails: retried twice with a 1 s countdown, then rejected
    (acks_late without acks_on_failure: basic_reject, no requeue)."""
    report("attempt", key=key, retries=self.request.retries, eta=self.request.eta)
    raise self.retry(exc=RuntimeError(f"{key} failed"), countdown=1)


@app.task(name="taskq.hold", ignore_result=True, bind=True, acks_late=True)
def hold(self: Task, key: str) -> str:
    """In a worker started with TASKQ_VICTIM set, blocks (bounded) so that
    the test can SIGKILL it mid-task; elsewhere, completes."""
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    report("started", key=key, redelivered=redelivered)
    if os.environ.get("TASKQ_VICTIM"):
        threading.Event().wait(HOLD_BOUND)
    report("done", key=key, redelivered=redelivered)
    return key
