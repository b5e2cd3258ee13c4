"""Checking what a request names or asks for: 400 with the reason when it is wrong."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from ..router import Topic
from .messages import HttpError, Request

if TYPE_CHECKING:
    from .server import HttpServer

#: Offsets are u64 on the wire.
MAX_OFFSET = (1 << 63) - 1


def valid_topic(http: HttpServer, name: str) -> str:
    """``name`` if it is a valid topic name (not a pattern); else 400."""
    problem = http.broker.topic_problem(name)
    if problem is not None:
        raise HttpError(400, f"bad topic name: {problem}", code="bad_topic")
    return name


def existing_topic(http: HttpServer, name: str) -> Topic:
    """The topic called ``name``: 400 for a bad name, 404 when it does not exist."""
    topic = http.broker.router.topics.get(name)
    if topic is None:
        valid_topic(http, name)
        raise HttpError(404, f"no such topic: {name}", code="topic_not_found")
    return topic


def check_query(request: Request, allowed: Collection[str]) -> None:
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        known = ", ".join(sorted(allowed)) or "none"
        raise HttpError(400, f"unknown query parameter {unknown[0]!r} (known: {known})")


def parse_int(text: str, what: str, low: int, high: int) -> int:
    """A decimal integer in [low, high]; else 400 naming ``what``."""
    stripped = text.strip()
    if not stripped or len(stripped) > 20 or not stripped.isascii() or not stripped.isdigit():
        raise HttpError(400, f"{what} must be a whole number from {low} to {high}, got {text!r}")
    value = int(stripped)
    if not low <= value <= high:
        raise HttpError(400, f"{what} must be from {low} to {high}, got {value}")
    return value


def parse_offset(text: str, what: str) -> int:
    return parse_int(text, what, 0, MAX_OFFSET)
