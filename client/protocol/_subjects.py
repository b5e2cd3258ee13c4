"""Topic and pattern syntax (protocol.md, "Topics and patterns").

Pure functions shared by the broker (which enforces them) and the client
(which checks early, so a typo fails in the caller's stack rather than as an
ERROR frame later).
"""

from __future__ import annotations

DEFAULT_MAX_TOPIC_BYTES = 255
DEFAULT_MAX_TOPIC_DEPTH = 16

_FORBIDDEN = frozenset(".*>") | frozenset(chr(c) for c in range(0x20)) | {"\x7f"}


def _token_ok(token: str) -> bool:
    if not token:
        return False
    for ch in token:
        if ch in _FORBIDDEN or ch.isspace():
            return False
    return True


def _check_shape(
    name: str, what: str, max_bytes: int, max_depth: int
) -> list[str] | str:
    """Return the tokens, or a reason string when the overall shape is wrong."""
    if not name:
        return f"{what} is empty"
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return f"{what} is {size} bytes, limit {max_bytes}"
    tokens = name.split(".")
    if len(tokens) > max_depth:
        return f"{what} has {len(tokens)} tokens, limit {max_depth}"
    return tokens


def topic_error(
    topic: str,
    max_bytes: int = DEFAULT_MAX_TOPIC_BYTES,
    max_depth: int = DEFAULT_MAX_TOPIC_DEPTH,
) -> str | None:
    """Why ``topic`` is not a valid publish topic, or None if it is."""
    tokens = _check_shape(topic, "topic", max_bytes, max_depth)
    if isinstance(tokens, str):
        return tokens
    for token in tokens:
        if not _token_ok(token):
            return f"invalid token {token!r} in topic {topic!r}"
    return None


def pattern_error(
    pattern: str,
    max_bytes: int = DEFAULT_MAX_TOPIC_BYTES,
    max_depth: int = DEFAULT_MAX_TOPIC_DEPTH,
) -> str | None:
    """Why ``pattern`` is not a valid subscription pattern, or None if it is."""
    tokens = _check_shape(pattern, "pattern", max_bytes, max_depth)
    if isinstance(tokens, str):
        return tokens
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if token == "*":
            continue
        if token == ">":
            if i != last:
                return f"'>' must be the last token in {pattern!r}"
            continue
        if not _token_ok(token):
            return f"invalid token {token!r} in pattern {pattern!r}"
    return None


def is_wildcard(pattern: str) -> bool:
    return any(t in ("*", ">") for t in pattern.split("."))


def matches(pattern: str, topic: str) -> bool:
    """Whether a valid ``pattern`` matches a valid ``topic``."""
    return tokens_match(pattern.split("."), topic.split("."))


def tokens_match(pattern: list[str], topic: list[str]) -> bool:
    n = len(pattern)
    for i, token in enumerate(pattern):
        if token == ">":
            # One or more trailing tokens: the topic must have at least one
            # token at this position.
            return len(topic) > i
        if i >= len(topic):
            return False
        if token != "*" and token != topic[i]:
            return False
    return len(topic) == n
