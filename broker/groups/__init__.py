"""Consumer groups: each message to one member, acknowledged, redelivered.

A group reads its topics from the log (never from the live fan-out), from
its own cursor, and hands batches to members with room under
``max_ack_pending``. Every handed-out message is pending until the member
settles it (ACK frame); a pending message whose ack wait expires, that is
nak'ed, or whose member leaves, is delivered again, alone; one delivered
``max_deliver`` times goes to the dead-letter topic.

- :mod:`.config`: a group's settings (the SUBSCRIBE options);
- :mod:`.group`: one group's state machine (members, cursors, pending);
- :mod:`.manager`: every group, membership, the dispatch task, and what is
  saved before it happens (broker/storage/groupjournal.py keeps it).
"""

from .config import (
    DEAD_LETTER_RETRY_SECONDS,
    DEFAULT_ACK_WAIT,
    DEFAULT_MAX_ACK_PENDING,
    DEFAULT_MAX_DELIVER,
    GroupConfig,
    group_name_error,
)
from .group import Group, GroupTopic, Member, Pending
from .manager import GroupManager

__all__ = [
    "DEAD_LETTER_RETRY_SECONDS",
    "DEFAULT_ACK_WAIT",
    "DEFAULT_MAX_ACK_PENDING",
    "DEFAULT_MAX_DELIVER",
    "Group",
    "GroupConfig",
    "GroupManager",
    "GroupTopic",
    "Member",
    "Pending",
    "group_name_error",
]
