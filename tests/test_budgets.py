"""Frame-size budgets (client/protocol/_budgets.py) against protocol.md,
"Limits", and against the frames the codec actually encodes: a batch of
exactly the budget makes a frame of exactly max_frame_bytes, which a
Connection with that limit accepts, and one byte more is FRAME_TOO_LARGE."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pybroker.protocol import (
    BATCH_HEADER,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_SIZE,
    MAX_RESUME_TOPICS,
    NEED_DATA,
    RECORD_HEADER,
    RESUME_OPTION_PREFIX,
    Connection,
    Deliver,
    ErrorCode,
    Hello,
    Publish,
    RemoteProtocolError,
    Role,
    StartKind,
    Subscribe,
    Welcome,
    deliver_header,
    deliver_overhead,
    encode_batch,
    encode_event,
    encode_publish,
    max_deliver_batch,
    max_publish_batch,
    max_publish_records,
    publish_overhead,
    resume_fits,
    server_frame_limit,
)

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "protocol.md"
TOPICS = ["a", "orders.eu.created", "ünï.cödé.🎉", "x" * 255]


def limits_text() -> str:
    text = PROTOCOL_MD.read_text()
    start = text.index("A client must not send a frame whose body exceeds")
    return text[start : text.index("## Topics and patterns", start)]


def number(pattern: str) -> int:
    """The number ``pattern``'s group catches in protocol.md's "Limits"."""
    match = re.search(pattern, " ".join(limits_text().split()))
    assert match is not None, pattern
    return int(match[1].replace(",", ""))


def test_payload_formula_matches_protocol_md() -> None:
    fixed = number(r"a PUBLISH of one message has (\d+) bytes besides")
    formula = number(r"`max_frame_bytes - (\d+) - topic bytes - headers block bytes`")
    default_payload = number(r"([\d,]+) bytes minus the topic's length")
    assert fixed == formula == 24
    for topic in TOPICS:
        t = len(topic.encode())
        for headers_block in (0, 1, 300):
            payload = max_publish_records(DEFAULT_MAX_FRAME_BYTES, topic) - RECORD_HEADER.size - headers_block
            assert payload == DEFAULT_MAX_FRAME_BYTES - formula - t - headers_block
            assert payload == default_payload - t - headers_block


def test_deliver_and_server_allowance_match_protocol_md() -> None:
    longer = number(r"its header is (\d+) bytes longer")
    allowance = number(r"server frames of up to `max_frame_bytes \+ (\d+)` bytes")
    for topic in TOPICS:
        assert deliver_overhead(topic) - publish_overhead(topic) == longer
        assert max_publish_batch(1000, topic) - max_deliver_batch(1000, topic) == longer
    assert server_frame_limit(DEFAULT_MAX_FRAME_BYTES) == DEFAULT_MAX_FRAME_BYTES + allowance
    # A DELIVER of the largest PUBLISH batch is within what a client accepts.
    assert server_frame_limit(0) >= longer


def batch_of(size: int) -> bytes:
    """A one-message batch of exactly ``size`` bytes."""
    batch = encode_batch([b"p" * (size - BATCH_HEADER.size - RECORD_HEADER.size)])
    assert len(batch) == size
    return batch


def open_pair(max_frame_bytes: int) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, max_frame_bytes=max_frame_bytes)
    server = Connection(Role.SERVER, max_frame_bytes=max_frame_bytes)
    server.receive_data(client.send(Hello("budgets")))
    assert isinstance(server.next_event(), Hello)
    client.receive_data(server.send(Welcome("0", "test")))
    assert isinstance(client.next_event(), Welcome)
    return client, server


def frame_error(conn: Connection, data: bytes) -> ErrorCode | None:
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except RemoteProtocolError as exc:
        return exc.code
    assert event is not NEED_DATA
    return None


@pytest.mark.parametrize("topic", TOPICS)
@pytest.mark.parametrize("max_frame_bytes", [400, 4096])
def test_a_publish_of_the_budget_is_exactly_the_limit(topic: str, max_frame_bytes: int) -> None:
    largest = max_publish_batch(max_frame_bytes, topic)
    assert largest == max_publish_records(max_frame_bytes, topic) + BATCH_HEADER.size
    assert largest >= BATCH_HEADER.size + RECORD_HEADER.size  # room for a message
    frame = encode_publish(1, topic, batch_of(largest))
    assert len(frame) - HEADER_SIZE == max_frame_bytes
    _, server = open_pair(max_frame_bytes)
    assert frame_error(server, frame) is None
    _, server = open_pair(max_frame_bytes)
    assert frame_error(server, encode_publish(1, topic, batch_of(largest + 1))) is ErrorCode.FRAME_TOO_LARGE


@pytest.mark.parametrize("topic", TOPICS)
@pytest.mark.parametrize("max_frame_bytes", [400, 4096])
def test_a_deliver_of_the_budget_is_exactly_the_limit(topic: str, max_frame_bytes: int) -> None:
    largest = max_deliver_batch(max_frame_bytes, topic)
    assert largest >= BATCH_HEADER.size + RECORD_HEADER.size  # room for a message
    t = topic.encode()
    batch = batch_of(largest)
    frame = deliver_header(1, t, 0, 0, len(batch)) + batch
    assert frame == encode_event(Deliver(1, topic, 0, 0, batch))
    assert len(frame) - HEADER_SIZE == max_frame_bytes
    client, _ = open_pair(max_frame_bytes)
    assert frame_error(client, frame) is None
    client, _ = open_pair(max_frame_bytes)
    bigger = batch_of(largest + 1)
    assert frame_error(client, deliver_header(1, t, 0, 0, len(bigger)) + bigger) is ErrorCode.FRAME_TOO_LARGE
    # ...which a client accepts with the server allowance, as it does.
    client, _ = open_pair(server_frame_limit(max_frame_bytes))
    assert frame_error(client, deliver_header(1, t, 0, 0, len(bigger)) + bigger) is None


def test_the_largest_publish_batch_delivers_within_the_allowance() -> None:
    topic = "x" * 255
    batch = batch_of(max_publish_batch(DEFAULT_MAX_FRAME_BYTES, topic))
    frame = encode_event(Deliver(2**32 - 1, topic, 2**64 - 1, 2**64 - 1, batch))
    assert len(frame) - HEADER_SIZE == DEFAULT_MAX_FRAME_BYTES + 12
    assert len(frame) - HEADER_SIZE <= server_frame_limit(DEFAULT_MAX_FRAME_BYTES)


def resubscribe_body(pattern: str, positions: list[tuple[str, int]]) -> int:
    """The body of the SUBSCRIBE a resuming client sends, its largest fixed
    fields and a group-free option set (client/subscription.py)."""
    options = {RESUME_OPTION_PREFIX + topic: str(position) for topic, position in positions}
    event = Subscribe(2**32 - 1, pattern, StartKind.TIME, 2**64 - 1, 2**32 - 1, options)
    return len(encode_event(event)) - HEADER_SIZE


@settings(max_examples=100, deadline=None)
@given(
    pattern=st.sampled_from([">", "orders.*", "ü." * 100 + ">"]),
    positions=st.dictionaries(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
        st.integers(0, 2**64 - 1),
        max_size=40,
    ),
)
def test_resume_fits_promises_a_frame_within_the_limit(pattern: str, positions: dict[str, int]) -> None:
    items = list(positions.items())
    needed = resubscribe_body(pattern, items)
    # It says yes exactly when the frame fits with 1 KiB for the fixed fields
    # (sub_id, pattern length, start, value, credit, option count: 21 bytes)
    # and options a subscription adds besides the positions.
    spare = 1024 - 21
    assert resume_fits(pattern, items, needed + spare)
    assert not resume_fits(pattern, items, needed + spare - 1)


def test_resume_fits_counts_positions() -> None:
    many = [(f"t{i}", i) for i in range(MAX_RESUME_TOPICS)]
    huge = 1 << 40
    assert resume_fits(">", many, huge)
    assert resume_fits(">", iter(many), huge)
    assert not resume_fits(">", many + [("one.more", 0)], huge)
    assert resume_fits(">", [], 1024 + 1)
    assert not resume_fits("ab", [], 1024 + 1)


def test_publish_with_a_batch_of_the_budget_round_trips() -> None:
    topic = "ünï.cödé"
    batch = batch_of(max_publish_batch(600, topic))
    client, server = open_pair(600)
    server.receive_data(client.send(Publish(5, topic, batch)))
    assert server.next_event() == Publish(5, topic, batch)
