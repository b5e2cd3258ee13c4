"""The broker fuzzers' shared parts (tests/test_fuzz_broker.py,
tests/test_fuzz_auth.py): seeded generators of client frames (valid ones,
ones with mutated records and a fixed-up CRC, ones the client may never
send, mutations of any frame), and the well-behaved client that checks,
between rounds, that everything it had acknowledged is intact.

The generators draw from the ``random.Random`` they are given and nothing
else, so a seed replays a run exactly.
"""

from __future__ import annotations

import os
import random
import struct

import trio

import pybroker as client
from pybroker.server.server import Server
from pybroker.protocol import (
    UNLIMITED_CREDIT,
    Ack,
    AckKind,
    Credit,
    Deliver,
    Durability,
    Error,
    ErrorCode,
    Event,
    GroupDeliver,
    Groups,
    GroupsAction,
    GroupsReply,
    Hello,
    Info,
    InfoReply,
    Ping,
    Pong,
    PubAck,
    Publish,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    TopicInfo,
    UnsubAck,
    Unsubscribe,
    Welcome,
    encode_batch,
)

from .frames import BATCH_HEADER, HEADER, batch_with_count

#: The fuzzers' seed: fixed, printed by each run; ``PYBROKER_FUZZ_SEED=N``
#: replays another run.
SEED = int(os.environ.get("PYBROKER_FUZZ_SEED", "20261128"))
#: Bound on any single wait of the well-behaved client.
TIMEOUT = 15.0

HEALTHY_TOPIC = "healthy.data"
FUZZ_TOPICS = ["fuzz.a", "fuzz.b.c", "fuzz.group.x", "fuzz.group.y"]
#: The consumer group valid frames join (besides "fz1" and "fz2").
GROUP = "fuzzers"


def random_batch(rng: random.Random) -> bytes:
    messages: list[bytes | tuple[bytes, dict[str, str] | None]] = []
    for _ in range(rng.randint(1, 4)):
        payload = rng.randbytes(rng.randint(0, 24))
        if rng.random() < 0.3:
            messages.append((payload, {"k": str(rng.randint(0, 9)), "é": "ü"}))
        else:
            messages.append(payload)
    return encode_batch(messages)


def crc_fixed_mutant(rng: random.Random) -> bytes:
    """A batch whose records were mutated after encoding, CRC recomputed.

    The broker checks only the envelope, so it stores these; whatever reads
    records later (groups splitting or dead-lettering, subscribers) must cope.
    """
    batch = bytearray(random_batch(rng))
    records = batch[BATCH_HEADER.size :]
    count = BATCH_HEADER.unpack_from(batch, 0)[0]
    choice = rng.randrange(4)
    if choice == 0 and records:
        for _ in range(rng.randint(1, 3)):
            records[rng.randrange(len(records))] = rng.randrange(256)
    elif choice == 1:
        # More records announced than there are, with just enough bytes for
        # the broker's envelope check (6 per record) to pass.
        count += rng.randint(1, 3)
        records += bytes(max(0, 6 * count - len(records)) + rng.randint(0, 3))
    elif choice == 2 and len(records) >= 4:
        # The first record's payload_len swallows what follows.
        struct.pack_into(">I", records, 0, len(records) - rng.randint(0, 5))
        count = max(count, 2)
        records += bytes(6 * count)
    else:
        records += rng.randbytes(rng.randint(1, 7))  # trailing bytes
    return batch_with_count(count, bytes(records))


