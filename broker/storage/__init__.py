"""Topic logs: where published batches are stored and read back from.

The server talks only to the :class:`LogStore` / :class:`TopicLog` interface
in :mod:`.base`; :class:`MemoryStore` keeps batches in memory (tests, and the
foundation), the durable file log implements the same interface.
"""

from .base import LogStore, StoredBatch, SyncResult, TopicLog
from .errors import DataLoss, NotOwnerError, ReadPending, StorageError
from .file import FileStore, FileTopicLog
from .lock import DataDirLocked
from .memory import MemoryStore, MemoryTopicLog
from .settings import SettingsResolver, TopicSettings

__all__ = [
    "DataDirLocked",
    "DataLoss",
    "ReadPending",
    "FileStore",
    "FileTopicLog",
    "LogStore",
    "MemoryStore",
    "MemoryTopicLog",
    "SettingsResolver",
    "NotOwnerError",
    "StorageError",
    "StoredBatch",
    "SyncResult",
    "TopicLog",
    "TopicSettings",
]
