"""Exceptions the client library raises."""

from __future__ import annotations

from collections.abc import Mapping

from .protocol import ErrorCode, code_name


class BrokerError(Exception):
    """The broker refused a request (an ERROR frame), with its numeric code
    and, where the broker gives them, machine-readable ``fields``."""

    def __init__(self, code: int, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code_name(code)} ({code}): {message}")
        self.code = code
        self.message = message
        self.fields: Mapping[str, str] = dict(fields or {})

    @property
    def error_code(self) -> ErrorCode | None:
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


class ConnectionClosed(Exception):
    """The connection ended; requests still waiting fail with this."""


class NoReceivers(BrokerError):
    """A request matched no subscription or group: nobody could answer it."""


class AuthenticationError(BrokerError):
    """The broker refused the credentials (AUTH_FAILED): raised by ``connect()``.

    The broker does not say which part was wrong, and neither can we."""


class PermissionDenied(BrokerError):
    """The authenticated user may not publish to, subscribe to or administer
    that topic or group (PERMISSION_DENIED); the connection stays open."""


class StorageFull(BrokerError):
    """The broker's disk (or its --min-free-bytes reserve) is full: that
    publish was not stored. The connection stays open; publishing works
    again once the broker has space (STORAGE_FULL)."""


class StorageError(BrokerError):
    """The broker's storage failed to write or fsync that publish, which was
    not stored and will never be delivered (STORAGE_ERROR)."""


class NotOwner(BrokerError):
    """Cluster mode: the broker does not own that publish's (or group's)
    topic; nothing was stored or made (NOT_OWNER). ``fields["owner"]`` is the owner's
    ``host:port`` (absent while the topic has none). A client with
    reconnecting on follows it by itself; this is raised only when it
    cannot (reconnecting off, or too many moves in a row)."""


class Partitioned(BrokerError):
    """That publish went to a topic made of partitions (PARTITIONED);
    nothing was stored. The client library publishes to the partitions by
    itself once it has seen this; it is raised only for what it cannot
    move (a delayed publish: send it again). ``fields["partitions"]`` is
    the topic's partition count."""


_BY_CODE: dict[int, type[BrokerError]] = {
    ErrorCode.AUTH_FAILED: AuthenticationError,
    ErrorCode.PERMISSION_DENIED: PermissionDenied,
    ErrorCode.NO_RECEIVERS: NoReceivers,
    ErrorCode.STORAGE_FULL: StorageFull,
    ErrorCode.STORAGE_ERROR: StorageError,
    ErrorCode.NOT_OWNER: NotOwner,
    ErrorCode.PARTITIONED: Partitioned,
}


def broker_error(code: int, message: str, fields: Mapping[str, str] | None = None) -> BrokerError:
    """The most specific exception for an ERROR frame's code."""
    return _BY_CODE.get(code, BrokerError)(code, message, fields)


class Timeout(TimeoutError):
    """An operation did not finish within its timeout: connecting, a request
    waiting for its reply, a flush. The message names the operation and the
    topic (or broker address). A ``TimeoutError``, so ``except
    TimeoutError`` catches it under any event loop."""


class MessageTooLarge(ValueError):
    """A message that cannot fit one frame under the broker's max_frame_bytes;
    raised before anything is sent (protocol.md, "Limits")."""
