"""A consumer group's settings: what SUBSCRIBE's group options mean.

(protocol.md, "Consumer groups": ack_wait_ms, max_deliver, backoff_ms,
backoff_jitter_pct, max_ack_pending, dead_letter), with their defaults and
checks. ``max_ack_pending`` is each member's own (its prefetch); the group
keeps the creating SUBSCRIBE's value for members that do not send one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from pybroker.protocol import KEY_HEADER, topic_error

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_DELIVER = 5
#: A member's prefetch when neither it nor the group's creator named one.
#: The client library always names one (its concurrency unless told), so
#: this is for other clients; fair dispatch splits batches across members
#: whatever it is, but a member can only be given work it has room for.
DEFAULT_MAX_ACK_PENDING = 1000
#: Group ordering modes: none (""), or per message key ("key").
ORDERINGS = ("", "key")
#: Messages a key-ordered group looks at past its cursor in one dispatch
#: for ones whose key is free (others wait behind a busy key): the bound
#: on that scan's work, and on how far ahead of a blocked key it hands out.
KEY_SCAN_LIMIT = 10_000
#: Seconds before a dead letter the log refused (disk full) is tried again.
DEAD_LETTER_RETRY_SECONDS = 1.0


@attrs.frozen
class GroupConfig:
    ack_wait: float = DEFAULT_ACK_WAIT
    max_deliver: int = DEFAULT_MAX_DELIVER  # 0: unlimited
    backoff: tuple[float, ...] = ()
    max_ack_pending: int = DEFAULT_MAX_ACK_PENDING
    dead_letter: str = ""
    #: Each backoff wait is stretched by up to this fraction (0.1: up to 10 %
    #: longer), drawn at random, so failures of one burst do not retry in step.
    backoff_jitter: float = 0.0
    #: "key": messages with the same ``key`` header go to one member at a
    #: time, in offset order (protocol.md, "Key-ordered groups"); "": none.
    ordering: str = ""

    def to_doc(self) -> dict[str, Any]:
        """As saved (the file store's journal, a cluster's etcd key)."""
        return {
            "ack_wait": self.ack_wait,
            "max_deliver": self.max_deliver,
            "backoff": list(self.backoff),
            "backoff_jitter": self.backoff_jitter,
            "max_ack_pending": self.max_ack_pending,
            "dead_letter": self.dead_letter,
            "ordering": self.ordering,
        }

    @classmethod
    def from_doc(cls, c: Mapping[str, Any]) -> GroupConfig:
        """What :meth:`to_doc` saved (older saves lack the later fields)."""
        return cls(
            float(c["ack_wait"]),
            int(c["max_deliver"]),
            tuple(float(b) for b in c["backoff"]),
            int(c["max_ack_pending"]),
            str(c["dead_letter"]),
            float(c.get("backoff_jitter", 0.0)),
            str(c.get("ordering", "")),
        )

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, str]) -> GroupConfig:
        """Parse SUBSCRIBE options (protocol.md, "Consumer groups")."""
        known = {
            "group", "ack_wait_ms", "max_deliver", "backoff_ms", "backoff_jitter_pct", "max_ack_pending",
            "dead_letter", "ordering",
        }
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown options {sorted(unknown)}")
        try:
            ack_wait = int(options.get("ack_wait_ms", DEFAULT_ACK_WAIT * 1000)) / 1000
            max_deliver = int(options.get("max_deliver", DEFAULT_MAX_DELIVER))
            max_ack_pending = int(options.get("max_ack_pending", DEFAULT_MAX_ACK_PENDING))
            backoff_text = options.get("backoff_ms", "")
            backoff = tuple(int(x) / 1000 for x in backoff_text.split(",") if x.strip())
            jitter_pct = int(options.get("backoff_jitter_pct", 0))
        except ValueError as exc:
            raise ValueError(f"bad group option: {exc}") from None
        dead_letter = options.get("dead_letter") or f"dlq.{name}"
        if ack_wait <= 0 or any(b <= 0 for b in backoff):
            raise ValueError("ack_wait_ms and backoff_ms must be positive")
        if max_deliver < 0 or not 1 <= max_ack_pending <= 1_000_000:
            raise ValueError("max_deliver must be >= 0 and max_ack_pending 1..1000000")
        if not 0 <= jitter_pct <= 100:
            raise ValueError("backoff_jitter_pct must be 0..100")
        problem = topic_error(dead_letter)
        if problem:
            raise ValueError(f"dead_letter: {problem}")
        ordering = options.get("ordering", "")
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {', '.join(repr(o) for o in ORDERINGS)}, got {ordering!r}")
        return cls(ack_wait, max_deliver, backoff, max_ack_pending, dead_letter, jitter_pct / 100, ordering)

    def backoff_for(self, deliveries: int) -> float:
        """How long a message nak'ed (without a delay of its own) after its
        ``deliveries``-th delivery waits before the next one, before jitter:
        ``backoff[deliveries - 1]``, the last step repeating; 0 without backoff."""
        if self.backoff:
            return self.backoff[min(deliveries, len(self.backoff)) - 1]
        return 0.0


def group_name_error(name: str) -> str | None:
    problem = topic_error(name)
    if problem is None and "." in name:
        problem = "a group name is one token (no dots)"
    return problem


