"""Consumer groups (protocol.md, "Consumer groups"): unit tests of the
group logic without sockets, then end-to-end tests over loopback.

Part 1 drives :class:`broker.groups.Group` directly over a ``Router`` on a
``MemoryStore`` with fake sessions and explicit ``now`` values, so every
timer path (ack wait, nak delay, in progress, backoff, max_deliver) is exact
and instant; one test runs the real :class:`GroupManager` task on Trio's
``MockClock``.

Part 2 runs a real broker and the client library: work sharing, fan-out to
plain subscribers and other groups, manual settling, dead letters, killed
workers, concurrency, ``max_ack_pending``, bad options, raw ACK frames.

Part 3 runs the broker on ``MockClock(autojump_threshold=...)`` so the
default 30 s ack wait, nak delays and backoff take milliseconds of real time.

Every wait is bounded with ``trio.fail_after`` and every loop is bounded.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
import trio
import trio.testing
from trio.testing import MockClock

import pybroker.server.groups.group as groups_module
import pybroker as client
from pybroker.server.groups import Group, GroupConfig, GroupManager, Member, group_name_error
from pybroker.server.storage import MemoryStore, MemoryTopicLog
from pybroker.server.router import Router, Subscription
from pybroker.server.server import Server
from pybroker.server.testing import running_broker
from pybroker import BrokerError, Client, Message
from pybroker.connection import _ranges
from pybroker.protocol import (
    Ack,
    AckKind,
    Deliver,
    Error,
    ErrorCode,
    GroupDeliver,
    Publish,
    PubAck,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    decode_batch,
    encode_batch,
    split_records,
)

from helpers.anybroker import serving
from helpers.fakes import Delivery, FakeSession, GroupEvents, Headers
from helpers.inproc import wait_until
from helpers.raw import raw_client


#: Upper bound, in seconds, on any single wait in the real-time tests.
TIMEOUT = 10.0
#: Bound on waits that depend on the broker's throughput (thousands of jobs):
#: generous, so a loaded machine does not fail them; they are not timings.
LONG = 30.0
#: How long "nothing more arrives" checks wait (real time).
QUIET = 0.15


# ==========================================================================
# Part 1: Group and GroupManager without sockets


class W:
    """A group member in the unit tests: its subscription, member and session."""

    def __init__(self, bench: Bench, sub: Subscription, member: Member, session: FakeSession) -> None:
        self.bench = bench
        self.sub = sub
        self.member = member
        self.session = session

    @property
    def group(self) -> Group:
        assert self.sub.group is not None
        return self.sub.group

    def take(self) -> list[Delivery]:
        got, self.session.got = self.session.got, []
        return got

    def take_offsets(self) -> list[int]:
        return [o for d in self.take() for o in d.offsets]

    def settle(
        self,
        kind: AckKind,
        *ranges: tuple[int, int],
        now: float,
        topic: str = "jobs",
        delay: float = 0.0,
    ) -> int:
        return self.group.settle(
            self.member, self.bench.router.topics[topic], kind, tuple(ranges), delay, now
        )

    def pending_offsets(self, topic: str = "jobs") -> list[int]:
        gt = self.group.topics[self.bench.router.topics[topic]]
        return sorted(o for o, p in gt.pending.items() if p.member is self.member)

    async def next_delivery(self, timeout: float) -> Delivery:
        with trio.fail_after(timeout):
            while not self.session.got:
                self.session.arrived = trio.Event()
                await self.session.arrived.wait()
        return self.session.got.pop(0)


class Bench:
    """A Router over a MemoryStore with a GroupManager, as the server wires them."""

    def __init__(self, max_bytes_per_topic: int = 64 << 20) -> None:
        events = GroupEvents()
        self.router = Router(MemoryStore(max_bytes_per_topic), events=events)
        self.manager = events.manager = GroupManager(self.router)
        self._ids = itertools.count(1)

    def join(
        self,
        name: str = "g",
        pattern: str = "jobs",
        *,
        start: StartKind = StartKind.EARLIEST,
        start_value: int = 0,
        **options: str,
    ) -> W:
        session = FakeSession()
        sub = Subscription(session, next(self._ids), pattern, credit=1 << 62)  # type: ignore[arg-type]
        config = GroupConfig.from_options(name, {"group": name, **options})
        # As the core does: a member that names max_ack_pending has its own.
        prefetch = config.max_ack_pending if "max_ack_pending" in options else None
        member = self.manager.join(sub, name, pattern, config, start, start_value, prefetch)
        sub.group = self.manager.groups[name]
        sub.member = member
        return W(self, sub, member, session)

    def plain(self, pattern: str) -> FakeSession:
        session = FakeSession()
        sub = Subscription(session, next(self._ids), pattern, credit=1 << 62)  # type: ignore[arg-type]
        self.router.add(sub)
        return session

    def publish(
        self, topic: str, *payloads: bytes, headers: Headers | None = None, ts: int = 1_000_000
    ) -> int:
        batch = encode_batch([(p, headers) for p in payloads])
        base, _, _ = self.router.publish(self.router.topic(topic), batch, len(payloads), ts)
        return base

    def step(self, now: float) -> None:
        """What one pass of GroupManager.run_once does, at time ``now``."""
        for group in list(self.manager.groups.values()):
            group.run_timers(now)
            group.dispatch(now)

    def stored(self, topic: str) -> list[tuple[bytes, Headers]]:
        log = self.router.topics[topic].log
        out: list[tuple[bytes, Headers]] = []
        for stored in log.read(log.first_offset, 1 << 30):
            out.extend(decode_batch(stored.batch))
        return out


def w_stats(w: W) -> dict[str, Any]:
    return w.group.statistics()


def payloads(n: int, prefix: bytes = b"") -> list[bytes]:
    return [prefix + b"%d" % i for i in range(n)]


# -- configuration ----------------------------------------------------------


def test_group_config_defaults_and_parsing() -> None:
    assert GroupConfig.from_options("g", {"group": "g"}) == GroupConfig(30.0, 5, (), 1000, "dlq.g")
    config = GroupConfig.from_options(
        "g",
        {
            "group": "g",
            "ack_wait_ms": "1500",
            "max_deliver": "0",
            "backoff_ms": "1000,5000,20000",
            "max_ack_pending": "7",
            "dead_letter": "dead.jobs",
        },
    )
    assert config == GroupConfig(1.5, 0, (1.0, 5.0, 20.0), 7, "dead.jobs", 0.0)
    # Backoff: a nak after the n-th delivery waits backoff[n-1]; the last repeats.
    assert [config.backoff_for(n) for n in range(1, 7)] == [1.0, 5.0, 20.0, 20.0, 20.0, 20.0]
    plain = GroupConfig.from_options("g", {"group": "g", "ack_wait_ms": "250"})
    assert [plain.backoff_for(n) for n in (1, 2, 9)] == [0.0, 0.0, 0.0]
    jittery = GroupConfig.from_options("g", {"group": "g", "backoff_ms": "100", "backoff_jitter_pct": "25"})
    assert jittery.backoff_jitter == 0.25
    assert group_name_error("workers") is None
    assert group_name_error("a.b") is not None
    assert group_name_error("") is not None
    assert group_name_error("a*") is not None


@pytest.mark.parametrize(
    "options",
    [
        {"ack_wait_ms": "0"},
        {"ack_wait_ms": "-5"},
        {"ack_wait_ms": "abc"},
        {"ack_wait_ms": "1.5"},
        {"max_deliver": "-1"},
        {"max_deliver": "x"},
        {"max_ack_pending": "0"},
        {"max_ack_pending": "1000001"},
        {"backoff_ms": "1000,0"},
        {"backoff_ms": "1000,-3"},
        {"backoff_ms": "1000,x"},
        {"backoff_jitter_pct": "-1"},
        {"backoff_jitter_pct": "101"},
        {"backoff_jitter_pct": "0.5"},
        {"dead_letter": "has space"},
        {"dead_letter": "dlq.>"},
        {"dead_letter": "a..b"},
        {"colour": "blue"},
    ],
)
def test_group_config_rejects_bad_values(options: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        GroupConfig.from_options("g", {"group": "g", **options})


def test_first_member_fixes_settings_and_pattern() -> None:
    bench = Bench()
    first = bench.join(max_ack_pending="2", ack_wait_ms="1000")
    second = bench.join(max_ack_pending="500", ack_wait_ms="9000")
    third = bench.join(ack_wait_ms="9000")
    assert first.group is second.group is third.group
    assert first.group.config.max_ack_pending == 2 and first.group.config.ack_wait == 1.0
    # max_ack_pending is each member's own; one that names none gets the group's.
    assert [w.member.max_ack_pending for w in (first, second, third)] == [2, 500, 2]
    assert len(first.group.members) == 3
    with pytest.raises(ValueError):
        bench.join(pattern="jobs.>")
    assert len(first.group.members) == 3


# -- hand-out -------------------------------------------------------------


def test_hand_out_respects_max_ack_pending_exactly() -> None:
    bench = Bench()
    w = bench.join(max_ack_pending="3")
    bench.publish("jobs", *payloads(10))  # one stored batch of 10
    bench.step(0)
    (d,) = w.take()
    # Only what fits: the batch is cut at the member's room.
    assert (d.base, d.payloads, d.deliveries) == (0, [b"0", b"1", b"2"], 1)
    assert w.member.unacked == 3
    bench.step(1)
    assert w.take() == []

    received = [0, 1, 2]
    for i in range(20):  # settle one at a time, out of order; bounded
        held = w.pending_offsets()
        if not held:
            break
        assert len(held) == w.member.unacked <= 3
        victim = held[-1] if i % 2 else held[0]
        kind = AckKind.ACK if i % 3 else AckKind.TERM
        assert w.settle(kind, (victim, victim), now=2) == 1
        assert w.member.unacked == len(held) - 1
        undelivered = 10 - len(received)
        bench.step(2)
        received += w.take_offsets()
        # Refilled to exactly the limit while messages remain, never above.
        assert w.member.unacked == min(3, len(held) - 1 + undelivered)
        assert w.member.unacked == len(w.pending_offsets())
    assert received == list(range(10))
    stats = w.group.statistics()
    assert stats["pending"] == 0 and stats["delivered"] == 10 and stats["redelivered"] == 0


def test_max_ack_pending_per_member_with_many_batches() -> None:
    bench = Bench()
    ws = [bench.join(max_ack_pending="2") for _ in range(2)]
    for p in payloads(10):
        bench.publish("jobs", p)
    bench.step(0)
    assert [w.member.unacked for w in ws] == [2, 2]
    assert [len(w.take_offsets()) for w in ws] == [2, 2]
    gt = ws[0].group.topics[bench.router.topics["jobs"]]
    assert gt.cursor == 4 and len(gt.pending) == 4


def test_round_robin_across_members_and_skip_not_accepting() -> None:
    bench = Bench()
    ws = [bench.join() for _ in range(3)]
    for p in payloads(6):
        bench.publish("jobs", p)
    bench.step(0)
    assert [w.take_offsets() for w in ws] == [[0, 3], [1, 4], [2, 5]]
    ws[1].session.accepting = False  # closing: the group does not hand it more
    for p in payloads(4, b"n"):
        bench.publish("jobs", p)
    bench.step(0)
    got = [w.take_offsets() for w in ws]
    assert got[1] == []
    assert sorted(got[0] + got[2]) == [6, 7, 8, 9]
    assert abs(len(got[0]) - len(got[2])) <= 1


def test_stored_batches_are_split_across_members_with_room() -> None:
    """Fair dispatch: the unit is the message. A stored batch is shared by
    every member with room, as evenly as their room allows, the larger
    share rotating from one batch to the next."""
    bench = Bench()
    a, b = bench.join(), bench.join()
    bench.publish("jobs", *payloads(5))
    bench.publish("jobs", *payloads(3, b"x"))
    bench.step(0)
    got_a, got_b = a.take(), b.take()
    assert [(d.base, d.payloads) for d in got_a] == [(0, [b"0", b"1", b"2"]), (7, [b"x2"])]
    assert [(d.base, d.payloads) for d in got_b] == [(3, [b"3", b"4"]), (5, [b"x0", b"x1"])]
    assert (a.member.unacked, b.member.unacked) == (4, 4)


def test_batch_split_follows_each_members_room() -> None:
    bench = Bench()
    small = bench.join(max_ack_pending="2")
    big = bench.join(max_ack_pending="100")
    idle = bench.join(max_ack_pending="100")
    idle.session.accepting = False  # closing: takes nothing
    bench.publish("jobs", *payloads(40))  # one stored batch
    bench.step(0)
    assert (small.take_offsets(), big.take_offsets(), idle.take()) == ([0, 1], list(range(2, 40)), [])
    # Once small has room again, the next batch is shared with it.
    bench.publish("jobs", *payloads(3, b"n"))
    small.settle(AckKind.ACK, (0, 0), now=1)
    bench.step(1)
    assert (small.take_offsets(), big.take_offsets()) == ([42], [40, 41])


def test_one_member_taking_a_whole_batch_gets_the_stored_bytes() -> None:
    bench = Bench()
    w = bench.join()
    sent: list[bytes] = []
    real = w.session.deliver_group

    def spy(sub: Any, topic: Any, base: int, ts: int, deliveries: int, batch: bytes) -> None:
        sent.append(batch)
        real(sub, topic, base, ts, deliveries, batch)

    w.session.deliver_group = spy  # type: ignore[method-assign]
    bench.publish("jobs", *payloads(5))
    bench.step(0)
    (stored,) = bench.router.topics["jobs"].log.read(0, 1 << 20)
    assert len(sent) == 1 and sent[0] is stored.batch  # not re-encoded


# -- settling ---------------------------------------------------------------


def test_ack_and_term_settle_for_good() -> None:
    bench = Bench()
    w = bench.join(ack_wait_ms="30000")
    bench.publish("jobs", *payloads(4))
    bench.step(0)
    assert w.take_offsets() == [0, 1, 2, 3]
    assert w.settle(AckKind.ACK, (0, 1), now=1) == 2
    assert w.settle(AckKind.TERM, (2, 2), now=1) == 1
    assert w.settle(AckKind.ACK, (0, 2), now=1) == 0  # settled already
    assert w.member.unacked == 1 and w.pending_offsets() == [3]
    stats = w.group.statistics()
    assert (stats["acked"], stats["termed"], stats["pending"]) == (2, 1, 1)
    bench.step(100)  # far past the ack wait: only the unsettled one comes back
    (d,) = w.take()
    assert (d.offsets, d.deliveries, d.payloads) == ([3], 2, [b"3"])


def test_nak_now_redelivers_alone_with_deliveries_2() -> None:
    bench = Bench()
    w = bench.join()
    bench.publish("jobs", *payloads(3), headers={"k": "v"})
    bench.step(0)
    assert w.take_offsets() == [0, 1, 2] and w.member.unacked == 3
    assert w.settle(AckKind.NAK, (1, 1), now=5) == 1
    assert w.member.unacked == 2
    bench.step(5)
    (d,) = w.take()
    # Alone: a batch of one, base_offset = its offset.
    assert (d.base, d.deliveries, d.messages) == (1, 2, ((b"1", {"k": "v"}),))
    assert w.member.unacked == 3
    assert w.group.statistics()["redelivered"] == 1


def test_nak_with_delay_is_not_redelivered_before_the_delay() -> None:
    bench = Bench()
    w = bench.join(max_ack_pending="1", ack_wait_ms="30000")
    bench.publish("jobs", b"a")
    bench.publish("jobs", b"b")
    bench.step(0)
    assert w.take_offsets() == [0]
    assert w.settle(AckKind.NAK, (0, 0), now=5, delay=10.0) == 1
    # The nak'ed message no longer counts against max_ack_pending...
    bench.step(5)
    assert w.take_offsets() == [1]
    assert w.settle(AckKind.ACK, (1, 1), now=6) == 1
    # ...and is not delivered again before its delay.
    bench.step(14.999)
    assert w.take() == []
    bench.step(15)
    (d,) = w.take()
    assert (d.offsets, d.deliveries, d.payloads) == ([0], 2, [b"a"])


def test_in_progress_extends_the_ack_wait() -> None:
    bench = Bench()
    w = bench.join(ack_wait_ms="30000")
    bench.publish("jobs", b"slow", b"other")
    bench.step(0)
    w.take()
    assert w.settle(AckKind.IN_PROGRESS, (0, 0), now=20) == 1
    assert w.member.unacked == 2  # still held
    bench.step(30)  # offset 1 expires; offset 0 was extended to 50
    assert [(d.offsets, d.deliveries) for d in w.take()] == [([1], 2)]
    bench.step(49.999)
    assert w.take() == []
    bench.step(50)
    assert [(d.offsets, d.deliveries) for d in w.take()] == [([0], 2)]


def test_ack_wait_expiry_redelivers_to_another_member() -> None:
    bench = Bench()
    a, b = bench.join(ack_wait_ms="30000"), bench.join()
    bench.publish("jobs", b"job")
    bench.step(0)
    assert a.take_offsets() == [0] and b.take() == []
    bench.step(29.999)
    assert a.take() == [] and b.take() == []
    bench.step(30)
    assert a.member.unacked == 0
    (d,) = b.take()
    assert (d.offsets, d.deliveries) == ([0], 2)
    # The first member's late ACK is ignored: the message is b's now.
    assert a.settle(AckKind.ACK, (0, 0), now=31) == 0
    assert b.pending_offsets() == [0] and b.member.unacked == 1
    assert b.settle(AckKind.ACK, (0, 0), now=31) == 1
    assert b.member.unacked == 0 and w_stats(b)["pending"] == 0


def test_backoff_schedule_last_wait_repeats() -> None:
    """A NAK without a delay of its own (what a raising handler sends) waits
    backoff[n-1] after the n-th delivery, the last step repeating; the ack
    wait stays ack_wait_ms; an explicit delay overrides the backoff."""
    bench = Bench()
    w = bench.join(backoff_ms="1000,5000,20000", max_deliver="0", ack_wait_ms="999000")
    bench.publish("jobs", b"x")
    bench.step(0)
    assert [d.deliveries for d in w.take()] == [1]
    now = 0.0
    for deliveries, wait in [(2, 1.0), (3, 5.0), (4, 20.0), (5, 20.0), (6, 20.0)]:
        assert w.settle(AckKind.NAK, (0, 0), now=now) == 1
        due = now + wait
        bench.step(due - 0.001)
        assert w.take() == [], f"redelivered before {wait} s"
        bench.step(due)
        (d,) = w.take()
        assert (d.offsets, d.deliveries) == ([0], deliveries)
        now = due
    w.settle(AckKind.NAK, (0, 0), now=now, delay=2.0)
    bench.step(now + 1.999)
    assert w.take() == []
    bench.step(now + 2)
    assert [(d.offsets, d.deliveries) for d in w.take()] == [([0], 7)]
    w.settle(AckKind.NAK, (0, 0), now=now + 2, delay=0.001)  # nak(delay=0): at once
    bench.step(now + 2.001)
    assert [(d.offsets, d.deliveries) for d in w.take()] == [([0], 8)]
    # Unsettled, it comes back after the ack wait, not after a backoff step.
    bench.step(now + 2.001 + 998.999)
    assert w.take() == []
    bench.step(now + 2.001 + 999)
    assert [(d.offsets, d.deliveries) for d in w.take()] == [([0], 9)]


def test_backoff_jitter_only_lengthens_within_its_bound() -> None:
    bench = Bench()
    w = bench.join(backoff_ms="1000", backoff_jitter_pct="50", max_deliver="0")
    bench.publish("jobs", b"x")
    bench.step(0)
    w.take()
    now = 0.0
    waits = []
    for _ in range(30):
        w.settle(AckKind.NAK, (0, 0), now=now)
        bench.step(now + 0.999)
        assert w.take() == [], "redelivered before its backoff"
        for tenth in range(1, 7):  # due somewhere in [1.0, 1.5)
            bench.step(now + 0.9 + tenth / 10)
            if w.take():
                waits.append(tenth / 10 + 0.9)
                break
        else:
            raise AssertionError("not redelivered within backoff + 50 %")
        now += 1.5
    assert len(set(waits)) > 1, f"no jitter: {waits}"


def test_last_delivery_nak_dead_letters_without_waiting_the_backoff() -> None:
    bench = Bench()
    w = bench.join(backoff_ms="10000", max_deliver="2")
    bench.publish("jobs", b"x")
    bench.step(0)
    w.take()
    w.settle(AckKind.NAK, (0, 0), now=0)
    bench.step(10)
    assert [d.deliveries for d in w.take()] == [2]
    w.settle(AckKind.NAK, (0, 0), now=11)
    bench.step(11)
    assert w.take() == [] and [p for p, _ in bench.stored("dlq.g")] == [b"x"]
    assert w_stats(w)["dead_lettered"] == 1


@pytest.mark.parametrize("how", ["expiry", "nak"])
def test_max_deliver_dead_letters_once_with_history(how: str) -> None:
    bench = Bench()
    w = bench.join(ack_wait_ms="10000", max_deliver="3")
    watcher = bench.plain("dlq.>")
    bench.publish("jobs", b"first", b"second")
    bench.publish("jobs", b"poison", headers={"trace": "abc", "x-app": "1"})
    bench.step(0)
    w.take()
    w.settle(AckKind.ACK, (0, 1), now=0)
    seen = [1]
    now = 0.0
    for _ in range(10):  # bounded: it must end after 3 deliveries
        now += 10.0
        if how == "nak":
            w.settle(AckKind.NAK, (2, 2), now=now - 5)
        bench.step(now)
        got = w.take()
        if not got:
            break
        seen += [d.deliveries for d in got]
    assert seen == [1, 2, 3]
    assert bench.stored("dlq.g") == [
        (
            b"poison",
            {
                "trace": "abc",
                "x-app": "1",
                "x-original-topic": "jobs",
                "x-original-offset": "2",
                "x-group": "g",
                "x-deliveries": "3",
                "x-reason": "max_deliver",
            },
        )
    ]
    assert [(s[1], s[2]) for s in watcher.plain] == [("dlq.g", 0)]
    stats = w_stats(w)
    assert (stats["dead_lettered"], stats["pending"], w.member.unacked) == (1, 0, 0)
    bench.step(now + 1000)
    assert w.take() == [] and len(bench.stored("dlq.g")) == 1


def test_custom_dead_letter_topic_and_max_deliver_1() -> None:
    bench = Bench()
    w = bench.join(max_deliver="1", dead_letter="failed.jobs")
    bench.publish("jobs", b"x")
    bench.step(0)
    w.take()
    w.settle(AckKind.NAK, (0, 0), now=1)
    bench.step(1)
    assert w.take() == []
    ((payload, headers),) = bench.stored("failed.jobs")
    assert payload == b"x" and headers["x-deliveries"] == "1" and headers["x-group"] == "g"
    assert "dlq.g" not in bench.router.topics


def test_term_is_never_dead_lettered() -> None:
    bench = Bench()
    w = bench.join(max_deliver="1")
    bench.publish("jobs", b"x")
    bench.step(0)
    w.take()
    w.settle(AckKind.TERM, (0, 0), now=1)
    bench.step(1000)
    assert w.take() == [] and "dlq.g" not in bench.router.topics


# -- members leaving --------------------------------------------------------


def test_member_leaving_hands_its_messages_to_another() -> None:
    bench = Bench()
    a, b = bench.join(), bench.join()
    for p in payloads(4):
        bench.publish("jobs", p)
    bench.step(0)
    assert (a.take_offsets(), b.take_offsets()) == ([0, 2], [1, 3])
    a.settle(AckKind.ACK, (0, 0), now=1)
    a.group.remove_member(a.member, now=1)
    assert a.member.unacked == 0 and a.member not in a.group.members
    bench.step(1)
    assert [(d.offsets, d.deliveries) for d in b.take()] == [([2], 2)]
    assert b.member.unacked == 3
    # A late ACK from the member that left changes nothing.
    assert a.settle(AckKind.ACK, (0, 10), now=2) == 0
    assert b.pending_offsets() == [1, 2, 3]

    # The last member leaves: its messages wait, the group keeps its position.
    b.group.remove_member(b.member, now=3)
    bench.publish("jobs", b"while-empty")
    bench.step(3)
    assert b.take() == []
    c = bench.join()
    bench.step(4)
    got = c.take()
    assert sorted((o, d.deliveries) for d in got for o in d.offsets) == [
        (1, 2),
        (2, 3),
        (3, 2),
        (4, 1),
    ]


# -- ranges -----------------------------------------------------------------


def test_huge_ranges_touch_only_pending_messages() -> None:
    bench = Bench()
    w = bench.join()
    bench.publish("jobs", *payloads(5))
    bench.step(0)
    w.take()
    gt = w.group.topics[bench.router.topics["jobs"]]
    assert sorted(Group._offsets_in(gt, ((0, 2**63),))) == [0, 1, 2, 3, 4]
    assert w.settle(AckKind.ACK, (3, 2**64 - 1), now=1) == 2
    assert w.settle(AckKind.ACK, (0, 0), (2, 2), now=1) == 2
    assert w.pending_offsets() == [1]
    assert w.settle(AckKind.ACK, (0, 2**63), (0, 2**63), now=1) == 1
    assert w_stats(w)["pending"] == 0 and w.member.unacked == 0
    assert w.settle(AckKind.ACK, (0, 2**64 - 1), now=1) == 0


def test_ranges_beyond_the_cursor_are_ignored() -> None:
    bench = Bench()
    w = bench.join(max_ack_pending="2")
    bench.publish("jobs", *payloads(4))
    bench.step(0)
    assert w.take_offsets() == [0, 1]
    # Offsets never handed out: nothing happens to them.
    assert w.settle(AckKind.ACK, (2, 3), now=1) == 0
    assert w.settle(AckKind.ACK, (0, 1), now=1) == 2
    bench.step(1)
    assert [(d.offsets, d.deliveries) for d in w.take()] == [([2, 3], 1)]


def test_offsets_pending_for_another_member_are_ignored() -> None:
    bench = Bench()
    a, b = bench.join(), bench.join()
    for p in payloads(4):
        bench.publish("jobs", p)
    bench.step(0)
    assert (a.take_offsets(), b.take_offsets()) == ([0, 2], [1, 3])
    for kind in AckKind:
        assert a.settle(kind, (1, 1), (3, 3), now=1) == 0
    assert b.pending_offsets() == [1, 3] and b.member.unacked == 2
    assert a.settle(AckKind.ACK, (0, 3), now=1) == 2
    assert a.pending_offsets() == [] and b.pending_offsets() == [1, 3]
    # An ACK naming a topic the group does not follow touches nothing.
    bench.publish("other", b"z")
    assert a.settle(AckKind.ACK, (0, 0), topic="other", now=1) == 0


# -- start positions and topics ------------------------------------------------


def test_start_offset_inside_a_stored_batch() -> None:
    bench = Bench()
    bench.publish("jobs", *payloads(5))
    bench.publish("jobs", b"5", b"6")
    w = bench.join(start=StartKind.OFFSET, start_value=2)
    bench.step(0)
    got = w.take()
    assert [(d.base, d.payloads) for d in got] == [(2, [b"2", b"3", b"4"]), (5, [b"5", b"6"])]

    other = Bench()
    other.publish("jobs", *payloads(5))
    v = other.join(start=StartKind.OFFSET, start_value=1, max_ack_pending="2")
    other.step(0)
    assert [(d.base, d.payloads) for d in v.take()] == [(1, [b"1", b"2"])]
    v.settle(AckKind.ACK, (1, 2), now=1)
    other.step(1)
    assert [(d.base, d.payloads) for d in v.take()] == [(3, [b"3", b"4"])]


def test_start_new_and_time() -> None:
    bench = Bench()
    bench.publish("jobs", b"old", ts=1000)
    bench.publish("jobs", b"mid", ts=2000)
    new = bench.join("fresh")
    new_only = bench.join("late", start=StartKind.NEW)
    by_time = bench.join("timed", start=StartKind.TIME, start_value=1500)
    bench.publish("jobs", b"new", ts=3000)
    bench.step(0)
    assert [p for d in new.take() for p in d.payloads] == [b"old", b"mid", b"new"]
    assert [p for d in new_only.take() for p in d.payloads] == [b"new"]
    assert [p for d in by_time.take() for p in d.payloads] == [b"mid", b"new"]


def test_wildcard_group_follows_topics_created_later() -> None:
    bench = Bench()
    bench.publish("orders.old", b"before")
    w = bench.join(pattern="orders.>", start=StartKind.NEW)
    bench.publish("orders.eu", b"e1", b"e2")
    bench.publish("orders.us.west", b"u1")
    bench.publish("payments.eu", b"p1")
    bench.publish("orders", b"no")
    bench.step(0)
    got = {(d.topic, d.base): d.payloads for d in w.take()}
    # New topics are read from their first offset; the start applies to
    # topics that existed when the group was created.
    assert got == {("orders.eu", 0): [b"e1", b"e2"], ("orders.us.west", 0): [b"u1"]}
    assert w.group in bench.router.topics["orders.eu"].groups
    assert w.group not in bench.router.topics["payments.eu"].groups
    w.settle(AckKind.ACK, (0, 1), topic="orders.eu", now=1)
    w.settle(AckKind.ACK, (0, 0), topic="orders.us.west", now=1)
    assert w_stats(w)["pending"] == 0


def test_group_reading_its_own_dead_letter_topic() -> None:
    bench = Bench()
    w = bench.join(pattern=">", max_deliver="1")
    bench.publish("jobs", b"bad", headers={"h": "1"})
    bench.step(0)
    assert w.take_offsets() == [0]
    w.settle(AckKind.NAK, (0, 0), now=1)
    bench.step(1)  # dead-letters into dlq.g, which this group then reads
    got = w.take()
    assert [(d.topic, d.base, d.deliveries) for d in got] == [("dlq.g", 0, 1)]
    ((payload, headers),) = got[0].messages
    assert payload == b"bad" and headers["x-original-topic"] == "jobs" and headers["h"] == "1"
    # Failing the dead letter too: it goes round once more, bounded.
    for i in range(3):
        w.settle(AckKind.NAK, (i, i), topic="dlq.g", now=2 + i)
        bench.step(2 + i)
        (d,) = w.take()
        assert (d.topic, d.base) == ("dlq.g", i + 1)
        assert d.messages[0][1]["x-original-topic"] == "dlq.g"
    assert w_stats(w)["dead_lettered"] == 4
    assert len(bench.stored("dlq.g")) == 4


def test_message_lost_to_retention_is_dropped() -> None:
    one = len(encode_batch([b"m0"]))
    bench = Bench(max_bytes_per_topic=one * 2)
    w = bench.join()
    bench.publish("jobs", b"m0")
    bench.step(0)
    assert w.take_offsets() == [0]
    w.settle(AckKind.NAK, (0, 0), now=1)
    for i in range(1, 5):
        bench.publish("jobs", b"m%d" % i)
    assert bench.router.topics["jobs"].log.first_offset == 3
    bench.step(1)
    got = w.take()
    assert [(d.offsets, d.deliveries) for d in got] == [([3], 1), ([4], 1)]
    assert w.pending_offsets() == [3, 4] and w.member.unacked == 2


@pytest.mark.parametrize("shape", ["one stored batch", "many stored batches"])
def test_draining_a_backlog_does_linear_work(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Handing out N stored messages a few at a time, as acks free room,
    must not re-read the whole backlog for every hand-out: that work is
    quadratic, and it runs on the broker's one thread, stalling every
    connection. Counted (records split, batches read), not timed."""
    n = 400
    work: Counter[str] = Counter()
    real_split = split_records
    real_read = MemoryTopicLog.read

    def counting_split(batch: bytes) -> list[bytes]:
        records = real_split(batch)
        work["records split"] += len(records)
        return records

    def counting_read(self: MemoryTopicLog, offset: int, max_bytes: int) -> list[Any]:
        found = real_read(self, offset, max_bytes)
        work["batches read"] += len(found)
        return found

    monkeypatch.setattr(groups_module, "split_records", counting_split)
    monkeypatch.setattr(MemoryTopicLog, "read", counting_read)
    bench = Bench()
    w = bench.join(max_ack_pending="5")
    if shape == "one stored batch":
        bench.publish("jobs", *payloads(n))
    else:
        for p in payloads(n):
            bench.publish("jobs", p)
    received: list[int] = []
    for _ in range(2 * n):  # bounded: one hand-out per ack
        bench.step(0)
        received += w.take_offsets()
        held = w.pending_offsets()
        if not held:
            break
        w.settle(AckKind.ACK, (held[0], held[0]), now=0)
    assert received == list(range(n))
    assert sum(work.values()) <= 10 * n, f"{dict(work)} for {n} messages: quadratic hand-out"


