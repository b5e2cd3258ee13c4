"""`pybroker bench`'s fast publisher packs the PUBLISH frames of a write
with one pack and checks a read's PUBACKs with one unpack (issue 17: the
load must cost less per message than the broker it measures). Byte for byte
the codec's frames; anything but the PUBACKs expected (out of order, a gap
in the offsets, another count or durability, another frame) falls back to
the frame-by-frame check."""

from __future__ import annotations

from pybroker.protocol import Durability, PubAck, encode_batch, encode_puback, encode_publish
from pybroker.server.bench.worker import _pack_frames, _pubacks_as_expected, publish_frame_tail

TS = 1_765_000_000_000_000


def test_frames_packed_at_once_are_the_codecs() -> None:
    for topic, batch, first, k in [("t", encode_batch([b"x"]), 1, 1), ("ü.é", encode_batch([b"y" * 300] * 3), 2**40, 9)]:
        packed = _pack_frames(publish_frame_tail(topic, batch), first, k)
        assert packed == b"".join(encode_publish(i, topic, batch) for i in range(first, first + k))


def _acks(first_id: int, base: int, counts: list[int], durability: Durability = Durability.DISK) -> bytes:
    out = []
    for i, count in enumerate(counts):
        out.append(encode_puback(PubAck(first_id + i, base, count, TS, durability)))
        base += count
    return b"".join(out)


def test_pubacks_checked_at_once_accept_exactly_what_is_expected() -> None:
    sizes = [1, 1, 2, 1, 3]
    # The first answers: any base offset.
    assert _pubacks_as_expected(_acks(1, 40, sizes[:3]), 3, 1, 0, sizes) == (4, int(Durability.DISK))
    # Later ones: from the offset expected on.
    assert _pubacks_as_expected(_acks(4, 44, sizes[3:]), 2, 4, 44, sizes) == (4, int(Durability.DISK))
    wrong = [
        _acks(4, 45, sizes[3:]),  # a gap in the offsets
        _acks(5, 44, [3]) + _acks(4, 47, [1]),  # out of order
        _acks(4, 44, [1, 2]),  # another count than sent
        _acks(4, 44, [1]) + _acks(5, 45, [3], Durability.OS),  # two durabilities
    ]
    for data in wrong:
        assert _pubacks_as_expected(data, 2, 4, 44, sizes) is None
    # More answers than requests sent.
    assert _pubacks_as_expected(_acks(5, 45, [3, 1]), 2, 5, 45, sizes) is None
