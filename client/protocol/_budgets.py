"""Frame-size budgets: how much of ``max_frame_bytes`` a frame's batch, a
message or a SUBSCRIBE's options may use (protocol.md, "Limits").

``max_frame_bytes`` bounds a frame's body. Around its batch a PUBLISH body
has request_id (8) and the topic as a str16 (2 + its bytes); a DELIVER has
sub_id, base offset and timestamp (20) and the topic (2 + its bytes). A
batch has an 8-byte header (count, CRC) and each record 6 bytes (payload
and headers lengths) besides its headers block and payload. So the largest
payload of one message is ``max_frame_bytes - 24 - topic bytes - headers
block bytes``. Every caller asks here rather than redoing the sum.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._batch import MAX_MSG_ID_BYTES, MSG_ID_HEADER
from ._wire import (
    BATCH_HEADER,
    DELIVER_BODY_FIXED,
    INFO_ENTRY,
    PUBLISH_BODY_FIXED,
    RESUME_OPTION_PREFIX,
    STR16_LENGTH,
)

#: Bytes a server frame may exceed the announced max_frame_bytes by: a
#: DELIVER carries a batch that fit a PUBLISH, with a longer header.
SERVER_FRAME_ALLOWANCE = 1024
#: Resume positions one SUBSCRIBE names at most: its options have a u16
#: count, less room for the others.
MAX_RESUME_TOPICS = 60_000
#: What a resuming SUBSCRIBE keeps for everything but its pattern and the
#: positions (sub_id, start, credit, the other options): well under 1 KiB.
_SUBSCRIBE_ROOM = 1024


def publish_overhead(topic: str) -> int:
    """Body bytes a PUBLISH to ``topic`` adds around its batch."""
    return PUBLISH_BODY_FIXED + len(topic.encode("utf-8"))


def deliver_overhead(topic: str) -> int:
    """Body bytes a DELIVER of ``topic`` adds around its batch."""
    return DELIVER_BODY_FIXED + len(topic.encode("utf-8"))


def max_publish_batch(max_frame_bytes: int, topic: str) -> int:
    """The largest batch (its header included) one PUBLISH to ``topic``
    carries under ``max_frame_bytes``."""
    return max_frame_bytes - publish_overhead(topic)


#: What naming a batch for exactly-once publishing adds to its first record
#: at most: the ``msg-id`` header entry (two lengths, the key, the id).
MSG_ID_ROOM = 2 + len(MSG_ID_HEADER) + 2 + MAX_MSG_ID_BYTES


def max_publish_records(max_frame_bytes: int, topic: str, dedup: bool = False) -> int:
    """The record bytes (batch header excluded) one PUBLISH to ``topic``
    carries under ``max_frame_bytes``: what a client fills a batch up to
    (less the room for a msg-id when it publishes exactly once)."""
    return max_publish_batch(max_frame_bytes, topic) - BATCH_HEADER.size - (MSG_ID_ROOM if dedup else 0)


def max_deliver_batch(max_frame_bytes: int, topic: str) -> int:
    """The largest batch (its header included) one DELIVER of ``topic``
    carries under ``max_frame_bytes``: 12 bytes less than a PUBLISH."""
    return max_frame_bytes - deliver_overhead(topic)


def server_frame_limit(max_frame_bytes: int) -> int:
    """The largest frame body a client accepts from a server that announced
    ``max_frame_bytes`` (protocol.md, "Limits")."""
    return max_frame_bytes + SERVER_FRAME_ALLOWANCE


def resume_fits(pattern: str, positions: Iterable[tuple[str, int]], max_frame_bytes: int) -> bool:
    """Whether one SUBSCRIBE to ``pattern`` can name every ``(topic,
    position)`` as a resume option under ``max_frame_bytes`` (protocol.md,
    "Resuming after a reconnect")."""
    size = _SUBSCRIBE_ROOM + len(pattern.encode("utf-8"))
    for count, (topic, position) in enumerate(positions, 1):
        if count > MAX_RESUME_TOPICS:
            return False
        # Two str16s: "resume:<topic>" and the decimal position.
        size += (
            2 * STR16_LENGTH
            + len(RESUME_OPTION_PREFIX)
            + len(topic.encode("utf-8"))
            + len(str(position))
        )
    return size <= max_frame_bytes


#: An INFO_REPLY's body before its entries: request_id (8), count (4).
_INFO_REPLY_FIXED = 12


def info_entry_size(topic: str) -> int:
    """Bytes one INFO_REPLY entry takes: the topic as a str16 and its four
    figures (first and next offset, retained bytes, subscriptions)."""
    return STR16_LENGTH + len(topic.encode("utf-8")) + INFO_ENTRY.size


def info_reply_room(max_frame_bytes: int) -> int:
    """Bytes of entries one INFO_REPLY may carry: the reply stays within
    ``max_frame_bytes`` (protocol.md, "INFO_REPLY")."""
    return max_frame_bytes - _INFO_REPLY_FIXED
