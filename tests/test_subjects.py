"""Topic and pattern syntax and matching (protocol.md, "Topics and patterns")."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pybroker.protocol import (
    DEFAULT_MAX_TOPIC_BYTES,
    DEFAULT_MAX_TOPIC_DEPTH,
    is_wildcard,
    matches,
    pattern_error,
    topic_error,
)

PROPERTY = settings(max_examples=250, deadline=None)

# --------------------------------------------------------------------------
# Validity

VALID_TOPICS = [
    "orders",
    "orders.eu.created",
    "a",
    "a.b",
    "A-b_c:d/e#f@g",
    "émoji.🎉.ünïcode",
    "日本.東京",
    "x" * DEFAULT_MAX_TOPIC_BYTES,  # exactly at the byte limit
    ".".join(["t"] * DEFAULT_MAX_TOPIC_DEPTH),  # exactly at the depth limit
    "a\x80b",  # C1 code points are not in the forbidden set (< 0x20, 0x7F)
]

INVALID_TOPICS = [
    pytest.param("", id="empty"),
    pytest.param(".", id="only-dot"),
    pytest.param("a..b", id="empty-token-middle"),
    pytest.param(".a", id="empty-token-first"),
    pytest.param("a.", id="empty-token-last"),
    pytest.param("*", id="star"),
    pytest.param(">", id="gt"),
    pytest.param("a.*", id="star-token"),
    pytest.param("a.>", id="gt-token"),
    pytest.param("a.*.b", id="star-middle"),
    pytest.param("ord*", id="star-in-token"),
    pytest.param("ord>", id="gt-in-token"),
    pytest.param("a b", id="space"),
    pytest.param(" a", id="leading-space"),
    pytest.param("a ", id="trailing-space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\rb", id="cr"),
    pytest.param("a\u00a0b", id="nbsp"),
    pytest.param("a\u3000b", id="ideographic-space"),
    pytest.param("a\u2028b", id="line-separator"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\x01b", id="ctrl-01"),
    pytest.param("a\x1fb", id="ctrl-1f"),
    pytest.param("a\x7fb", id="del"),
    pytest.param("x" * (DEFAULT_MAX_TOPIC_BYTES + 1), id="too-long"),
    pytest.param("é" * 128, id="too-long-in-bytes-not-chars"),  # 128 chars, 256 bytes
    pytest.param(".".join(["t"] * (DEFAULT_MAX_TOPIC_DEPTH + 1)), id="too-deep"),
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topic(topic: str) -> None:
    assert topic_error(topic) is None


@pytest.mark.parametrize("topic", INVALID_TOPICS)
def test_invalid_topic(topic: str) -> None:
    reason = topic_error(topic)
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_every_valid_topic_is_a_valid_pattern(topic: str) -> None:
    assert pattern_error(topic) is None


VALID_PATTERNS = [
    "orders",
    "orders.eu.created",
    "*",
    ">",
    "orders.*",
    "*.eu",
    "*.*.*",
    "orders.>",
    "*.>",
    "a.*.c.>",
    "émoji.*.>",
    ".".join(["*"] * DEFAULT_MAX_TOPIC_DEPTH),
    ".".join(["*"] * (DEFAULT_MAX_TOPIC_DEPTH - 1) + [">"]),
]

INVALID_PATTERNS = [
    pytest.param("", id="empty"),
    pytest.param(".", id="only-dot"),
    pytest.param("a..b", id="empty-token"),
    pytest.param("a.", id="empty-token-last"),
    pytest.param(".>", id="empty-token-before-gt"),
    pytest.param("*..>", id="empty-token-between-wildcards"),
    pytest.param(">.a", id="gt-first-of-two"),
    pytest.param("a.>.b", id="gt-middle"),
    pytest.param(">.>", id="gt-twice"),
    pytest.param(">.*", id="gt-before-star"),
    pytest.param("ord*", id="star-in-token"),
    pytest.param("*ord", id="star-prefix"),
    pytest.param("a.**", id="double-star"),
    pytest.param("a.b>", id="gt-in-token"),
    pytest.param("a.>>", id="double-gt"),
    pytest.param("a.*>", id="star-gt"),
    pytest.param("a b.*", id="space"),
    pytest.param("a.* ", id="space-after-star"),
    pytest.param("a.\t>", id="tab"),
    pytest.param("a\x00.*", id="nul"),
    pytest.param("a\x7f.>", id="del"),
    pytest.param("*" + ".*" * DEFAULT_MAX_TOPIC_DEPTH, id="too-deep"),
    pytest.param("x" * (DEFAULT_MAX_TOPIC_BYTES - 1) + ".>", id="too-long"),
]


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_pattern(pattern: str) -> None:
    assert pattern_error(pattern) is None


@pytest.mark.parametrize("pattern", INVALID_PATTERNS)
def test_invalid_pattern(pattern: str) -> None:
    reason = pattern_error(pattern)
    assert isinstance(reason, str) and reason


def test_custom_limits() -> None:
    assert topic_error("abcd", max_bytes=4) is None
    assert topic_error("abcde", max_bytes=4) is not None
    assert topic_error("é.é", max_bytes=5) is None  # 5 bytes
    assert topic_error("é.éa", max_bytes=5) is not None  # 6 bytes
    assert topic_error("a.b.c", max_depth=3) is None
    assert topic_error("a.b.c.d", max_depth=3) is not None
    assert pattern_error("*.*.>", max_depth=3) is None
    assert pattern_error("*.*.*.>", max_depth=3) is not None
    assert pattern_error("ab.>", max_bytes=4) is None
    assert pattern_error("abc.>", max_bytes=4) is not None


def test_is_wildcard() -> None:
    assert is_wildcard("*")
    assert is_wildcard(">")
    assert is_wildcard("a.*.b")
    assert is_wildcard("a.>")
    assert not is_wildcard("a.b")
    assert not is_wildcard("orders")


# --------------------------------------------------------------------------
# Matching


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        # exact
        ("orders", "orders", True),
        ("orders.eu", "orders.eu", True),
        ("orders", "orders.eu", False),
        ("orders.eu", "orders", False),
        ("orders.eu", "orders.us", False),
        ("orders", "order", False),
        ("order", "orders", False),
        # "*" is exactly one token (protocol.md examples)
        ("orders.*", "orders.eu", True),
        ("orders.*", "orders", False),
        ("orders.*", "orders.eu.created", False),
        ("*", "orders", True),
        ("*", "orders.eu", False),
        ("*.eu", "orders.eu", True),
        ("*.eu", "orders.us", False),
        ("*.*", "a.b", True),
        ("*.*", "a", False),
        ("*.*", "a.b.c", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("a.*.c", "a.c", False),
        # ">" is one or more trailing tokens
        ("orders.>", "orders.eu", True),
        ("orders.>", "orders.eu.created", True),
        ("orders.>", "orders", False),
        ("orders.>", "other.eu", False),
        ("a.*.>", "a.b.c", True),
        ("a.*.>", "a.b.c.d.e", True),
        ("a.*.>", "a.b", False),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        # ">" alone matches every topic
        (">", "a", True),
        (">", "orders.eu.created", True),
        (">", ".".join(["t"] * DEFAULT_MAX_TOPIC_DEPTH), True),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert pattern_error(pattern) is None
    assert topic_error(topic) is None
    assert matches(pattern, topic) is expected


def reference_matches(pattern: str, topic: str) -> bool:
    """The obvious regex translation of protocol.md's wildcard rules."""
    parts: list[str] = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r".+")
        else:
            parts.append(re.escape(token))
    return re.fullmatch(r"\.".join(parts), topic, flags=re.DOTALL) is not None


