"""Permissions: the pattern algebra, the per-user rules, and the matrix end to end.

The algebra (``overlaps``, ``covers``) is checked against brute force over
every topic of a small alphabet with Hypothesis. The matrix runs a real
broker with a users file in tmp_path (``running_broker(auth_file=...)``) and
real clients: each permission allowed and denied, deny over allow, ``*``
and ``>`` edge cases, groups, GROUPS and INFO filtering, request/reply.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import pybroker as client
from pybroker.server.permissions import DECISION_CACHE_LIMIT, DecisionCache, Permissions, covers, overlaps
from pybroker.server.server import Server
from pybroker.server.testing import running_broker
from pybroker.protocol import ErrorCode, matches

from helpers.auth import user_entry, write_users


TIMEOUT = 10.0

# -- the pattern algebra, by brute force ------------------------------------

_ALPHABET = ("a", "b", "c")  # "c" appears in no pattern: "some other token"
_TOPICS = [
    ".".join(t) for n in range(1, 5) for t in itertools.product(_ALPHABET, repeat=n)
]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    depth = draw(st.integers(1, 3))
    tokens = [draw(st.sampled_from(["a", "b", "*"])) for _ in range(depth)]
    if draw(st.booleans()):
        tokens[-1] = ">"
    return ".".join(tokens)


def _matching(pattern: str) -> set[str]:
    return {t for t in _TOPICS if matches(pattern, t)}


@given(patterns(), patterns())
def test_overlaps_is_exactly_a_shared_topic(a: str, b: str) -> None:
    # Patterns of depth <= 3 share a topic iff they share one of depth <= 4.
    expected = bool(_matching(a) & _matching(b))
    assert overlaps(a.split("."), b.split(".")) == expected
    assert overlaps(b.split("."), a.split(".")) == expected


@given(patterns(), patterns())
def test_covers_is_exactly_a_subset(outer: str, inner: str) -> None:
    # A counterexample, if any, has at most one token more than the patterns.
    expected = _matching(inner) <= _matching(outer)
    assert covers(outer.split("."), inner.split(".")) == expected


@given(
    st.lists(patterns(), max_size=3),
    st.lists(patterns(), max_size=2),
    patterns(),
)
def test_an_accepted_subscription_never_reaches_a_forbidden_topic(
    allow: list[str], deny: list[str], pattern: str
) -> None:
    """The security property: whatever SUBSCRIBE accepts, every topic it can
    match is allowed and not denied, so fan-out needs no filtering."""
    perms = Permissions(subscribe_allow=tuple(allow), subscribe_deny=tuple(deny))
    if perms.may_subscribe(pattern):
        for topic in _matching(pattern):
            assert any(matches(a, topic) for a in allow), (pattern, topic)
            assert not any(matches(d, topic) for d in deny), (pattern, topic)
    # And a topic is readable exactly when the rules say so.
    for topic in _TOPICS[:12]:
        expected = any(matches(a, topic) for a in allow) and not any(matches(d, topic) for d in deny)
        assert perms.may_read(topic) == expected


@pytest.mark.parametrize(
    ("outer", "inner", "covered"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a.>", False),  # ">" reaches a.b.c too
        ("a.*", "a.*", True),
        ("a.>", "a.*", True),
        ("a.>", "a.*.c", True),
        ("a.>", "a", False),  # ">" needs at least one token
        ("a.>", "a.>", True),
        (">", ">", True),
        (">", "a", True),
        ("*", ">", False),
        ("a.b", "a.*", False),
        ("*.b", "a.*", False),
    ],
)
def test_covers_edge_cases(outer: str, inner: str, covered: bool) -> None:
    assert covers(outer.split("."), inner.split(".")) is covered


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a", False),
        ("a.>", "*.b.c", True),
        (">", "x", True),
        ("*", "a.b", False),
        ("a.*.c", "a.b.*", True),
        ("a.*.c", "a.b.d", False),
    ],
)
def test_overlaps_edge_cases(a: str, b: str, shared: bool) -> None:
    assert overlaps(a.split("."), b.split(".")) is shared


# -- one user's rules ---------------------------------------------------------


def test_publish_needs_an_allow_and_no_deny() -> None:
    p = Permissions(publish_allow=("orders.>",), publish_deny=("orders.internal.>",))
    assert p.may_publish("orders.eu")
    assert p.may_publish("orders.eu.created")
    assert not p.may_publish("orders")  # ">" needs a token
    assert not p.may_publish("orders.internal.audit")  # deny wins over allow
    assert not p.may_publish("billing.eu")
    assert not Permissions().may_publish("anything")


def test_subscribe_needs_one_covering_allow_and_no_overlapping_deny() -> None:
    p = Permissions(subscribe_allow=("orders.>", "billing.*"), subscribe_deny=("orders.secret",))
    assert p.may_subscribe("orders.eu")
    assert p.may_subscribe("orders.eu.>")
    assert not p.may_subscribe("orders.*")  # could reach orders.secret
    assert not p.may_subscribe("orders.>")
    assert not p.may_subscribe("orders.secret")
    assert p.may_subscribe("billing.x")
    assert not p.may_subscribe("billing.>")  # reaches billing.x.y, not covered
    assert not p.may_subscribe(">")
    # Two allows together do not make a wildcard: a.* could reach a.z.
    two = Permissions(subscribe_allow=("a.x", "a.y"))
    assert two.may_read("a.x") and two.may_read("a.y")
    assert not two.may_subscribe("a.*")


def test_inboxes_are_implicit_unless_denied() -> None:
    p = Permissions()
    assert p.may_publish("_inbox.abc")  # a responder answers any requester
    assert p.may_subscribe("_inbox.abc")  # one's own inbox
    assert not p.may_subscribe("_inbox.*")  # everyone's inboxes
    assert not p.may_subscribe("_inbox.>")
    # Every topic under _inbox is an inbox (broker/inboxes.py), at any depth.
    assert p.may_publish("_inbox.abc.def") and p.may_subscribe("_inbox.abc.def")
    assert not p.may_subscribe("_inbox.abc.*") and not p.may_publish("_inbox")
    denied = Permissions(publish_deny=("_inbox.>",), subscribe_deny=("_inbox.>",))
    assert not denied.may_publish("_inbox.abc")
    assert not denied.may_subscribe("_inbox.abc")


def test_decision_cache_is_bounded() -> None:
    calls: list[str] = []

    def decide(name: str) -> bool:
        calls.append(name)
        return name.startswith("ok")

    cache = DecisionCache(decide)
    assert cache("ok.1") and cache("ok.1") and not cache("no")
    assert calls == ["ok.1", "no"]  # the second lookup was a hit
    for i in range(DECISION_CACHE_LIMIT * 2):
        cache(f"t{i}")
    assert len(cache._known) <= DECISION_CACHE_LIMIT


# -- end to end ---------------------------------------------------------------

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
ADMIN = "admin-token-0123456789"
WORKER = "worker-token-0123456789"


@asynccontextmanager
async def broker(tmp_path: Path) -> AsyncIterator[Server]:
    users = {
        "alice": user_entry(
            token=ALICE,
            publish=["orders.>", "audit.*"],
            publish_deny=["orders.internal.>"],
            subscribe=["orders.>", "billing.*"],
            subscribe_deny=["orders.secret"],
        ),
        "bob": user_entry(token=BOB, publish=[">"], subscribe=[">"]),
        "worker": user_entry(token=WORKER, publish=["dlq.>"], subscribe=["jobs.*"]),
        "admin": user_entry(token=ADMIN, admin=True),
    }
    async with running_broker(auth_file=write_users(tmp_path, users)) as server:
        yield server


def connect(server: Server, token: str) -> AbstractAsyncContextManager[client.Client]:
    return client.connect(server.url, token=token)


async def test_publish_allowed_and_denied(tmp_path: Path) -> None:
    async with broker(tmp_path) as server, connect(server, ALICE) as alice:
        with trio.fail_after(TIMEOUT):
            assert (await alice.publish("orders.eu", b"1")).offset == 0
            assert (await alice.publish("audit.x", b"1")).offset == 0
            for topic in ("billing.x", "orders.internal.audit", "orders", "audit.x.y"):
                with pytest.raises(client.PermissionDenied) as denied:
                    await alice.publish(topic, b"no")
                assert denied.value.code == ErrorCode.PERMISSION_DENIED
                assert repr(topic) in denied.value.message and "alice" in denied.value.message
            # Not fatal: the connection goes on, and nothing was stored.
            assert (await alice.publish("orders.eu", b"2")).offset == 1
            assert "billing.x" not in server.broker.router.topics
            # Messages queued without waiting fail the same way.
            pending = await alice.send("billing.x", b"no")
            with pytest.raises(client.PermissionDenied):
                await pending.wait()


async def test_subscribe_allowed_and_denied_with_wildcards(tmp_path: Path) -> None:
    async with broker(tmp_path) as server, connect(server, ALICE) as alice:
        with trio.fail_after(TIMEOUT):
            for pattern in ("orders.eu", "orders.eu.>", "orders.*.created", "billing.x"):
                async with alice.subscribe(pattern):
                    pass
            # orders.* and orders.> could reach orders.secret (denied);
            # billing.> and > are not covered by any allow.
            for pattern in ("orders.*", "orders.>", "orders.secret", "billing.>", ">", "*.eu", "payroll"):
                with pytest.raises(client.PermissionDenied) as denied:
                    await alice.subscribe(pattern)
                assert denied.value.code == ErrorCode.PERMISSION_DENIED
            # Not fatal either.
            async with alice.subscribe("orders.eu", start="earliest") as sub:
                await alice.publish("orders.eu", b"hello")
                msg = await sub.__anext__()
                assert msg.payload == b"hello"


async def test_group_on_a_topic_the_user_may_not_read(tmp_path: Path) -> None:
    async with broker(tmp_path) as server, connect(server, WORKER) as worker, connect(server, BOB) as bob:
        with trio.fail_after(TIMEOUT):
            for pattern in ("secret.jobs", "jobs.>", ">"):
                with pytest.raises(client.PermissionDenied):
                    await worker.subscribe(pattern, group="g")
            assert "g" not in server.broker.groups.groups
            async with worker.subscribe("jobs.*", group="workers") as sub:
                await bob.publish("jobs.a", b"job")
                msg = await sub.__anext__()
                assert msg.payload == b"job"
                await msg.ack()


async def test_creating_a_group_needs_publish_on_its_dead_letter_topic(tmp_path: Path) -> None:
    async with broker(tmp_path) as server, connect(server, WORKER) as worker:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(client.PermissionDenied) as denied:
                await worker.subscribe("jobs.*", group="g1", dead_letter="jobs.dead")
            assert "jobs.dead" in denied.value.message
            assert "g1" not in server.broker.groups.groups
            # Without dead-lettering there is nothing to publish.
            async with worker.subscribe("jobs.*", group="g2", dead_letter="jobs.dead", max_deliver=0):
                pass
            async with worker.subscribe("jobs.*", group="g3"):  # dlq.g3: allowed
                pass


async def test_groups_admin_shows_only_readable_groups(tmp_path: Path) -> None:
    async with broker(tmp_path) as server, connect(server, BOB) as bob, connect(
        server, WORKER
    ) as worker, connect(server, ADMIN) as admin:
        with trio.fail_after(TIMEOUT):
            async with bob.subscribe("secret.*", group="hidden"):
                pass
            async with bob.subscribe("jobs.*", group="visible"):
                pass
            listed = await worker.groups("list")
            assert [g["group"] for g in listed["groups"]] == ["visible"]
            assert (await worker.groups("inspect", "visible"))["pattern"] == "jobs.*"
            with pytest.raises(client.PermissionDenied):
                await worker.groups("inspect", "hidden")
            with pytest.raises(client.PermissionDenied):
                await worker.groups("delete", "hidden")
            assert "hidden" in server.broker.groups.groups
            # bob reads everything; admin may read no topic but sees and
            # administers every group.
            assert {g["group"] for g in (await bob.groups())["groups"]} == {"hidden", "visible"}
            assert {g["group"] for g in (await admin.groups())["groups"]} == {"hidden", "visible"}
            assert (await admin.groups("inspect", "hidden"))["pattern"] == "secret.*"
            with pytest.raises(client.PermissionDenied):
                await admin.subscribe("secret.*")
            assert await admin.groups("delete", "hidden") == {"deleted": "hidden"}
            assert await worker.groups("delete", "visible") == {"deleted": "visible"}
            assert not server.broker.groups.groups


async def test_info_shows_only_readable_topics(tmp_path: Path) -> None:
    async with broker(tmp_path) as server, connect(server, BOB) as bob, connect(server, ALICE) as alice:
        with trio.fail_after(TIMEOUT):
            for topic in ("orders.eu", "orders.secret", "billing.x", "payroll.y"):
                await bob.publish(topic, b"x")
            assert [t.topic for t in await alice.topics()] == ["billing.x", "orders.eu"]
            assert [t.topic for t in await alice.topics("orders.*")] == ["orders.eu"]
            assert len(await bob.topics()) == 4


async def test_request_reply_between_restricted_users(tmp_path: Path) -> None:
    users = {
        "caller": user_entry(token=ALICE, publish=["svc.echo"]),
        "service": user_entry(token=BOB, subscribe=["svc.echo"]),
    }
    async with running_broker(auth_file=write_users(tmp_path, users)) as server:
        async with connect(server, BOB) as service, connect(server, ALICE) as caller:

            async def echo(msg: client.Message) -> None:
                await service.respond(msg, msg.payload.upper())

            with trio.fail_after(TIMEOUT):
                await service.subscribe("svc.echo", echo)
                reply = await caller.request("svc.echo", b"hi")
                assert reply.payload == b"HI"
                # The implicit inbox right is for one's own exact inbox only.
                with pytest.raises(client.PermissionDenied):
                    await caller.subscribe("_inbox.>")
