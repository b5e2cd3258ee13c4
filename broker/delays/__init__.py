"""Delayed delivery: batches published to be delivered later.

- :mod:`.buckets`: where they wait (a file per time bucket, or memory);
- :mod:`.schedule`: due order, release into their topics, durability.
"""

from .buckets import Entry, FileBuckets, MemoryBuckets
from .schedule import DEFAULT_BUCKET_MS, Schedule

__all__ = ["DEFAULT_BUCKET_MS", "Entry", "FileBuckets", "MemoryBuckets", "Schedule"]
