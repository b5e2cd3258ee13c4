"""Consumer groups in cluster mode (docs/cluster.md §10), against a real
etcd and a real SeaweedFS on loopback: a group runs at its topic's owner
only (a member that subscribes anywhere else is told NOT_OWNER and the
client follows it); the owner saves each group's cursor and pending
messages in etcd, each delivery count before the delivery goes out, in
transactions fenced on its epoch; the next owner resumes from there, so
across a graceful stop or a SIGKILL of the owner every message is
delivered at least once and none that was acked comes again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pybroker
import trio

from helpers.cluster_broker import (  # noqa: F401 (servers, urls: fixtures)
    WAIT,
    addr_of,
    cluster_node,
    cluster_processes,
    ranked_owners,
    hello,
    publish_to_owner,
    servers,
    settled_owner,
    stop_gracefully,
    store_of,
    urls,
)
from helpers.procs import BrokerProcess
from helpers.raw import raw_client
from pybroker.protocol import (
    Ack,
    AckKind,
    Error,
    ErrorCode,
    GroupDeliver,
    Ping,
    Pong,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    decode_batch,
    first_msg_id,
)
from pybroker.server.cluster.etcd import Etcd
from pybroker.server.cluster.groupstate import ClusterGroupState
from pybroker.server.cluster.keys import ClusterKeys
from pybroker.server.cluster.ranking import first
from pybroker.server.cluster.store import parse_cluster_urls
from pybroker.server.server import Server

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")


def group_key(urls: dict[str, str], group: str, topic: str) -> bytes:
    return parse_cluster_urls(urls["cluster"], urls["object_store"]).keys.group(group, topic, 0)


async def saved_state(etcd: Etcd, key: bytes) -> dict[str, Any] | None:
    kv = await etcd.get(key)
    return None if kv is None else dict(json.loads(kv.value))


def shared_of(node: Server) -> ClusterGroupState:
    shared = node.broker.groups.shared
    assert isinstance(shared, ClusterGroupState), shared
    return shared


async def wait_saved(etcd: Etcd, key: bytes, predicate: Any) -> dict[str, Any]:
    """The group's saved state once ``predicate`` holds for it (polled,
    bounded: it changes with the owner's next transaction)."""
    with trio.fail_after(WAIT):
        while True:
            state = await saved_state(etcd, key)
            if state is not None and predicate(state):
                return state
            await trio.sleep(0.02)


@asynccontextmanager
async def two_processes(urls: dict[str, str], tmp_path: Path) -> AsyncIterator[tuple[dict[str, BrokerProcess], Etcd]]:
    """Two ``pybroker serve --cluster`` processes, started, by ``host:port``,
    and a client of their etcd. A 3 s lease: a take-over after a SIGKILL
    waits for it to run out (the default 10 s would add 7 s to the suite
    and show nothing more)."""
    async with (
        cluster_processes(urls, tmp_path) as procs,
        Etcd(parse_cluster_urls(urls["cluster"], urls["object_store"]).etcd) as etcd,
    ):
        yield {proc.url.removeprefix("pybroker://"): proc for proc in procs}, etcd


async def group_owner(addr: str, topic: str) -> str:
    """The owner of ``topic`` (which has one), as a group SUBSCRIBE to the
    node at ``addr`` finds it: SUBACK there, or NOT_OWNER naming it."""
    async with raw_client(f"pybroker://{addr}") as raw:
        await hello(raw, "probe")
        await raw.send_event(Subscribe(1, topic, StartKind.NEW, 0, options={"group": "probe"}))
        answer = await raw.next_event()
    if answer == SubAck(1):
        return addr
    assert isinstance(answer, Error) and answer.code == ErrorCode.NOT_OWNER, answer
    return answer.fields.get("owner", "")  # (none while it is being handed over)


