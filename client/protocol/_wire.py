"""Where the bytes sit: frame header, frame types, flags, field layouts and
the protocol's fixed limits (protocol.md, "Framing", "Limits", the frame
table).

Everything here is a constant. Readers, writers and the size budgets
(:mod:`._budgets`) build on these layouts, so a field that changes size
changes here and nowhere else.
"""

from __future__ import annotations

import enum
import struct

PROTOCOL_VERSION = 1
MAGIC = b"PYBK"


class FrameType(enum.IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    PUBLISH = 0x10
    PUBACK = 0x11
    SUBSCRIBE = 0x20
    SUBACK = 0x21
    UNSUBSCRIBE = 0x22
    UNSUBACK = 0x23
    CREDIT = 0x24
    ACK = 0x25
    DELIVER = 0x30
    GROUP_DELIVER = 0x31
    PING = 0x40
    PONG = 0x41
    ERROR = 0x50
    GOODBYE = 0x60
    INFO = 0x70
    INFO_REPLY = 0x71
    GROUPS = 0x72
    GROUPS_REPLY = 0x73
    TOPICS = 0x74
    TOPICS_REPLY = 0x75


TYPES_BY_VALUE = {int(t): t for t in FrameType}

# -- framing -----------------------------------------------------------------

FRAME_HEADER = struct.Struct(">IBB")  # body size, type, flags
HEADER_SIZE = FRAME_HEADER.size
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024

# -- flags -------------------------------------------------------------------

ERROR_FLAG_FATAL = 0x01
#: ERROR carries a fields block (``str16`` key/value pairs) after its message.
ERROR_FLAG_FIELDS = 0x02
INFO_FLAG_TRUNCATED = 0x01
#: INFO continues a listing: an ``after`` topic name follows the pattern.
INFO_FLAG_AFTER = 0x01
#: TOPICS: request_id, action, the offset to keep from (purge), then the topic.
TOPICS_FIXED = struct.Struct(">QBQ")
PUBLISH_FLAG_NEEDS_RECEIVER = 0x01
#: The batch's first record carries a ``msg-id`` header: store it once (protocol.md, "Publishing exactly once").
PUBLISH_FLAG_DEDUP = 0x02
#: The batch's first record carries a ``deliver-at`` header: deliver the
#: batch then, not now (protocol.md, "Delayed delivery").
PUBLISH_FLAG_DELAYED = 0x04
#: PUBACK base_offset of a delayed batch: it has no offset until it is released.
NO_OFFSET = 0xFFFF_FFFF_FFFF_FFFF

#: Flag bits defined per frame type; all others must be 0.
ALLOWED_FLAGS = {
    FrameType.ERROR: ERROR_FLAG_FATAL | ERROR_FLAG_FIELDS,
    FrameType.INFO_REPLY: INFO_FLAG_TRUNCATED,
    FrameType.INFO: INFO_FLAG_AFTER,
    FrameType.PUBLISH: PUBLISH_FLAG_NEEDS_RECEIVER | PUBLISH_FLAG_DEDUP | PUBLISH_FLAG_DELAYED,
}

# -- field layouts -----------------------------------------------------------

U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
#: Bytes in front of a str16's text: its length.
STR16_LENGTH = U16.size

PUBLISH_FIXED = struct.Struct(">Q")  # request_id (then the topic, then the batch)
PUBACK = struct.Struct(">QQIQB")  # request_id, base offset, count, timestamp, durability
DELIVER_FIXED = struct.Struct(">IQQ")  # sub_id, base offset, timestamp (then topic, batch)
GROUP_DELIVER_FIXED = struct.Struct(">IQQH")  # sub_id, base, timestamp, deliveries
SUBSCRIBE_START = struct.Struct(">BQI")  # start, start_value, credit
GROUPS_CREATE_START = struct.Struct(">BQ")  # start, start_value
CREDIT = struct.Struct(">II")
INFO_ENTRY = struct.Struct(">QQQI")  # first, next, retained bytes, subscriptions
ACK_FIXED = struct.Struct(">IBI")  # sub_id, kind, delay_ms
RANGE = struct.Struct(">QQ")
ERROR_FIXED = struct.Struct(">HBQ")  # code, ref_kind, ref

# Body bytes of the batch-carrying frames besides the topic's text and the
# batch: their fixed fields and the topic's length.
PUBLISH_BODY_FIXED = PUBLISH_FIXED.size + STR16_LENGTH  # 10
DELIVER_BODY_FIXED = DELIVER_FIXED.size + STR16_LENGTH  # 22
GROUP_DELIVER_BODY_FIXED = GROUP_DELIVER_FIXED.size + STR16_LENGTH  # 24

#: A batch (protocol.md, "Batches"): count, CRC-32 of the records, records.
BATCH_HEADER = struct.Struct(">II")
#: One record: payload length, headers block length, headers, payload.
RECORD_HEADER = struct.Struct(">IH")

# -- fixed limits ------------------------------------------------------------

#: Senders cut ERROR messages to this many characters (protocol.md).
ERROR_MESSAGE_CHARS = 1000
#: Entries an INFO_REPLY holds at most.
MAX_INFO_ENTRIES = 10_000
#: Ranges one ACK frame carries at most.
MAX_ACK_RANGES = 1024

#: SUBSCRIBE credit meaning "no flow control".
UNLIMITED_CREDIT = 0xFFFFFFFF
#: HELLO option by which a client asks for ERROR fields (protocol.md, "ERROR").
ERROR_FIELDS_OPTION = "error_fields"
#: SUBSCRIBE option ``resume:<topic>`` = decimal offset: where a resumed
#: subscription continues in that topic (protocol.md, "Resuming after a
#: reconnect").
RESUME_OPTION_PREFIX = "resume:"
