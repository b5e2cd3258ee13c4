"""Who is asking: the user a connection or request authenticated as, and
what that user may do (broker/permissions.py), in the form the core checks.

Without a users file there is no user and everything is allowed. A TCP
connection keeps one ``Principal`` for its life, with per-topic decisions
memoised (the publish hot path then costs a dict lookup); an HTTP request
makes a fresh one.
"""

from __future__ import annotations

from collections.abc import Callable

from .auth import User
from .permissions import DecisionCache


def _allow(_: str) -> bool:
    return True


class Principal:
    __slots__ = ("user", "may_publish", "may_read", "may_subscribe")

    def __init__(self, user: User | None = None, *, cached: bool = False) -> None:
        self.user = user
        self.may_publish: Callable[[str], bool] = _allow
        self.may_read: Callable[[str], bool] = _allow
        #: Patterns (plain and group subscriptions, group administration).
        self.may_subscribe: Callable[[str], bool] = _allow
        if user is not None:
            perms = user.permissions
            self.may_publish = DecisionCache(perms.may_publish) if cached else perms.may_publish
            self.may_read = DecisionCache(perms.may_read) if cached else perms.may_read
            self.may_subscribe = perms.may_subscribe

    @property
    def name(self) -> str | None:
        return self.user.name if self.user is not None else None

    @property
    def admin(self) -> bool:
        """Admins (and everyone, without a users file) see every group and
        the broker-wide figures."""
        return self.user is None or self.user.permissions.admin

    def may_manage(self, topic: str) -> bool:
        """Delete or purge ``topic`` (everyone, without a users file)."""
        return self.user is None or self.user.permissions.may_manage(topic)

    def who(self) -> str:
        """How refusals name the asker."""
        return f"user {self.user.name!r}" if self.user is not None else "this connection"


ANYONE = Principal()