async def settled_group_owner(etcd: Etcd, keys: ClusterKeys, addrs: list[str], topic: str) -> str:
    """The node where ``topic``'s groups run once ownership has settled:
    the owner key names the member ranked first, and every node says so.
    (Right after the topic is made by its first publish it may still move
    there; a member sent to it meanwhile is sent on again.)"""
    with trio.fail_after(WAIT):
        while True:
            (owner,) = await ranked_owners(etcd, keys, topic)
            if owner is not None and owner[0] in addrs:
                if all([await group_owner(addr, topic) == owner[0] for addr in addrs]):
                    return owner[0]
            await trio.sleep(0.05)


async def test_a_member_on_another_node_is_sent_to_the_owner(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "work", [b"m0"], "creator")
        owner = await settled_owner(nodes, "work")
        other = b if owner is a else a
        # Refused on the sub_id, naming the owner; nothing is registered there.
        async with raw_client(other) as raw:
            await hello(raw, "misdirected")
            await raw.send_event(Subscribe(4, "work", StartKind.EARLIEST, 0, options={"group": "workers"}))
            refused = await raw.next_event()
        assert isinstance(refused, Error) and refused.code == ErrorCode.NOT_OWNER, refused
        assert (refused.ref_kind, refused.ref, refused.fatal) == (RefKind.SUBSCRIPTION, 4, False), refused
        assert refused.fields == {"topic": "work", "owner": addr_of(owner), "owner_url": f"http://127.0.0.1:{owner.http_port}"}
        assert "workers" not in other.broker.groups.groups
        # A pattern with wildcards is no topic's: the group's coordinator
        # runs it. Asked first, a node sends the member to the node ranked
        # first for the group, or (being that node) takes the group and
        # has it asked again; nothing is registered meanwhile.
        async with raw_client(owner) as raw:
            await hello(raw, "wild")
            await raw.send_event(Subscribe(5, "work.*", StartKind.EARLIEST, 0, options={"group": "wild"}))
            wild = await raw.next_event()
        assert isinstance(wild, Error) and wild.code == ErrorCode.NOT_OWNER, wild
        assert (wild.ref, wild.fields["topic"]) == (5, "work.*"), wild
        assert wild.fields.get("owner", addr_of(other)) == addr_of(other), wild
        assert "wild" not in owner.broker.groups.groups

        # The client follows the answer: the subscription is made at the owner.
        got: list[tuple[int, int, bytes]] = []
        async with pybroker.connect(f"pybroker://{addr_of(other)}", name="member", reconnect=True) as client:
            async with client.subscribe("work", group="workers", start="earliest", auto_ack=False, max_ack_pending=50) as sub:
                assert client.reconnects == 1
                for i in range(1, 6):
                    await publish_to_owner(nodes, "work", [f"m{i}".encode()], "publisher")
                with trio.fail_after(WAIT):
                    async for message in sub:
                        got.append((message.offset, message.deliveries, message.payload))
                        await message.ack()
                        if len(got) == 6:
                            break
                await client.ping()  # the acks have reached the owner
        assert got == [(i, 1, f"m{i}".encode()) for i in range(6)]
        assert "workers" in owner.broker.groups.groups and "workers" not in other.broker.groups.groups
        # The owner saved the group: cursor past every message, nothing pending.
        state = await wait_saved(store_of(owner).etcd, group_key(urls, "workers", "work"), lambda s: not s["pending"])
        assert state["cursor"] == 6 and state["group"]["pattern"] == "work"


