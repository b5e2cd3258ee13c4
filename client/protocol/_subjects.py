"""Topic and pattern syntax (protocol.md, "Topics and patterns").

Pure functions shared by the broker (which enforces them) and the client
(which checks early, so a typo fails in the caller's stack rather than as an
ERROR frame later).
"""

from __future__ import annotations

import zlib

DEFAULT_MAX_TOPIC_BYTES = 255
DEFAULT_MAX_TOPIC_DEPTH = 16
#: Partitions a topic may be created with (protocol.md, "Partitioned topics").
MAX_PARTITIONS = 4096
#: Partition ``p`` of topic ``orders`` is the topic ``orders~p``.
PARTITION_MARK = "~"

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


def partition_of(topic: str) -> tuple[str, int] | None:
    """``(base, p)`` when ``topic`` names partition ``p`` of topic ``base``
    (``orders~3``: its last token ends in ``~`` and a partition number,
    decimal without leading zeros, below MAX_PARTITIONS); else None."""
    mark = topic.rfind(PARTITION_MARK)
    if mark <= 0:
        return None
    digits = topic[mark + 1 :]
    if not digits.isdigit() or not digits.isascii() or (len(digits) > 1 and digits[0] == "0"):
        return None
    p = int(digits)
    if p >= MAX_PARTITIONS or topic[mark - 1] == ".":
        return None
    return topic[:mark], p


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition a message whose ``key`` header is ``key`` goes to:
    ``zlib.crc32`` of its UTF-8, mod the topic's partition count (the rule
    every client keeps, so one key's messages stay in one partition)."""
    if partitions < 1:
        raise ValueError("a topic has at least one partition")
    data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    return zlib.crc32(data) % partitions


def partition_topic(base: str, partition: int) -> str:
    """The name of partition ``partition`` of topic ``base``."""
    return f"{base}{PARTITION_MARK}{partition}"


def matches(pattern: str, topic: str) -> bool:
    """Whether a valid ``pattern`` matches a valid ``topic``."""
    return tokens_match(pattern.split("."), topic.split("."))


def tokens_match(pattern: list[str], topic: list[str]) -> bool:
    """Whether ``pattern``'s tokens match ``topic``'s; a partition of a
    topic (``orders~3``) is matched by what matches the topic (``orders``)
    as well as by what matches its own name."""
    if _tokens_match(pattern, topic):
        return True
    last = topic[-1]
    if PARTITION_MARK not in last:
        return False
    named = partition_of(last)
    return named is not None and _tokens_match(pattern, [*topic[:-1], named[0]])


def _tokens_match(pattern: list[str], topic: list[str]) -> bool:
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
