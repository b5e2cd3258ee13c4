"""Topic logs: where published batches are stored and read back from.

The server talks only to the :class:`LogStore` / :class:`TopicLog` interface
in :mod:`.base`; :class:`MemoryStore` keeps batches in memory (tests, and the
foundation), the durable file log implements the same interface.
"""

from .base import LogStore, StoredBatch, TopicLog
from .memory import MemoryStore, MemoryTopicLog

__all__ = ["LogStore", "MemoryStore", "MemoryTopicLog", "StoredBatch", "TopicLog"]
