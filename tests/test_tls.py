"""TLS on the TCP and HTTP listeners, against a real broker on 127.0.0.1, port 0.

Certificates come from ``trustme``: a throwaway CA and a server certificate
for ``127.0.0.1`` and ``localhost``, written under ``tmp_path``. The broker
runs with ``tls_cert``/``tls_key``; clients verify it against that CA.
Every wait is bounded with ``trio.fail_after``; nothing asserts on elapsed
time. The CLI tests run ``pybroker`` as subprocesses (tests/helpers/procs.py); the
``certs`` fixture is in conftest.py.
"""

from __future__ import annotations

import json
from functools import partial
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import anyio
import trio

import pybroker as client
from pybroker.server.config import Config
from pybroker.server.server import Server
from pybroker.server.testing import running_broker
from pybroker.server import closing
from pybroker.server.tls import TLSConfigError, server_context, wrap_server_stream
from pybroker import ConnectionClosed
from pybroker.protocol import (
    MSG_ID_ROOM,
    NEED_DATA,
    Connection,
    Error,
    ErrorCode,
    Goodbye,
    Hello,
    Role,
    Welcome,
)
from pybroker.transport import client_context

from helpers.anybroker import serving
from helpers.brokerlog import broker_log
from helpers.certs import Certs, make_certs
from helpers.http import in_thread
from helpers.inproc import wait_sessions
from helpers.procs import find_event, run, spawn


#: The client's side of TLS (connecting, verifying, publishing and
#: subscribing over it) runs under Trio and asyncio; the broker's side
#: (raw streams, handshakes, shutdown) under Trio.
client_side = pytest.mark.anyio

#: Upper bound, in seconds, on any single wait in these tests.
TIMEOUT = 10.0
#: Short handshake timeout for the stalled-handshake tests; still long
#: enough for a busy machine to finish the TLS handshake where a test needs it.
HANDSHAKE_TIMEOUT = 1.5


@asynccontextmanager
async def tls_broker(certs: Certs, **overrides: Any) -> AsyncIterator[Server]:
    """A TLS broker; under asyncio in a thread of its own (helpers.anybroker)."""
    async with serving(tls_cert=certs.cert_file, tls_key=certs.key_file, **overrides) as server:
        yield server


def trusting(certs: Certs) -> ssl.SSLContext:
    """A client context that trusts only the test CA."""
    return ssl.create_default_context(cafile=str(certs.ca_file))


