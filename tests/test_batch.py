"""The batch envelope and records (protocol.md, "Batches")."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pybroker.protocol import (
    EMPTY_HEADERS,
    ErrorCode,
    MalformedBatch,
    RemoteProtocolError,
    check_batch,
    decode_batch,
    encode_batch,
    encode_batch_from_records,
    encode_record,
)

PROPERTY = settings(max_examples=250, deadline=None)

Message = tuple[bytes, Mapping[str, str]]


def raw_batch(records: bytes, count: int, crc: int | None = None) -> bytes:
    """A batch envelope around arbitrary record bytes (crc defaults to correct)."""
    if crc is None:
        crc = zlib.crc32(records)
    return struct.pack(">II", count, crc) + records


def rec(payload: bytes, headers: bytes = b"") -> bytes:
    return struct.pack(">IH", len(payload), len(headers)) + headers + payload


def hdr(key: bytes, value: bytes) -> bytes:
    return struct.pack(">H", len(key)) + key + struct.pack(">H", len(value)) + value


# --------------------------------------------------------------------------
# Exact bytes


def test_record_bytes() -> None:
    assert encode_record(b"hi") == bytes.fromhex("00000002 0000 6869")
    assert encode_record(b"", None) == bytes.fromhex("00000000 0000")
    assert encode_record(b"x", {"k": "v"}) == bytes.fromhex("00000001 0006 0001 6b 0001 76 78")
    assert encode_record(b"", {"é": ""}) == bytes.fromhex("00000000 0006 0002 c3a9 0000")


def test_batch_bytes() -> None:
    records = bytes.fromhex("00000002 0000 6869")
    crc = zlib.crc32(records)
    expected = bytes.fromhex("00000001") + crc.to_bytes(4, "big") + records
    assert encode_batch([b"hi"]) == expected
    assert encode_batch([(b"hi", None)]) == expected
    assert encode_batch([(b"hi", {})]) == expected
    assert encode_batch_from_records([encode_record(b"hi")]) == expected


def test_batch_of_several_messages_bytes() -> None:
    r1 = bytes.fromhex("00000001 0000 61")
    r2 = bytes.fromhex("00000000 0006 0001 6b 0001 76")
    r3 = bytes.fromhex("00000002 0000 6263")
    records = r1 + r2 + r3
    batch = encode_batch([b"a", (b"", {"k": "v"}), bytearray(b"bc")])  # type: ignore[list-item]
    assert batch == bytes.fromhex("00000003") + zlib.crc32(records).to_bytes(4, "big") + records


# --------------------------------------------------------------------------
# Encoding errors


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_batch([])


def test_empty_header_key_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_batch([(b"x", {"": "v"})])


def test_oversized_headers_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_record(b"", {"k": "v" * 0x10000})
    with pytest.raises(ValueError):
        encode_record(b"", {"k" * 0x10000: "v"})
    # each entry fits, the block does not
    with pytest.raises(ValueError):
        encode_record(b"", {f"k{i}": "v" * 30000 for i in range(3)})


# --------------------------------------------------------------------------
# Decoding


def test_decode_simple() -> None:
    out = decode_batch(encode_batch([b"hi", (b"yo", {"a": "1", "b": "2"})]))
    assert out == [(b"hi", {}), (b"yo", {"a": "1", "b": "2"})]
    assert out[0][1] is EMPTY_HEADERS
    assert list(out[1][1]) == ["a", "b"]  # header order is kept


def test_decode_does_not_check_the_crc() -> None:
    # The broker checks the CRC; decode_batch only checks the records tile.
    batch = raw_batch(rec(b"hi"), 1, crc=0xDEADBEEF)
    assert decode_batch(batch) == [(b"hi", {})]


MALFORMED_BATCHES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00\x00\x00\x01\x00\x00\x00", id="short-header"),
    pytest.param(raw_batch(b"", 1), id="count-1-no-records"),
    pytest.param(raw_batch(rec(b"hi"), 2), id="count-too-high"),
    pytest.param(raw_batch(rec(b"hi") + rec(b"yo"), 1), id="count-too-low"),
    pytest.param(raw_batch(rec(b"hi") + b"\x00", 1), id="trailing-byte"),
    pytest.param(raw_batch(rec(b"hi")[:-1], 1), id="payload-truncated"),
    pytest.param(raw_batch(rec(b"hi")[:5], 1), id="record-header-truncated"),
    pytest.param(raw_batch(struct.pack(">IH", 0, 10) + hdr(b"k", b"v"), 1), id="headers-past-end"),
    pytest.param(raw_batch(rec(b"", hdr(b"", b"v")), 1), id="empty-header-key"),
    pytest.param(raw_batch(rec(b"", hdr(b"\xff", b"v")), 1), id="header-key-not-utf8"),
    pytest.param(raw_batch(rec(b"", hdr(b"k", b"\xc3\x28")), 1), id="header-value-not-utf8"),
    pytest.param(raw_batch(rec(b"", hdr(b"k", b"v")[:-1]), 1), id="header-entry-truncated"),
    pytest.param(
        # headers_len says 5 but the entry is 6 bytes: it runs into the payload
        raw_batch(struct.pack(">IH", 1, 5) + hdr(b"k", b"v"), 1),
        id="header-entry-overruns-block",
    ),
    pytest.param(raw_batch(struct.pack(">IH", 0, 3) + b"\x00\x01k", 1), id="header-value-missing"),
]


@pytest.mark.parametrize("batch", MALFORMED_BATCHES)
def test_decode_malformed(batch: bytes) -> None:
    with pytest.raises(MalformedBatch):
        decode_batch(batch)


def test_malformed_batch_is_a_value_error() -> None:
    assert issubclass(MalformedBatch, ValueError)


# --------------------------------------------------------------------------
# check_batch (the broker's O(1) envelope check)


def test_check_batch_ok() -> None:
    batch = encode_batch([b"a", b"b", (b"c", {"k": "v"})])
    assert check_batch(batch) == (3, True)
    assert check_batch(memoryview(batch)) == (3, True)
    assert check_batch(bytearray(batch)) == (3, True)  # type: ignore[arg-type]


def test_check_batch_crc_mismatch_is_returned_not_raised() -> None:
    batch = bytearray(encode_batch([b"hello"]))
    batch[-1] ^= 0x01
    assert check_batch(bytes(batch)) == (1, False)
    batch = bytearray(encode_batch([b"hello"]))
    batch[4] ^= 0x80  # the crc field itself
    assert check_batch(bytes(batch)) == (1, False)


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00\x01\x00\x00\x00", id="7-bytes"),
        pytest.param(raw_batch(b"", 0), id="count-0-empty"),
        pytest.param(raw_batch(rec(b"hi"), 0), id="count-0-with-records"),
        pytest.param(raw_batch(b"", 1), id="count-1-no-records"),
        pytest.param(raw_batch(b"\x00" * 5, 1), id="count-1-5-bytes"),
        pytest.param(raw_batch(b"\x00" * 11, 2), id="count-2-11-bytes"),
        pytest.param(raw_batch(b"", 0xFFFFFFFF), id="huge-count"),
    ],
)
def test_check_batch_malformed(batch: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        check_batch(batch)
    assert info.value.code is ErrorCode.MALFORMED_FRAME


def test_check_batch_minimum_size_is_accepted() -> None:
    # 6 bytes per record is the least the envelope check can demand.
    assert check_batch(raw_batch(b"\x00" * 6, 1)) == (1, True)
    assert check_batch(raw_batch(b"\x00" * 12, 2)) == (2, True)
    assert check_batch(raw_batch(b"\x00" * 12, 2, crc=1)) == (2, False)


# --------------------------------------------------------------------------
# Properties

header_keys = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
header_values = st.text(st.characters(codec="utf-8"), max_size=24)
headers = st.dictionaries(header_keys, header_values, max_size=5)
payloads = st.binary(max_size=200)
messages = st.lists(
    st.one_of(
        payloads,
        st.tuples(payloads, st.none()),
        st.tuples(payloads, headers),
    ),
    min_size=1,
    max_size=12,
)


def normalised(items: list[bytes | tuple[bytes, Mapping[str, str] | None]]) -> list[Message]:
    out: list[Message] = []
    for item in items:
        if isinstance(item, tuple):
            out.append((item[0], dict(item[1] or {})))
        else:
            out.append((item, {}))
    return out


@PROPERTY
@given(items=messages)
def test_batch_round_trip(items: list[bytes | tuple[bytes, Mapping[str, str] | None]]) -> None:
    batch = encode_batch(items)
    expected = normalised(items)
    decoded = decode_batch(batch)
    assert decoded == expected
    for (_, got_headers), (_, want_headers) in zip(decoded, expected):
        assert list(got_headers.items()) == list(want_headers.items())
    assert check_batch(batch) == (len(items), True)
    assert batch == encode_batch_from_records([encode_record(p, h) for p, h in expected])
    assert int.from_bytes(batch[:4], "big") == len(items)
    assert int.from_bytes(batch[4:8], "big") == zlib.crc32(batch[8:])


@st.composite
def damaged_batches(draw: st.DrawFn) -> bytes:
    """Valid batches with a few bytes flipped, cut, inserted or the count changed."""
    batch = bytearray(encode_batch(draw(messages)))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "count", "truncate"]))
        if action == "flip" and batch:
            i = draw(st.integers(0, len(batch) - 1))
            batch[i] ^= draw(st.integers(1, 255))
        elif action == "cut" and batch:
            i = draw(st.integers(0, len(batch) - 1))
            del batch[i : i + draw(st.integers(1, 8))]
        elif action == "insert":
            i = draw(st.integers(0, len(batch)))
            batch[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif action == "count" and len(batch) >= 4:
            batch[0:4] = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big")
        elif action == "truncate":
            del batch[draw(st.integers(0, len(batch))) :]
    return bytes(batch)


arbitrary_batches = st.one_of(st.binary(max_size=300), damaged_batches())


@PROPERTY
@given(batch=arbitrary_batches)
def test_decode_batch_never_raises_anything_but_malformed(batch: bytes) -> None:
    try:
        out = decode_batch(batch)
    except MalformedBatch:
        return
    count = int.from_bytes(batch[:4], "big")
    assert len(out) == count
    for payload, hdrs in out:
        assert isinstance(payload, bytes)
        for key, value in hdrs.items():
            assert isinstance(key, str) and key
            assert isinstance(value, str)
    # whatever decoded consumed the records exactly
    consumed = sum(len(encode_record(p, h)) for p, h in out)
    assert consumed <= len(batch) - 8  # "<" only if a header key was repeated


@PROPERTY
@given(batch=arbitrary_batches)
def test_check_batch_returns_or_raises_malformed(batch: bytes) -> None:
    try:
        result = check_batch(batch)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.MALFORMED_FRAME
        return
    count, crc_ok = result
    assert isinstance(count, int) and isinstance(crc_ok, bool)
    assert count == int.from_bytes(batch[:4], "big") >= 1
    assert len(batch) - 8 >= 6 * count
    assert crc_ok is (zlib.crc32(batch[8:]) == int.from_bytes(batch[4:8], "big"))


@PROPERTY
@given(items=messages, data=st.data())
def test_any_single_byte_change_in_records_breaks_the_crc(
    items: list[bytes | tuple[bytes, Mapping[str, str] | None]], data: st.DataObject
) -> None:
    batch = bytearray(encode_batch(items))
    i = data.draw(st.integers(8, len(batch) - 1))
    batch[i] ^= data.draw(st.integers(1, 255))
    assert check_batch(bytes(batch)) == (len(items), False)
