"""Who is asking and what they may see, for the HTTP side.

With a users file (``Config.auth_file``) every request but ``/healthz`` and
``/readyz`` (probes of load balancers and orchestrators, which reveal
nothing) needs ``Authorization: Bearer <token>`` or ``Basic`` with a user
name and password: 401 with ``WWW-Authenticate`` when it is missing or
wrong. Then the user's permissions (broker/permissions.py) apply as on the
binary protocol: publishing needs publish permission on the topic, reading
(topic figures, messages, events) subscribe permission, topic lists show
only readable topics, and the broker-wide figures (``/metrics``,
``/v1/broker``) need ``admin = true``. Refusals are 403. Without a users
file every request is allowed, as before. Request/reply inboxes belong to
the TCP connection that owns them (broker/inboxes.py): no HTTP request
lists or reads one (404), whoever asks.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from pybroker.protocol import ErrorCode

from ..core import Refused
from ..principal import Principal
from .messages import HttpError, Request

if TYPE_CHECKING:
    from .server import HttpServer

#: Paths answered without credentials.
OPEN_PATHS = frozenset({("healthz",), ("readyz",)})
CHALLENGE = 'Bearer realm="pybroker", Basic realm="pybroker", charset="UTF-8"'


async def authenticate(http: HttpServer, request: Request) -> Request:
    """``request`` with its user set, or 401. Basic runs scrypt in a worker
    thread (bounded by the authenticator's limiter), never on the loop."""
    auth = http.broker.auth
    if auth is None or request.segments in OPEN_PATHS:
        return request
    header = request.header("authorization")
    if header is None:
        raise HttpError(401, "authentication required", headers={"www-authenticate": CHALLENGE})
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    user = None
    method = scheme.lower()
    if method == "bearer" and value:
        user = auth.by_token(value)
    elif method == "basic" and value:
        try:
            # latin-1 is what headers arrive as; the credentials are UTF-8.
            decoded = base64.b64decode(value.encode("latin-1"), validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeError):
            decoded = ""
        name, sep, password = decoded.partition(":")
        if sep and name:
            user = await auth.by_password(name, password)
    if user is None:
        http.logger.warning(
            "http authentication failed", method=method, peer=request.peer, path=request.path
        )
        raise HttpError(401, "authentication failed", headers={"www-authenticate": CHALLENGE})
    return attrs.evolve(request, user=user)


def _forbidden(request: Request, what: str) -> HttpError:
    name = request.user.name if request.user is not None else "?"
    return HttpError(403, f"user {name!r} may not {what}", code="permission_denied")


def require_read(request: Request, topic: str) -> None:
    if request.user is not None and not request.user.permissions.may_read(topic):
        raise _forbidden(request, f"read {topic!r}")


def require_publish(request: Request, topic: str) -> None:
    if request.user is not None and not request.user.permissions.may_publish(topic):
        raise _forbidden(request, f"publish to {topic!r}")


def require_admin(request: Request) -> None:
    if request.user is not None and not request.user.permissions.admin:
        raise _forbidden(request, f"read {request.path} (needs admin = true)")


def readable(request: Request) -> Callable[[str], bool]:
    """Filter for topic lists."""
    if request.user is None:
        return lambda topic: True
    return request.user.permissions.may_read


def principal(request: Request) -> Principal:
    """Who sent the request, as the broker core checks it."""
    return Principal(request.user)


#: HTTP status and error ``code`` of each refusal of the core.
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.PERMISSION_DENIED: (403, "permission_denied"),
    ErrorCode.BAD_TOPIC: (400, "bad_topic"),
    ErrorCode.BAD_PATTERN: (400, "bad_pattern"),
    ErrorCode.BATCH_LIMIT: (422, "unprocessable_entity"),
    ErrorCode.UNKNOWN_GROUP: (404, "group_not_found"),
    ErrorCode.UNKNOWN_TOPIC: (404, "topic_not_found"),
    ErrorCode.STORAGE_FULL: (507, "storage_full"),
    ErrorCode.STORAGE_ERROR: (503, "storage_error"),
    ErrorCode.NOT_OWNER: (421, "not_owner"),
    ErrorCode.PARTITIONED: (409, "partitioned"),
}


def refused(refusal: Refused) -> HttpError:
    """The HTTP answer to a refusal of the core."""
    status, code = _STATUS.get(refusal.code, (400, "bad_request"))
    if refusal.code == ErrorCode.NOT_OWNER:
        # Where to send it: the owner's TCP address and, when it serves
        # HTTP, its URL (docs/cluster.md §8).
        where = {k: refusal.fields[k] for k in ("owner", "owner_url") if refusal.fields.get(k)}
        return HttpError(status, refusal.message, code=code, details=where)
    if refusal.code == ErrorCode.PARTITIONED:
        # Publish to one of its partitions (protocol.md, "Partitioned topics").
        return HttpError(status, refusal.message, code=code, details={"partitions": int(refusal.fields["partitions"])})
    return HttpError(status, refusal.message, code=code)