def closed_reasons(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [str(e.get("reason")) for e in logs if e.get("event") == "connection closed"]


async def read_to_eof(stream: trio.abc.ReceiveStream, limit: int = 1 << 20) -> bytes:
    """Everything until EOF or a reset (bounded in bytes and time)."""
    data = bytearray()
    with trio.fail_after(TIMEOUT):
        while len(data) < limit:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
    return bytes(data)


async def round_trip(url: str, certs: Certs, topic: str, payloads: list[bytes]) -> None:
    """Publish ``payloads`` over TLS and receive them on a subscription."""
    async with client.connect(url, ca_file=certs.ca_file, name="round-trip") as c:
        with anyio.fail_after(TIMEOUT):
            async with c.subscribe(topic) as sub:
                acks = await c.publish_many(topic, payloads)
                got = [await anext(sub) for _ in payloads]
    assert [m.payload for m in got] == payloads
    assert [m.offset for m in got] == [a.offset for a in acks]


def client_hello(certs: Certs) -> bytes:
    """The first flight of a real TLS client (its ClientHello), as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = trusting(certs).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a TLS handshake record
    return hello


# --------------------------------------------------------------------------
# Publish and subscribe over TLS


@client_side
async def test_url_scheme_and_publish_subscribe(certs: Certs) -> None:
    with broker_log() as logs:
        async with tls_broker(certs) as server:
            assert server.url == f"pybrokers://127.0.0.1:{server.port}"
            await round_trip(server.url, certs, "tls.basic", [b"one", b"two", b"three"])
    listening = [e for e in logs if e.get("event") == "listening"]
    assert listening and listening[0]["tls"] is True
    assert listening[0]["url"].startswith("pybrokers://")
    http = [e for e in logs if e.get("event") == "http listening"]
    assert http and http[0]["tls"] is True


@client_side
async def test_plain_broker_keeps_its_scheme() -> None:
    async with serving() as server:
        assert server.url == f"pybroker://127.0.0.1:{server.port}"
        assert server.tls is None


@client_side
async def test_key_inside_the_certificate_file(certs: Certs) -> None:
    async with serving(tls_cert=certs.bundle_file) as server:
        await round_trip(server.url, certs, "tls.bundle", [b"x"])


@client_side
async def test_frames_near_the_limit_cross_many_tls_records(certs: Certs) -> None:
    """One message that fills a PUBLISH frame to max_frame_bytes, and a batch
    the client must split, both arrive intact (TLS records are 16 KiB)."""
    topic = "tls.big"
    async with tls_broker(certs) as server:
        max_frame = server.config.limits.max_frame_bytes
        # PUBLISH body: request_id u64, topic str16, batch count u32 + crc u32,
        # one record: payload_len u32 + headers_len u16 + payload.
        largest = max_frame - 8 - (2 + len(topic)) - 8 - 6 - MSG_ID_ROOM  # room for the batch's msg-id
        big = bytes(range(256)) * (largest // 256) + b"z" * (largest % 256)
        assert len(big) == largest
        many = [b"%06d" % i + b"." * 40_000 for i in range(150)]  # ~6 MB in all
        async with client.connect(server.url, ca_file=certs.ca_file) as c:
            with anyio.fail_after(TIMEOUT * 3):
                async with c.subscribe(topic) as sub:
                    big_ack = await c.publish(topic, big)
                    acks = await c.publish_many(topic, many)
                    got = [await anext(sub) for _ in range(1 + len(many))]
        assert got[0].payload == big and got[0].offset == big_ack.offset == 0
        assert [m.payload for m in got[1:]] == many
        assert [m.offset for m in got[1:]] == [a.offset for a in acks] == list(range(1, 151))


@client_side
async def test_consumer_group_over_tls(certs: Certs) -> None:
    async with tls_broker(certs) as server:
        async with client.connect(server.url, ca_file=certs.ca_file, name="w1") as w1, \
                client.connect(server.url, ca_file=certs.ca_file, name="w2") as w2, \
                client.connect(server.url, ca_file=certs.ca_file, name="pub") as pub:
            with anyio.fail_after(TIMEOUT):
                async with w1.subscribe("jobs.>", group="workers") as s1, \
                        w2.subscribe("jobs.>", group="workers") as s2:
                    payloads = [b"job-%d" % i for i in range(40)]
                    await pub.publish_many("jobs.tls", payloads)
                    seen: list[bytes] = []

                    async def work(sub: client.Subscription) -> None:
                        async for msg in sub:
                            seen.append(msg.payload)
                            await msg.ack()
                            if len(seen) == len(payloads):
                                nursery.cancel_scope.cancel()

                    async with anyio.create_task_group() as nursery:
                        nursery.start_soon(work, s1)
                        nursery.start_soon(work, s2)
                    assert sorted(seen) == sorted(payloads)
                    doc = await pub.groups("inspect", "workers")
                    with anyio.fail_after(TIMEOUT):
                        while doc["acked"] < len(payloads):
                            await anyio.sleep(0.01)
                            doc = await pub.groups("inspect", "workers")
                    assert doc["pending"] == 0 and doc["acked"] == len(payloads)


@client_side
async def test_tls_true_with_a_plain_scheme_and_a_context(certs: Certs) -> None:
    async with tls_broker(certs) as server:
        plain_url = server.url.replace("pybrokers://", "pybroker://")
        async with client.connect(plain_url, tls=trusting(certs)) as c:
            ack = await c.publish("tls.ctx", b"via context")
        # localhost is in the certificate too: host name checks pass.
        async with client.connect(f"pybrokers://localhost:{server.port}", tls=trusting(certs)) as c:
            ack2 = await c.publish("tls.ctx", b"by name")
        assert (ack.offset, ack2.offset) == (0, 1)


# --------------------------------------------------------------------------
# Failures: each costs only its own connection


@client_side
async def test_wrong_ca_fails_verification_and_the_broker_keeps_serving(
    certs: Certs, tmp_path: Path
) -> None:
    other = make_certs(tmp_path, "other")
    with broker_log():
        async with tls_broker(certs) as server:
            with anyio.fail_after(TIMEOUT):
                with pytest.raises(ssl.SSLCertVerificationError) as info:
                    async with client.connect(server.url, ca_file=other.ca_file):
                        raise AssertionError("connected with a certificate from another CA")
            assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
            assert any(f"127.0.0.1:{server.port}" in note for note in info.value.__notes__)
            # The system CAs do not know the test CA either.
            with anyio.fail_after(TIMEOUT):
                with pytest.raises(ssl.SSLCertVerificationError):
                    async with client.connect(server.url):
                        raise AssertionError("connected without trusting the test CA")
            await round_trip(server.url, certs, "tls.after", [b"still here"])
            await wait_sessions(server, 0)


@client_side
async def test_host_name_is_checked(certs: Certs, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    issued = certs.ca.issue_cert("broker.example")
    (elsewhere / "cert.pem").write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(elsewhere / "key.pem"))
    async with serving(tls_cert=elsewhere / "cert.pem", tls_key=elsewhere / "key.pem") as server:
        with anyio.fail_after(TIMEOUT):
            with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
                async with client.connect(server.url, ca_file=certs.ca_file):
                    raise AssertionError("connected to a certificate for another host")


@client_side
async def test_plain_client_against_tls_broker(certs: Certs) -> None:
    with broker_log() as logs:
        async with tls_broker(certs) as server:
            async with client.connect(server.url, ca_file=certs.ca_file, name="bystander") as ok:
                async with ok.subscribe("tls.bystander") as sub:
                    plain_url = server.url.replace("pybrokers://", "pybroker://")
                    with anyio.fail_after(TIMEOUT):
                        with pytest.raises(ConnectionClosed):
                            async with client.connect(plain_url, tls=False):
                                raise AssertionError("a plain HELLO was accepted on a TLS port")
                    await wait_sessions(server, 1)
                    with anyio.fail_after(TIMEOUT):
                        await ok.publish("tls.bystander", b"unaffected")
                        assert (await anext(sub)).payload == b"unaffected"
            await wait_sessions(server, 0)
    assert "connection lost" in closed_reasons(logs)


@client_side
async def test_tls_client_against_plain_broker_fails_clearly() -> None:
    async with serving() as server:
        with anyio.fail_after(TIMEOUT):
            with pytest.raises(ssl.SSLError, match="does the broker serve TLS") as info:
                async with client.connect(server.url, tls=True):
                    raise AssertionError("TLS handshake with a plain broker succeeded")
        assert f"127.0.0.1:{server.port}" in str(info.value)
        await wait_sessions(server, 0)


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(lambda hello: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http-request"),
        pytest.param(lambda hello: bytes(range(256)) * 64, id="garbage"),
        pytest.param(lambda hello: hello, id="client-hello-then-close"),
        pytest.param(lambda hello: hello[: len(hello) // 2], id="half-a-client-hello"),
        pytest.param(lambda hello: b"\x16\x03\x01\x00\x05hello", id="bad-handshake-record"),
    ],
)
async def test_bad_tls_input_is_disconnected_cleanly(certs: Certs, send: Any) -> None:
    hello = client_hello(certs)
    with broker_log():
        async with tls_broker(certs) as server:
            async with client.connect(server.url, ca_file=certs.ca_file) as ok:
                async with ok.subscribe("tls.bad") as sub:
                    raw = await trio.open_tcp_stream("127.0.0.1", server.port)
                    async with raw:
                        await wait_sessions(server, 2)
                        await raw.send_all(send(hello))
                        await raw.send_eof()
                        await read_to_eof(raw)
                    await wait_sessions(server, 1)
                    with trio.fail_after(TIMEOUT):
                        await ok.publish("tls.bad", b"fine")
                        assert (await anext(sub)).payload == b"fine"
            await wait_sessions(server, 0)


@pytest.mark.parametrize("first_flight", [False, True], ids=["silent", "stalls-after-client-hello"])
async def test_stalled_tls_handshake_is_cut_off_by_the_handshake_timeout(
    certs: Certs, first_flight: bool
) -> None:
    hello = client_hello(certs)
    with broker_log() as logs:
        async with tls_broker(certs, handshake_timeout=HANDSHAKE_TIMEOUT) as server:
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with raw:
                await wait_sessions(server, 1)
                if first_flight:
                    await raw.send_all(hello)
                # Never finish the handshake: the broker must hang up.
                answered = await read_to_eof(raw)
            if first_flight:
                assert answered[:1] == b"\x16"  # its ServerHello, then nothing
            else:
                assert answered == b""
            await wait_sessions(server, 0)
            await round_trip(server.url, certs, "tls.after.stall", [b"ok"])
    assert closed_reasons(logs)[0] == "handshake timeout"


async def test_handshake_timeout_still_applies_to_hello_over_tls(certs: Certs) -> None:
    """TLS done, no HELLO: the usual fatal HANDSHAKE_REQUIRED, readable."""
    async with tls_broker(certs, handshake_timeout=HANDSHAKE_TIMEOUT) as server:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        stream = trio.SSLStream(tcp, trusting(certs), server_hostname="127.0.0.1")
        async with stream:
            with trio.fail_after(TIMEOUT):
                await stream.do_handshake()
            conn = Connection(Role.CLIENT)
            data = await read_to_eof(stream)
            conn.receive_data(data)
            conn.receive_data(b"")
            event = conn.next_event()
            assert isinstance(event, Error) and event.fatal, event
            assert event.code == ErrorCode.HANDSHAKE_REQUIRED


async def test_fatal_error_before_hello_is_readable_over_tls(certs: Certs) -> None:
    """A frame before HELLO gets the fatal ERROR, then a clean close, even
    with more input behind it that the broker never reads."""
    async with tls_broker(certs) as server:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        stream = trio.SSLStream(tcp, trusting(certs), server_hostname="127.0.0.1")
        async with stream:
            conn = Connection(Role.CLIENT)
            # A PING before HELLO is fatal; the pile behind it is never read.
            ping = bytes.fromhex("0000000840 00") + b"\x00" * 8
            with trio.fail_after(TIMEOUT):
                await stream.send_all(ping + b"\x00" * 200_000)
            data = await read_to_eof(stream)
            conn.receive_data(data)
            event = conn.next_event()
            assert isinstance(event, Error) and event.fatal, event
            assert event.code == ErrorCode.HANDSHAKE_REQUIRED


async def test_tls_close_lingers_like_tcp(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    """linger_close over TLS: close_notify, then EOF, then the socket stays
    open, draining, until the peer closes; closing at once with unread input
    would reset the connection and could destroy our last records."""
    monkeypatch.setattr(closing, "LINGER_SECONDS", TIMEOUT * 3)  # never the reason it ends
    context = server_context(Config(tls_cert=certs.cert_file, tls_key=certs.key_file))
    a, b = trio.socket.socketpair()
    server = wrap_server_stream(trio.SocketStream(a), context)
    peer_tcp = trio.SocketStream(b)
    peer = trio.SSLStream(peer_tcp, trusting(certs), server_hostname="127.0.0.1")
    closed = trio.Event()

    async def close_server() -> None:
        await closing.linger_close(server)
        closed.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.do_handshake)
            nursery.start_soon(server.send_all, b"last words")
        await peer.send_all(b"never read by the server")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_server)
            assert await peer.receive_some(100) == b"last words"
            assert await peer.receive_some(100) == b""  # close_notify: a clean end
            # The server half-closed and is draining: it has not closed its
            # socket, and takes what we still send.
            assert not closed.is_set()
            await peer_tcp.send_all(b"x" * 100_000)
            assert not closed.is_set()
            await peer_tcp.aclose()  # our EOF ends its linger
            await closed.wait()
    await trio.aclose_forcefully(peer)  # its transport is closed already


# --------------------------------------------------------------------------
# Graceful shutdown


async def test_graceful_shutdown_with_tls_clients(certs: Certs) -> None:
    with broker_log() as logs:
        async with tls_broker(certs) as server:
            async with client.connect(server.url, ca_file=certs.ca_file, name="sub") as s, \
                    client.connect(server.url, ca_file=certs.ca_file, name="pub") as p:
                async with s.subscribe("tls.down") as sub:
                    acks = await p.publish_many("tls.down", [b"%d" % i for i in range(100)])
                    assert [a.offset for a in acks] == list(range(100))
                    server.shutdown()
                    got: list[bytes] = []
                    with trio.fail_after(TIMEOUT):
                        with pytest.raises(ConnectionClosed):
                            async for msg in sub:
                                got.append(msg.payload)
                        await server.wait_stopped()
                    assert got == [b"%d" % i for i in range(100)]
                    assert s.closed and p.closed
    reasons = closed_reasons(logs)
    assert reasons == ["server shutdown", "server shutdown"], reasons


async def test_shutdown_with_a_handshake_in_progress(certs: Certs) -> None:
    """A connection stuck in its TLS handshake does not hold up shutdown
    (the handshake timeout is left long: shutdown must end it)."""
    with broker_log() as logs:
        async with tls_broker(certs) as server:
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with raw:
                await raw.send_all(client_hello(certs))
                with trio.fail_after(TIMEOUT):
                    # Its half of the handshake: now it waits for ours.
                    assert (await raw.receive_some(65536))[:1] == b"\x16"
                server.shutdown()
                with trio.fail_after(TIMEOUT):
                    await server.wait_stopped()
                await read_to_eof(raw)
    assert closed_reasons(logs) == ["server shutdown"]


async def test_goodbye_over_tls_is_clean(certs: Certs) -> None:
    """A raw TLS client: HELLO, GOODBYE; the broker answers GOODBYE and
    closes with close_notify (a clean EOF, not a truncation)."""
    async with tls_broker(certs) as server:
        tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
        stream = trio.SSLStream(tcp, trusting(certs), server_hostname="127.0.0.1")
        async with stream:
            conn = Connection(Role.CLIENT)
            with trio.fail_after(TIMEOUT):
                await stream.send_all(conn.send(Hello(client_name="raw")))
                assert isinstance(await next_event(stream, conn), Welcome)
                await stream.send_all(conn.send(Goodbye()))
                assert isinstance(await next_event(stream, conn), Goodbye)
                # A clean end: close_notify. A bare TCP EOF would raise
                # BrokenResourceError here (https_compatible=False).
                assert await stream.receive_some(65536) == b""


async def next_event(stream: trio.abc.ReceiveStream, conn: Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


# --------------------------------------------------------------------------
# HTTPS


def https_get(url: str, context: ssl.SSLContext) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, context=context, timeout=TIMEOUT) as resp:
        return resp.status, resp.headers.get("content-type", ""), resp.read()


def https_post_json(url: str, context: ssl.SSLContext, doc: Any) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(doc).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, context=context, timeout=TIMEOUT) as resp:
        return resp.status, json.loads(resp.read())


async def test_https_healthz_and_json_api(certs: Certs) -> None:
    with broker_log():
        async with tls_broker(certs) as server:
            base = f"https://127.0.0.1:{server.http_port}"
            context = trusting(certs)
            status, _, body = await in_thread(partial(https_get, f"{base}/healthz", context))
            assert status == 200 and body
            status, doc = await in_thread(
                partial(https_post_json, f"{base}/v1/topics/tls.http/messages", context, {"payload": "over https"})
            )
            assert status == 200 and doc["offset"] == 0, doc
            status, ctype, body = await in_thread(
                partial(https_get, f"{base}/v1/topics/tls.http/messages", context)
            )
            assert status == 200 and ctype.startswith("application/json")
            assert [m["payload"] for m in json.loads(body)["messages"]] == ["over https"]
            # The message is the same one TCP clients see.
            async with client.connect(server.url, ca_file=certs.ca_file) as c:
                infos = await c.topics("tls.http")
            assert [(i.topic, i.next_offset) for i in infos] == [("tls.http", 1)]


async def test_https_rejects_untrusted_and_plain_http(certs: Certs, tmp_path: Path) -> None:
    other = make_certs(tmp_path, "other")
    with broker_log():
        async with tls_broker(certs) as server:
            assert server.http_port is not None
            base = f"127.0.0.1:{server.http_port}"
            with pytest.raises(urllib.error.URLError) as info:
                await in_thread(partial(https_get, f"https://{base}/healthz", trusting(other)))
            assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
            # Plain HTTP to the HTTPS port: closed, no answer, no harm.
            raw = await trio.open_tcp_stream("127.0.0.1", server.http_port)
            async with raw:
                await raw.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b"HTTP/1.1" not in await read_to_eof(raw)
            status, _, _ = await in_thread(partial(https_get, f"https://{base}/healthz", trusting(certs)))
            assert status == 200


async def read_until(stream: trio.abc.ReceiveStream, buf: bytearray, marker: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        while marker not in buf:
            chunk = await stream.receive_some(65536)
            assert chunk, f"stream ended before {marker!r}: {bytes(buf)!r}"
            buf += chunk


async def test_sse_over_https(certs: Certs) -> None:
    """An event stream reads and writes one SSLStream at once (it watches
    for the client closing while it sends events)."""
    with broker_log():
        async with tls_broker(certs) as server:
            assert server.http is not None and server.http_port is not None
            tcp = await trio.open_tcp_stream("127.0.0.1", server.http_port)
            stream = trio.SSLStream(tcp, trusting(certs), server_hostname="127.0.0.1")
            async with stream:
                await stream.send_all(
                    b"GET /v1/topics/tls.sse/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                )
                buf = bytearray()
                await read_until(stream, buf, b"\r\n\r\n")
                assert buf.startswith(b"HTTP/1.1 200"), bytes(buf)
                await read_until(stream, buf, b"\n\n")  # the opening comment: subscribed
                async with client.connect(server.url, ca_file=certs.ca_file) as c:
                    await c.publish_many("tls.sse", [b"sse over tls 1", b"sse over tls 2"])
                await read_until(stream, buf, b"sse over tls 2")
                assert b"sse over tls 1" in buf
            # Closing our end ends the stream on the broker's side.
            with trio.fail_after(TIMEOUT):
                while server.http.connections:
                    await trio.sleep(0.01)


async def test_https_request_timeout_covers_a_stalled_handshake(certs: Certs) -> None:
    http = attrs.evolve(Config().http, request_timeout=HANDSHAKE_TIMEOUT)
    async with tls_broker(certs, http=http) as server:
        assert server.http is not None and server.http_port is not None
        raw = await trio.open_tcp_stream("127.0.0.1", server.http_port)
        async with raw:
            await raw.send_all(client_hello(certs))
            answered = await read_to_eof(raw)
        assert answered[:1] == b"\x16"
        with trio.fail_after(TIMEOUT):
            while server.http.connections:
                await trio.sleep(0.01)


# --------------------------------------------------------------------------
# Configuration


def test_server_context_errors(certs: Certs, tmp_path: Path) -> None:
    assert server_context(Config()) is None
    with pytest.raises(TLSConfigError, match="does not exist"):
        server_context(Config(tls_cert=tmp_path / "missing.pem", tls_key=certs.key_file))
    with pytest.raises(TLSConfigError, match="does not exist"):
        server_context(Config(tls_cert=certs.cert_file, tls_key=tmp_path / "missing.key"))
    with pytest.raises(TLSConfigError, match="without a certificate"):
        server_context(Config(tls_key=certs.key_file))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match="cannot load TLS certificate"):
        server_context(Config(tls_cert=junk, tls_key=certs.key_file))
    # The certificate alone, without its key.
    with pytest.raises(TLSConfigError, match="cannot load TLS certificate"):
        server_context(Config(tls_cert=certs.cert_file))
    # A key that does not belong to the certificate.
    other = make_certs(tmp_path, "other")
    with pytest.raises(TLSConfigError, match="cannot load TLS certificate"):
        server_context(Config(tls_cert=certs.cert_file, tls_key=other.key_file))
    context = server_context(Config(tls_cert=certs.cert_file, tls_key=certs.key_file))
    assert context is not None and context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_encrypted_key_is_refused_without_prompting(certs: Certs, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(certs.key_file.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="encrypted"):
        server_context(Config(tls_cert=certs.cert_file, tls_key=encrypted))


async def test_broker_does_not_start_with_a_bad_certificate(tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError):
        async with running_broker(tls_cert=tmp_path / "nope.pem", tls_key=tmp_path / "nope.key"):
            raise AssertionError("started without a certificate")


def test_client_context_choices(certs: Certs) -> None:
    assert client_context(None, None, url_tls=False) is None
    assert client_context(False, None, url_tls=False) is None
    for tls, ca, url_tls in [(None, None, True), (True, None, False), (None, certs.ca_file, False)]:
        context = client_context(tls, ca, url_tls=url_tls)
        assert context is not None
        assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    mine = trusting(certs)
    assert client_context(mine, None, url_tls=True) is mine
    with pytest.raises(ValueError, match="pybrokers"):
        client_context(False, None, url_tls=True)
    with pytest.raises(ValueError, match="not both"):
        client_context(mine, certs.ca_file, url_tls=True)
    with pytest.raises(FileNotFoundError, match="no such CA file"):
        client_context(None, certs.ca_file.with_name("missing.pem"), url_tls=True)


async def test_bench_refuses_tls_brokers() -> None:
    """Its raw workers speak plain TCP: refused up front, not halfway."""
    for extra in (["--url", "pybrokers://127.0.0.1:7420"], ["--broker-args=--tls-cert x.pem"]):
        result = await run(["bench", "latency", *extra])
        assert result.returncode == 2, result
        assert "TLS brokers" in result.stderr.decode(), result


def test_parse_url_accepts_both_schemes() -> None:
    assert client.parse_url("pybrokers://example.org:9000") == ("example.org", 9000)
    assert client.parse_url("pybrokers://example.org") == ("example.org", 7420)
    with pytest.raises(ValueError, match="pybrokers://"):
        client.parse_url("tls://example.org:9000")


# --------------------------------------------------------------------------
# The command line


async def test_cli_serve_tls_pub_sub(certs: Certs, tmp_path: Path) -> None:
    args = [
        "serve", "--port", "0", "--storage", "memory", "--log-format", "json",
        "--tls-cert", str(certs.cert_file), "--tls-key", str(certs.key_file),
    ]
    async with spawn(args, "serve", cwd=tmp_path) as broker:
        listening = await broker.stderr.wait_for(find_event("listening"))
        port = listening["port"]
        url = listening["url"]
        assert url == f"pybrokers://127.0.0.1:{port}" and listening["tls"] is True, listening
        ca = ["--url", url, "--ca", str(certs.ca_file)]
        result = await run(["pub", "cli.tls", "hello over tls", *ca])
        assert result.returncode == 0, result
        assert result.stdout.decode() == "published to cli.tls at offset 0 (memory)\n"
        result = await run(["sub", "cli.tls", "--from", "earliest", "--count", "1", *ca])
        assert result.returncode == 0, result
        assert result.stdout.decode() == "cli.tls [0] hello over tls\n"
        result = await run(["topics", *ca])
        assert result.returncode == 0 and "cli.tls" in result.stdout.decode(), result
        result = await run(["groups", *ca])
        assert result.returncode == 0 and result.stdout.decode() == "no groups\n", result
        # Without the CA the system's CAs do not vouch for the broker.
        result = await run(["pub", "cli.tls", "unverified", "--url", url])
        assert result.returncode == 1, result
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr.decode(), result
        # A plain URL to the TLS port fails cleanly too.
        result = await run(["pub", "cli.tls", "plain", "--url", f"pybroker://127.0.0.1:{port}"])
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr.decode(), result


async def test_cli_ca_from_the_environment(certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with tls_broker(certs) as server:
        monkeypatch.setenv("PYBROKER_CA", str(certs.ca_file))
        monkeypatch.setenv("PYBROKER_URL", server.url)
        # run() drops PYBROKER_URL from the child's environment; pass the URL.
        result = await run(["pub", "cli.env", "via env", "--url", server.url])
        assert result.returncode == 0, result


async def test_cli_serve_refuses_a_missing_certificate(tmp_path: Path) -> None:
    result = await run([
        "serve", "--port", "0", "--storage", "memory",
        "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "missing.key"),
    ])
    assert result.returncode == 1, result
    err = result.stderr.decode()
    assert "missing.pem" in err and "does not exist" in err, err
    assert "Traceback" not in err, err
