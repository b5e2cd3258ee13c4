"""Publishing a request body as it is: ``text/plain`` and
``application/octet-stream`` bodies are one message each, what
``curl --data-binary @file`` and most webhooks send.

The payload is the body's bytes, unchanged (no charset is applied, an empty
body is an empty message). Message headers come from request headers named
``X-Pybroker-Header-<name>``: the message header is ``<name>`` lower-cased
(HTTP header names are case-insensitive, so their case is not kept), the
value is the request header's bytes read as UTF-8. A JSON body
(``application/json``, ``application/*+json``, or no Content-Type at all)
is parsed as before (:mod:`.api`) and carries its headers in the JSON.
"""

from __future__ import annotations

from pybroker.protocol import encode_headers

from .messages import JSON, HttpError, Request

#: Request headers that become message headers (lower case, as h11 gives them).
HEADER_PREFIX = "x-pybroker-header-"
RAW_TYPES = frozenset({"text/plain", "application/octet-stream"})


def media_type(request: Request) -> str | None:
    ctype = request.header("content-type")
    return None if ctype is None else ctype.split(";", 1)[0].strip().lower()


def is_json(media: str | None) -> bool:
    return media is None or media == JSON or (media.startswith("application/") and media.endswith("+json"))


def message_headers(request: Request) -> dict[str, str] | None:
    """The ``X-Pybroker-Header-*`` request headers as message headers (None
    when there are none); 400 when a value is not UTF-8, 422 when the
    headers do not fit a message."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        if not name.startswith(HEADER_PREFIX):
            continue
        key = name[len(HEADER_PREFIX) :]
        if not key:
            raise HttpError(400, f"{name!r} names no message header")
        try:
            # The server decodes header bytes as Latin-1: undo it, read UTF-8.
            headers[key] = value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise HttpError(400, f"header {name!r} is not UTF-8") from None
    if not headers:
        return None
    try:
        encode_headers(headers)
    except ValueError as exc:
        raise HttpError(422, f"bad message headers: {exc}") from None
    return headers


def raw_message(request: Request) -> tuple[bytes, dict[str, str] | None] | None:
    """The message a raw body publishes, or None for a JSON body; 415 for
    any other media type."""
    media = media_type(request)
    if is_json(media):
        if any(name.startswith(HEADER_PREFIX) for name in request.headers):
            raise HttpError(
                400, "X-Pybroker-Header-* is for text/plain and application/octet-stream bodies; "
                "a JSON body carries its headers in \"headers\""
            )
        return None
    if media not in RAW_TYPES:
        raise HttpError(
            415,
            f"unsupported Content-Type {request.header('content-type')!r}: "
            "expected application/json, text/plain or application/octet-stream",
        )
    return request.body, message_headers(request)
