"""Per-user publish and subscribe permissions: allow and deny topic patterns.

The rules (also in protocol.md, "Authentication and permissions"):

- **Publish** to a topic: some publish-allow pattern matches it and no
  publish-deny pattern does (deny wins).
- **Subscribe** to a pattern (plain or as a consumer group member), and
  **read** a topic (INFO, GROUPS, HTTP reads, SSE): the pattern must be
  *covered* by one subscribe-allow pattern (every topic it can match, that
  allow matches too) and must not *overlap* any subscribe-deny pattern (no
  topic matches both). So a wildcard subscription that could ever reach a
  forbidden topic, even one that does not exist yet, is refused at SUBSCRIBE
  time; nothing is filtered during fan-out, which stays as fast as without
  authentication. Coverage by a single allow is deliberate: it keeps the
  rule explainable (allow ``a.x`` and ``a.y`` does not grant ``a.*``, which
  could also reach ``a.z``).
- **Inboxes** (request/reply, protocol.md "Request and reply"): every user
  may subscribe to an inbox (a topic whose first token is ``_inbox``) by its
  exact name and publish to any inbox, so ``request`` and ``respond`` work
  without listing them; an explicit deny of ``_inbox...`` patterns still
  wins. Which connection may subscribe to which inbox is not a permission
  but ownership (broker/inboxes.py): the first connection to subscribe
  owns it, and every other one is refused, whatever its user may do.

Patterns use the topic syntax of protocol.md ("Topics and patterns"): ``*``
matches one token, a last ``>`` one or more. The pattern algebra below
works on token lists, so it is exact, not an approximation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs

from pybroker.protocol import tokens_match

from .inboxes import INBOX_PREFIX

#: Cached per-topic decisions per session; past this the cache starts over
#: (a client publishing to ever-new topic names must not grow memory).
DECISION_CACHE_LIMIT = 4096


def overlaps(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether some topic matches both patterns (given as token lists)."""
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b):
            return False  # one is exhausted, the other still needs tokens
        x, y = a[i], b[i]
        if x == ">" or y == ">":
            # ">" takes one or more tokens and the other side has at least
            # one left here, which any suffix of tokens can satisfy.
            return True
        if x != "*" and y != "*" and x != y:
            return False
    return True


def covers(outer: Sequence[str], inner: Sequence[str]) -> bool:
    """Whether every topic ``inner`` matches is matched by ``outer``."""
    for i, o in enumerate(outer):
        if o == ">":
            return len(inner) > i  # inner has >= 1 token (or its own ">") here
        if i >= len(inner):
            return False
        t = inner[i]
        if t == ">":
            return False  # inner reaches arbitrary depths, outer stops
        if o != "*" and t != o:
            return False  # also when t is "*": it matches more than o
    return len(inner) == len(outer)


def _split(patterns: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(p.split(".")) for p in patterns)


@attrs.frozen
class Permissions:
    """One user's allow and deny patterns (already validated)."""

    publish_allow: tuple[str, ...] = ()
    publish_deny: tuple[str, ...] = ()
    subscribe_allow: tuple[str, ...] = ()
    subscribe_deny: tuple[str, ...] = ()
    #: May list, inspect and delete every consumer group and read the
    #: broker-wide HTTP figures (/metrics, /v1/broker); grants no publish
    #: or subscribe right.
    admin: bool = False
    #: Topics it may delete and purge (TOPICS); admins may manage every topic.
    manage_allow: tuple[str, ...] = ()
    manage_deny: tuple[str, ...] = ()
    _pa: tuple[tuple[str, ...], ...] = attrs.field(init=False, eq=False, repr=False)
    _pd: tuple[tuple[str, ...], ...] = attrs.field(init=False, eq=False, repr=False)
    _sa: tuple[tuple[str, ...], ...] = attrs.field(init=False, eq=False, repr=False)
    _sd: tuple[tuple[str, ...], ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_pa", _split(self.publish_allow))
        object.__setattr__(self, "_pd", _split(self.publish_deny))
        object.__setattr__(self, "_sa", _split(self.subscribe_allow))
        object.__setattr__(self, "_sd", _split(self.subscribe_deny))

    def may_publish(self, topic: str) -> bool:
        tokens = topic.split(".")
        if any(tokens_match(list(d), tokens) for d in self._pd):
            return False
        if len(tokens) >= 2 and tokens[0] == INBOX_PREFIX:
            return True  # replies to requests (module docstring)
        return any(tokens_match(list(a), tokens) for a in self._pa)

    def may_subscribe(self, pattern: str) -> bool:
        """Plain and group subscriptions, and reading one topic (a topic is a
        pattern without wildcards)."""
        tokens = pattern.split(".")
        if any(overlaps(d, tokens) for d in self._sd):
            return False
        if len(tokens) >= 2 and tokens[0] == INBOX_PREFIX and "*" not in tokens and ">" not in tokens:
            return True  # an inbox by its exact name; ownership is the session's check
        return any(covers(a, tokens) for a in self._sa)

    def may_read(self, topic: str) -> bool:
        return self.may_subscribe(topic)

    def may_manage(self, topic: str) -> bool:
        """Delete or purge ``topic``: admins, and users whose ``manage``
        patterns allow it (and do not deny it)."""
        if self.admin:
            return True
        tokens = topic.split(".")
        if any(tokens_match(d.split("."), tokens) for d in self.manage_deny):
            return False
        return any(tokens_match(a.split("."), tokens) for a in self.manage_allow)


class DecisionCache:
    """Per-session memo of a per-topic decision: the publish hot path does a
    dict lookup instead of pattern matching."""

    __slots__ = ("_decide", "_known")

    def __init__(self, decide: Callable[[str], bool]) -> None:
        self._decide = decide
        self._known: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        known = self._known.get(name)
        if known is None:
            if len(self._known) >= DECISION_CACHE_LIMIT:
                self._known.clear()
            known = self._known[name] = self._decide(name)
        return known
