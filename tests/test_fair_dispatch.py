"""Work queues as their users expect them (issue 15, items 1 and 2), end to
end: a real broker on loopback with the file store, workers through the
client library.

- Fair dispatch: a group hands out messages, not stored batches; each
  member holds at most its own ``max_ack_pending`` (by default its
  concurrency), so one batch of jobs is shared, uneven workers get work in
  proportion to their speed, and an idle member never waits while another
  holds work it has not started.
- Backoff: a handler that raises is redelivered after the group's
  ``backoff`` step for that delivery, then dead-lettered after
  ``max_deliver``.

Splits and delivery counts are asserted; wall-clock durations never are
(a loaded machine only makes the lower bounds on backoff gaps easier).
Every wait is bounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import pybroker
from pybroker.server.groups import Group
from pybroker.server.groups.group import fair_shares
from pybroker.server.server import Server
from pybroker import Message

from helpers.anybroker import serving
from helpers.inproc import wait_until

#: The tests that go through the client run under Trio and asyncio.
both = pytest.mark.anyio

TIMEOUT = 10.0
#: Bound on a whole work-queue run (40 jobs of 20-80 ms): generous, not a timing.
RUN = 60.0


@asynccontextmanager
async def file_broker(tmp_path: Path) -> AsyncIterator[Server]:
    async with serving(data_dir=tmp_path / "data", http_port=None) as server:
        yield server


def group_of(server: Server, name: str) -> Group:
    return server.broker.groups.groups[name]


async def queue_jobs(url: str, n: int) -> None:
    """``n`` jobs with ``send()`` in one loop and one flush: one PUBLISH."""
    async with pybroker.connect(url, name="producer") as producer:
        with anyio.fail_after(TIMEOUT):
            for i in range(n):
                await producer.send("jobs", b"job-%d" % i)
            await producer.flush()


def stored_batches(server: Server, topic: str) -> list[int]:
    log = server.broker.router.topics[topic].log
    return [b.count for b in log.read(log.first_offset, 1 << 30)]


async def run_workers(
    server: Server, delays: list[float], jobs: int, **subscribe: Any
) -> tuple[dict[str, list[bytes]], float]:
    """Workers ``w0``, ``w1``, ... whose handlers take ``delays[i]`` seconds
    each, sharing group ``workers``; ``jobs`` jobs queued as one batch once
    all have joined. Returns what each handled and the elapsed time from
    the publish to the last ack (for the report, never asserted)."""
    handled: dict[str, list[bytes]] = {f"w{i}": [] for i in range(len(delays))}
    done = anyio.Event()

    def worker(name: str, delay: float) -> Callable[[Message], Awaitable[None]]:
        async def handle(msg: Message) -> None:
            await anyio.sleep(delay)
            handled[name].append(msg.payload)
            if sum(map(len, handled.values())) >= jobs:
                done.set()

        return handle

    async with AsyncExitStack() as stack:
        for i, delay in enumerate(delays):
            c = await stack.enter_async_context(pybroker.connect(server.url, name=f"w{i}"))
            with anyio.fail_after(TIMEOUT):
                await c.subscribe("jobs", worker(f"w{i}", delay), group="workers", **subscribe)
        t0 = anyio.current_time()
        await queue_jobs(server.url, jobs)
        with anyio.fail_after(RUN):
            await done.wait()
        group = group_of(server, "workers")
        await wait_until(lambda: group.acked == jobs, RUN)
        elapsed = anyio.current_time() - t0
    assert stored_batches(server, "jobs") == [jobs], "the jobs were meant to be one stored batch"
    everything = Counter(p for got in handled.values() for p in got)
    assert set(everything) == {b"job-%d" % i for i in range(jobs)} and max(everything.values()) == 1
    assert group.redelivered == 0 and group.statistics()["pending"] == 0
    return handled, elapsed


# -- fair dispatch --------------------------------------------------------------


def test_fair_shares_split_evenly_within_each_room() -> None:
    assert fair_shares(40, [1, 1]) == [1, 1]
    assert fair_shares(40, [1000, 1000]) == [20, 20]
    assert fair_shares(5, [1000, 1000]) == [3, 2]
    assert fair_shares(1, [999, 1000, 1000]) == [1, 0, 0]  # the first in turn
    assert fair_shares(40, [2, 100]) == [2, 38]
    assert fair_shares(7, [1, 10, 10]) == [1, 3, 3]
    assert fair_shares(0, [5, 5]) == [0, 0]
    for count in range(30):
        for rooms in ([1], [3, 1], [2, 7, 4], [5, 5, 5, 1]):
            shares = fair_shares(count, rooms)
            assert sum(shares) == min(count, sum(rooms))
            assert all(0 <= s <= r for s, r in zip(shares, rooms))
            # As even as the rooms allow: below its room, nobody has two
            # fewer than another.
            assert all(s == r or s >= max(shares) - 1 for s, r in zip(shares, rooms))


@both
async def test_one_batch_of_jobs_is_shared_by_two_workers(tmp_path: Path) -> None:
    """The issue's case: 40 jobs queued with send() (one stored batch), two
    workers of 50 ms with the client's defaults. Before fair dispatch one
    worker got all 40 and the other none."""
    async with file_broker(tmp_path) as server:
        handled, elapsed = await run_workers(server, [0.05, 0.05], 40)
    counts = sorted(len(got) for got in handled.values())
    print(f"2 x 50 ms, 40 jobs: split {counts}, {elapsed:.2f} s (ideal 1.00 s)")
    assert counts[0] >= 40 // 3, f"work not shared: {counts}"


@pytest.mark.parametrize("delays", [(0.01, 0.1), (0.1, 0.01)], ids=["fast-first", "slow-first"])
@both
async def test_uneven_workers_get_work_in_proportion_to_speed(
    tmp_path: Path, delays: tuple[float, float]
) -> None:
    """A worker ten times faster handles most of the jobs, whichever joined
    first: nobody holds unstarted work while the other is idle, so the split
    follows speed. (Ten times, so that a loaded machine's round trips per
    job, which even the speeds out, still leave a clear split.)"""
    async with file_broker(tmp_path) as server:
        handled, elapsed = await run_workers(server, list(delays), 40)
    fast_name, slow_name = ("w0", "w1") if delays[0] < delays[1] else ("w1", "w0")
    fast, slow = len(handled[fast_name]), len(handled[slow_name])
    print(f"{delays} s, 40 jobs: fast {fast}, slow {slow}, {elapsed:.2f} s (ideal 0.36 s)")
    assert slow >= 1, "the slow worker got nothing"
    assert fast >= 2 * slow, f"fast {fast}, slow {slow}: the split does not follow speed"


@both
async def test_prefetch_defaults_to_concurrency_and_can_be_raised(tmp_path: Path) -> None:
    async with file_broker(tmp_path) as server, pybroker.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT):
            await c.subscribe("jobs", lambda m: None, group="g")
            await c.subscribe("jobs", lambda m: None, group="g", concurrency=3)
            await c.subscribe("jobs", lambda m: None, group="g", concurrency=3, max_ack_pending=50)
            async with c.subscribe("jobs", group="g", auto_ack=False):
                group = group_of(server, "g")
                assert [m.max_ack_pending for m in group.members] == [1, 3, 50, 1]
                stats = group.statistics()
                assert (stats["members"], stats["prefetch"], stats["in_flight"]) == (4, 55, 0)


@both
async def test_idle_member_gets_the_work_another_has_not_started(tmp_path: Path) -> None:
    """A worker stuck on its first job holds only that one (its prefetch):
    a worker joining later takes every other job at once."""
    jobs = 10
    stuck = anyio.Event()
    release = anyio.Event()
    late: list[bytes] = []
    late_done = anyio.Event()

    async def slow(msg: Message) -> None:
        stuck.set()
        with anyio.fail_after(RUN):
            await release.wait()

    def quick(msg: Message) -> None:
        late.append(msg.payload)
        if len(late) == jobs - 1:
            late_done.set()

    async with file_broker(tmp_path) as server, AsyncExitStack() as stack:
        a = await stack.enter_async_context(pybroker.connect(server.url, name="a"))
        with anyio.fail_after(TIMEOUT):
            await a.subscribe("jobs", slow, group="workers")
        await queue_jobs(server.url, jobs)
        with anyio.fail_after(TIMEOUT):
            await stuck.wait()
        group = group_of(server, "workers")
        await wait_until(lambda: group.delivered == 1)
        assert group.statistics()["in_flight"] == 1  # nothing else taken
        b = await stack.enter_async_context(pybroker.connect(server.url, name="b"))
        with anyio.fail_after(TIMEOUT):
            await b.subscribe("jobs", quick, group="workers")
            await late_done.wait()
        assert sorted(late) == sorted(b"job-%d" % i for i in range(1, jobs))
        release.set()
        await wait_until(lambda: group.acked == jobs)


# -- backoff ------------------------------------------------------------------------


@both
async def test_raising_handler_waits_the_backoff_then_is_dead_lettered_once(tmp_path: Path) -> None:
    backoff = [0.2, 0.4]
    seen: list[tuple[int, float]] = []

    def always_fails(msg: Message) -> None:
        seen.append((msg.deliveries, anyio.current_time()))
        raise RuntimeError("this job always fails")

    async with file_broker(tmp_path) as server, pybroker.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT):
            dead = await c.subscribe("dlq.workers")
            await c.subscribe("jobs", always_fails, group="workers", max_deliver=3, backoff=backoff)
            await c.publish("jobs", b"poison")
            letter = await dead.__anext__()
        dead_at = anyio.current_time()
        assert letter.payload == b"poison" and letter.headers["x-deliveries"] == "3"
        assert [d for d, _ in seen] == [1, 2, 3]
        gaps = [b - a for (_, a), (_, b) in zip(seen, seen[1:])]
        print(f"backoff {backoff}: gaps {[round(g, 3) for g in gaps]}, dead-lettered "
              f"{dead_at - seen[-1][1]:.3f} s after the 3rd delivery")
        assert gaps[0] >= backoff[0] and gaps[1] >= backoff[1], gaps
        # Nothing more: no 4th delivery, no second dead letter.
        with anyio.move_on_after(0.6):
            extra = await dead.__anext__()
            raise AssertionError(f"dead-lettered twice: {extra!r}")
        group = group_of(server, "workers")
        stats = group.statistics()
        assert (stats["dead_lettered"], stats["pending"], stats["redelivered"]) == (1, 0, 2)
        assert len(seen) == 3


@pytest.mark.parametrize("delay", [None, 0.3])
@both
async def test_explicit_nak_delay_overrides_the_backoff(tmp_path: Path, delay: float | None) -> None:
    async with file_broker(tmp_path) as server, pybroker.connect(server.url) as c:
        async with c.subscribe("jobs", group="g", auto_ack=False, backoff=[0.3 if delay is None else 30]) as sub:
            await c.publish("jobs", b"x")
            with anyio.fail_after(TIMEOUT):
                first = await sub.__anext__()
                t0 = anyio.current_time()
                await first.nak(delay=delay)
                second = await sub.__anext__()
            assert second.deliveries == 2 and anyio.current_time() - t0 >= 0.3
            await second.ack()
            await wait_until(lambda: group_of(server, "g").acked == 1)