# -- the manager task on Trio's clock ----------------------------------------


async def test_manager_task_runs_timers_on_the_trio_clock(autojump_clock: MockClock) -> None:
    bench = Bench()
    w = bench.join(ack_wait_ms="30000")
    m = bench.manager
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        t0 = trio.current_time()
        bench.publish("jobs", b"a", b"b")
        d = await w.next_delivery(1)
        assert (d.offsets, d.deliveries) == ([0, 1], 1)
        assert trio.current_time() == pytest.approx(t0)
        m.settle(w.group, w.member, "jobs", AckKind.ACK, ((0, 0),), 0.0)
        m.settle(w.group, w.member, "jobs", AckKind.NAK, ((1, 1),), 10.0)
        m.settle(w.group, w.member, "nope", AckKind.ACK, ((0, 0),), 0.0)  # unknown topic
        d = await w.next_delivery(100)
        assert (d.offsets, d.deliveries) == ([1], 2)
        assert trio.current_time() - t0 == pytest.approx(10)
        await trio.sleep_until(t0 + 20)
        m.settle(w.group, w.member, "jobs", AckKind.IN_PROGRESS, ((1, 1),), 0.0)
        d = await w.next_delivery(100)
        assert (d.offsets, d.deliveries) == ([1], 3)
        assert trio.current_time() - t0 == pytest.approx(50)
        m.leave(w.group, w.member)
        await trio.sleep(1)
        later = bench.join()  # join wakes the task: the message goes to it
        d = await later.next_delivery(1)
        assert (d.offsets, d.deliveries) == ([1], 4)
        assert trio.current_time() - t0 == pytest.approx(51)
        m.settle(w.group, later.member, "jobs", AckKind.ACK, ((1, 1),), 0.0)
        await trio.sleep(1000)
        assert later.session.got == [] and w_stats(later)["pending"] == 0
        nursery.cancel_scope.cancel()