# A small alphabet so that generated patterns and topics actually collide.
small_tokens = st.sampled_from(["a", "b", "c", "ab", "é", "x-y"])
any_tokens = st.text(
    alphabet=st.characters(
        codec="utf-8",
        exclude_characters=".*>",
        exclude_categories=["Cc", "Zs", "Zl", "Zp"],
    ),
    min_size=1,
    max_size=6,
).filter(lambda t: not any(ch.isspace() for ch in t))
tokens = st.one_of(small_tokens, small_tokens, any_tokens)


@st.composite
def topics(draw: st.DrawFn) -> str:
    return ".".join(draw(st.lists(tokens, min_size=1, max_size=6)))


@st.composite
def patterns(draw: st.DrawFn) -> str:
    body = draw(st.lists(st.one_of(tokens, st.just("*")), min_size=1, max_size=6))
    if draw(st.booleans()):
        body[-1] = ">"
    return ".".join(body)


@st.composite
def pattern_for(draw: st.DrawFn, topic: str) -> str:
    """A pattern derived from ``topic`` (often matching, sometimes not)."""
    toks = topic.split(".")
    out = [draw(st.sampled_from([t, "*", t, "a"])) for t in toks]
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(out) - 1))
        out = out[:cut] + [">"]
    return ".".join(out)


@PROPERTY
@given(topic=topics())
def test_generated_topics_are_valid(topic: str) -> None:
    assert topic_error(topic) is None
    assert pattern_error(topic) is None


@PROPERTY
@given(pattern=patterns())
def test_generated_patterns_are_valid(pattern: str) -> None:
    assert pattern_error(pattern) is None
    if is_wildcard(pattern):
        assert topic_error(pattern) is not None


@PROPERTY
@given(pattern=patterns(), topic=topics())
def test_matches_agrees_with_regex_reference(pattern: str, topic: str) -> None:
    assert matches(pattern, topic) is reference_matches(pattern, topic)


@PROPERTY
@given(data=st.data(), topic=topics())
def test_matches_agrees_with_reference_on_derived_patterns(data: st.DataObject, topic: str) -> None:
    pattern = data.draw(pattern_for(topic))
    assert pattern_error(pattern) is None
    assert matches(pattern, topic) is reference_matches(pattern, topic)


@PROPERTY
@given(topic=topics())
def test_topic_matches_itself_and_gt(topic: str) -> None:
    assert matches(topic, topic)
    assert matches(">", topic)
    depth = len(topic.split("."))
    assert matches(".".join(["*"] * depth), topic)
    assert not matches(".".join(["*"] * (depth + 1)), topic)
    if depth > 1:
        assert not matches(".".join(["*"] * (depth - 1)), topic)
        assert matches(".".join(["*"] * (depth - 1) + [">"]), topic)
    assert not matches(topic + ".>", topic)


@PROPERTY
@given(text=st.text(max_size=40))
def test_validators_never_raise(text: str) -> None:
    t = topic_error(text)
    p = pattern_error(text)
    assert t is None or isinstance(t, str)
    assert p is None or isinstance(p, str)
    # A valid topic is always a valid pattern.
    if t is None:
        assert p is None
