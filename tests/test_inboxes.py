"""Request/reply inboxes are private and ephemeral (issue 12; protocol.md,
"Request and reply").

Three users on a real broker with a users file and file storage
(``running_broker(auth_file=..., data_dir=...)``): ``service`` answers
requests, ``caller`` makes them, ``eve`` may read only ``public.>``; and
``ops``, an admin who may subscribe to everything. Each rule over TCP, the
CLI (a real ``pybroker`` subprocess) and HTTP; then without authentication;
then an inbox's life (its grace period, the bounds) and a reconnecting
client taking its inbox back, or getting a new one when it cannot. Every
wait is bounded.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
import trio
import trio.testing
from anyio.abc import ByteStream

import pybroker as client
import pybroker.connection as client_connection
from pybroker.server.inboxes import RETAIN_BYTES, Inboxes
from pybroker.server.storage import FileStore, MemoryTopicLog
from pybroker.server.router import Topic
from pybroker.server.server import Server
from pybroker.protocol import Durability, ErrorCode, encode_batch

from helpers.anybroker import serving
from helpers.auth import user_entry, write_users
from helpers.http import basic, http_request
from helpers.inproc import session_named, wait_until
from helpers.procs import run
from helpers.restarts import FAST

TIMEOUT = 20.0
SERVICE = "service-token-0123456789"
CALLER_PASSWORD = "caller pass word"
EVE = "eve-token-0123456789abcdef"
OPS = "ops-token-0123456789abcdef"
SECRET = b"the secret answer"


def users(tmp_path: Path) -> Path:
    return write_users(
        tmp_path,
        {
            "service": user_entry(token=SERVICE, subscribe=["svc.>"]),
            "caller": user_entry(password=CALLER_PASSWORD, publish=["svc.>"], subscribe=["public.>"]),
            "eve": user_entry(token=EVE, publish=["public.>"], subscribe=["public.>"]),
            "ops": user_entry(token=OPS, publish=[">"], subscribe=[">"], admin=True),
        },
    )


def inbox_dirs(data_dir: Path) -> list[str]:
    """Topic directories of inboxes in the data directory (there must be none)."""
    topics = data_dir / "topics"
    return sorted(d.name for d in topics.iterdir() if d.name.startswith("_inbox.")) if topics.exists() else []


class Service:
    """Answers every ``svc.>`` request with SECRET and remembers where the
    replies went (the ``reply-to`` header every subscriber of the request
    topic sees: how an inbox's name gets around)."""

    def __init__(self, c: client.Client) -> None:
        self.c = c
        self.reply_to: list[str] = []

    async def __call__(self, msg: client.Message) -> None:
        self.reply_to.append(msg.headers["reply-to"])
        await self.c.respond(msg, SECRET)


@asynccontextmanager
async def three_users(tmp_path: Path, **config: Any) -> AsyncIterator[tuple[Server, Service, client.Client, client.Client, client.Client]]:
    """A broker with the users file, the service answering ``svc.echo``, and
    connections of caller, eve and ops."""
    async with serving(data_dir=tmp_path / "data", auth_file=users(tmp_path), **config) as server:
        async with (
            client.connect(server.url, name="service", token=SERVICE) as svc,
            client.connect(server.url, name="caller", user="caller", password=CALLER_PASSWORD) as caller,
            client.connect(server.url, name="eve", token=EVE) as eve,
            client.connect(server.url, name="ops", token=OPS) as ops,
        ):
            service = Service(svc)
            await svc.subscribe("svc.echo", service)
            yield server, service, caller, eve, ops


#: The client-facing tests run under Trio and asyncio; those that drive the
#: broker's clock, its sessions' streams, a Trio proxy, `pybroker` subprocesses
#: or the HTTP helpers stay with pytest-trio.
both = pytest.mark.anyio


# -- TCP -------------------------------------------------------------------------


@both
async def test_no_other_connection_reads_a_reply_over_tcp(tmp_path: Path) -> None:
    """The issue's scenario: eve (allowed only ``public.>``) neither lists the
    caller's inbox nor subscribes to it, from earliest or live; nor does an
    admin, nor the caller's own user on another connection."""
    async with three_users(tmp_path) as (server, service, caller, eve, ops):
        with anyio.fail_after(TIMEOUT):
            assert (await caller.request("svc.echo", b"?")).payload == SECRET
            (inbox,) = set(service.reply_to)
            assert inbox.startswith("_inbox.")
            for who in (eve, ops):
                assert [t.topic for t in await who.topics()] == [t for t in ["svc.echo"] if who is ops]
                assert await who.topics("_inbox.>") == []
                for start in ("earliest", "new"):
                    with pytest.raises(client.PermissionDenied, match="another connection's inbox"):
                        await who.subscribe(inbox, start=start)
            async with client.connect(server.url, user="caller", password=CALLER_PASSWORD) as again:
                with pytest.raises(client.PermissionDenied, match="another connection's inbox"):
                    await again.subscribe(inbox, start="earliest")
            # Still the caller's: the next reply reaches it.
            assert (await caller.request("svc.echo", b"again")).payload == SECRET
            # Nothing of it in the store or among the topics; one inbox in memory.
            assert inbox_dirs(tmp_path / "data") == []
            assert not [t for t in server.broker.router.topics if t.startswith("_inbox")]
            assert len(server.broker.router.inboxes) == 1


@both
async def test_wildcards_never_deliver_an_inbox(tmp_path: Path) -> None:
    """ops may subscribe to ``>``: it gets the requests, never the replies; a
    pattern over inboxes alone is refused, even for an admin."""
    async with three_users(tmp_path) as (server, service, caller, eve, ops):
        with anyio.fail_after(TIMEOUT):
            seen: list[str] = []
            marker = anyio.Event()

            def everything(msg: client.Message) -> None:
                seen.append(msg.topic)
                if msg.topic == "zz.marker":
                    marker.set()

            await ops.subscribe(">", everything)
            for pattern in ("_inbox.*", "_inbox.>", "_inbox.*.x"):
                with pytest.raises(client.PermissionDenied, match="inboxes are private"):
                    await ops.subscribe(pattern)
            assert (await caller.request("svc.echo", b"?")).payload == SECRET
            # The reply was routed before the marker was published: had it
            # reached ops's ">" it would have arrived first.
            await ops.publish("zz.marker", b"")
            await marker.wait()
            assert seen == ["svc.echo", "zz.marker"]


@both
async def test_inbox_replies_are_not_stored(tmp_path: Path) -> None:
    """A reply is acknowledged as held in memory; one to an inbox nobody
    holds is dropped (and a request to it has no receivers)."""
    async with three_users(tmp_path) as (server, service, caller, eve, ops):
        with anyio.fail_after(TIMEOUT):
            ack = await eve.publish("_inbox.nobody", b"into the void")
            assert (ack.offset, ack.durability) == (0, Durability.MEMORY)
            assert "_inbox.nobody" not in server.broker.router.inboxes
            with pytest.raises(client.NoReceivers):
                await eve.request("_inbox.nobody", b"?")
            assert await ops.topics() == [] and inbox_dirs(tmp_path / "data") == []


@both
async def test_an_inbox_is_a_plain_subscription_of_its_owner(tmp_path: Path) -> None:
    async with three_users(tmp_path) as (server, service, caller, eve, ops):
        with anyio.fail_after(TIMEOUT):
            with pytest.raises(client.BrokerError, match="plain subscriptions only") as info:
                await eve.subscribe("_inbox.mine", group="workers")
            assert info.value.code == ErrorCode.BAD_REQUEST
            # The owner may subscribe to its inbox twice; the last
            # unsubscribe ends the inbox, and then anyone may take the name.
            one = await eve.subscribe("_inbox.mine")
            two = await eve.subscribe("_inbox.mine")
            await one.unsubscribe()
            with pytest.raises(client.PermissionDenied):
                await ops.subscribe("_inbox.mine")
            await two.unsubscribe()
            assert "_inbox.mine" not in server.broker.router.inboxes
            async with ops.subscribe("_inbox.mine", start="earliest") as sub:
                await caller.publish("_inbox.mine", b"for ops")
                assert (await anext(sub)).payload == b"for ops"


# -- CLI ----------------------------------------------------------------------------


async def test_the_cli_cannot_read_or_list_another_inbox(tmp_path: Path) -> None:
    async with three_users(tmp_path) as (server, service, caller, eve, ops):
        with anyio.fail_after(TIMEOUT):
            assert (await caller.request("svc.echo", b"?")).payload == SECRET
        (inbox,) = set(service.reply_to)
        for token in (EVE, OPS):
            got = await run(["sub", inbox, "--from", "earliest", "--count", "1", "--url", server.url, "--token", token])
            assert got.returncode == 1, got
            assert "PERMISSION_DENIED (211)" in got.stderr.decode() and got.stdout == b"", got
            listed = await run(["topics", "--url", server.url, "--token", token])
            assert listed.returncode == 0 and "_inbox" not in listed.stdout.decode(), listed
        # As the caller's user, too: the inbox is its first connection's.
        got = await run(
            ["sub", inbox, "--from", "earliest", "--count", "1", "--url", server.url, "--user", "caller"],
            env={"PYBROKER_PASSWORD": CALLER_PASSWORD},
        )
        assert got.returncode == 1 and "another connection's inbox" in got.stderr.decode(), got


# -- HTTP -------------------------------------------------------------------------


async def test_http_never_shows_an_inbox(tmp_path: Path) -> None:
    async with three_users(tmp_path) as (server, service, caller, eve, ops):
        with anyio.fail_after(TIMEOUT):
            assert (await caller.request("svc.echo", b"?")).payload == SECRET
        (inbox,) = set(service.reply_to)
        port = server.http_port
        assert port is not None
        people = {"eve": f"Bearer {EVE}", "ops": f"Bearer {OPS}", "caller": basic("caller", CALLER_PASSWORD)}
        for who, auth in people.items():
            status, _, body = await http_request(port, "GET", "/v1/topics", auth=auth)
            assert status == 200 and not [t for t in body["topics"] if t["name"].startswith("_inbox")], (who, body)
            for path in (f"/v1/topics/{inbox}/messages?from=0", f"/v1/topics/{inbox}", f"/v1/topics/{inbox}/events"):
                status, _, body = await http_request(port, "GET", path, auth=auth)
                assert (status, body["code"]) == (404, "topic_not_found"), (who, path, body)
        # The broker-wide figures count inboxes and name none.
        status, _, metrics = await http_request(port, "GET", "/metrics", auth=people["ops"])
        text = metrics.decode()
        assert status == 200 and 'topic="_inbox' not in text and inbox not in text
        assert 'pybroker_inboxes{state="owned"} 1' in text and "pybroker_topics 1" in text
        status, _, broker_info = await http_request(port, "GET", "/v1/broker", auth=people["ops"])
        assert (broker_info["topics"], broker_info["inboxes"]) == (1, 1)
        # Answering over HTTP stays open to anyone allowed to publish.
        got: list[bytes] = []
        arrived = anyio.Event()
        await caller.subscribe("_inbox.caller-http", lambda m: (got.append(m.payload), arrived.set()))
        status, _, body = await http_request(
            port, "POST", "/v1/topics/_inbox.caller-http/messages", auth=people["eve"], body={"payload": "via http"}
        )
        assert status == 200 and body["durability"] == "memory", body
        with anyio.fail_after(TIMEOUT):
            await arrived.wait()
        assert got == [b"via http"]


# -- without authentication ---------------------------------------------------------------


async def test_without_auth_an_inbox_is_its_connections(tmp_path: Path) -> None:
    async with serving(data_dir=tmp_path / "data") as server:
        async with (
            client.connect(server.url, name="service") as svc,
            client.connect(server.url, name="caller") as caller,
            client.connect(server.url, name="other") as other,
        ):
            service = Service(svc)
            await svc.subscribe("svc.echo", service)
            with anyio.fail_after(TIMEOUT):
                assert (await caller.request("svc.echo", b"?")).payload == SECRET
                (inbox,) = set(service.reply_to)
                assert [t.topic for t in await other.topics()] == ["svc.echo"]
                with pytest.raises(client.PermissionDenied, match="this connection may not subscribe"):
                    await other.subscribe(inbox, start="earliest")
                with pytest.raises(client.PermissionDenied):
                    await other.subscribe("_inbox.>")
            assert server.http_port is not None
            status, _, body = await http_request(server.http_port, "GET", f"/v1/topics/{inbox}/messages")
            assert status == 404, body
            assert inbox_dirs(tmp_path / "data") == []


# -- an inbox's life -------------------------------------------------------------------


@both
async def test_an_inbox_goes_with_its_connection_without_grace(tmp_path: Path) -> None:
    async with three_users(tmp_path, inbox_grace=0) as (server, service, caller, eve, ops):
        async with client.connect(server.url, user="caller", password=CALLER_PASSWORD) as brief:
            with anyio.fail_after(TIMEOUT):
                assert (await brief.request("svc.echo", b"?")).payload == SECRET
            assert len(server.broker.router.inboxes) == 1
        # The broker dropped the connection's subscriptions before its
        # GOODBYE, which the graceful close waited for.
        assert len(server.broker.router.inboxes) == 0 and server.broker.router.inboxes.in_grace == 0


@both
async def test_the_same_user_reclaims_an_inbox_within_the_grace_period(tmp_path: Path) -> None:
    """Replies sent while the owner was away are kept (in memory) and handed
    over when its user takes the inbox back; nobody else may."""
    async with three_users(tmp_path, inbox_grace=3600) as (server, service, caller, eve, ops):
        with anyio.fail_after(TIMEOUT):
            async with client.connect(server.url, user="caller", password=CALLER_PASSWORD) as first:
                await first.subscribe("_inbox.kept")
            assert server.broker.router.inboxes.in_grace == 1
            await eve.publish("_inbox.kept", b"while away")
            for other in (eve, ops):
                with pytest.raises(client.PermissionDenied):
                    await other.subscribe("_inbox.kept", start="earliest")
            async with client.connect(server.url, user="caller", password=CALLER_PASSWORD) as second:
                async with second.subscribe("_inbox.kept", start="earliest") as sub:
                    assert server.broker.router.inboxes.in_grace == 0
                    assert (await anext(sub)).payload == b"while away"
            assert inbox_dirs(tmp_path / "data") == []


@both
async def test_inboxes_an_older_version_stored_are_ignored(tmp_path: Path) -> None:
    """Before inboxes were private they were topics in the store: they stay on
    disk untouched (the broker says so) and are never served."""
    store = FileStore(tmp_path / "data")
    store.topic("_inbox.old").append(encode_batch([b"an old reply"]), 1, 1)
    store.topic("kept").append(encode_batch([b"a message"]), 1, 1)
    store.close()
    with structlog.testing.capture_logs() as logs:
        async with serving(data_dir=tmp_path / "data") as server:
            async with client.connect(server.url) as c:
                with anyio.fail_after(TIMEOUT):
                    assert [t.topic for t in await c.topics()] == ["kept"]
                    async with c.subscribe("_inbox.old", start="earliest") as sub:
                        await c.publish("_inbox.old", b"new")
                        assert (await anext(sub)).payload == b"new"  # not the stored one
    (warning,) = [e for e in logs if e["event"].startswith("stored request/reply inboxes ignored")]
    assert warning["inboxes"] == 1 and warning["first"] == ["_inbox.old"]
    assert inbox_dirs(tmp_path / "data") == ["_inbox.old"]


class _Owner:
    """Stands in for a connection."""


def _topic(name: str) -> Topic:
    return Topic(name, MemoryTopicLog(name, RETAIN_BYTES))


async def test_the_grace_timer_removes_an_inbox_when_its_grace_ends(autojump_clock: trio.testing.MockClock) -> None:
    inboxes = Inboxes(_topic, grace=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(inboxes.run)
        owner = _Owner()
        inboxes.claim("_inbox.a", owner, "u")
        await trio.sleep(100)
        assert "_inbox.a" in inboxes  # owned: no timer runs
        inboxes.release(owner, trio.current_time())
        assert inboxes.next_expiry() == trio.current_time() + 30
        await trio.sleep(29.9)
        assert "_inbox.a" in inboxes and inboxes.may_claim("_inbox.a", _Owner(), "u")
        assert not inboxes.may_claim("_inbox.a", _Owner(), "someone else")
        await trio.sleep(0.2)
        assert "_inbox.a" not in inboxes and inboxes.next_expiry() == math.inf
        nursery.cancel_scope.cancel()


def test_inboxes_in_grace_and_their_replies_are_bounded() -> None:
    inboxes = Inboxes(_topic, grace=30.0, max_in_grace=3)
    for i in range(5):
        owner = _Owner()
        inboxes.claim(f"_inbox.{i}", owner, None)
        inboxes.release(owner, float(i))
    assert sorted(n for n in ("_inbox.0", "_inbox.1", "_inbox.2", "_inbox.3", "_inbox.4") if n in inboxes) == [
        "_inbox.2", "_inbox.3", "_inbox.4",
    ]  # fmt: skip
    topic = inboxes.topic("_inbox.4")
    batch = b"\0" * 10_000
    for _ in range(50):
        topic.log.append(batch, 1, 0)
    assert topic.log.size_bytes <= RETAIN_BYTES and topic.log.next_offset == 50


# -- reconnecting -------------------------------------------------------------------


async def test_a_reconnecting_client_takes_its_inbox_back_with_the_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks while a request is being served; the reply lands
    in the inbox during its grace period (the client's reconnect is held
    until then); the client reconnects, resumes its inbox subscription, and
    the request returns that reply."""
    async with serving(data_dir=tmp_path / "data", auth_file=users(tmp_path)) as server:
        async with (
            client.connect(server.url, name="service", token=SERVICE) as svc,
            client.connect(server.url, name="caller", user="caller", password=CALLER_PASSWORD, reconnect=FAST) as caller,
        ):
            asked = anyio.Event()
            answer = anyio.Event()
            may_reconnect = anyio.Event()

            async def slow(msg: client.Message) -> None:
                asked.set()
                await answer.wait()
                await svc.respond(msg, SECRET)

            real_open = client_connection.open_stream

            async def held_open(*args: Any, **kwargs: Any) -> ByteStream:
                await may_reconnect.wait()
                return await real_open(*args, **kwargs)

            monkeypatch.setattr(client_connection, "open_stream", held_open)
            await svc.subscribe("svc.slow", slow)
            replies: list[bytes] = []
            with anyio.fail_after(TIMEOUT):
                async with trio.open_nursery() as nursery:

                    async def ask() -> None:
                        replies.append((await caller.request("svc.slow", b"?", timeout=TIMEOUT)).payload)

                    nursery.start_soon(ask)
                    await asked.wait()
                    inbox = caller._inbox
                    assert inbox is not None
                    await session_named(server, "caller").stream.aclose()  # the network drops it
                    await wait_until(lambda: server.broker.router.inboxes.in_grace == 1, TIMEOUT)
                    answer.set()
                    kept = server.broker.router.inboxes.get(inbox)
                    assert kept is not None and kept.owner is None
                    await wait_until(lambda: kept.topic.log.next_offset == 1, TIMEOUT)  # the reply, held
                    assert not caller.connected
                    may_reconnect.set()
            assert replies == [SECRET]
            assert caller.reconnects == 1 and caller._inbox == inbox
            assert server.broker.router.inboxes.get(inbox) is kept and kept.owner is session_named(server, "caller").outbox


class FreezingProxy:
    """A TCP proxy whose ``freeze()`` stops every connection open at that
    moment, both ways, without closing it: a network partition. The broker
    keeps the frozen connection (until its idle timeout); connections made
    afterwards flow."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._generation = 0
        self._frozen_below = 0

    def freeze(self) -> None:
        self._generation += 1
        self._frozen_below = self._generation

    async def handle(self, downstream: trio.SocketStream) -> None:
        generation = self._generation
        async with await trio.open_tcp_stream("127.0.0.1", self.target_port) as upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, downstream, upstream, generation, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, downstream, generation, nursery.cancel_scope)

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, generation: int, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(65536):
                if generation < self._frozen_below:
                    await trio.sleep_forever()  # held, never delivered, never closed
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


async def test_a_client_whose_inbox_is_still_held_gets_a_new_one(tmp_path: Path) -> None:
    """The client gives a silent connection up (keepalive) while the broker
    still holds it, so its inbox is still that connection's: the resumed
    inbox subscription is refused. The request waiting there fails at once
    (not at its timeout), and the next request gets a new inbox."""
    async with serving(data_dir=tmp_path / "data", auth_file=users(tmp_path)) as server:
        proxy = FreezingProxy(server.port)
        async with trio.open_nursery() as proxies:
            listeners = await proxies.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
            url = f"pybroker://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            async with (
                client.connect(server.url, name="service", token=SERVICE) as svc,
                client.connect(
                    url, name="caller", user="caller", password=CALLER_PASSWORD, reconnect=FAST, keepalive=0.2
                ) as caller,
            ):
                asked = anyio.Event()

                async def serve(msg: client.Message) -> None:
                    if msg.payload == b"hold":
                        asked.set()
                        return  # answered never
                    await svc.respond(msg, SECRET)

                await svc.subscribe("svc.>", serve)
                with anyio.fail_after(TIMEOUT):
                    assert (await caller.request("svc.echo", b"?")).payload == SECRET
                    first_inbox = caller._inbox
                    async with trio.open_nursery() as nursery:

                        async def held() -> None:
                            with pytest.raises(client.ConnectionClosed, match="reply inbox was lost"):
                                await caller.request("svc.echo", b"hold", timeout=10 * TIMEOUT)

                        nursery.start_soon(held)
                        await asked.wait()
                        proxy.freeze()
                    assert caller.reconnects >= 1 and caller._inbox is None
                    assert len([s for s in server.sessions if s.client_name == "caller"]) == 2
                    assert server.broker.router.inboxes.get(first_inbox) is not None  # still the frozen one's
                    assert (await caller.request("svc.echo", b"after")).payload == SECRET
                    assert caller._inbox not in (None, first_inbox)
            proxies.cancel_scope.cancel()