def test_client_ranges_helper() -> None:
    assert _ranges([]) == []
    assert _ranges([5, 3, 4, 10, 1, 4]) == [(1, 1), (3, 5), (10, 10)]
    assert _ranges(list(range(2000, 0, -2))) == [(i, i) for i in range(2, 2001, 2)]


# ==========================================================================
# Part 2: end to end over loopback, under Trio and asyncio (``both``; the
# broker runs in a thread of its own under asyncio: helpers.anybroker)

both = pytest.mark.anyio


@asynccontextmanager
async def broker(**overrides: Any) -> AsyncIterator[Server]:
    overrides.setdefault("http_port", None)
    async with serving(**overrides) as server:
        yield server


def group_of(server: Server, name: str) -> Group:
    return server.broker.groups.groups[name]


async def quiet(*clients: Client) -> None:
    """A round trip on each connection, a short pause, another round trip."""
    with anyio.fail_after(TIMEOUT):
        for c in clients:
            await c.ping()
        await anyio.sleep(QUIET)
        for c in clients:
            await c.ping()


class Ledger:
    """What callbacks received: (worker, payload, deliveries, message)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, bytes, int, Message]] = []
        self._waiters: list[tuple[Callable[[], bool], anyio.Event]] = []

    def record(self, worker: str, msg: Message) -> None:
        self.entries.append((worker, msg.payload, msg.deliveries, msg))
        for check, event in self._waiters:
            if check():
                event.set()

    def callback(self, worker: str) -> Callable[[Message], None]:
        def cb(msg: Message) -> None:
            self.record(worker, msg)

        return cb

    async def wait(self, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        with anyio.fail_after(timeout):
            if check():
                await anyio.lowlevel.checkpoint()
                return
            event = anyio.Event()
            self._waiters.append((check, event))
            await event.wait()

    def payloads(self, worker: str | None = None) -> list[bytes]:
        return [p for w, p, _, _ in self.entries if worker is None or w == worker]


class Holder:
    """Iterates a subscription in the background, keeping every message."""

    def __init__(self, sub: client.Subscription) -> None:
        self.sub = sub
        self.messages: list[Message] = []
        self._changed = anyio.Event()
        #: Most messages held unsettled at once, counted as each arrives (a
        #: settlement is sent before the delivery it makes room for).
        self.most_unsettled = 0

    async def run(self) -> None:
        async for msg in self.sub:
            self.messages.append(msg)
            self.most_unsettled = max(self.most_unsettled, len(self.unsettled()))
            self._changed.set()

    async def wait_count(self, n: int, timeout: float = TIMEOUT) -> None:
        with anyio.fail_after(timeout):
            while len(self.messages) < n:
                self._changed = anyio.Event()
                await self._changed.wait()

    def unsettled(self) -> list[Message]:
        return [m for m in self.messages if m.settled in (None, AckKind.IN_PROGRESS)]


@pytest.mark.parametrize("storage", ["memory", "file"])
@both
async def test_three_workers_process_every_job_exactly_once(storage: str, tmp_path: Path) -> None:
    n = 3000 if storage == "memory" else 600
    overrides: dict[str, Any] = {"data_dir": tmp_path / "data"} if storage == "file" else {}
    ledger = Ledger()
    async with broker(**overrides) as server, AsyncExitStack() as stack:
        for i in range(3):
            w = await stack.enter_async_context(client.connect(server.url, name=f"w{i}"))
            with anyio.fail_after(TIMEOUT):
                await w.subscribe("jobs", ledger.callback(f"w{i}"), group="workers", max_ack_pending=100)
        pub = await stack.enter_async_context(client.connect(server.url, name="pub"))
        jobs = payloads(n, b"job-")
        with anyio.fail_after(LONG):
            acks = await pub.publish_many("jobs", jobs)
        assert [a.offset for a in acks] == list(range(n))
        await ledger.wait(lambda: len(ledger.entries) >= n, LONG)
        group = group_of(server, "workers")
        await wait_until(lambda: group.acked == n, LONG)
        await quiet(pub)
        counts = Counter(ledger.payloads())
        assert set(counts) == set(jobs) and max(counts.values()) == 1, "every job exactly once"
        assert {d for _, _, d, _ in ledger.entries} == {1}
        assert all(m.is_group_message and m.settled is AckKind.ACK for *_, m in ledger.entries)
        per_worker = Counter(w for w, *_ in ledger.entries)
        assert sorted(per_worker) == ["w0", "w1", "w2"], f"work not shared: {per_worker}"
        stats = group.statistics()
        assert (stats["pending"], stats["redelivered"], stats["members"]) == (0, 0, 3)


@both
async def test_plain_subscriber_and_other_group_get_their_own_copy() -> None:
    n = 500
    ledger = Ledger()
    async with broker() as server, AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(client.connect(server.url, name=f"c{i}")) for i in range(4)
        ]
        with anyio.fail_after(TIMEOUT):
            await clients[0].subscribe("jobs", ledger.callback("plain"))
            await clients[1].subscribe("jobs", ledger.callback("a1"), group="alpha")
            await clients[2].subscribe("jobs", ledger.callback("a2"), group="alpha")
            await clients[3].subscribe("jobs", ledger.callback("beta"), group="beta")
            await clients[3].publish_many("jobs", payloads(n))
        await ledger.wait(lambda: len(ledger.entries) >= 3 * n)
        await wait_until(lambda: group_of(server, "alpha").acked == n == group_of(server, "beta").acked)
        await quiet(*clients)
        everything = sorted(payloads(n))
        assert sorted(ledger.payloads("plain")) == everything
        assert sorted(ledger.payloads("a1") + ledger.payloads("a2")) == everything
        assert sorted(ledger.payloads("beta")) == everything
        plain = [m for w, _, _, m in ledger.entries if w == "plain"]
        assert not any(m.is_group_message for m in plain)


@both
async def test_manual_ack_nak_term_in_progress() -> None:
    async with broker() as server, client.connect(server.url) as c:
        async with (
            # Holds four unsettled at once: a prefetch of 4 (the default is 1).
            c.subscribe("jobs", group="g", auto_ack=False, max_ack_pending=4) as sub,
            anyio.create_task_group() as nursery,
        ):
            holder = Holder(sub)
            nursery.start_soon(holder.run)
            with anyio.fail_after(TIMEOUT):
                await c.publish_many("jobs", [b"ack", b"term", b"nak", b"slow"])
            await holder.wait_count(4)
            m_ack, m_term, m_nak, m_slow = holder.messages
            assert [m.deliveries for m in holder.messages] == [1, 1, 1, 1]
            assert all(m.is_group_message and m.settled is None for m in holder.messages)
            await m_ack.ack()
            await m_term.term()
            await m_nak.nak()
            await m_slow.in_progress()
            assert m_slow.settled is AckKind.IN_PROGRESS
            await holder.wait_count(5)
            again = holder.messages[4]
            assert (again.payload, again.offset, again.deliveries) == (b"nak", m_nak.offset, 2)
            with pytest.raises(RuntimeError):
                await m_ack.ack()  # settled already
            with pytest.raises(RuntimeError):
                await m_nak.nak()
            await m_slow.in_progress()  # may repeat
            await m_slow.ack()
            await again.ack()
            group = group_of(server, "g")
            await wait_until(lambda: group.acked == 3 and group.termed == 1)
            await quiet(c)
            assert len(holder.messages) == 5
            stats = group.statistics()
            assert (stats["pending"], stats["delivered"], stats["redelivered"]) == (0, 4, 1)
            nursery.cancel_scope.cancel()
        async with c.subscribe("plain.topic") as plain:
            await c.publish("plain.topic", b"p")
            with anyio.fail_after(TIMEOUT):
                msg = await plain.__anext__()
            assert not msg.is_group_message and msg.deliveries == 1
            with pytest.raises(RuntimeError):
                await msg.ack()


@both
async def test_failing_callback_is_redelivered_then_dead_lettered() -> None:
    ledger = Ledger()
    failures: list[int] = []

    def worker(msg: Message) -> None:
        ledger.record("w", msg)
        if msg.payload == b"poison":
            failures.append(msg.deliveries)
            raise RuntimeError("cannot process this one")

    async with broker() as server, client.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT):
            dead = await c.subscribe("failed.jobs")
            await c.subscribe("jobs", worker, group="g", max_deliver=3, dead_letter="failed.jobs")
            acks = await c.publish_many("jobs", [b"ok-1", (b"poison", {"k": "v"}), b"ok-2"])
            dlq = await dead.__anext__()
        assert dlq.payload == b"poison" and dlq.topic == "failed.jobs"
        assert dict(dlq.headers) == {
            "k": "v",
            "x-original-topic": "jobs",
            "x-original-offset": str(acks[1].offset),
            "x-group": "g",
            "x-deliveries": "3",
            "x-reason": "max_deliver",
        }
        assert failures == [1, 2, 3]
        poison = [m for w, p, _, m in ledger.entries if p == b"poison"]
        assert all(m.settled is AckKind.NAK for m in poison)
        await quiet(c)
        assert sorted(ledger.payloads()) == sorted([b"ok-1", b"ok-2"] + [b"poison"] * 3)
        stats = group_of(server, "g").statistics()
        assert (stats["acked"], stats["dead_lettered"], stats["pending"]) == (2, 1, 0)


@pytest.mark.parametrize("how", ["cancel", "aclose"])
@both
async def test_killed_worker_messages_go_to_the_others(how: str) -> None:
    n = 300
    ledger = Ledger()
    stuck = anyio.Event()

    async def stuck_worker(msg: Message) -> None:
        ledger.record("doomed", msg)
        stuck.set()
        await anyio.sleep_forever()  # mid-message, never settles

    async def doomed(url: str, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with anyio.CancelScope() as scope:
            async with client.connect(url, name="doomed") as a:
                await a.subscribe("jobs", stuck_worker, group="workers", max_ack_pending=50)
                task_status.started((scope, a))
                await anyio.sleep_forever()

    async with broker() as server, anyio.create_task_group() as nursery, AsyncExitStack() as stack:
        with anyio.fail_after(TIMEOUT):
            scope, doomed_client = await nursery.start(doomed, server.url)
        for i in range(2):
            w = await stack.enter_async_context(client.connect(server.url, name=f"w{i}"))
            with anyio.fail_after(TIMEOUT):
                await w.subscribe("jobs", ledger.callback(f"w{i}"), group="workers")
        pub = await stack.enter_async_context(client.connect(server.url, name="pub"))
        jobs = payloads(n, b"job-")
        with anyio.fail_after(TIMEOUT):
            await pub.publish_many("jobs", jobs)
            await stuck.wait()
        group = group_of(server, "workers")
        await wait_until(lambda: group.acked == n - 50)  # all but the doomed one's share
        held = [m for m in group.members if m.unacked]
        assert len(held) == 1 and held[0].unacked == 50  # the doomed member's share
        in_hand = ledger.payloads("doomed")
        assert len(in_hand) == 1
        if how == "cancel":
            scope.cancel()
        else:
            with anyio.fail_after(TIMEOUT):
                await doomed_client.aclose()

        def all_done() -> bool:
            return set(ledger.payloads("w0") + ledger.payloads("w1")) == set(jobs)

        await ledger.wait(all_done)
        redelivered = [(p, d) for w, p, d, _ in ledger.entries if w != "doomed" and d > 1]
        assert len(redelivered) == 50
        assert (in_hand[0], 2) in redelivered
        await wait_until(lambda: group.acked == n)
        assert len(group.members) == 2 and group.statistics()["pending"] == 0
        scope.cancel()


@pytest.mark.parametrize(
    ("concurrency", "max_ack_pending", "expected"), [(4, None, 4), (4, 2, 2), (1, None, 1)]
)
@both
async def test_concurrency_runs_callbacks_at_once(
    concurrency: int, max_ack_pending: int | None, expected: int
) -> None:
    n = 12
    active = 0
    most = 0
    done: list[bytes] = []
    full = anyio.Event()
    release = anyio.Event()
    finished = anyio.Event()

    async def work(msg: Message) -> None:
        nonlocal active, most
        active += 1
        most = max(most, active)
        if active >= expected:
            full.set()
        with anyio.fail_after(TIMEOUT):
            await release.wait()
        active -= 1
        done.append(msg.payload)
        if len(done) == n:
            finished.set()

    async with broker() as server, client.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT):
            await c.subscribe(
                "jobs", work, group="g", concurrency=concurrency, max_ack_pending=max_ack_pending
            )
            await c.publish_many("jobs", payloads(n))
            await full.wait()
        await quiet(c)
        assert active == most == expected
        release.set()
        with anyio.fail_after(TIMEOUT):
            await finished.wait()
        assert most == expected and sorted(done) == sorted(payloads(n))
        await wait_until(lambda: group_of(server, "g").acked == n)


@both
async def test_max_ack_pending_is_never_exceeded_per_member() -> None:
    limit = 5
    async with broker() as server, anyio.create_task_group() as nursery, AsyncExitStack() as stack:
        holders: list[Holder] = []
        for i in range(2):
            c = await stack.enter_async_context(client.connect(server.url, name=f"m{i}"))
            with anyio.fail_after(TIMEOUT):
                sub = await c.subscribe("jobs", group="g", auto_ack=False, max_ack_pending=limit)
            holders.append(Holder(sub))
            nursery.start_soon(holders[-1].run)
        pub = await stack.enter_async_context(client.connect(server.url, name="pub"))
        with anyio.fail_after(TIMEOUT):
            await pub.publish_many("jobs", payloads(30))
        for h in holders:
            await h.wait_count(limit)
        await quiet(pub)
        assert [len(h.unsettled()) for h in holders] == [limit, limit]
        # Settle some: exactly that many more arrive, never above the limit.
        first = holders[0]
        await first.messages[0].ack()
        await first.messages[1].nak(delay=60)
        await first.messages[2].term()
        await first.wait_count(limit + 3)
        await quiet(pub)
        assert len(first.messages) == limit + 3 and len(first.unsettled()) == limit
        assert len(holders[1].messages) == limit
        for _ in range(10):  # bounded: drain the rest, acking as we go
            for h in holders:
                for m in h.unsettled():
                    await m.ack()
            await quiet(pub)
            assert all(len(h.unsettled()) <= limit for h in holders)
            if sum(len(h.messages) for h in holders) >= 30:
                break
        assert [h.most_unsettled for h in holders] == [limit, limit]
        offsets = sorted(m.offset for h in holders for m in h.messages)
        assert offsets == list(range(30)) and all(m.deliveries == 1 for h in holders for m in h.messages)


@both
async def test_many_acks_are_sent_as_several_ack_frames() -> None:
    n = 2100  # acking every other one: 1050 ranges, more than one ACK frame holds
    async with broker() as server, client.connect(server.url) as c:
        async with c.subscribe("jobs", group="g", auto_ack=False, max_ack_pending=n) as sub:
            with anyio.fail_after(TIMEOUT):
                await c.publish_many("jobs", payloads(n))
                got = [await sub.__anext__() for _ in range(n)]
            # Settled without yielding (ack() minus its checkpoint), so one
            # writer pass turns them into 1050 ranges: two ACK frames.
            for m in got[::2]:
                m._settle(AckKind.ACK)
            await anyio.lowlevel.checkpoint()
            group = group_of(server, "g")
            await wait_until(lambda: group.acked == n // 2)
            assert group.statistics()["pending"] == n // 2
            for m in got[1::2]:
                await m.ack()
            await wait_until(lambda: group.acked == n)
            assert group.statistics()["pending"] == 0


@both
async def test_group_keeps_its_position_without_members() -> None:
    async with broker() as server, client.connect(server.url) as c:
        async with c.subscribe("jobs", group="g") as sub:
            await c.publish("jobs", b"one")
            with anyio.fail_after(TIMEOUT):
                one = await sub.__anext__()
            assert one.payload == b"one"
            await one.ack()  # iterating never acks by itself
            await c.ping()
        await wait_until(lambda: not group_of(server, "g").members)
        assert group_of(server, "g").statistics()["pending"] == 0
        with anyio.fail_after(TIMEOUT):
            await c.publish_many("jobs", [b"two", b"three"])
        async with c.subscribe("jobs", group="g", max_ack_pending=2) as sub:
            with anyio.fail_after(TIMEOUT):
                got = [await sub.__anext__() for _ in range(2)]
        assert [(m.payload, m.deliveries) for m in got] == [(b"two", 1), (b"three", 1)]


@pytest.mark.parametrize("late_start", ["offset", "time"])
@both
async def test_later_member_start_is_ignored(late_start: str) -> None:
    """protocol.md: the first SUBSCRIBE fixes the group's start position;
    later members' start is ignored, so they get every group message."""
    start: Any = 5 if late_start == "offset" else dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    async with broker() as server, client.connect(server.url) as c:
        async with c.subscribe("jobs", group="g", start="earliest"):
            pass  # creates the group at the start of the topic, then leaves
        with anyio.fail_after(TIMEOUT):
            await c.publish_many("jobs", payloads(10))
        async with c.subscribe(
            "jobs", group="g", start=start, auto_ack=False, ack_wait=30, max_ack_pending=10
        ) as sub:
            got: list[Message] = []
            with anyio.move_on_after(1.0):
                async for msg in sub:
                    got.append(msg)
                    if len(got) == 10:
                        break
            group = group_of(server, "g")
            assert group.statistics()["delivered"] == 10  # the broker handed out all ten
            assert [m.offset for m in got] == list(range(10)), (
                "the client dropped group messages before its own (ignored) start"
            )


