"""Consumer groups across broker restarts: positions and pending survive."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import trio

import pybroker as client
from pybroker.server.testing import running_broker

from helpers.inproc import wait_until
from helpers.procs import broker_process


#: Bound on one wait for a subprocess broker or its deliveries.
TIMEOUT = 20.0


async def test_restart_keeps_position_and_redelivers_unacked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    held: list[client.Message] = []
    async with running_broker(data_dir=data) as server:
        async with client.connect(server.url) as pub, client.connect(server.url) as w:
            await pub.publish_many("jobs", [b"%d" % i for i in range(100)])
            async with w.subscribe(
                "jobs", group="workers", start="earliest", max_ack_pending=50, auto_ack=False
            ) as sub:

                async def take() -> None:
                    async for msg in sub:
                        held.append(msg)
                        if msg.offset < 40:
                            await msg.ack()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(take)
                    # 40 acked, then 50 more handed out and held unacked.
                    await wait_until(lambda: len(held) == 90)
                    await trio.sleep(0.1)  # the acks reach the broker
                    nursery.cancel_scope.cancel()
                info = await pub.groups("inspect", "workers")
                assert info["topics"]["jobs"] == {"cursor": 90, "pending": 50, "backlog": 10}
                # Stop the broker with the member still in: no goodbye to the group.
    # One journal for all groups: a checkpoint, then records.
    assert [p.name for p in (data / "groups").iterdir()] == ["journal.1"]

    async with running_broker(data_dir=data) as server:
        async with client.connect(server.url) as c:
            info = await c.groups("inspect", "workers")
            assert info["members"] == 0
            assert info["topics"]["jobs"] == {"cursor": 90, "pending": 50, "backlog": 10}
            got: list[client.Message] = []
            await c.subscribe("jobs", got.append, group="workers")
            await wait_until(lambda: len(got) == 60)
            await trio.sleep(0.2)
            assert sorted(m.offset for m in got) == list(range(40, 100))
            # The 50 held before the restart are deliveries 2; the rest are new.
            assert {m.offset: m.deliveries for m in got} == {
                **{o: 2 for o in range(40, 90)},
                **{o: 1 for o in range(90, 100)},
            }
            await wait_until(lambda: server.broker.groups.groups["workers"].acked == 60)
    # Everything acknowledged: a third start has nothing to deliver.
    async with running_broker(data_dir=data) as server:
        info = server.broker.groups.groups["workers"].statistics()
        assert info["pending"] == 0 and info["topics"]["jobs"]["cursor"] == 100


async def test_deleted_group_stays_deleted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_broker(data_dir=data) as server:
        async with client.connect(server.url) as c:
            async with c.subscribe("t", group="gone"):
                pass
            await c.groups("delete", "gone")
    async with running_broker(data_dir=data) as server:
        assert "gone" not in server.broker.groups.groups


async def test_damaged_group_state_is_reported_not_fatal(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "groups").mkdir(parents=True)
    (data / "groups" / "broken.json").write_text("{not json")
    async with running_broker(data_dir=data) as server:
        assert "broken" not in server.broker.groups.groups
        async with client.connect(server.url) as c:
            got: list[int] = []
            await c.subscribe("t", lambda m: got.append(m.offset), group="broken")
            await c.publish("t", b"x")
            await wait_until(lambda: got == [0])


async def test_kill_9_loses_no_job(tmp_path: Path) -> None:
    """At least once across SIGKILL: every published job is processed,
    whatever the broker's last group snapshot held."""
    done: set[int] = set()
    async with broker_process(tmp_path / "data", tmp_path, "--no-http") as broker:
        await broker.start()
        async with client.connect(broker.url) as pub:
            await pub.publish_many("jobs", [b"%d" % i for i in range(2000)])

        async def slow_worker(msg: client.Message) -> None:
            await trio.sleep(0.002)  # so each cycle ends mid-stream
            done.add(msg.offset)

        for _ in range(3):
            # Work for a while, then kill the broker mid-stream.
            with trio.move_on_after(0.3):
                async with client.connect(broker.url) as w:
                    await w.subscribe(
                        "jobs", slow_worker, group="w", start="earliest", max_ack_pending=20
                    )
                    await trio.sleep_forever()
            await broker.kill()
            await broker.start()
        assert 0 < len(done) < 2000, len(done)  # the kills did land mid-stream
        async with client.connect(broker.url) as w:
            await w.subscribe("jobs", lambda m: done.add(m.offset), group="w", start="earliest")
            await wait_until(lambda: len(done) == 2000, timeout=30)
        assert done == set(range(2000))


# ---------------------------------------------------------------------------
# Delivery counts and dead letters across kill -9 (`pybroker serve`, SIGKILL)


