"""The pybroker wire protocol (protocol.md): one sans-I/O codec shared by the
broker and the client.

This module is the protocol's only door: every public name is re-exported
here, and nothing outside the package imports its private modules, which
are named for what they own:

- ``_wire``: frame header, frame types, flags, field layouts, fixed limits;
- ``_budgets``: every frame-size budget (what fits under max_frame_bytes);
- ``_events``: one event class per frame type, and their field enums;
- ``_readers`` / ``_writers``: bytes to events and events to bytes;
- ``_state``: the handshake states and the legal-transition tables;
- ``_connection``: the Connection that applies them to a byte stream;
- ``_batch``: the batch and record format inside PUBLISH and DELIVER;
- ``_subjects``: topic and pattern syntax and matching;
- ``_errors``: error codes and the exceptions that carry them.
"""

from ._batch import (
    EMPTY_HEADERS,
    MAX_MSG_ID_BYTES,
    MSG_ID_HEADER,
    Headers,
    MalformedBatch,
    batch_count,
    check_batch,
    decode_batch,
    encode_batch,
    encode_batch_from_records,
    encode_headers,
    encode_record,
    first_msg_id,
    record_headers,
    split_records,
    with_msg_id,
)
from ._budgets import (
    MSG_ID_ROOM,
    info_entry_size,
    info_reply_room,
    MAX_RESUME_TOPICS,
    SERVER_FRAME_ALLOWANCE,
    deliver_overhead,
    max_deliver_batch,
    max_publish_batch,
    max_publish_records,
    publish_overhead,
    resume_fits,
    server_frame_limit,
)
from ._connection import CLOSED, NEED_DATA, Connection
from ._errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    code_name,
)
from ._events import (
    EVENT_TYPES,
    Ack,
    AckKind,
    Credit,
    Deliver,
    Durability,
    Error,
    Event,
    Goodbye,
    GroupDeliver,
    Groups,
    GroupsAction,
    GroupsReply,
    Hello,
    Info,
    InfoReply,
    Ping,
    Pong,
    PubAck,
    Publish,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    TopicInfo,
    Topics,
    TopicsAction,
    TopicsReply,
    UnsubAck,
    Unsubscribe,
    Welcome,
)
from ._readers import DeliverHead, decode_body, decode_frame, deliver_at, frame_at
from ._state import Role, State
from ._subjects import (
    DEFAULT_MAX_TOPIC_BYTES,
    DEFAULT_MAX_TOPIC_DEPTH,
    is_wildcard,
    matches,
    pattern_error,
    tokens_match,
    topic_error,
)
from ._wire import (
    BATCH_HEADER,
    DEFAULT_MAX_FRAME_BYTES,
    ERROR_FIELDS_OPTION,
    FRAME_HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_ACK_RANGES,
    MAX_INFO_ENTRIES,
    PROTOCOL_VERSION,
    RECORD_HEADER,
    RESUME_OPTION_PREFIX,
    UNLIMITED_CREDIT,
    FrameType,
)
from ._writers import (
    deliver_header,
    encode_event,
    encode_puback,
    encode_publish,
    group_deliver_header,
)

__all__ = [
    # framing and fixed limits
    "BATCH_HEADER",
    "DEFAULT_MAX_FRAME_BYTES",
    "ERROR_FIELDS_OPTION",
    "FRAME_HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_ACK_RANGES",
    "MAX_INFO_ENTRIES",
    "PROTOCOL_VERSION",
    "RECORD_HEADER",
    "RESUME_OPTION_PREFIX",
    "UNLIMITED_CREDIT",
    "FrameType",
    # frame-size budgets
    "MAX_RESUME_TOPICS",
    "SERVER_FRAME_ALLOWANCE",
    "MAX_MSG_ID_BYTES",
    "MSG_ID_HEADER",
    "MSG_ID_ROOM",
    "first_msg_id",
    "record_headers",
    "with_msg_id",
    "deliver_overhead",
    "max_deliver_batch",
    "info_entry_size",
    "info_reply_room",
    "max_publish_batch",
    "max_publish_records",
    "publish_overhead",
    "resume_fits",
    "server_frame_limit",
    # events
    "EVENT_TYPES",
    "Ack",
    "AckKind",
    "Credit",
    "Deliver",
    "Durability",
    "Error",
    "Event",
    "Goodbye",
    "GroupDeliver",
    "Groups",
    "GroupsAction",
    "GroupsReply",
    "Hello",
    "Info",
    "InfoReply",
    "Ping",
    "Pong",
    "PubAck",
    "Publish",
    "RefKind",
    "StartKind",
    "SubAck",
    "Subscribe",
    "TopicInfo",
    "Topics",
    "TopicsAction",
    "TopicsReply",
    "UnsubAck",
    "Unsubscribe",
    "Welcome",
    # reading and writing frames
    "DeliverHead",
    "decode_body",
    "decode_frame",
    "deliver_at",
    "deliver_header",
    "encode_event",
    "encode_puback",
    "encode_publish",
    "frame_at",
    "group_deliver_header",
    # the connection
    "CLOSED",
    "NEED_DATA",
    "Connection",
    "Role",
    "State",
    # batches
    "EMPTY_HEADERS",
    "Headers",
    "MalformedBatch",
    "batch_count",
    "check_batch",
    "decode_batch",
    "encode_batch",
    "encode_batch_from_records",
    "encode_headers",
    "encode_record",
    "split_records",
    # topics and patterns
    "DEFAULT_MAX_TOPIC_BYTES",
    "DEFAULT_MAX_TOPIC_DEPTH",
    "is_wildcard",
    "matches",
    "pattern_error",
    "tokens_match",
    "topic_error",
    # errors
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "code_name",
]
