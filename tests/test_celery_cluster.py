"""Celery on a pybroker cluster (README, "Several brokers"): a real
``celery worker`` and a real sender, each given kombu's failover URL of
two ``pybroker serve --cluster`` processes on a real etcd and SeaweedFS.

The queue's topic and its consumer group live at one node, the topic's
owner; the worker's and the sender's clients are sent there (NOT_OWNER).
That node is then SIGKILLed: the worker's and the sender's connections
drop, they move to the other node, which takes the topic and the group
over once the dead node's lease (3 s) runs out, and every task, sent
before or after the kill, runs (at least once: the ones in the worker's
hands when the owner died come again)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

celery = pytest.importorskip("celery")  # the `celery` extra, part of `test`
pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

import pybroker  # noqa: E402
from pybroker.contrib.kombu import queue_topic  # noqa: E402
from pybroker.protocol import Error, ErrorCode, StartKind, SubAck, Subscribe  # noqa: E402

from helpers.cluster_broker import cluster_processes, hello, servers, urls  # noqa: E402,F401 (servers, urls: fixtures)
from helpers.procs import BrokerProcess  # noqa: E402
from helpers.raw import raw_client  # noqa: E402
from helpers.restarts import FAST  # noqa: E402
from helpers.taskworkers import REPORTS, reports  # noqa: E402
from test_celery import celery_worker, client_app, close_app, send  # noqa: E402

#: Every connection a test opened in this process is closed by its end.
pytestmark = pytest.mark.usefixtures("no_sync_client_left_behind")

TASKS = 60
#: Bound on a task batch's reports: a take-over (the 3 s lease) and the
#: clients' reconnection backoff on a shared 2-core machine.
DONE_WITHIN = 90.0


async def group_owner(nodes: list[BrokerProcess], topic: str) -> BrokerProcess:
    """The node where ``topic``'s consumer groups run: the one that takes a
    group SUBSCRIBE (the other answers NOT_OWNER naming it)."""
    with trio.fail_after(DONE_WITHIN):
        while True:
            for node in nodes:
                async with raw_client(node.url) as raw:
                    await hello(raw, "probe")
                    await raw.send_event(Subscribe(1, topic, StartKind.NEW, 0, options={"group": "probe"}))
                    answer = await raw.next_event()
                if answer == SubAck(1):
                    return node
                assert isinstance(answer, Error) and answer.code == ErrorCode.NOT_OWNER, answer
            await trio.sleep(0.1)  # no owner yet (being taken over): ask again


async def test_a_worker_and_a_sender_carry_on_when_the_queues_owner_is_killed(
    urls: dict[str, str], tmp_path: Path
) -> None:
    async with cluster_processes(urls, tmp_path) as nodes:
        addrs = [node.url.removeprefix("pybroker://") for node in nodes]
        failover = ";".join(f"pybroker://{addr}" for addr in addrs)  # kombu's failover URL
        every = "pybroker://" + ",".join(addrs)
        async with pybroker.connect(every, reconnect=FAST) as c, reports(c, REPORTS) as got:
            async with celery_worker(failover, "w1", concurrency=2):
                app = client_app(failover)
                try:
                    await send(app, "taskq.touch", [[f"before-{i}"] for i in range(TASKS)])
                    await got.wait_for(
                        lambda items: {f"before-{i}" for i in range(TASKS)} <= {r.get("key") for r in items},
                        timeout=DONE_WITHIN,
                    )
                    owner = await group_owner(nodes, queue_topic("celery"))
                    assert await owner.kill() == -signal.SIGKILL
                    await send(app, "taskq.touch", [[f"after-{i}"] for i in range(TASKS)])
                finally:
                    await trio.to_thread.run_sync(close_app, app)
                expected = {f"after-{i}" for i in range(TASKS)}
                await got.wait_for(lambda items: expected <= {r.get("key") for r in items}, timeout=DONE_WITHIN)