def valid_client_event(rng: random.Random) -> Event:
    topic = rng.choice(FUZZ_TOPICS)
    pick = rng.randrange(11)
    if pick <= 2:
        batch = crc_fixed_mutant(rng) if rng.random() < 0.35 else random_batch(rng)
        return Publish(rng.choice([0, rng.getrandbits(64)]), topic, batch, rng.random() < 0.1)
    if pick == 3:
        options: dict[str, str] = {}
        if rng.random() < 0.3:
            options = {"group": rng.choice([GROUP, "fz1", "fz2"]), "max_ack_pending": "1"}
        return Subscribe(
            rng.randrange(8),
            rng.choice(["fuzz.>", "fuzz.*", topic, "fuzz.*.x"]),
            StartKind(rng.randrange(4)) if not options else StartKind.EARLIEST,
            rng.choice([0, 1, rng.getrandbits(64)]),
            rng.choice([1, 5, UNLIMITED_CREDIT]),
            options,
        )
    if pick == 4:
        return Unsubscribe(rng.randrange(8))
    if pick == 5:
        return Credit(rng.randrange(8), rng.choice([1, 100, 2**32 - 1]))
    if pick == 6:
        first = rng.randrange(50)
        return Ack(
            rng.randrange(8),
            AckKind(rng.randrange(4)),
            topic,
            ((first, first + rng.randrange(5)),),
            rng.choice([0, 10]),
        )
    if pick == 7:
        return Info(rng.getrandbits(64), rng.choice([">", "fuzz.>", "*"]))
    if pick == 8:
        return Groups(rng.getrandbits(64), GroupsAction(rng.randrange(3)), rng.choice(["", GROUP, "fz1"]))
    if pick == 9:
        return Ping(rng.getrandbits(64))
    rest: list[Event] = [Pong(1), Error(ErrorCode.BAD_REQUEST, "fuzz", 0, RefKind.NONE)]
    return rng.choice(rest)


def wrong_direction_event(rng: random.Random) -> Event:
    """A frame the client may never send, or not now."""
    events: list[Event] = [
        Hello("again"),
        Welcome("0.1.0", "fake"),
        PubAck(1, 0, 1, 0, Durability.DISK),
        SubAck(1),
        UnsubAck(1),
        Deliver(1, "fuzz.a", 0, 0, random_batch(rng)),
        GroupDeliver(1, "fuzz.a", 0, 0, 1, random_batch(rng)),
        InfoReply(1, (TopicInfo("fuzz.a", 0, 1, 10, 0),)),
        GroupsReply(1, "{}"),
    ]
    return rng.choice(events)


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    how = rng.randrange(5)
    if how == 0:  # flip bits
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif how == 1:  # overwrite bytes
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif how == 2:  # wrong length in the header
        size = HEADER.unpack_from(out, 0)[0]
        delta = rng.choice([-3, -1, 1, 2, 9, 2**20, 2**31])
        struct.pack_into(">I", out, 0, max(0, min(size + delta, 2**32 - 1)))
    elif how == 3:  # truncated
        del out[rng.randrange(len(out)) :]
    else:  # bytes inserted
        pos = rng.randrange(len(out) + 1)
        out[pos:pos] = rng.randbytes(rng.randint(1, 5))
    return bytes(out)


class Healthy:
    """The well-behaved client: what it published and had acknowledged."""

    def __init__(self, c: client.Client) -> None:
        self.c = c
        self.acked: dict[int, bytes] = {}  # offset -> payload
        self.counter = 0

    async def check(self, n: int = 5) -> None:
        """Publish n messages with a live subscription; all arrive intact."""
        payloads = []
        for _ in range(n):
            payloads.append(f"healthy-{self.counter}-".encode() + bytes(range(self.counter % 256)))
            self.counter += 1
        with trio.fail_after(TIMEOUT):
            async with self.c.subscribe(HEALTHY_TOPIC) as sub:
                acks = await self.c.publish_many(HEALTHY_TOPIC, payloads)
                got = [await anext(sub) for _ in range(n)]
            await self.c.ping()
        assert [m.payload for m in got] == payloads
        assert [m.offset for m in got] == [a.offset for a in acks]
        for ack, payload in zip(acks, payloads, strict=True):
            assert ack.offset not in self.acked
            self.acked[ack.offset] = payload

    async def verify_replay(self, server: Server) -> None:
        async with client.connect(server.url, name="replay", connect_timeout=TIMEOUT) as c:
            with trio.fail_after(TIMEOUT):
                async with c.subscribe(HEALTHY_TOPIC, start="earliest") as sub:
                    replayed = [await anext(sub) for _ in range(len(self.acked))]
        assert {m.offset: m.payload for m in replayed} == self.acked
        assert [m.offset for m in replayed] == sorted(self.acked)