async def _next(sub: client.Subscription) -> client.Message:
    with trio.fail_after(TIMEOUT):
        async for msg in sub:
            return msg
    raise AssertionError("subscription ended")


async def test_poison_job_counted_across_kill_9_then_dead_lettered_once(tmp_path: Path) -> None:
    """A job whose handler never acks is in flight at every crash: it is
    delivered 1, 2, 3 times across two SIGKILLs, then (max_deliver 3) goes to
    the dead-letter topic instead of a 4th delivery, and a SIGKILL right
    after that does not dead-letter it a second time."""
    options: dict[str, Any] = {"group": "w", "start": "earliest", "max_deliver": 3, "auto_ack": False}
    async with broker_process(tmp_path / "data", tmp_path) as broker:
        url = await broker.start()
        async with client.connect(url) as c:
            await c.publish("jobs", b"poison")
        for expected in (1, 2, 3):
            if expected > 1:
                url = await broker.start()
            try:
                async with client.connect(url, name=f"worker-{expected}") as w:
                    async with w.subscribe("jobs", **options) as sub:
                        msg = await _next(sub)
                        assert (msg.offset, msg.payload, msg.deliveries) == (0, b"poison", expected)
                        if expected == 3:
                            async with w.subscribe("dlq.w", start="earliest") as dlq:
                                await msg.nak()  # the handler failed again
                                dead = await _next(dlq)
                        assert await broker.kill() == -signal.SIGKILL
            except client.ConnectionClosed:
                pass  # leaving the blocks: the broker is gone
        assert dead.payload == b"poison"
        assert {k: v for k, v in dead.headers.items() if k != "x-reason"} == {
            "x-original-topic": "jobs",
            "x-original-offset": "0",
            "x-group": "w",
            "x-deliveries": "3",
        }
        url = await broker.start()
        async with client.connect(url) as c:
            got: list[client.Message] = []
            await c.subscribe("jobs", got.append, **{**options, "auto_ack": True})
            await c.publish("jobs", b"fine")
            await wait_until(lambda: len(got) == 1)
            # Dispatch hands out what waits for redelivery first: had the
            # poison job still been pending, it would be in dlq.w twice now.
            assert [(m.offset, m.payload, m.deliveries) for m in got] == [(1, b"fine", 1)]
            (info,) = await c.topics("dlq.w")
            assert (info.first_offset, info.next_offset) == (0, 1)
            group = await c.groups("inspect", "w")
            assert group["topics"]["jobs"]["cursor"] == 2
        await broker.stop()


async def test_delivery_counts_never_go_back_across_kill_9(tmp_path: Path) -> None:
    """Workers ack three jobs in four and hold the rest; the broker is
    SIGKILLed as soon as each cycle has seen 60 deliveries. Every message's
    delivery counts, over all cycles, must rise strictly: a delivery made
    after the group's last snapshot is not forgotten by a crash."""
    jobs, per_cycle = 400, 60
    seen: dict[int, list[int]] = {}
    acked: set[int] = set()
    options: dict[str, Any] = {"group": "w", "start": "earliest", "max_deliver": 0, "max_ack_pending": 50}
    async with broker_process(tmp_path / "data", tmp_path) as broker:
        url = await broker.start()
        async with client.connect(url) as c:
            await c.publish_many("jobs", [b"%d" % i for i in range(jobs)])
        for cycle in range(4):
            if cycle:
                url = await broker.start()
            count = 0
            try:
                async with client.connect(url, name=f"worker-{cycle}") as w:
                    async with w.subscribe("jobs", **options, auto_ack=False) as sub:
                        with trio.fail_after(TIMEOUT):
                            async for msg in sub:
                                seen.setdefault(msg.offset, []).append(msg.deliveries)
                                count += 1
                                if msg.offset % 4:
                                    await msg.ack()
                                    acked.add(msg.offset)
                                if count == per_cycle:
                                    assert await broker.kill() == -signal.SIGKILL
                                    break  # (messages already buffered here are not looked at)
            except client.ConnectionClosed:
                pass
            assert count == per_cycle, f"cycle {cycle}: {count} deliveries"
        # The last run acks everything, held jobs included.
        url = await broker.start()
        async with client.connect(url) as w:
            async def finish(msg: client.Message) -> None:
                seen.setdefault(msg.offset, []).append(msg.deliveries)
                acked.add(msg.offset)

            await w.subscribe("jobs", finish, **options)
            await wait_until(lambda: len(acked) == jobs)
        await broker.stop()
    redelivered = {o: d for o, d in seen.items() if len(d) > 1}
    assert redelivered, "the kills never caught a delivery in flight"
    backwards = {o: d for o, d in seen.items() if d != sorted(set(d))}
    assert not backwards, f"delivery counts went back after a kill: {sorted(backwards.items())[:5]}"
    assert set(seen) == set(range(jobs))
