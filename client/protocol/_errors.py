"""Error codes of the wire protocol and the exceptions that carry them.

As in h11, errors are split by who broke the protocol: ``RemoteProtocolError``
when the peer sent something invalid, ``LocalProtocolError`` when our own code
tried to send something invalid. Both carry the numeric code that goes into
the ERROR frame, so sessions never match on message strings.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Numeric codes of the ERROR frame (protocol.md, "ERROR")."""

    MALFORMED_FRAME = 100
    UNKNOWN_FRAME_TYPE = 101
    FRAME_TOO_LARGE = 102
    UNSUPPORTED_VERSION = 103
    HANDSHAKE_REQUIRED = 104
    UNEXPECTED_FRAME = 105
    AUTH_FAILED = 106
    IDLE_TIMEOUT = 107
    TOO_MANY_CONNECTIONS = 108
    BAD_TOPIC = 200
    BAD_PATTERN = 201
    CHECKSUM_MISMATCH = 202
    BATCH_LIMIT = 203
    UNKNOWN_SUBSCRIPTION = 204
    DUPLICATE_SUBSCRIPTION = 205
    TOO_MANY_SUBSCRIPTIONS = 206
    BAD_REQUEST = 207
    DATA_LOST = 208
    NO_RECEIVERS = 209
    UNKNOWN_GROUP = 210
    PERMISSION_DENIED = 211
    STORAGE_FULL = 212
    STORAGE_ERROR = 213
    UNKNOWN_TOPIC = 216
    TOPIC_DELETED = 217
    NOT_OWNER = 218
    PARTITIONED = 219
    INTERNAL_ERROR = 500
    SHUTTING_DOWN = 503

    @property
    def fatal(self) -> bool:
        """Connection-level errors (1xx) and internal errors close the connection."""
        return self < 200 or self == ErrorCode.INTERNAL_ERROR


def code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"UNKNOWN_{code}"


class ProtocolError(Exception):
    """A violation of protocol.md, carrying the code for the ERROR frame."""

    def __init__(self, code: ErrorCode, message: str, ref: int = 0) -> None:
        super().__init__(f"{code.name} ({int(code)}): {message}")
        self.code = code
        self.message = message
        self.ref = ref


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""