@both
async def test_conflicting_and_bad_group_options_are_207() -> None:
    async with broker() as server, client.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT):
            await c.subscribe("jobs.>", group="g")
            with pytest.raises(BrokerError) as info:
                await c.subscribe("jobs.*", group="g")
            assert info.value.code == 207 and info.value.error_code is ErrorCode.BAD_REQUEST
            # Same pattern, other settings: joins (the settings are the first's,
            # but for max_ack_pending: each member's own prefetch).
            await c.subscribe("jobs.>", group="g", max_ack_pending=3, ack_wait=1)
            group = group_of(server, "g")
            assert (group.config.max_ack_pending, group.config.ack_wait) == (1, 30.0)
            assert [m.max_ack_pending for m in group.members] == [1, 3]
            bad: list[dict[str, Any]] = [
                {"group": "a.b"},
                {"group": ""},
                {"group": "x*"},
                {"group": "h", "max_deliver": -1},
                {"group": "h", "max_ack_pending": 0},
                {"group": "h", "max_ack_pending": 1_000_001},
                {"group": "h", "dead_letter": "has space"},
                {"group": "h", "dead_letter": "dlq.*"},
            ]
            for kwargs in bad:
                with pytest.raises(BrokerError) as info:
                    await c.subscribe("other", **kwargs)
                assert info.value.code == 207, kwargs
            assert "h" not in server.broker.groups.groups
            with pytest.raises(ValueError):
                c.subscribe("other", max_deliver=3)  # group options need group=
            with pytest.raises(ValueError):
                c.subscribe("other", group="h", concurrency=0)
            # The connection is fine afterwards.
            sub = await c.subscribe("other", group="h")
            await c.publish("other", b"ok")
            assert (await sub.__anext__()).payload == b"ok"


