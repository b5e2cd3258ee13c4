"""The batch codec at its edges (client/protocol/_batch.py): splitting valid
batches into their records, and the 16-bit limits of the headers block, at
exactly 65535 and 65536 bytes.

``split_records`` is what a consumer group uses to send one message of a
stored batch alone (redelivery, dead letters); the fuzz tests only show it
never raises anything but MalformedBatch, these show it splits right.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pybroker.protocol import (
    MalformedBatch,
    check_batch,
    decode_batch,
    encode_batch,
    encode_batch_from_records,
    encode_headers,
    encode_record,
    split_records,
)

PROPERTY = settings(max_examples=200, deadline=None)

Item = tuple[bytes, Mapping[str, str]]


def _alone(record: bytes) -> list[Item]:
    """The record re-encoded as a batch of its own, decoded."""
    batch = encode_batch_from_records([record])
    assert check_batch(batch) == (1, True)
    return [(bytes(p), dict(h)) for p, h in decode_batch(batch)]


# -- split_records on valid batches ------------------------------------------------


@pytest.mark.parametrize(
    "items",
    [
        pytest.param([(b"one", {})], id="one"),
        pytest.param([(b"", {})], id="one-empty"),
        pytest.param([(b"a", {}), (b"", {}), (b"ccc", {})], id="empty-in-the-middle"),
        pytest.param([(b"p" * 70_000, {"k": "v"}), (b"q", {"x-a": "1", "x-b": "\u00e9"})], id="headers-and-big"),
        pytest.param([(bytes([i]) * i, {"n": str(i)} if i % 2 else {}) for i in range(50)], id="fifty"),
    ],
)
def test_split_records_gives_each_record_of_a_valid_batch(items: list[Item]) -> None:
    batch = encode_batch(items)
    records = split_records(batch)
    assert records == [encode_record(p, h) for p, h in items]
    assert b"".join(records) == batch[8:]
    assert [_alone(r) for r in records] == [[(p, dict(h))] for p, h in items]


messages = st.lists(
    st.tuples(
        st.binary(max_size=300),
        st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=20), max_size=3),
    ),
    min_size=1,
    max_size=20,
)


@PROPERTY
@given(messages)
def test_split_records_then_decode_each_is_decoding_the_batch(items: list[Item]) -> None:
    batch = encode_batch(items)
    records = split_records(batch)
    assert len(records) == len(items)
    assert b"".join(records) == batch[8:]
    alone = [m for r in records for m in _alone(r)]
    assert alone == [(p, dict(h)) for p, h in decode_batch(batch)]


@PROPERTY
@given(messages, st.data())
def test_split_records_refuses_a_batch_cut_short(items: list[Item], data: st.DataObject) -> None:
    batch = encode_batch(items)
    cut = data.draw(st.integers(8, len(batch) - 1))
    with pytest.raises(MalformedBatch):
        split_records(batch[:cut])


def test_split_records_refuses_a_count_larger_than_its_records() -> None:
    batch = encode_batch([b"a", b"b"])
    more = struct.pack(">I", 3) + batch[4:]
    with pytest.raises(MalformedBatch, match="3 records announced"):
        split_records(more)


@pytest.mark.parametrize("count", [1 << 8, 1 << 16, 1 << 24, 0xFFFFFFFF])
def test_split_records_reads_all_four_bytes_of_the_count(count: int) -> None:
    """A count with its high bytes set and no records behind it is refused,
    not read as a smaller count (or none)."""
    with pytest.raises(MalformedBatch, match=f"{count} records announced"):
        split_records(struct.pack(">II", count, 0) + encode_record(b"x"))


# -- the headers block: 65535 bytes fit, 65536 do not ---------------------------------


def _block(entries: list[tuple[int, int]]) -> dict[str, str]:
    """Headers whose keys and values have these UTF-8 byte lengths (keys
    made distinct by their first byte)."""
    return {chr(ord("a") + i) + "k" * (k - 1): "\u00e9" * (v // 2) + "v" * (v % 2) for i, (k, v) in enumerate(entries)}


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([(1, 65530)], id="one-header"),
        pytest.param([(3, 30000), (5, 35519)], id="two-headers"),
        pytest.param([(65531, 0)], id="long-key"),
    ],
)
def test_headers_block_of_exactly_65535_bytes_fits(entries: list[tuple[int, int]]) -> None:
    headers = _block(entries)
    block = encode_headers(headers)
    assert len(block) == 0xFFFF
    record = encode_record(b"payload", headers)
    assert struct.unpack_from(">IH", record) == (7, 0xFFFF)
    assert decode_batch(encode_batch_from_records([record])) == [(b"payload", headers)]


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([(1, 65531)], id="one-header"),
        pytest.param([(3, 30000), (5, 35520)], id="two-headers"),
        pytest.param([(65532, 0)], id="long-key"),
        pytest.param([(1, 65535)], id="value-at-its-own-limit"),
        pytest.param([(65535, 1)], id="key-at-its-own-limit"),
    ],
)
def test_headers_block_of_65536_bytes_or_more_is_a_value_error(entries: list[tuple[int, int]]) -> None:
    headers = _block(entries)
    with pytest.raises(ValueError, match="longer than 65535 bytes") as info:
        encode_record(b"payload", headers)
    assert not isinstance(info.value, struct.error)
    with pytest.raises(ValueError, match="longer than 65535 bytes"):
        encode_batch([(b"payload", headers)])


@pytest.mark.parametrize("key_bytes, value_bytes", [(65536, 0), (1, 65536), (65536, 65536)])
def test_a_key_or_value_over_65535_bytes_is_a_value_error(key_bytes: int, value_bytes: int) -> None:
    headers = {"k" * key_bytes: "v" * value_bytes}
    with pytest.raises(ValueError, match="longer than 65535 bytes") as info:
        encode_headers(headers)
    assert not isinstance(info.value, struct.error)


def test_limits_count_utf8_bytes_not_characters() -> None:
    fits = {"k": "\u20ac" * 21843 + "v"}  # 3 bytes each: 65529 + 1, block 65535
    assert len(encode_headers(fits)) == 0xFFFF
    with pytest.raises(ValueError):
        encode_headers({"k": "\u20ac" * 21844})  # 65532 bytes: block 65537
