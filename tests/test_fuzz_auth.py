"""Fuzzing the security boundary of a broker with a users file, over loopback.

A broker with durable storage and a real users file in ``tmp_path``: an
admin (``root``, token and password), a restricted user (``rita``, publish
and subscribe allow/deny patterns with ``*`` and ``>``) and the well-behaved
client's user (``hal``). In rounds:

1. **Unauthenticated peers.** Many raw connections send random bytes,
   mutated frames, valid frames before HELLO, HELLOs with missing, wrong,
   mixed, mutated, huge or very many credential options (also right
   credentials with a wrong version, bad magic or reserved flags), then more
   frames, among them a right HELLO and PUBLISHes. Each may receive nothing
   but one fatal ERROR of the 100-106 family, then EOF; and the admin's
   view of topics, offsets and groups is unchanged by them.
2. **The restricted peer** (raw, codec-valid frames, pipelined) sends random
   PUBLISH, SUBSCRIBE (plain and group, patterns over a small token
   alphabet), UNSUBSCRIBE, INFO and GROUPS while the admin publishes to
   every topic of the alphabet. Each answer is compared to an oracle
   written here from protocol.md ("Authentication and permissions") by
   brute force over a finite topic universe, not with broker.permissions:
   refused PUBLISH gets 211, accepted ones a PUBACK; SUBSCRIBE succeeds
   exactly when the rules allow (and 211 otherwise); no DELIVER or
   GROUP_DELIVER ever carries a topic the user may not read; INFO and
   GROUPS list exactly the readable topics and groups. Inboxes
   (``_inbox...``, protocol.md "Request and reply") follow ownership, not
   permissions: the admin's connection owns two, which rita's SUBSCRIBEs
   must be refused; rita owns those she subscribes to first (and takes
   them back on her next connection); only an owner's exact subscription
   is delivered an inbox's messages; no INFO lists one; none is stored.
3. After each round the healthy client publishes and receives; at the end
   it replays everything it had acknowledged, and every topic holds exactly
   the messages some authenticated party had acknowledged (so nothing
   refused or unauthenticated was stored).

What it found: the right password followed by NUL bytes was accepted
(scrypt's PBKDF2 pads an HMAC key under 64 bytes with zeros); fixed in
broker/auth.py, directed tests below.

The seed is fixed and printed; ``PYBROKER_FUZZ_SEED=N`` replays another run.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import struct
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import pybroker as client
from pybroker.server.auth import hash_password, verify_password
from pybroker.server.server import Server
from pybroker.server.testing import running_broker
from pybroker.protocol import (
    UNLIMITED_CREDIT,
    Ack,
    AckKind,
    Deliver,
    Error,
    ErrorCode,
    FrameType,
    Event,
    Goodbye,
    GroupDeliver,
    Groups,
    GroupsAction,
    GroupsReply,
    Hello,
    Info,
    InfoReply,
    Ping,
    PubAck,
    Publish,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
    encode_event,
)

from helpers.auth import CHEAP, user_entry, write_users
from helpers.brokerlog import broker_log
from helpers.frames import hello_body, raw_frame, s16, u16
from helpers.fuzzing import (
    HEALTHY_TOPIC,
    SEED,
    Healthy,
    mutate,
    random_batch,
    valid_client_event,
    wrong_direction_event,
)
from helpers.raw import RawClient, raw_client


ROUNDS = 15
UNAUTH_PER_ROUND = 100
RESTRICTED_FRAMES_PER_ROUND = 300
#: Frames the restricted peer sends before it reads the answers.
PIPELINE = (1, 12)
TIMEOUT = 10.0
RUN_TIMEOUT = 60.0

#: Bound on each wait of a raw connection (as in test_fuzz_broker.py).
PEER_TIMEOUT = 15.0

# -- users ------------------------------------------------------------------

ROOT_TOKEN = "root-token-" + "Q7vX2kLm9pR4sT8w"
ROOT_PASSWORD = "root-pw-Hc83jdQ0zzK1"
RITA_PASSWORD = "rita-pw-Jm2qP9xW4bN7"
HAL_PASSWORD = "hal-pw-Lr5tY1uI8oP3"

RITA_PUBLISH_ALLOW = ("a.*", "shared.>", "x.*.x", "dlq.*")
RITA_PUBLISH_DENY = ("shared.secret.>", "a.secret", "*.*.b", "_inbox.secret")
#: "*.x" reaches the admin's inbox _inbox.x: a wildcard never delivers it.
RITA_SUBSCRIBE_ALLOW = ("a.>", "shared.*", "b.x", "x.*.a", "dlq.>", "*.x")
RITA_SUBSCRIBE_DENY = ("a.secret.>", "*.secret", "a.b.b", "_inbox.b")

#: Topic tokens of the fuzzed requests; "zz" appears in no rule and no
#: request, and stands for "any other token" in the oracle's universe.
TOKENS = ("a", "b", "x", "secret", "shared", "_inbox", "dlq")
EDGE_PATTERNS = (
    *RITA_SUBSCRIBE_ALLOW,
    *RITA_SUBSCRIBE_DENY,
    *RITA_PUBLISH_ALLOW,
    "a.*", "a.secret", "a.secret.x", "a.b.*", "a.b", "a.x.>", "shared.>", "shared.secret",
    "b.*", "x.>", "x.b.a", "x.secret.a", "_inbox.a", "_inbox.*", "_inbox.>", "*", ">", "*.x",
    "dlq.g1", "dlq.*", "_inbox.x", "_inbox.shared", "_inbox.x.a",
)  # fmt: skip
EDGE_TOPICS = (
    "a.x", "a.b", "a.secret", "a.b.b", "a.secret.x", "shared.x", "shared.secret", "shared.secret.x",
    "shared.a.b", "x.a.x", "x.b.x", "x.secret.x", "b.x", "dlq.g1", "dlq.g2", "_inbox.a",
    "_inbox.secret", "_inbox.b", "_inbox.a.b", "secret",
)  # fmt: skip
#: Patterns rita may subscribe to, so that her groups get deliveries.
READABLE_PATTERNS = ("a.x.>", "shared.x", "b.x", "x.*.a", "a.b.a", "dlq.>", "a.*.x")
GROUP_NAMES = ("g1", "g2", "g3")
#: Inboxes the admin's connection subscribes to (owns) for the whole run.
ADMIN_INBOXES = ("_inbox.x", "_inbox.shared")
#: Groups the admin creates and keeps a member in: one rita may read, one not.
ADMIN_GROUPS = {"adm_ok": "a.x.>", "adm_secret": "a.secret.>"}


def users(tmp_path: Path) -> Path:
    return write_users(
        tmp_path,
        {
            "root": user_entry(
                token=ROOT_TOKEN, password=ROOT_PASSWORD, publish=[">"], subscribe=[">"], admin=True
            ),
            "rita": user_entry(
                password=RITA_PASSWORD,
                publish=RITA_PUBLISH_ALLOW,
                publish_deny=RITA_PUBLISH_DENY,
                subscribe=RITA_SUBSCRIBE_ALLOW,
                subscribe_deny=RITA_SUBSCRIBE_DENY,
            ),
            "hal": user_entry(password=HAL_PASSWORD, publish=["healthy.>"], subscribe=["healthy.>"]),
        },
    )


# -- the oracle: protocol.md's rules, by brute force ------------------------


def match(pattern: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """protocol.md "Topics and patterns", written out token by token."""
    if not pattern:
        return not topic
    head = pattern[0]
    if head == ">":
        return len(topic) >= 1
    if not topic or (head != "*" and head != topic[0]):
        return False
    return match(pattern[1:], topic[1:])


#: Every topic of depth 1..4 over the alphabet and one foreign token. The
#: patterns involved have at most 3 tokens, so two of them differ (cover,
#: overlap) on some topic of this universe if they differ at all.
UNIVERSE = tuple(
    t for n in range(1, 5) for t in itertools.product((*TOKENS, "zz"), repeat=n)
)


@functools.cache
def matching(pattern: str) -> frozenset[tuple[str, ...]]:
    p = tuple(pattern.split("."))
    return frozenset(t for t in UNIVERSE if match(p, t))


def _inbox(tokens: list[str]) -> bool:
    """An inbox by its exact name (protocol.md: every topic under ``_inbox``)."""
    return len(tokens) >= 2 and tokens[0] == "_inbox" and "*" not in tokens and ">" not in tokens


def is_inbox(name: str) -> bool:
    """A topic, or a pattern, that can name inboxes only."""
    return name.split(".")[0] == "_inbox" and "." in name


def rita_may_publish(topic: str) -> bool:
    tokens = tuple(topic.split("."))
    if any(match(tuple(d.split(".")), tokens) for d in RITA_PUBLISH_DENY):
        return False  # deny wins, over the inbox rule too
    return _inbox(list(tokens)) or any(match(tuple(a.split(".")), tokens) for a in RITA_PUBLISH_ALLOW)


def rita_may_subscribe(pattern: str) -> bool:
    reach = matching(pattern)
    if any(reach & matching(d) for d in RITA_SUBSCRIBE_DENY):
        return False
    return _inbox(pattern.split(".")) or any(reach <= matching(a) for a in RITA_SUBSCRIBE_ALLOW)


def rita_may_read(topic: str) -> bool:
    """By permissions alone: inboxes also need ownership (Rita.may_receive)."""
    tokens = tuple(topic.split("."))
    if any(match(tuple(d.split(".")), tokens) for d in RITA_SUBSCRIBE_DENY):
        return False
    return _inbox(list(tokens)) or any(match(tuple(a.split(".")), tokens) for a in RITA_SUBSCRIBE_ALLOW)


def test_oracle_sanity() -> None:
    """The oracle itself, on hand-picked cases from protocol.md."""
    assert rita_may_publish("a.x") and not rita_may_publish("a.secret") and not rita_may_publish("a.b.b")
    assert rita_may_publish("_inbox.a") and not rita_may_publish("_inbox.secret")
    assert not rita_may_publish("b.x") and rita_may_publish("shared.x.y") and not rita_may_publish("shared.secret.x")
    assert rita_may_subscribe("a.x.>") and not rita_may_subscribe("a.>")  # a.>: reaches a.secret.x
    assert rita_may_subscribe("a.b.a") and not rita_may_subscribe("a.b.*")  # a.b.*: reaches a.b.b
    assert rita_may_subscribe("shared.x") and not rita_may_subscribe("shared.*")  # shared.secret
    assert rita_may_subscribe("_inbox.a") and not rita_may_subscribe("_inbox.b") and not rita_may_subscribe("_inbox.*")
    assert not rita_may_subscribe("b.*") and rita_may_subscribe("b.x") and rita_may_subscribe("x.*.a")
    assert rita_may_read("a.b.a") and not rita_may_read("a.b.b") and not rita_may_read("x.secret")
    assert rita_may_publish("_inbox.a.x") and rita_may_subscribe("_inbox.a.x") and not rita_may_publish("_inbox")
    assert not rita_may_publish("_inbox.a.b")  # deny *.*.b wins over the inbox rule
    assert rita_may_subscribe("*.x") and rita_may_read("_inbox.x") and is_inbox("_inbox.*") and not is_inbox("_inbox")


# -- generators ----------------------------------------------------------------


def random_pattern(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(EDGE_PATTERNS)
    tokens = [rng.choice((*TOKENS, "*", "*")) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        tokens[-1] = ">"
    return ".".join(tokens)


def random_topic(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(EDGE_TOPICS)
    return ".".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 3)))


def right_hello(rng: random.Random) -> Hello:
    if rng.random() < 0.5:
        return Hello("right", options={"user": "rita", "password": RITA_PASSWORD})
    return Hello("right", options={"token": ROOT_TOKEN})


def hello_frame(hello: Hello, version: int | None = None, flags: int = 0, magic: bytes = b"PYBK") -> bytes:
    """HELLO bytes built by hand, so the version, magic and flags can be wrong."""
    options = u16(len(hello.options)) + b"".join(
        s16(k.encode("utf-8")) + s16(v.encode("utf-8")) for k, v in hello.options.items()
    )
    body = hello_body(
        magic, hello.version if version is None else version, hello.client_name.encode("utf-8"), options
    )
    return raw_frame(FrameType.HELLO, body, flags)


def far_secret(rng: random.Random) -> str:
    """A wrong secret no frame mutation of a few bytes turns into a right one."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(0, 40)))