@pytest.mark.parametrize(
    "kwargs", [{"ack_wait": 0}, {"ack_wait": -1}, {"backoff": [1, -1]}, {"backoff": [0]}]
)
@both
async def test_non_positive_waits_are_refused_not_clamped(kwargs: dict[str, Any]) -> None:
    """ack_wait_ms and backoff_ms must be positive (protocol.md); the client
    must not quietly turn 0 or -1 s into 1 ms (a redelivery storm)."""
    async with broker() as server, client.connect(server.url) as c:
        with anyio.fail_after(TIMEOUT), pytest.raises((ValueError, BrokerError)) as info:
            await c.subscribe("jobs", group="h", **kwargs)
        if isinstance(info.value, BrokerError):
            assert info.value.code == 207
        assert "h" not in server.broker.groups.groups, server.broker.groups.groups["h"].config


# -- raw frames -----------------------------------------------------------------


def assert_bad_request(event: Any, sub_id: int) -> None:
    assert isinstance(event, Error), event
    assert (event.code, event.fatal, event.ref_kind, event.ref) == (
        ErrorCode.BAD_REQUEST,
        False,
        RefKind.SUBSCRIPTION,
        sub_id,
    ), event
    assert event.message


async def test_raw_ack_errors_are_207_and_not_fatal() -> None:
    async with broker() as server, raw_client(server, handshake="raw-groups") as raw:
        await raw.send_event(Subscribe(1, "jobs"))
        assert await raw.expect(SubAck) == SubAck(1)
        await raw.send_event(Subscribe(2, "jobs", options={"group": "g"}))
        assert await raw.expect(SubAck) == SubAck(2)
        cases: list[tuple[int, Ack]] = [
            (1, Ack(1, AckKind.ACK, "jobs", ((0, 0),))),  # a plain subscription
            (77, Ack(77, AckKind.ACK, "jobs", ((0, 0),))),  # no such subscription
            (2, Ack(2, 9, "jobs", ((0, 0),))),  # type: ignore[arg-type]  # unknown kind
            (2, Ack(2, AckKind.ACK, "jobs", ())),  # zero ranges
            (2, Ack(2, AckKind.NAK, "jobs", ((5, 4),))),  # first > last
        ]
        for sub_id, ack in cases:
            await raw.send_event(ack)
            assert_bad_request(await raw.expect(Error), sub_id)
        bad_options = [
            {"group": "g2", "ack_wait_ms": "0"},
            {"group": "g2", "ack_wait_ms": "soon"},
            {"group": "g2", "backoff_ms": "5,-1"},
            {"group": "g2", "max_deliver": "-2"},
            {"group": "g2", "colour": "blue"},
            {"group": "g.2"},
        ]
        for i, options in enumerate(bad_options, start=10):
            await raw.send_event(Subscribe(i, "jobs", options=options))
            assert_bad_request(await raw.expect(Error), i)
        assert "g2" not in server.broker.groups.groups
        # Valid settings from a later member are accepted (and ignored).
        await raw.send_event(Subscribe(20, "jobs", options={"group": "g", "ack_wait_ms": "10"}))
        assert await raw.expect(SubAck) == SubAck(20)
        assert group_of(server, "g").config.ack_wait == 30.0
        await raw.ping(1)
        assert not raw.backlog