async def test_a_graceful_stop_of_the_owner_redelivers_only_what_was_not_acked(
    urls: dict[str, str], tmp_path: Path
) -> None:
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "jobs", [f"m{i}".encode() for i in range(20)], "publisher")
        owner = await settled_owner(nodes, "jobs")
        survivor = b if owner is a else a
        key = group_key(urls, "g", "jobs")
        first: list[tuple[int, int]] = []
        async with pybroker.connect(f"pybroker://{addr_of(owner)}", name="first") as client:
            async with client.subscribe("jobs", group="g", start="earliest", auto_ack=False, max_ack_pending=100) as sub:
                with trio.fail_after(WAIT):
                    async for message in sub:
                        first.append((message.offset, message.deliveries))
                        if message.offset < 10:
                            await message.ack()
                        if len(first) == 20:
                            break
                await client.ping()  # the acks have reached the owner
                # Counted before sent: every delivery received is in etcd already.
                state = await saved_state(store_of(owner).etcd, key)
                assert state is not None
                assert state["cursor"] == 20
                assert all(int(o) < 20 for o in state["pending"]), state
        assert first == [(i, 1) for i in range(20)]
        # The owner stops gracefully: it saves the group, then hands the topic over.
        await stop_gracefully(owner)
        state = await saved_state(store_of(survivor).etcd, key)
        assert state is not None
        assert state["cursor"] == 20 and sorted(int(o) for o in state["pending"]) == list(range(10, 20)), state
        assert all(d == 0 and n == 1 for d, n in state["pending"].values()), state  # member gone: due now

        second: list[tuple[int, int]] = []
        async with pybroker.connect(f"pybroker://{addr_of(survivor)}", name="second", reconnect=True) as client:
            async with client.subscribe("jobs", group="g", start="earliest", auto_ack=False, max_ack_pending=100) as sub:
                with trio.fail_after(WAIT):
                    async for message in sub:
                        second.append((message.offset, message.deliveries))
                        await message.ack()
                        if len(second) == 10:
                            break
                # New messages go on where the cursor was; the ones acked on
                # the first owner never come again (redeliveries go first).
                await publish_to_owner([survivor], "jobs", [f"m{i}".encode() for i in range(20, 25)], "publisher")
                with trio.fail_after(WAIT):
                    async for message in sub:
                        second.append((message.offset, message.deliveries))
                        await message.ack()
                        if len(second) == 15:
                            break
                await client.ping()
        assert sorted(second[:10]) == [(i, 2) for i in range(10, 20)]
        assert second[10:] == [(i, 1) for i in range(20, 25)]
        state = await wait_saved(store_of(survivor).etcd, key, lambda s: not s["pending"])
        assert state["cursor"] == 25


async def test_a_hand_over_to_a_joining_node_saves_the_acks_first(urls: dict[str, str], tmp_path: Path) -> None:
    """Node a owns the topic; its member acks half of 20 messages, and a
    saves acks alone only every 60 s here. Node b joins, ranked first for
    the topic: a hands it over, and saves the group before its owner key
    goes (its save would be refused after), so b has the acks: only the
    unacked half is pending. Before, those acks were lost to the hand-over
    and all 20 came again."""
    topic = next(t for t in (f"handed-{i}" for i in range(100)) if first({"a", "b"}, t, 0) == "b")
    async with cluster_node(urls, "a", tmp_path) as a:
        shared_of(a).interval = 60.0  # acks alone: not saved by the timer within this test
        await publish_to_owner([a], topic, [f"m{i}".encode() for i in range(20)], "publisher")
        key = group_key(urls, "g", topic)
        async with pybroker.connect(f"pybroker://{addr_of(a)}", name="member") as client:
            async with client.subscribe(topic, group="g", start="earliest", auto_ack=False, max_ack_pending=100) as sub:
                got = 0
                with trio.fail_after(WAIT):
                    async for message in sub:
                        got += 1
                        if message.offset < 10:
                            await message.ack()
                        if got == 20:
                            break
                await client.ping()  # the acks have reached the owner
                saved = await saved_state(store_of(a).etcd, key)
                assert saved is not None and len(saved["pending"]) == 20, saved  # the acks are not saved yet
                async with cluster_node(urls, "b", tmp_path) as b:

                    def taken() -> bool:
                        manager = store_of(b).manager
                        return manager is not None and manager.local(topic, 0) is not None

                    with trio.fail_after(WAIT):
                        while not taken():  # (b's take-over is in etcd and in b, not an event here)
                            await trio.sleep(0.05)
                    state = await saved_state(store_of(b).etcd, key)
        assert state is not None
        assert sorted(int(o) for o in state["pending"]) == list(range(10, 20)), state