def wrong_hello(rng: random.Random) -> tuple[Hello, bool]:
    """A HELLO whose credentials must fail, and whether it is far enough from
    every right one that mutating a few of its bytes cannot make it right."""
    pick = rng.randrange(16)
    near = False
    if pick == 0:
        options: dict[str, str] = {}
    elif pick == 1:
        options = {"user": "rita"}
    elif pick == 2:
        options = {"password": RITA_PASSWORD}
        near = True
    elif pick == 3:
        options = {"user": rng.choice(["rita", "root", "hal", "nobody", ""]), "password": far_secret(rng)}
    elif pick == 4:
        options = {"user": "root", "password": RITA_PASSWORD}  # someone else's password
        near = True
    elif pick == 5:
        options = {"user": rng.choice(["Rita", "rita ", "rita\x00", "ritä"]), "password": RITA_PASSWORD}
        near = True
    elif pick == 6:
        pw = RITA_PASSWORD
        options = {
            "user": "rita",
            "password": rng.choice([pw + "x", pw[:-1], pw.upper(), pw + "\x00", " " + pw, ""]),
        }
        near = True
    elif pick == 7:
        options = {"token": far_secret(rng)}
    elif pick == 8:
        options = {"token": rng.choice([ROOT_TOKEN[:-1], ROOT_TOKEN + "=", ROOT_TOKEN.upper(), ""])}
        near = True
    elif pick == 9:
        # token and user together: refused even when both are right.
        options = {"token": ROOT_TOKEN, "user": "rita", "password": RITA_PASSWORD}
        near = True
    elif pick == 10:
        options = {"token": ROOT_TOKEN, "user": "root"}
        near = True
    elif pick == 11:
        # Huge values.
        options = {"user": "rita" * rng.choice([1, 16383]), "password": "p" * rng.choice([65535, 30000])}
        if rng.random() < 0.5:
            options = {"token": "t" * 65535}
    elif pick == 12:
        # Many options, none of them (right) credentials.
        options = {f"k{i}": "v" * rng.randrange(4) for i in range(rng.choice([100, 3000, 20000]))}
        if rng.random() < 0.5:
            options["user"] = "rita"
            options["password"] = far_secret(rng)
    elif pick == 13:
        options = {"USER": "rita", "Password": RITA_PASSWORD, "tok": ROOT_TOKEN}
        near = True
    elif pick == 14:
        options = {"user": "hal", "password": ROOT_PASSWORD}
        near = True
    else:
        options = {"user": "rita", "password": far_secret(rng), "x" * 500: "é" * 1000}
    return Hello(rng.choice(["", "fuzz", "é" * 50]), options=options), not near


