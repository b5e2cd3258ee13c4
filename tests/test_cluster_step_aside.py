"""A node cut off from etcd sends its clients to the others
(broker/cluster/stepaside.py; docs/cluster.md §11), against a real etcd
and SeaweedFS: node ``a`` reaches etcd through a proxy that the test cuts,
node ``b`` directly. Its subscribers would otherwise wait on a copy that
no longer grows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pybroker
import trio

from helpers.cluster_broker import (  # noqa: F401 (servers, urls: fixtures)
    WAIT,
    cluster_node,
    publish_to_owner,
    servers,
    settled_owner,
    store_of,
    urls,
    wait_for,
)
from helpers.http import assert_error, request
from helpers.raw import raw_client
from helpers.restarts import FAST
from helpers.tcpproxy import PartitionProxy
from pybroker.protocol import Error, ErrorCode, Hello, Welcome
from pybroker.server.cluster.ranking import first
from pybroker.server.server import Server

pytest.importorskip("httpx", reason="cluster mode needs the cluster extra (httpx)")

TTL = 2


async def hello_answer(node: Server) -> object:
    async with raw_client(node) as raw:
        await raw.send_event(Hello(client_name="probe", options={}))
        with trio.fail_after(WAIT):
            return await raw.next_event()


async def test_a_node_cut_off_from_etcd_sends_its_clients_to_another(urls: dict[str, str], tmp_path: Path) -> None:
    etcd = urls["cluster"].removeprefix("etcd://").split("/", 1)[0]
    proxy = PartitionProxy("127.0.0.1", int(etcd.rsplit(":", 1)[1]))
    topic = next(f"cut.{i}" for i in range(64) if first(["a", "b"], f"cut.{i}", 0) == "a")
    async with trio.open_nursery() as background:
        port = await background.start(proxy.run)
        through = {**urls, "cluster": urls["cluster"].replace(etcd, f"127.0.0.1:{port}", 1)}
        async with (
            cluster_node(through, "a", tmp_path, cluster_lease_ttl=TTL) as a,
            cluster_node(urls, "b", tmp_path, cluster_lease_ttl=TTL) as b,
        ):
            await publish_to_owner([a, b], topic, [b"m0"], "creator")
            assert await settled_owner([a, b], topic) is a
            url = f"pybroker://127.0.0.1:{a.port},127.0.0.1:{b.port}"
            got: list[tuple[int, bytes]] = []
            async with pybroker.connect(url, name="follows", reconnect=FAST) as client:
                async with client.subscribe(topic, start="earliest") as sub:
                    with trio.fail_after(WAIT):
                        async for message in sub:
                            got.append((message.offset, message.payload))
                            break
                    # An HTTP event stream on a, open before the cut.
                    stream = await trio.open_tcp_stream("127.0.0.1", a.http_port)
                    await stream.send_all(
                        f"GET /v1/topics/{topic}/events HTTP/1.1\r\nhost: a\r\n\r\n".encode()
                    )
                    with trio.fail_after(WAIT):
                        head = await stream.receive_some(65536)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    proxy.cut()
                    await wait_for(lambda: store_of(a).stepped_aside)
                    # The others are told to go elsewhere meanwhile.
                    refused = await hello_answer(a)
                    assert isinstance(refused, Error) and refused.code == ErrorCode.SHUTTING_DOWN, refused
                    assert "cut off" in refused.message
                    # The stream ended (its connection closed), and a new
                    # one is refused with 503 while a is cut off.
                    with trio.fail_after(WAIT):
                        while await stream.receive_some(65536):
                            pass
                    await stream.aclose()
                    again = await request(a.http_port, "GET", f"/v1/topics/{topic}/events")
                    assert_error(again, 503, "unavailable")
                    # The client is on b now, which took the topic over.
                    for i in range(1, 6):
                        with trio.fail_after(WAIT):
                            await client.publish(topic, f"m{i}".encode())
                    with trio.fail_after(WAIT):
                        async for message in sub:
                            got.append((message.offset, message.payload))
                            if len(got) == 6:
                                break
                    assert client.reconnects >= 1
            assert got == [(i, f"m{i}".encode()) for i in range(6)]
            assert store_of(b).manager is not None and store_of(b).manager.local(topic, 0) is not None
            # Healed: a holds a lease again and takes clients again.
            proxy.heal()
            await wait_for(lambda: not store_of(a).stepped_aside)
            assert isinstance(await hello_answer(a), Welcome)
            assert store_of(a).step_aside.times == 1
        background.cancel_scope.cancel()


async def test_a_node_keeps_its_clients_when_no_other_is_ready(urls: dict[str, str], tmp_path: Path) -> None:
    """Alone and cut off (etcd down for everyone, as far as it can tell):
    moving clients would gain nothing, so it keeps them."""
    etcd = urls["cluster"].removeprefix("etcd://").split("/", 1)[0]
    proxy = PartitionProxy("127.0.0.1", int(etcd.rsplit(":", 1)[1]))
    async with trio.open_nursery() as background:
        port = await background.start(proxy.run)
        through = {**urls, "cluster": urls["cluster"].replace(etcd, f"127.0.0.1:{port}", 1)}
        async with cluster_node(through, "a", tmp_path, cluster_lease_ttl=TTL) as a:
            await publish_to_owner([a], "alone", [b"m0"], "creator")
            store = store_of(a)
            assert store.manager is not None
            proxy.cut()
            await wait_for(lambda: store.problem is not None)
            # Past the point where it would step aside had anyone been ready:
            # checked by its own clock, a few rounds of its checks.
            with trio.fail_after(WAIT):
                while trio.current_time() < (proxy.cut_at or 0) + store.step_aside.after + 4 * store.step_aside.every:
                    await trio.sleep(store.step_aside.every)
            assert not store.stepped_aside
            assert isinstance(await hello_answer(a), Welcome)
            proxy.heal()
            await wait_for(lambda: store.problem is None)
        background.cancel_scope.cancel()