async def test_raw_group_deliver_frames_and_redelivery() -> None:
    async with broker() as server, raw_client(server, handshake="raw-groups") as raw:
        await raw.send_event(Subscribe(3, "jobs", options={"group": "g", "ack_wait_ms": "500"}))
        assert await raw.expect(SubAck) == SubAck(3)
        await raw.send_event(Publish(1, "jobs", encode_batch([b"a", (b"b", {"h": "x"}), b"c"])))
        first: GroupDeliver = await raw.expect(GroupDeliver)
        ack: PubAck = await raw.expect(PubAck)
        assert (first.sub_id, first.topic, first.base_offset, first.deliveries) == (3, "jobs", 0, 1)
        assert first.timestamp == ack.timestamp
        assert decode_batch(first.batch) == [(b"a", {}), (b"b", {"h": "x"}), (b"c", {})]
        t0 = anyio.current_time()
        await raw.send_event(Ack(3, AckKind.ACK, "jobs", ((0, 0), (2, 2))))
        again: GroupDeliver = await raw.expect(GroupDeliver, timeout=5)
        assert anyio.current_time() - t0 >= 0.4  # not before the ack wait
        assert (again.base_offset, again.deliveries) == (1, 2)
        assert decode_batch(again.batch) == [(b"b", {"h": "x"})]
        await raw.send_event(Ack(3, AckKind.ACK, "jobs", ((0, 2**64 - 1),)))
        group = group_of(server, "g")
        await wait_until(lambda: group.statistics()["pending"] == 0)
        await raw.ping(2)
        with anyio.move_on_after(0.4):
            extra = await raw.next_event(5)
            raise AssertionError(f"nothing more expected, got {extra!r}")
        assert not any(isinstance(e, (GroupDeliver, Deliver)) for e in raw.backlog)