def fuzz_unauth(rng: random.Random) -> bytes:
    """The bytes of one unauthenticated connection."""
    kind = rng.randrange(7)
    if kind == 0:
        head = rng.randbytes(rng.randint(1, 64))
    elif kind == 1:
        # A mutated frame: any client frame, or a far-wrong HELLO.
        hello, far = wrong_hello(rng)
        if rng.random() < 0.5 and far:
            head = mutate(rng, encode_event(hello))
        else:
            head = mutate(rng, encode_event(valid_client_event(rng)))
    elif kind == 2:
        # Valid frames before HELLO (those of the unauthenticated fuzzer too).
        events: list[Event] = [valid_client_event(rng) for _ in range(rng.randint(1, 3))]
        events.append(Publish(7, random_topic(rng), random_batch(rng)))
        events.append(Subscribe(1, ">", StartKind.EARLIEST))
        events.append(Info(2, ">"))
        rng.shuffle(events)
        head = b"".join(encode_event(e) for e in events)
    elif kind == 3:
        head = encode_event(wrong_direction_event(rng))
    elif kind == 4:
        # Right credentials in a HELLO that is wrong otherwise.
        hello = right_hello(rng)
        how = rng.randrange(3)
        if how == 0:
            head = hello_frame(hello, version=rng.choice([0, 2, 0xFFFF]))
        elif how == 1:
            head = hello_frame(hello, magic=rng.choice([b"PYBX", b"pybk", b"\0\0\0\0"]))
        else:
            head = hello_frame(hello, flags=rng.choice([1, 0x80]))
    else:
        hello, _ = wrong_hello(rng)
        head = encode_event(hello)
    if not head:
        head = b"\0"  # a truncation left nothing: the right HELLO below must not come first
    # Then more frames, which must change nothing: among them right
    # credentials, publishes and subscriptions.
    tail = []
    for _ in range(rng.randint(0, 5)):
        choice = rng.randrange(5)
        if choice == 0:
            tail.append(encode_event(right_hello(rng)))
        elif choice == 1:
            tail.append(encode_event(Publish(rng.randrange(1, 99), random_topic(rng), random_batch(rng))))
        elif choice == 2:
            tail.append(encode_event(Subscribe(rng.randrange(9), random_pattern(rng), StartKind.EARLIEST)))
        elif choice == 3:
            tail.append(encode_event(valid_client_event(rng)))
        else:
            tail.append(rng.randbytes(rng.randint(1, 16)))
    return head + b"".join(tail)


