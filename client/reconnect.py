"""When and how often a client tries to get its connection back.

Exponential backoff with jitter, as AWS's "Exponential Backoff And Jitter"
recommends: when a broker restarts, every client lost its connection at the
same moment, and without jitter they would all come back in the same
millisecond, again and again.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import attrs

from .protocol import ErrorCode

#: Fatal errors after which trying again is reasonable: the broker (or this
#: connection) went away, not the client being refused or misbehaving.
RETRYABLE_CODES = frozenset(
    {
        ErrorCode.IDLE_TIMEOUT,
        ErrorCode.TOO_MANY_CONNECTIONS,
        ErrorCode.INTERNAL_ERROR,
        ErrorCode.SHUTTING_DOWN,
    }
)


@attrs.frozen
class Reconnect:
    """``connect(url, reconnect=Reconnect(...))``; ``reconnect=True`` uses the defaults.

    The n-th attempt (from 0) waits ``min(max_delay, initial_delay *
    multiplier**n)`` seconds, of which a fraction ``jitter`` is drawn at
    random (1.0: anywhere between 0 and the full delay; 0: exactly the delay).
    After ``max_attempts`` failed attempts in a row (None: never give up) the
    client closes and everything waiting on it fails with ConnectionClosed.
    """

    max_attempts: int | None = 60
    initial_delay: float = 0.1
    max_delay: float = 5.0
    multiplier: float = 2.0
    jitter: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None)")
        if not 0 <= self.initial_delay <= self.max_delay:
            raise ValueError("need 0 <= initial_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def delays(self) -> Iterator[float]:
        """The wait before each attempt, as many as there are attempts."""
        attempt = 0
        base = self.initial_delay
        while self.max_attempts is None or attempt < self.max_attempts:
            yield base * (1 - self.jitter * random.random())
            base = min(self.max_delay, base * self.multiplier)
            attempt += 1