@both
async def test_short_ack_wait_redelivers_in_real_time() -> None:
    async with broker() as server, AsyncExitStack() as stack:
        a = await stack.enter_async_context(client.connect(server.url, name="a"))
        b = await stack.enter_async_context(client.connect(server.url, name="b"))
        with anyio.fail_after(TIMEOUT):
            sub_a = await a.subscribe("jobs", group="g", auto_ack=False, ack_wait=0.2)
            sub_b = await b.subscribe("jobs", group="g", auto_ack=False)
            await a.publish("jobs", b"x")
            m1 = await sub_a.__anext__()  # a joined first: round-robin starts with it
            t0 = anyio.current_time()
            m2 = await sub_b.__anext__()
        assert anyio.current_time() - t0 >= 0.15
        assert (m1.deliveries, m2.deliveries, m2.offset, m2.payload) == (1, 2, m1.offset, b"x")
        await m1.ack()  # too late: ignored, the message is b's now
        await m2.ack()
        group = group_of(server, "g")
        await wait_until(lambda: group.statistics()["pending"] == 0)
        await quiet(a, b)
        stats = group.statistics()
        assert (stats["acked"], stats["delivered"], stats["redelivered"]) == (1, 1, 1)
        assert sub_a.statistics().pending_messages == sub_b.statistics().pending_messages == 0