# -- part 1: unauthenticated connections ---------------------------------------

#: The fatal errors an unauthenticated connection may get.
UNAUTH_CODES = {
    ErrorCode.MALFORMED_FRAME,
    ErrorCode.UNKNOWN_FRAME_TYPE,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.UNSUPPORTED_VERSION,
    ErrorCode.HANDSHAKE_REQUIRED,
    ErrorCode.UNEXPECTED_FRAME,
    ErrorCode.AUTH_FAILED,
}


@attrs.define
class Tally:
    unauth: int = 0
    unauth_bytes: int = 0
    unauth_codes: dict[str, int] = attrs.Factory(dict)
    silent_eof: int = 0
    requests: int = 0
    outcomes: dict[str, int] = attrs.Factory(dict)
    delivered: int = 0
    group_delivered: int = 0
    admin_published: int = 0
    #: SUBSCRIBEs of rita to the admin's inboxes (refused), and to her own.
    others_inbox: int = 0
    own_inbox: int = 0
    #: Inbox messages delivered to rita (her own), and dropped replies.
    inbox_delivered: int = 0

    def outcome(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


async def run_unauth(server: Server, data: bytes, tally: Tally) -> None:
    async with raw_client(server, timeout=PEER_TIMEOUT, reset_is_eof=True) as peer:
        peer.conn.send(Hello("unauth"))  # the codec must take a WELCOME: so we can see one
        try:
            await peer.send(data)
            with trio.fail_after(TIMEOUT):
                await peer.stream.send_eof()
        except trio.BrokenResourceError:
            pass  # closed on us: its ERROR is waiting
        got: list[Event] = []
        while (event := await peer.next_event()) is not None:
            got.append(event)
            assert len(got) <= 1, f"an unauthenticated peer got {got!r} for {data[:200]!r}"
    assert len(got) <= 1
    if got:
        (event,) = got
        assert isinstance(event, Error) and event.fatal, f"unauthenticated peer got {event!r} for {data[:200]!r}"
        assert event.code in UNAUTH_CODES, f"{event!r} for {data[:200]!r}"
        name = ErrorCode(event.code).name
        tally.unauth_codes[name] = tally.unauth_codes.get(name, 0) + 1
    else:
        tally.silent_eof += 1  # e.g. nothing complete before EOF
    tally.unauth += 1
    tally.unauth_bytes += len(data)


async def snapshot(admin: client.Client) -> tuple[dict[str, int], dict[str, tuple[str, int]]]:
    with trio.fail_after(TIMEOUT):
        topics = {t.topic: t.next_offset for t in await admin.topics(">")}
        groups = {g["group"]: (g["pattern"], g["members"]) for g in (await admin.groups("list"))["groups"]}
    return topics, groups


# -- part 2: the restricted peer -----------------------------------------------


@attrs.define
class World:
    """What the test knows of the broker, as the broker processes frames in
    order: groups (name -> pattern) and their members, existing topics, and
    what every party had acknowledged per topic."""

    groups: dict[str, str] = attrs.Factory(lambda: dict(ADMIN_GROUPS))
    admin_members: set[str] = attrs.Factory(lambda: set(ADMIN_GROUPS))
    existing: set[str] = attrs.Factory(set)
    acked: dict[str, int] = attrs.Factory(dict)
    #: Inbox -> who owns it ("root", "rita"); rita's outlive her connection
    #: (grace) and her next connection takes them back.
    inbox_owner: dict[str, str] = attrs.Factory(lambda: dict.fromkeys(ADMIN_INBOXES, "root"))

    def stored(self, topic: str, count: int) -> None:
        if is_inbox(topic):
            return  # acknowledged, never stored (in memory for its owner only)
        self.existing.add(topic)
        self.acked[topic] = self.acked.get(topic, 0) + count


@attrs.frozen
class Expect:
    """One request of the restricted peer and what the oracle says."""

    key: tuple[int, int]  # (ref_kind, ref) of its answer
    kind: str
    event: Event
    outcome: Any  # "ok", an ErrorCode, or a set of acceptable ones


class Rita:
    def __init__(self, peer: RawClient, world: World, rng: random.Random, tally: Tally) -> None:
        self.peer = peer
        self.world = world
        self.rng = rng
        self.tally = tally
        self.next_id = 1
        self.next_sub = 1
        self.subs: dict[int, tuple[str, str | None]] = {}  # active: sub_id -> (pattern, group)
        self.ever: dict[int, tuple[str, str | None]] = {}  # accepted at some point
        self.members: dict[str, int] = {}  # group -> her members in it
        self.inbox_subs: dict[str, int] = {}  # inbox -> her active subscriptions to it
        self.pending: dict[tuple[int, int], Expect] = {}

    def request_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def plan(self) -> Expect:
        rng, world = self.rng, self.world
        pick = rng.random()
        if pick < 0.35:
            topic = random_topic(rng)
            needs = rng.random() < 0.1
            pub = Publish(self.request_id(), topic, random_batch(rng), needs)
            outcome: Any = "ok" if rita_may_publish(topic) else ErrorCode.PERMISSION_DENIED
            if outcome == "ok" and needs:
                outcome = {"ok", ErrorCode.NO_RECEIVERS}
            return Expect((RefKind.REQUEST, pub.request_id), "publish", pub, outcome)
        if pick < 0.65:
            pattern = random_pattern(rng)
            sid = self.next_sub
            self.next_sub += 1
            group = rng.choice(GROUP_NAMES + tuple(ADMIN_GROUPS)) if rng.random() < 0.35 else None
            options: dict[str, str] = {}
            if group is not None:
                options["group"] = group
                if rng.random() < 0.3:
                    options["max_deliver"] = "0"
                if rng.random() < 0.3:
                    options["dead_letter"] = random_topic(rng)
                if rng.random() < 0.3 and group in world.groups:
                    pattern = world.groups[group]  # the right pattern, sometimes
                elif rng.random() < 0.4:
                    pattern = rng.choice(READABLE_PATTERNS)
            start = rng.choice([StartKind.NEW, StartKind.EARLIEST])
            sub = Subscribe(sid, pattern, start, 0, UNLIMITED_CREDIT, options)
            if not rita_may_subscribe(pattern):
                outcome = ErrorCode.PERMISSION_DENIED
            elif is_inbox(pattern):
                # Ownership (protocol.md, "Request and reply"), whatever
                # the permissions say.
                if not _inbox(pattern.split(".")):
                    outcome = ErrorCode.PERMISSION_DENIED  # a wildcard over inboxes only
                elif group is not None:
                    outcome = ErrorCode.BAD_REQUEST
                elif world.inbox_owner.get(pattern, "rita") != "rita":
                    outcome = ErrorCode.PERMISSION_DENIED
                    self.tally.others_inbox += 1
                else:
                    outcome = "ok"
                    world.inbox_owner[pattern] = "rita"
                    self.inbox_subs[pattern] = self.inbox_subs.get(pattern, 0) + 1
                    self.tally.own_inbox += 1
            elif group is None:
                outcome = "ok"
            elif group in world.groups:
                outcome = "ok" if world.groups[group] == pattern else ErrorCode.BAD_REQUEST
            else:
                dead_letter = options.get("dead_letter", f"dlq.{group}")
                if options.get("max_deliver") != "0" and not rita_may_publish(dead_letter):
                    outcome = ErrorCode.PERMISSION_DENIED
                else:
                    outcome = "ok"
                    world.groups[group] = pattern
            if outcome == "ok":
                self.subs[sid] = self.ever[sid] = (pattern, group)
                if group is not None:
                    self.members[group] = self.members.get(group, 0) + 1
            return Expect((RefKind.SUBSCRIPTION, sid), "subscribe", sub, outcome)
        if pick < 0.72:
            if self.subs and rng.random() < 0.8:
                sid = rng.choice(sorted(self.subs))
                pattern, group = self.subs.pop(sid)
                if group is not None:
                    self.members[group] -= 1
                if pattern in self.inbox_subs:
                    self.inbox_subs[pattern] -= 1
                    if not self.inbox_subs[pattern]:
                        # Her last subscription: the owner gave it up.
                        del self.inbox_subs[pattern]
                        del self.world.inbox_owner[pattern]
                outcome = "ok"
            else:
                sid = self.next_sub + 1000
                outcome = ErrorCode.UNKNOWN_SUBSCRIPTION
            return Expect((RefKind.SUBSCRIPTION, sid), "unsubscribe", Unsubscribe(sid), outcome)
        if pick < 0.86:
            info = Info(self.request_id(), random_pattern(rng))
            return Expect((RefKind.REQUEST, info.request_id), "info", info, set(world.existing))
        action = GroupsAction(rng.randrange(3))
        name = "" if action is GroupsAction.LIST else rng.choice(GROUP_NAMES + tuple(ADMIN_GROUPS) + ("nope",))
        req = Groups(self.request_id(), action, name)
        if action is GroupsAction.LIST:
            visible = {g for g, p in world.groups.items() if rita_may_subscribe(p)}
            return Expect((RefKind.REQUEST, req.request_id), "groups", req, visible)
        if name not in world.groups:
            outcome = ErrorCode.UNKNOWN_GROUP
        elif not rita_may_subscribe(world.groups[name]):
            outcome = ErrorCode.PERMISSION_DENIED
        elif action is GroupsAction.INSPECT:
            outcome = "ok"
        elif self.members.get(name, 0) or name in world.admin_members:
            outcome = ErrorCode.BAD_REQUEST
        else:
            outcome = "ok"
            del world.groups[name]
        return Expect((RefKind.REQUEST, req.request_id), "groups", req, outcome)

    async def round(self, frames: int) -> None:
        sent = 0
        while sent < frames:
            size = min(self.rng.randint(*PIPELINE), frames - sent)
            data: list[bytes] = []
            for _ in range(size):
                exp = self.plan()
                if exp.key in self.pending:
                    # Its answer would be ambiguous (an UNSUBSCRIBE of a
                    # SUBSCRIBE in flight): let the earlier ones be answered.
                    await self.flush(data)
                    data = []
                self.pending[exp.key] = exp
                data.append(self.peer.conn.send(exp.event))
            await self.flush(data)
            sent += size
        self.tally.requests += sent

    async def flush(self, data: list[bytes]) -> None:
        await self.peer.send(b"".join(data))
        while self.pending:
            await self.answer(await self.next())

    async def next(self) -> Event:
        event = await self.peer.next_event()
        assert event is not None, "the broker closed the restricted peer's connection"
        return event

    async def drain(self) -> None:
        """Say GOODBYE and check what is still delivered, up to EOF."""
        self.subs.clear()  # nothing is acked after GOODBYE
        self.inbox_subs.clear()  # her inboxes wait for her next connection
        await self.peer.send(self.peer.conn.send(Goodbye()))
        while (event := await self.peer.next_event()) is not None:
            if isinstance(event, Goodbye):
                continue
            await self.answer(event)
        assert not self.pending
        self.members.clear()  # her members left with the connection

    def check_topic(self, sub_id: int, topic: str, kind: str) -> None:
        assert sub_id in self.ever, f"{kind} for a sub_id never accepted: {sub_id} {topic!r}"
        pattern, group = self.ever[sub_id]
        assert rita_may_read(topic), f"SECURITY: {kind} of {topic!r} to rita (sub {sub_id}, {pattern!r})"
        assert match(tuple(pattern.split(".")), tuple(topic.split("."))), (kind, topic, pattern)
        if is_inbox(topic):
            # Only to an exact subscription the oracle accepted because rita
            # owned the inbox then (it may have ended since: deliveries
            # arrive up to its UNSUBACK), never to a wildcard or a group.
            assert pattern == topic and group is None, f"SECURITY: {kind} of inbox {topic!r} to sub {pattern!r}"
            self.tally.inbox_delivered += 1

    async def answer(self, event: Event) -> None:
        if isinstance(event, Deliver):
            self.check_topic(event.sub_id, event.topic, "DELIVER")
            self.tally.delivered += 1
            return
        if isinstance(event, GroupDeliver):
            self.check_topic(event.sub_id, event.topic, "GROUP_DELIVER")
            self.tally.group_delivered += 1
            if event.sub_id in self.subs:
                # Settle it, as a member would (once unsubscribed it is not ours).
                count = struct.unpack_from(">I", event.batch, 0)[0]
                ack = Ack(event.sub_id, AckKind.ACK, event.topic, ((event.base_offset, event.base_offset + count - 1),))
                await self.peer.send(self.peer.conn.send(ack))
            return
        if isinstance(event, Ping):
            return  # an idle PING (60 s: not in this run); not an answer to anything
        if isinstance(event, Error):
            assert not event.fatal, event
            key = (int(event.ref_kind), event.ref)
        elif isinstance(event, PubAck):
            key = (RefKind.REQUEST, event.request_id)
        elif isinstance(event, SubAck | UnsubAck):
            key = (RefKind.SUBSCRIPTION, event.sub_id)
        elif isinstance(event, InfoReply | GroupsReply):
            key = (RefKind.REQUEST, event.request_id)
        else:
            raise AssertionError(f"unexpected frame to rita: {event!r}")
        exp = self.pending.pop(key, None)
        assert exp is not None, f"an answer to nothing asked: {event!r}"
        self.check(exp, event)

    def check(self, exp: Expect, event: Event) -> None:
        what = f"{exp.event!r} -> {event!r}"
        if isinstance(event, Error):
            code = ErrorCode(event.code)
            self.tally.outcome(f"{exp.kind} {code.name}")
            if isinstance(exp.outcome, set):
                assert code in exp.outcome, what
            else:
                assert exp.outcome == code, what
            return
        self.tally.outcome(f"{exp.kind} ok")
        if exp.kind == "publish":
            ok = exp.outcome == "ok" or (isinstance(exp.outcome, set) and "ok" in exp.outcome)
            assert isinstance(event, PubAck) and ok, f"SECURITY: {what}" if not ok else what
            assert isinstance(exp.event, Publish)
            self.world.stored(exp.event.topic, event.count)
        elif exp.kind in ("subscribe", "unsubscribe"):
            assert exp.outcome == "ok", what
        elif exp.kind == "info":
            assert isinstance(event, InfoReply) and isinstance(exp.event, Info), what
            pattern = tuple(exp.event.pattern.split("."))
            listed = {t.topic for t in event.topics}
            for topic in listed:
                assert rita_may_read(topic), f"SECURITY: INFO lists {topic!r} to rita: {what}"
                assert not is_inbox(topic), f"SECURITY: INFO lists inbox {topic!r}: {what}"
                assert match(pattern, tuple(topic.split("."))), what
            known = {t for t in exp.outcome if rita_may_read(t) and match(pattern, tuple(t.split(".")))}
            assert known <= listed, f"INFO misses readable topics {known - listed}: {what}"
        else:
            assert isinstance(event, GroupsReply) and isinstance(exp.event, Groups), what
            doc = json.loads(event.document)
            if exp.event.action is GroupsAction.LIST:
                listed = {g["group"] for g in doc["groups"]}
                for g in doc["groups"]:
                    assert rita_may_subscribe(g["pattern"]), f"SECURITY: GROUPS lists {g} to rita"
                assert listed == exp.outcome, what
            else:
                assert exp.outcome == "ok", what
                if exp.event.action is GroupsAction.INSPECT:
                    assert doc["group"] == exp.event.name and rita_may_subscribe(doc["pattern"]), what
                else:
                    assert doc == {"deleted": exp.event.name}, what


# -- the admin ------------------------------------------------------------------

#: Every topic of depth 1..2 over the alphabet, every edge topic, and a fixed
#: sample of depth 3: the admin publishes to all of them in every round.
ADMIN_TOPICS = sorted(
    {".".join(t) for n in (1, 2) for t in itertools.product(TOKENS, repeat=n)}
    | set(EDGE_TOPICS)
    | {".".join(t) for t in random.Random(7).sample(list(itertools.product(TOKENS, repeat=3)), 40)}
)


async def admin_publish(admin: client.Client, world: World, tally: Tally, rng: random.Random) -> None:
    topics = list(ADMIN_TOPICS)
    rng.shuffle(topics)
    pending = [(t, await admin.send(t, b"admin:" + t.encode())) for t in topics]
    for topic, p in pending:
        with trio.fail_after(TIMEOUT):
            await p.wait()
        world.stored(topic, 1)
        tally.admin_published += 1


async def admin_group_member(admin: client.Client, name: str, pattern: str, started: trio.Event) -> None:
    async with admin.subscribe(pattern, group=name) as sub:
        started.set()
        async for _ in sub:
            pass


class HalHealthy(Healthy):
    async def verify_replay(self, server: Server) -> None:
        async with client.connect(
            server.url, name="replay", user="hal", password=HAL_PASSWORD, connect_timeout=TIMEOUT
        ) as c:
            with trio.fail_after(TIMEOUT):
                async with c.subscribe(HEALTHY_TOPIC, start="earliest") as sub:
                    replayed = [await anext(sub) for _ in range(len(self.acked))]
        assert {m.offset: m.payload for m in replayed} == self.acked
        assert [m.offset for m in replayed] == sorted(self.acked)


async def rita_round(server: Server, world: World, rng: random.Random, tally: Tally) -> None:
    async with raw_client(server, timeout=PEER_TIMEOUT, reset_is_eof=True) as peer:
        await peer.send(peer.conn.send(Hello("rita", options={"user": "rita", "password": RITA_PASSWORD})))
        assert isinstance(await peer.next_event(), Welcome)
        rita = Rita(peer, world, rng, tally)
        await rita.round(RESTRICTED_FRAMES_PER_ROUND)
        await rita.drain()


# -- directed regressions for what the fuzzer found ----------------------------


def test_password_with_trailing_nul_is_wrong() -> None:
    """scrypt keys PBKDF2-HMAC with the password, and HMAC pads a key under 64
    bytes with zero bytes: "pw" and "pw\\0" derived the same key, so a
    HELLO with the right password plus a NUL was let in."""
    stored = hash_password("secret-pw", **CHEAP)
    assert verify_password("secret-pw", stored)
    for wrong in ("secret-pw\0", "secret-pw\0\0\0", "secret-p", "secret-pw\0x"):
        assert not verify_password(wrong, stored), wrong
    with pytest.raises(ValueError, match="NUL"):
        hash_password("pw\0", **CHEAP)


async def test_hello_with_password_plus_nul_is_refused(tmp_path: Path) -> None:
    async with running_broker(data_dir=tmp_path / "data", auth_file=users(tmp_path)) as server:
        for password in (RITA_PASSWORD + "\0", RITA_PASSWORD + "\0\0"):
            async with raw_client(server, timeout=PEER_TIMEOUT, reset_is_eof=True) as peer:
                hello = Hello("nul", options={"user": "rita", "password": password})
                await peer.send(peer.conn.send(hello) + encode_event(Publish(1, "a.x", random_batch(random.Random(1)))))
                event = await peer.next_event()
                assert isinstance(event, Error) and event.code == ErrorCode.AUTH_FAILED, event
                assert await peer.next_event() is None
        async with client.connect(server.url, user="rita", password=RITA_PASSWORD, connect_timeout=TIMEOUT) as c:
            assert (await c.publish("a.x", b"ok")).offset == 0


# -- the run --------------------------------------------------------------------


async def test_fuzz_auth_boundary(tmp_path: Path) -> None:
    print(f"fuzz seed {SEED} (PYBROKER_FUZZ_SEED={SEED} replays this run)")
    rng = random.Random(SEED)
    tally = Tally()
    world = World()
    config: dict[str, Any] = {"data_dir": tmp_path / "data", "auth_file": users(tmp_path), "handshake_timeout": 5.0}
    with broker_log():
        async with running_broker(**config) as server:
            with trio.fail_after(RUN_TIMEOUT):
                async with (
                    client.connect(server.url, name="root", token=ROOT_TOKEN, connect_timeout=TIMEOUT) as admin,
                    client.connect(
                        server.url, name="hal", user="hal", password=HAL_PASSWORD, connect_timeout=TIMEOUT
                    ) as hal,
                    trio.open_nursery() as members,
                ):
                    for name, pattern in ADMIN_GROUPS.items():
                        started = trio.Event()
                        members.start_soon(admin_group_member, admin, name, pattern, started)
                        await started.wait()
                    admin_replies: list[str] = []
                    for inbox in ADMIN_INBOXES:
                        await admin.subscribe(inbox, lambda m: admin_replies.append(m.topic))
                    healthy = HalHealthy(hal)
                    await healthy.check()
                    for _ in range(ROUNDS):
                        # 1. Unauthenticated peers: nothing but a fatal error,
                        # nothing stored, no group touched.
                        before = await snapshot(admin)
                        conns = [fuzz_unauth(rng) for _ in range(UNAUTH_PER_ROUND)]
                        async with trio.open_nursery() as nursery:
                            for data in conns:
                                nursery.start_soon(run_unauth, server, data, tally)
                        assert await snapshot(admin) == before
                        # 2. The restricted peer while the admin publishes
                        # to every topic.
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(admin_publish, admin, world, tally, random.Random(rng.random()))
                            await rita_round(server, world, rng, tally)
                        # 3. The healthy client.
                        await healthy.check()
                        world.acked[HEALTHY_TOPIC] = len(healthy.acked)
                        world.existing.add(HEALTHY_TOPIC)
                    members.cancel_scope.cancel()
                await healthy.verify_replay(server)
                # Every topic holds exactly what authenticated parties had
                # acknowledged: nothing refused or unauthenticated was stored.
                async with client.connect(server.url, name="root", token=ROOT_TOKEN, connect_timeout=TIMEOUT) as admin:
                    topics, _ = await snapshot(admin)
                assert topics == world.acked
                # The admin's inboxes got what was published to them, nobody
                # else's subscription did (check_topic), and no inbox was
                # ever stored.
                assert set(admin_replies) == set(ADMIN_INBOXES)
                assert not [d.name for d in (tmp_path / "data" / "topics").iterdir() if d.name.startswith("_inbox.")]
    print(f"fuzz auth: {tally}")
    assert tally.unauth == ROUNDS * UNAUTH_PER_ROUND
    assert tally.unauth_codes.get("AUTH_FAILED", 0) > 0 and tally.unauth_codes.get("HANDSHAKE_REQUIRED", 0) > 0
    assert tally.outcomes.get("publish PERMISSION_DENIED", 0) > 0 and tally.outcomes.get("publish ok", 0) > 0
    assert tally.outcomes.get("subscribe PERMISSION_DENIED", 0) > 0 and tally.outcomes.get("subscribe ok", 0) > 0
    assert tally.delivered > 0 and tally.group_delivered > 0
    assert tally.others_inbox > 0 and tally.own_inbox > 0 and tally.inbox_delivered > 0
