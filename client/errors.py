"""Exceptions the client library raises."""

from __future__ import annotations

from .protocol import ErrorCode
from .protocol.errors import code_name


class BrokerError(Exception):
    """The broker refused a request (an ERROR frame), with its numeric code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code_name(code)} ({code}): {message}")
        self.code = code
        self.message = message

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


def broker_error(code: int, message: str) -> BrokerError:
    """The most specific exception for an ERROR frame's code."""
    if code == ErrorCode.AUTH_FAILED:
        return AuthenticationError(code, message)
    if code == ErrorCode.PERMISSION_DENIED:
        return PermissionDenied(code, message)
    if code == ErrorCode.NO_RECEIVERS:
        return NoReceivers(code, message)
    return BrokerError(code, message)


class MessageTooLarge(ValueError):
    """A message that cannot fit one frame under the broker's max_frame_bytes;
    raised before anything is sent (protocol.md, "Limits")."""