# ==========================================================================
# Part 3: the broker on Trio's MockClock (long waits in milliseconds)


@pytest.fixture
def net_clock() -> MockClock:
    """Jumps to the next timer once every task has been idle 50 ms of real
    time: loopback I/O completes far sooner, so only real waits jump."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@asynccontextmanager
async def clocked_member(**options: Any) -> AsyncIterator[tuple[Server, Client, client.Subscription]]:
    async with broker(retention_check_seconds=3600.0) as server:
        # The clock jumps only to the next timer: the parking lot's 0.25 s
        # sweep and the groups' 0.2 s snapshots would make every mock second
        # cost 9 jumps of 50 ms real time (these tests took 12-46 s each).
        # Neither is what they are about, and neither changes a delivery.
        server.lot.sweep = 3600.0
        server.broker.groups.persist_interval = 5.0
        async with client.connect(server.url) as c:
            async with c.subscribe("jobs", group="g", auto_ack=False, **options) as sub:
                yield server, c, sub


async def next_msg(sub: client.Subscription, timeout: float) -> Message:
    with trio.fail_after(timeout):
        return await sub.__anext__()


async def test_mock_clock_default_ack_wait_redelivers_after_30s(net_clock: MockClock) -> None:
    async with clocked_member() as (server, c, sub):
        await c.publish("jobs", b"x")
        first = await next_msg(sub, 5)
        t0 = trio.current_time()
        second = await next_msg(sub, 100)
        elapsed = trio.current_time() - t0
        assert 29.99 <= elapsed < 31, elapsed
        assert (first.deliveries, second.deliveries, second.offset) == (1, 2, first.offset)
        await second.ack()
        with trio.move_on_after(200):  # mock time: well past further ack waits
            extra = await sub.__anext__()
            raise AssertionError(f"acked, yet delivered again: {extra!r}")
        assert group_of(server, "g").statistics()["pending"] == 0


async def test_mock_clock_nak_delay_and_in_progress(net_clock: MockClock) -> None:
    async with clocked_member() as (_server, c, sub):
        await c.publish("jobs", b"x")
        first = await next_msg(sub, 5)
        t0 = trio.current_time()
        await first.nak(delay=10)
        second = await next_msg(sub, 100)
        assert 9.99 <= trio.current_time() - t0 < 11
        assert second.deliveries == 2
        # In progress at +20 s restarts the 30 s clock: due at +50, not +30.
        t1 = trio.current_time()
        await trio.sleep(20)
        await second.in_progress()
        third = await next_msg(sub, 100)
        assert 49.99 <= trio.current_time() - t1 < 51
        assert third.deliveries == 3
        await third.ack()


async def test_mock_clock_backoff_then_dead_letter(net_clock: MockClock) -> None:
    async with clocked_member(backoff=[1, 5, 20]) as (_server, c, sub):
        async with c.subscribe("dlq.g") as dead:
            await c.publish("jobs", b"x", {"k": "v"})
            msg = await next_msg(sub, 5)
            times = [trio.current_time()]
            seen = [msg.deliveries]
            for _ in range(4):  # default max_deliver 5: deliveries 2..5
                await msg.nak()  # the group's backoff for this delivery
                msg = await next_msg(sub, 100)
                times.append(trio.current_time())
                seen.append(msg.deliveries)
            waits = [b - a for a, b in itertools.pairwise(times)]
            assert seen == [1, 2, 3, 4, 5]
            assert waits == pytest.approx([1, 5, 20, 20], abs=0.05)
            await msg.nak()  # the 5th: dead-lettered at once, no backoff wait
            dlq = await next_msg(dead, 100)
            assert trio.current_time() - times[-1] == pytest.approx(0, abs=0.05)
            assert dlq.payload == b"x" and dlq.headers["k"] == "v"
            assert dlq.headers["x-deliveries"] == "5" and dlq.headers["x-reason"] == "max_deliver"
            with trio.move_on_after(100):
                extra = await sub.__anext__()
                raise AssertionError(f"dead-lettered, yet delivered again: {extra!r}")
