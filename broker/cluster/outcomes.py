"""What a cluster append comes to when it is not acknowledged (docs/cluster.md §5-§6).

Shared by the partition's owner, which sequences appends, and the node's
commit rounds (rounds.py), which write and commit them.
"""

from __future__ import annotations


class AppendError(Exception):
    """An append was not acknowledged."""


class NotOwner(AppendError):
    """This node does not own the partition (or no longer does): nothing of
    the append was committed. The publisher should go to the owner."""


class AppendFailed(AppendError):
    """Nothing of the append was committed (the object store or etcd failed
    before the commit was sent); retryable."""


class ChainBroken(AppendFailed):
    """Not sent: the partition's round before it, still out when this one
    was written, was not committed (its offsets followed that round's).
    Whoever sent that round is told why; a cluster store does not report
    this one again, since the earlier round's failure already covers it."""


class OutcomeUnknown(AppendError):
    """The append may have been committed; it is not acknowledged. A resend
    with a msg-id is deduplicated (by the broker's exactly-once window), one
    without may be stored twice."""