async def test_kill_9_of_the_owner_redelivers_what_was_not_acked_and_nothing_acked(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """Two ``pybroker serve --cluster`` processes; a member (connected to the
    node that does not own the topic, and sent to the owner) acks half of
    what it got; the owner is SIGKILLed; once the other node has taken the
    topic over (its lease ran out: 3 s here) the same client, moved back,
    gets the unacked half again and the acked half never."""
    settings = parse_cluster_urls(urls["cluster"], urls["object_store"])
    key = settings.keys.group("g", "kill9", 0)
    async with two_processes(urls, tmp_path) as (procs, etcd):
        addrs = list(procs)
        await publish_to_owner(addrs, "kill9", [f"m{i}".encode() for i in range(30)], "p")
        owner = await settled_group_owner(etcd, settings.keys, addrs, "kill9")
        survivor = addrs[1] if owner == addrs[0] else addrs[0]
        received: list[tuple[int, int]] = []
        async with pybroker.connect(f"pybroker://{survivor}", name="member", reconnect=True) as client:
            async with client.subscribe(
                "kill9", group="g", start="earliest", auto_ack=False, max_ack_pending=100, ack_wait=2.0
            ) as sub:
                assert client.reconnects == 1  # sent to the owner
                with trio.fail_after(WAIT):
                    async for message in sub:
                        if not received:
                            # Counted before sent: the first delivery's count is in etcd.
                            state = await saved_state(etcd, key)
                            assert state is not None and state["pending"]["0"][1] == 1, state
                        received.append((message.offset, message.deliveries))
                        if message.offset < 15:
                            await message.ack()
                        if len(received) == 30:
                            break
                await client.ping()
                # The acks are saved (the next transaction after them).
                await wait_saved(etcd, key, lambda s: sorted(map(int, s["pending"])) == list(range(15, 30)))
                await procs[owner].kill()
                with trio.fail_after(WAIT):
                    async for message in sub:
                        received.append((message.offset, message.deliveries))
                        await message.ack()
                        if len(received) == 45:
                            break
                # The client is on the new owner now: new messages come after.
                await publish_to_owner([survivor], "kill9", [b"m30", b"m31"], "p")
                with trio.fail_after(WAIT):
                    async for message in sub:
                        received.append((message.offset, message.deliveries))
                        await message.ack()
                        if len(received) == 47:
                            break
                await client.ping()
        assert received[:30] == [(i, 1) for i in range(30)]
        assert sorted(received[30:45]) == [(i, 2) for i in range(15, 30)]
        assert received[45:] == [(30, 1), (31, 1)]
        state = await wait_saved(etcd, key, lambda s: not s["pending"])
        assert state["cursor"] == 32


async def test_a_refused_state_transaction_sends_nothing_and_ends_the_membership(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """The group key changed behind the owner's back (the stand-in for a
    fenced owner: its transaction compares the key's mod revision as well
    as its epoch): the delivery waiting for that transaction is never
    sent, the member is told NOT_OWNER on its sub_id, and a new
    subscription resumes from what etcd holds."""
    async with cluster_node(urls, "a", tmp_path) as a:
        await publish_to_owner([a], "fenced", [b"zero"], "p")
        key = group_key(urls, "g", "fenced")
        etcd = store_of(a).etcd
        shared = shared_of(a)
        async with raw_client(a) as raw:
            await hello(raw, "member")
            await raw.send_event(
                Subscribe(1, "fenced", StartKind.EARLIEST, 0, options={"group": "g", "max_ack_pending": "10"})
            )
            assert await raw.next_event() == SubAck(1)
            first = await raw.next_event()
            assert isinstance(first, GroupDeliver) and (first.base_offset, first.deliveries) == (0, 1), first
            saved = await etcd.get(key)
            assert saved is not None
            await etcd.put(key, saved.value)  # the same state, written by someone else
            refused_before = shared.refused
            await publish_to_owner([a], "fenced", [b"one"], "p")
            told = await raw.next_event()
            assert isinstance(told, Error) and told.code == ErrorCode.NOT_OWNER, told
            assert (told.ref_kind, told.ref) == (RefKind.SUBSCRIPTION, 1), told
            assert told.fields == {"topic": "fenced"}  # this node owns the topic: no other owner to name
            assert shared.refused == refused_before + 1
            assert "g" not in a.broker.groups.groups
            # Subscribing again loads the state etcd has: offset 0 pending
            # (its ack wait not over), offset 1 never sent, so sent now, first time.
            await raw.send_event(
                Subscribe(2, "fenced", StartKind.EARLIEST, 0, options={"group": "g", "max_ack_pending": "10"})
            )
            assert await raw.next_event() == SubAck(2)
            again = await raw.next_event()
            assert isinstance(again, GroupDeliver), again
            assert (again.sub_id, again.base_offset, again.deliveries) == (2, 1, 1), again
            assert [p for p, _ in decode_batch(again.batch)] == [b"one"]
        state = await saved_state(etcd, key)
        assert state is not None and state["cursor"] == 2


async def test_members_are_told_when_their_node_loses_the_topic(urls: dict[str, str], tmp_path: Path) -> None:
    """The owner's lease is revoked behind its back (etcd deletes its keys;
    its commits would be refused): it evicts the group and tells the member
    NOT_OWNER on its sub_id; subscribed again at whichever node owns the
    topic now, the member gets what it had not acked, and nothing it had."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "moving", [f"m{i}".encode() for i in range(10)], "p")
        owner = await settled_owner(nodes, "moving")
        other = b if owner is a else a
        key = group_key(urls, "g", "moving")
        options = {"group": "g", "max_ack_pending": "100", "ack_wait_ms": "2000"}
        async with raw_client(owner) as raw:
            await hello(raw, "member")
            await raw.send_event(Subscribe(1, "moving", StartKind.EARLIEST, 0, options=options))
            assert await raw.next_event() == SubAck(1)
            first: list[int] = []
            with trio.fail_after(WAIT):
                while len(first) < 10:
                    event = await raw.next_event()
                    assert isinstance(event, GroupDeliver) and event.deliveries == 1, event
                    first += range(event.base_offset, event.base_offset + len(decode_batch(event.batch)))
            assert first == list(range(10))
            await raw.send_event(Ack(1, AckKind.ACK, "moving", ((0, 4),)))
            await wait_saved(store_of(other).etcd, key, lambda s: sorted(map(int, s["pending"])) == list(range(5, 10)))
            manager = store_of(owner).manager
            assert manager is not None
            await store_of(other).etcd.revoke(manager.keeper.lease)
            with trio.fail_after(WAIT):
                while True:
                    event = await raw.next_event()
                    if isinstance(event, Error):
                        break
                    # (Its ack wait may run out first: redelivered there, still unacked.)
                    assert isinstance(event, GroupDeliver) and 5 <= event.base_offset < 10, event
        assert event.code == ErrorCode.NOT_OWNER and (event.ref_kind, event.ref) == (RefKind.SUBSCRIPTION, 1), event
        assert event.fields.get("topic") == "moving", event

        # Subscribed again, following NOT_OWNER to the owner (or waiting for
        # one). The topic may move twice: the node that lost its lease joins
        # again, under a new one, and takes back what it ranks first for.
        again: list[tuple[int, int]] = []
        target = addr_of(other)
        moves = 0
        with trio.fail_after(WAIT):
            while {o for o, _ in again} != set(range(5, 10)):
                async with raw_client(f"pybroker://{target}") as raw:
                    await hello(raw, "member again")
                    await raw.send_event(Subscribe(1, "moving", StartKind.EARLIEST, 0, options=options))
                    answer = await raw.next_event()
                    while answer == SubAck(1) or isinstance(answer, GroupDeliver):
                        if isinstance(answer, GroupDeliver):
                            again += [(answer.base_offset, answer.deliveries)]
                            if {o for o, _ in again} == set(range(5, 10)):
                                break
                        answer = await raw.next_event()
                    else:
                        assert isinstance(answer, Error) and answer.code == ErrorCode.NOT_OWNER, answer
                        moves += 1
                        target = answer.fields.get("owner", target)
                        await trio.sleep(0.05)  # no owner yet: again shortly
        assert all(5 <= o < 10 and n >= 2 for o, n in again), again
        print(f"the member moved {moves} times before it was back at the owner")


async def test_a_delivery_waits_for_the_transaction_that_counts_it(urls: dict[str, str], tmp_path: Path) -> None:
    """Counted before sent, with the state transaction held up and then
    failing (a fault injected before it is sent): the delivery is not sent
    meanwhile (a PING sent after it was handed out is answered first), and
    goes out once a later transaction has saved its count."""
    async with cluster_node(urls, "a", tmp_path) as a:
        await publish_to_owner([a], "counted", [b"created"], "p")
        key = group_key(urls, "g", "counted")
        shared = shared_of(a)
        async with raw_client(a) as raw:
            await hello(raw, "member")
            await raw.send_event(Subscribe(1, "counted", StartKind.NEW, 0, options={"group": "g"}))
            assert await raw.next_event() == SubAck(1)
            await wait_saved(store_of(a).etcd, key, lambda s: s["cursor"] == 1)  # loaded, and saved once
            writing = trio.Event()
            release = trio.Event()
            failures = 0

            async def held_then_failed(topic: str) -> None:
                nonlocal failures
                writing.set()
                await release.wait()
                failures += 1
                shared.before_write = None
                raise OSError("injected: etcd cannot be reached")

            shared.before_write = held_then_failed
            await publish_to_owner([a], "counted", [b"one"], "p")
            with trio.fail_after(WAIT):
                await writing.wait()  # the hand-out is held, its transaction about to go
            await raw.send_event(Ping(1))
            assert await raw.next_event() == Pong(1)  # before any GROUP_DELIVER: none was sent
            state = await saved_state(store_of(a).etcd, key)
            assert state is not None and state["cursor"] == 1 and not state["pending"], state
            release.set()
            delivered = await raw.next_event()
            assert isinstance(delivered, GroupDeliver), delivered
            assert (delivered.base_offset, delivered.deliveries) == (1, 1), delivered
            assert failures == 1
            state = await saved_state(store_of(a).etcd, key)
            assert state is not None and state["cursor"] == 2 and state["pending"]["1"][1] == 1, state


async def test_a_dead_letter_to_a_topic_another_node_owns_is_handed_to_it(urls: dict[str, str], tmp_path: Path) -> None:
    """The dead-letter topic is owned by the other node: the group's owner
    hands the dead letter over through etcd, the other node stores it, the
    group settles it, and a hand-off taken twice is stored once."""
    jobs_node = first(["a", "b"], "jobs", 0)
    dead = next(f"dead.{i}" for i in range(64) if first(["a", "b"], f"dead.{i}", 0) != jobs_node)
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        await publish_to_owner(nodes, "jobs", [b"poison"], "creator")
        await publish_to_owner(nodes, dead, [b"earlier"], "creator")
        owner, dead_owner = await settled_owner(nodes, "jobs"), await settled_owner(nodes, dead)
        assert owner is not dead_owner
        letters: list[pybroker.Message] = []
        async with pybroker.connect(f"pybroker://{addr_of(owner)}", name="member", reconnect=True) as client:
            async with client.subscribe(dead, start="earliest") as dead_letters:
                async with client.subscribe(
                    "jobs", group="workers", start="earliest", auto_ack=False, max_deliver=2, dead_letter=dead
                ) as sub:
                    deliveries = []
                    with trio.fail_after(WAIT):
                        async for message in sub:
                            deliveries.append(message.deliveries)
                            await message.nak(0)
                            if len(deliveries) == 2:
                                break
                    # (Still a member: a group dead-letters at a message's next turn.)
                    with trio.fail_after(WAIT):
                        async for message in dead_letters:
                            letters.append(message)
                            if len(letters) == 2:
                                break
        assert deliveries == [1, 2]
        assert [m.payload for m in letters] == [b"earlier", b"poison"]
        letter = letters[1]
        assert letter.offset == 1
        assert {k: letter.headers[k] for k in ("x-original-topic", "x-original-offset", "x-group", "x-deliveries")} == {
            "x-original-topic": "jobs", "x-original-offset": "0", "x-group": "workers", "x-deliveries": "2",
        }  # fmt: skip
        # Named (the client hands msg-ids to nobody): as stored, by the group.
        (stored,) = store_of(dead_owner).topic(dead).read(1, 1 << 20)
        msg_id = first_msg_id(stored.batch)
        assert msg_id is not None and msg_id.startswith("dead-letter-"), msg_id
        # The group settled it once handed off: nothing pending is saved.
        await wait_saved(store_of(owner).etcd, group_key(urls, "workers", "jobs"), lambda s: not s["pending"])
        sender, taker = store_of(owner).hand_offs, store_of(dead_owner).hand_offs
        assert (sender.sent, taker.taken) == (1, 1)
        key = sender.key(dead, msg_id)

        async def taken(times: int) -> None:
            with trio.fail_after(WAIT):
                while taker.taken < times or await store_of(owner).etcd.get(key) is not None:
                    await trio.sleep(0.02)  # (bounded) taken on the owner's next look

        await taken(1)
        # The same hand-off again (a group's retry after a crash): stored once.
        await store_of(owner).etcd.put(key, b"i" + stored.batch)
        await taken(2)
        assert store_of(dead_owner).topic(dead).next_offset == 2
        assert dead_owner.broker.dedup.duplicates >= 1


async def test_groups_delete_at_the_owner_deletes_the_saved_state(urls: dict[str, str], tmp_path: Path) -> None:
    async with cluster_node(urls, "a", tmp_path) as a:
        await publish_to_owner([a], "deleted", [b"zero", b"one"], "p")
        key = group_key(urls, "g", "deleted")
        etcd = store_of(a).etcd
        async with pybroker.connect(f"pybroker://127.0.0.1:{a.port}", name="member") as client:
            async with client.subscribe("deleted", group="g", start="earliest", auto_ack=False) as sub:
                with trio.fail_after(WAIT):
                    async for message in sub:
                        await message.ack()
                        if message.offset == 1:
                            break
                await client.ping()
            await wait_saved(etcd, key, lambda s: s["cursor"] == 2 and not s["pending"])
            answer = await client.groups("delete", "g")
            assert answer.get("deleted") == "g", answer
        with trio.fail_after(WAIT):
            while await etcd.get(key) is not None:
                await trio.sleep(0.02)  # the fenced delete is the group state's next transaction
        # Made again, the group starts as its SUBSCRIBE says: from the start.
        async with pybroker.connect(f"pybroker://127.0.0.1:{a.port}", name="member") as client:
            async with client.subscribe("deleted", group="g", start="earliest", auto_ack=False) as sub:
                with trio.fail_after(WAIT):
                    async for message in sub:
                        break
        assert (message.offset, message.deliveries) == (0, 1)


async def test_a_group_over_several_topics_runs_at_its_coordinator_and_resumes_at_the_next(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """A group whose pattern has wildcards reads topics that different
    nodes own: the node the ranking puts first for its name coordinates it
    (it holds ``grpown/{group}``) and dispatches every matching topic from
    its own copies, a topic made after the group included; each topic's
    state is its own key, saved in transactions fenced on the coordinator's
    epoch. After a graceful stop of the coordinator the other node
    coordinates the group and resumes every topic: nothing acked comes
    again, and what was published since arrives once."""
    async with cluster_node(urls, "a", tmp_path) as a, cluster_node(urls, "b", tmp_path) as b:
        nodes = [a, b]
        first_topics = ["orders.eu", "orders.us", "orders.uk", "orders.jp"]
        for topic in first_topics:
            await publish_to_owner(nodes, topic, [b"m0", b"m1"], "p")
        owners = {addr_of(await settled_owner(nodes, topic)) for topic in first_topics}
        assert owners == {addr_of(a), addr_of(b)}, owners  # the group reads topics both nodes own
        both = f"pybroker://{addr_of(a)},{addr_of(b)}"
        got: list[tuple[str, bytes]] = []
        async with pybroker.connect(both, name="member", reconnect=True) as member:
            async with member.subscribe("orders.*", group="all", start="earliest", auto_ack=False) as sub:
                with trio.fail_after(WAIT):
                    async for message in sub:
                        got.append((message.topic, message.payload))
                        await message.ack()
                        if len(got) == 8:
                            break
                    # A topic made after the group is read too.
                    await publish_to_owner(nodes, "orders.asia", [b"a0"], "p")
                    async for message in sub:
                        got.append((message.topic, message.payload))
                        await message.ack()
                        break
                await member.ping()
        assert sorted(got) == sorted([(t, p) for t in first_topics for p in (b"m0", b"m1")] + [("orders.asia", b"a0")])
        settings = parse_cluster_urls(urls["cluster"], urls["object_store"])
        async with Etcd(settings.etcd) as etcd:
            held = await etcd.get(settings.keys.coordinator("all"))
            assert held is not None
            coordinator = a if json.loads(held.value)["addr"] == addr_of(a) else b
            survivor = b if coordinator is a else a
            cursors = {**{t: 2 for t in first_topics}, "orders.asia": 1}
            for topic, cursor in cursors.items():
                await wait_saved(
                    etcd, settings.keys.group("all", topic, 0), lambda s, c=cursor: s["cursor"] == c and not s["pending"]
                )
            await stop_gracefully(coordinator)  # it saves the group and gives its key up
            assert await etcd.get(settings.keys.coordinator("all")) is None
        for topic in cursors:
            await publish_to_owner([survivor], topic, [b"later"], "p")
        again: list[tuple[str, bytes, int]] = []
        async with pybroker.connect(survivor.url, name="member", reconnect=True) as member:
            async with member.subscribe("orders.*", group="all", auto_ack=False) as sub:
                with trio.fail_after(WAIT):
                    async for message in sub:
                        again.append((message.topic, message.payload, message.deliveries))
                        await message.ack()
                        if len(again) == len(cursors):
                            break
        assert sorted(again) == sorted((t, b"later", 1) for t in cursors)


async def test_kill_9_of_a_coordinator_hands_the_group_over_when_its_lease_ends(
    urls: dict[str, str], tmp_path: Path
) -> None:
    """Two ``pybroker serve --cluster`` processes; a group over ``jobs.*``
    (two topics) acks half of what it got at its coordinator, which is then
    SIGKILLed: once its lease has run out (3 s) its key is gone, the other
    node coordinates the group, and the same client, moved there, gets the
    unacked half again and the acked half never."""
    settings = parse_cluster_urls(urls["cluster"], urls["object_store"])
    async with two_processes(urls, tmp_path) as (procs, etcd):
        addrs = list(procs)
        for topic in ("jobs.a", "jobs.b"):
            await publish_to_owner(addrs, topic, [f"{topic}-{i}".encode() for i in range(10)], "p")
        received: list[tuple[str, int, int]] = []
        async with pybroker.connect(f"pybroker://{addrs[0]},{addrs[1]}", name="member", reconnect=True) as client:
            async with client.subscribe(
                "jobs.*", group="g", start="earliest", auto_ack=False, max_ack_pending=100, ack_wait=2.0
            ) as sub:
                with trio.fail_after(WAIT):
                    async for message in sub:
                        received.append((message.topic, message.offset, message.deliveries))
                        if message.offset < 5:
                            await message.ack()
                        if len(received) == 20:
                            break
                await client.ping()
                held = await etcd.get(settings.keys.coordinator("g"))
                assert held is not None
                coordinator = json.loads(held.value)["addr"]
                for topic in ("jobs.a", "jobs.b"):
                    await wait_saved(
                        etcd, settings.keys.group("g", topic, 0), lambda s: sorted(map(int, s["pending"])) == list(range(5, 10))
                    )
                await procs[coordinator].kill()
                with trio.fail_after(WAIT):
                    async for message in sub:
                        received.append((message.topic, message.offset, message.deliveries))
                        await message.ack()
                        if len(received) == 30:
                            break
                await client.ping()
        assert sorted(received[:20]) == sorted((t, i, 1) for t in ("jobs.a", "jobs.b") for i in range(10))
        assert sorted(received[20:]) == sorted((t, i, 2) for t in ("jobs.a", "jobs.b") for i in range(5, 10))
        held = await etcd.get(settings.keys.coordinator("g"))
        assert held is not None and json.loads(held.value)["addr"] != coordinator
