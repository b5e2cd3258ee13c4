"""What handlers see and return: a parsed request, a response, an HTTP error.

No I/O here. The connection loop (:mod:`.server`) builds a :class:`Request`
from h11's events and turns a :class:`Response` (or a streamed one) back
into h11 events; :class:`HttpError` anywhere becomes a JSON error body
``{"error": message, "code": name, "status": status}``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ..auth import User

JSON = "application/json"

#: The machine-readable ``code`` of each error status.
ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
    505: "http_version_not_supported",
    507: "insufficient_storage",
}


class HttpError(Exception):
    """Answer the request with ``status`` and a JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or ERROR_CODES.get(status, "error")
        self.headers = dict(headers or {})
        #: More of the answer, as data (421 not_owner: where to go; 409
        #: partitioned: how many partitions).
        self.details = dict(details or {})

    def response(self) -> Response:
        body = {**self.details, "error": self.message, "code": self.code, "status": self.status}
        return json_response(body, self.status, headers=self.headers)


@attrs.frozen
class Request:
    method: str
    #: Path segments, percent-decoded one by one ("/v1/topics/a%2Fb" ->
    #: ["v1", "topics", "a/b"]), so a segment may hold any character.
    segments: tuple[str, ...]
    path: str
    #: Query parameters; a name given twice is refused before handlers run.
    query: Mapping[str, str]
    #: Header names lower-cased, values decoded as Latin-1; repeated names
    #: joined with ", ".
    headers: Mapping[str, str]
    body: bytes
    conn_id: int
    peer: str
    #: Who sent it, when the broker has a users file (set by .access).
    user: User | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        """The body as JSON: 415 for another media type, 400 when it does not parse."""
        ctype = self.headers.get("content-type")
        if ctype is not None:
            media = ctype.split(";", 1)[0].strip().lower()
            if media != JSON and not (media.startswith("application/") and media.endswith("+json")):
                raise HttpError(415, f"expected Content-Type: {JSON}, got {ctype!r}")
        if not self.body:
            raise HttpError(400, "the request has no body; expected a JSON object")
        try:
            return json.loads(self.body)
        except UnicodeDecodeError:
            raise HttpError(400, "the body is not UTF-8") from None
        except ValueError as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc}") from None


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: Mapping[str, str] = attrs.field(factory=dict)


#: Writes one chunk of a streamed body; returns when the peer has taken it.
Send = Callable[[bytes], Awaitable[None]]


@attrs.frozen
class StreamResponse:
    """A response whose body is produced over time (Server-Sent Events).

    ``produce(send)`` writes chunks with ``send`` until it returns (the body
    ends) or is cancelled (the peer went away or the server is stopping).
    The connection is closed afterwards.
    """

    status: int
    content_type: str
    produce: Callable[[Send], Awaitable[None]]
    headers: Mapping[str, str] = attrs.field(factory=dict)


def json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def json_response(
    value: Any, status: int = 200, *, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(status, json_body(value), JSON, dict(headers or {}))
