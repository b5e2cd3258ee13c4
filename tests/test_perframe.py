"""One message per PUBLISH frame (issue 17): the session's precomputed
frame structs and the direct writes of broker/session/flushing.py.

Each PUBLISH frame's deliveries and PUBACK are written at the end of the
read that held it, every connection's in one writev, or by the flusher task
after a commit round; what a socket does not take goes to the connection's
writer task. These tests check what a peer sees: every message, in order,
once, to every subscriber; PUBACKs in order with the durability promised;
a subscriber that stops reading gets everything later, in order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pybroker.protocol import (
    UNLIMITED_CREDIT,
    Durability,
    PubAck,
    deliver_header,
    encode_puback,
)
from pybroker.server.session import Session
from pybroker.server.session.acks import PUBACK_FRAME
from pybroker.server.session.outbox import DELIVER_PREFIX
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.server.testing import running_broker

from helpers.frames import good_batch, publish_frame
from helpers.inproc import wait_until
from helpers.raw import RawSubscriber, raw_client


def test_puback_struct_is_the_codecs() -> None:
    for request_id, base, count, ts, durability in [
        (1, 0, 1, 0, Durability.DISK),
        (2**64 - 1, 2**63, 2**32 - 1, 1_700_000_000_000_000, Durability.OS),
        (7, 12345, 500, 99, Durability.MEMORY),
    ]:
        ours = PUBACK_FRAME.pack(PUBACK_FRAME.size - 6, 0x11, 0, request_id, base, count, ts, durability)
        assert ours == encode_puback(PubAck(request_id, base, count, ts, durability))


def test_deliver_prefix_is_the_codecs() -> None:
    for sub_id, topic, base, ts, size in [
        (1, b"t", 0, 0, 20),
        (2**32 - 1, "ü.x.é".encode(), 2**63, 1_700_000_000_000_000, 4 * 1024 * 1024),
    ]:
        body = DELIVER_PREFIX.size - 6 + len(topic) + size
        ours = DELIVER_PREFIX.pack(body, 0x30, 0, sub_id, base, ts, len(topic)) + topic
        assert ours == deliver_header(sub_id, topic, base, ts, size)


def _broker(tmp_path: Path, fsync: str):  # type: ignore[no-untyped-def]
    return running_broker(
        data_dir=tmp_path / "data", topic_settings=SettingsResolver.from_specs(TopicSettings(fsync=fsync), [])
    )


def _session(server, name: str) -> Session:  # type: ignore[no-untyped-def]
    sessions = [s for s in server.sessions if s.client_name == name]
    assert len(sessions) == 1, [s.client_name for s in server.sessions]
    return sessions[0]


@pytest.mark.trio
@pytest.mark.parametrize("fsync", ["always", "never"])
async def test_one_message_frames_reach_every_subscriber_in_order(tmp_path: Path, fsync: str) -> None:
    frames = 300
    async with _broker(tmp_path, fsync) as server:
        subs = [await RawSubscriber.open(server.url, f"sub{i}", "perframe.t", UNLIMITED_CREDIT) for i in range(5)]
        try:
            async with raw_client(server, handshake="pub") as pub:
                # Every frame in a few writes: one read holds many of them.
                wire = [publish_frame(i, b"perframe.t", good_batch(b"m%d" % i)) for i in range(1, frames + 1)]
                for start in range(0, frames, 100):
                    await pub.send(b"".join(wire[start : start + 100]))
                acks = await pub.events(frames)
                assert all(isinstance(a, PubAck) for a in acks), acks
                assert [a.request_id for a in acks] == list(range(1, frames + 1))  # type: ignore[union-attr]
                assert [a.base_offset for a in acks] == list(range(frames))  # type: ignore[union-attr]
                want = Durability.DISK if fsync == "always" else Durability.OS
                assert {a.durability for a in acks} == {want}  # type: ignore[union-attr]
            with trio.fail_after(30):
                for sub in subs:
                    await sub.read_messages(frames)
            for sub in subs:
                assert sub.messages == [(i - 1, b"m%d" % i) for i in range(1, frames + 1)]
        finally:
            for sub in subs:
                await sub.aclose()


@pytest.mark.trio
async def test_subscriber_that_stops_reading_gets_the_rest_in_order(tmp_path: Path) -> None:
    """Direct writes fill the stalled subscriber's socket; the rest waits in
    its outbox (its writer task sends it) or in the log, within the bound."""
    frames = 3000
    payload = b"p" * 1000
    async with _broker(tmp_path, "never") as server:
        stalled = await RawSubscriber.open(server.url, "stalled", "stall.t", UNLIMITED_CREDIT)
        live = await RawSubscriber.open(server.url, "live", "stall.t", UNLIMITED_CREDIT)
        try:
            outbox = _session(server, "stalled").outbox
            peak = 0
            async with raw_client(server, handshake="pub") as pub:
                for start in range(1, frames + 1, 50):
                    await pub.send(
                        b"".join(publish_frame(i, b"stall.t", good_batch(payload + b"%d" % i)) for i in range(start, start + 50))
                    )
                    peak = max(peak, outbox.queued_bytes + outbox.sending)
                    await live.read_messages(start + 49)
                acks = await pub.events(frames)
                assert [a.base_offset for a in acks] == list(range(frames))  # type: ignore[union-attr]
            # The stalled one did not read: what it was sent filled its
            # socket, and more waited, within the bound.
            await wait_until(lambda: outbox.queued_bytes + outbox.sending > 0 or outbox.lagging)
            assert peak <= outbox.limit + len(payload) + 100
            with trio.fail_after(30):
                await stalled.read_messages(frames)
            for sub in (stalled, live):
                assert [o for o, _ in sub.messages] == list(range(frames))
                assert sub.messages[-1] == (frames - 1, payload + b"%d" % frames)
        finally:
            await stalled.aclose()
            await live.aclose()
