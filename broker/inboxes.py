"""Request/reply inboxes: private to one connection, in memory, short-lived.

A topic whose first token is ``_inbox`` (``_inbox.<token>``, what the
client library's ``request`` subscribes to) is an inbox, not a topic
(protocol.md, "Request and reply"):

- **Owned.** The first connection that subscribes to an inbox by its exact
  name owns it; every other connection's SUBSCRIBE is refused with
  PERMISSION_DENIED, whoever its user is (admins too), with or without
  authentication. A wildcard pattern never delivers an inbox's messages,
  and one that can match only inboxes (``_inbox.*``, ``_inbox.>``) is
  refused. Anyone may publish to an inbox: that is how a reply gets there.
- **Not a topic.** Inboxes are kept here, not in ``Router.topics``, so no
  listing shows them (INFO, HTTP, the dashboard, /metrics) and no HTTP read
  finds them (404). They never reach the log store: each keeps its recent
  replies in memory only, at most ``RETAIN_BYTES`` (and always the newest),
  for a subscriber that lags or replays.
- **Short-lived.** An inbox goes when its owner unsubscribes from it for
  the last time, and ``grace`` seconds after its owner's connection
  closes. Within the grace period a connection of the same user (any
  connection, without authentication: there are no users to tell apart)
  reclaims it with its replies, which is what a reconnecting client does.
  At most ``MAX_IN_GRACE`` inboxes wait in grace; beyond, the oldest goes.

A reply to an inbox that does not exist (never subscribed, or gone) is
acknowledged and dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .router import Subscription, Topic

INBOX_PREFIX = "_inbox"
_PREFIX_DOT = INBOX_PREFIX + "."
#: Bytes of replies an inbox keeps (besides the newest, always kept): what
#: a subscriber that lags, or reclaims the inbox after a reconnect, can
#: still be sent.
RETAIN_BYTES = 64 * 1024
#: Inboxes whose owner left, waiting to be reclaimed; beyond, the oldest goes.
MAX_IN_GRACE = 10_000
#: Default seconds an inbox outlives its owner's connection.
DEFAULT_GRACE = 30.0


def is_inbox(name: str) -> bool:
    """Whether a topic, or a pattern, names inboxes only (first token ``_inbox``)."""
    return name.startswith(_PREFIX_DOT)


def has_wildcard(pattern: str) -> bool:
    return any(t in ("*", ">") for t in pattern.split("."))


class Inbox:
    __slots__ = ("topic", "owner", "user", "expires")

    def __init__(self, topic: Topic, owner: object, user: str | None) -> None:
        self.topic = topic
        #: The owning connection (a Session); None once it closed (grace).
        self.owner: object | None = owner
        #: Its user's name (None without authentication): who may reclaim it.
        self.user = user
        #: trio.current_time() at which an ownerless inbox goes.
        self.expires = math.inf

    def __repr__(self) -> str:
        return f"Inbox({self.topic.name!r}, owned={self.owner is not None})"


class Inboxes:
    """Every inbox of one broker, by name. Synchronous but for :meth:`run`,
    the timer that removes inboxes whose grace period is over."""

    def __init__(
        self,
        make_topic: Callable[[str], Topic],
        grace: float = DEFAULT_GRACE,
        max_in_grace: int = MAX_IN_GRACE,
    ) -> None:
        self._make_topic = make_topic
        self.grace = grace
        self.max_in_grace = max_in_grace
        self._by_name: dict[str, Inbox] = {}
        #: Inboxes by owning connection, so closing one finds its inboxes.
        self._by_owner: dict[object, dict[str, Inbox]] = {}
        #: Ownerless inboxes, oldest first (one grace for all: by expiry).
        self._in_grace: dict[Inbox, None] = {}
        self._wake = trio.Event()

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Inbox | None:
        return self._by_name.get(name)

    @property
    def in_grace(self) -> int:
        return len(self._in_grace)

    # -- subscribing ------------------------------------------------------

    def may_claim(self, name: str, owner: object, user: str | None) -> bool:
        """Whether ``owner`` (a connection of ``user``) may subscribe to the
        inbox ``name``: nobody has it, it has it, or it is its user's in grace."""
        inbox = self._by_name.get(name)
        return (
            inbox is None
            or inbox.owner is owner
            or (inbox.owner is None and inbox.user == user)
        )

    def claim(self, name: str, owner: object, user: str | None) -> Inbox:
        """Make ``owner`` the owner of ``name`` (check :meth:`may_claim` first)."""
        inbox = self._by_name.get(name)
        if inbox is None:
            inbox = self._by_name[name] = Inbox(self._make_topic(name), owner, user)
        elif inbox.owner is None:
            del self._in_grace[inbox]  # reclaimed, replies and offsets kept
            inbox.owner = owner
            inbox.expires = math.inf
        self._by_owner.setdefault(owner, {})[name] = inbox
        return inbox

    def attach(self, sub: Subscription) -> list[Topic]:
        """Route an exact inbox subscription to its inbox, if its session owns it."""
        inbox = self._by_name.get(sub.pattern)
        if inbox is None or inbox.owner is not sub.subscriber:
            return []  # not its own: it gets nothing (the session refused it anyway)
        inbox.topic.subs.append(sub)
        return [inbox.topic]

    def detach(self, sub: Subscription) -> None:
        """A subscription ended. The owner's last one ends the inbox too: the
        owner gave it up (its connection's end is :meth:`release`)."""
        inbox = self._by_name.get(sub.pattern)
        if inbox is None or sub not in inbox.topic.subs:
            return
        # Rebuild rather than mutate: a publish may be iterating the list.
        inbox.topic.subs = [s for s in inbox.topic.subs if s is not sub]
        if not inbox.topic.subs and inbox.owner is sub.subscriber:
            self._drop(inbox)

    def release(self, owner: object, now: float) -> None:
        """``owner``'s connection is closing: its inboxes wait ``grace``
        seconds to be reclaimed (none, with a grace of 0)."""
        owned = self._by_owner.pop(owner, None)
        if not owned:
            return
        for inbox in owned.values():
            if inbox.owner is not owner:
                continue  # (cannot happen: the map follows ownership)
            inbox.owner = None
            if self.grace <= 0:
                self._drop(inbox)
                continue
            inbox.expires = now + self.grace
            self._in_grace[inbox] = None
        while len(self._in_grace) > self.max_in_grace:
            self._drop(next(iter(self._in_grace)))
        self._wake.set()

    # -- publishing -------------------------------------------------------

    def topic(self, name: str) -> Topic:
        """Where a publish to inbox ``name`` goes: the inbox's topic, or, for
        an inbox nobody holds, a topic of its own that nothing keeps (the
        reply is acknowledged and dropped)."""
        inbox = self._by_name.get(name)
        return inbox.topic if inbox is not None else self._make_topic(name)

    def has_receivers(self, name: str) -> bool:
        inbox = self._by_name.get(name)
        return inbox is not None and bool(inbox.topic.subs)

    # -- expiry -----------------------------------------------------------

    def expire(self, now: float) -> None:
        """Remove the inboxes whose grace period is over."""
        while self._in_grace:
            inbox = next(iter(self._in_grace))
            if inbox.expires > now:
                return
            self._drop(inbox)

    def next_expiry(self) -> float:
        if not self._in_grace:
            return math.inf
        return next(iter(self._in_grace)).expires

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The grace timer: removes each inbox when its grace period ends."""
        task_status.started()
        while True:
            self.expire(trio.current_time())
            self._wake = trio.Event()
            with trio.move_on_at(self.next_expiry()):
                await self._wake.wait()

    def _drop(self, inbox: Inbox) -> None:
        name = inbox.topic.name
        if self._by_name.get(name) is inbox:
            del self._by_name[name]
        self._in_grace.pop(inbox, None)
        if inbox.owner is not None:
            owned = self._by_owner.get(inbox.owner)
            if owned is not None:
                owned.pop(name, None)
                if not owned:
                    del self._by_owner[inbox.owner]
        inbox.topic.subs = []
