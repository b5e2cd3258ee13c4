"""Topic logs: where published batches are stored and read back from.

The server talks only to the :class:`LogStore` / :class:`TopicLog` interface
in :mod:`.base`; :class:`MemoryStore` keeps batches in memory (tests, and the
foundation), the durable file log implements the same interface.
"""

from .base import LogStore, StoredBatch, TopicLog
from .file import FileStore, FileTopicLog
from .memory import MemoryStore, MemoryTopicLog
from .settings import SettingsResolver, TopicSettings

__all__ = [
    "FileStore",
    "FileTopicLog",
    "LogStore",
    "MemoryStore",
    "MemoryTopicLog",
    "SettingsResolver",
    "StoredBatch",
    "TopicLog",
    "TopicSettings",
]
