"""Batches as large as a frame (issue 17): a connection's socket takes a
multi-megabyte DELIVER in many pieces, and the rest of each piece is kept
as a view of the same bytes (broker/session/outbox.py, ``_writev``); the
default outbound bound keeps several such batches queued per subscriber.

These tests check what a peer sees: every byte of every large batch, in
order, whether the subscriber reads as it goes or stops and reads later.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pybroker.protocol import UNLIMITED_CREDIT
from pybroker.server.config import Config
from pybroker.server.storage.settings import SettingsResolver, TopicSettings
from pybroker.server.testing import running_broker

from helpers.frames import good_batch, publish_frame
from helpers.raw import RawSubscriber, raw_client

#: Three messages of ~600 KiB in a batch of ~1.8 MiB: far more than a
#: socket takes in one write.
MESSAGE_BYTES = 600 * 1024


def _payload(batch: int, message: int) -> bytes:
    # Every message distinct along its whole length, so that a piece sent
    # twice, skipped or shifted changes what arrives.
    seed = b"%06d-%d|" % (batch, message)
    return (seed * (MESSAGE_BYTES // len(seed) + 1))[:MESSAGE_BYTES]


def test_default_outbound_bound_holds_several_frame_sized_batches() -> None:
    config = Config()
    assert config.outbound_queue_bytes >= 2 * config.limits.max_frame_bytes


@pytest.mark.trio
@pytest.mark.parametrize("stall", [False, True], ids=["reading", "stalled-then-reading"])
async def test_large_batches_arrive_whole_and_in_order(tmp_path: Path, stall: bool) -> None:
    batches = 12
    settings = SettingsResolver.from_specs(TopicSettings(fsync="never"), [])
    async with running_broker(data_dir=tmp_path / "data", topic_settings=settings) as server:
        sub = await RawSubscriber.open(server.url, "big-sub", "big.t", UNLIMITED_CREDIT)
        try:
            async with raw_client(server, handshake="pub") as pub:
                for b in range(batches):
                    await pub.send(publish_frame(b + 1, b"big.t", good_batch(*(_payload(b, m) for m in range(3)))))
                    if not stall:
                        with trio.fail_after(30):
                            await sub.read_messages(3 * (b + 1))
                with trio.fail_after(30):
                    acks = await pub.events(batches)
                assert [a.base_offset for a in acks] == [3 * b for b in range(batches)]  # type: ignore[union-attr]
            with trio.fail_after(60):
                await sub.read_messages(3 * batches)
            assert [o for o, _ in sub.messages] == list(range(3 * batches))
            for offset, payload in sub.messages:
                assert payload == _payload(offset // 3, offset % 3), offset
        finally:
            await sub.aclose()
