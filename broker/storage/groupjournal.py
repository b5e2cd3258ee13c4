"""Where the consumer groups' state is kept: the journal files, or nothing.

The group manager (broker/groups/manager.py) decides what to save and when
a hand-out may go out; this module owns the files (the record format and its
replay are in :mod:`.groupstate`). Two implementations of one interface,
as the topic logs have: :class:`FileGroupState` keeps generations of an
append-only journal in a directory, :class:`MemoryGroupState` keeps nothing
(memory storage: a restart forgets every group).

The file journal: a generation starts with a checkpoint (every group's
snapshot) and grows by records written to the OS one call at a time;
``sync`` fsyncs what was written (and, for a new generation, the directory;
then the files it replaced are deleted). A failed write or fsync makes the
store ``broken``: nothing more goes into that file, and the next
``checkpoint`` starts a fresh generation from memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import trio

from .fileops import REAL, FileOps, fsync_dir
from .groupstate import Journal, SavedState, encode_checkpoint, read_state_dir


class GroupState(Protocol):
    #: Records must be durable before what they count happens.
    persistent: bool
    #: A write or fsync failed; nothing saved since can be trusted until a
    #: new checkpoint is durable.
    broken: bool
    sync_rounds: int
    checkpoints: int

    def read(self) -> SavedState:
        """What was saved (at start, before anything is appended)."""

    def checkpoint(self, snapshots: Iterable[dict[str, Any]]) -> bool:
        """Start a new generation with these snapshots; False if it failed."""

    def checkpoint_due(self) -> bool:
        """Whether the next save should be a checkpoint (none yet, broken,
        or the journal has grown large against its last checkpoint)."""

    def append(self, data: bytes) -> None:
        """Records, written to the OS (survives kill -9 once this returns)."""

    def sync_now(self) -> bool:
        """Make everything durable at once (start and shutdown); False if it failed."""

    async def sync(self) -> bool:
        """Make everything appended so far durable; False if it failed."""

    def close(self) -> None:
        """Sync and close (shutdown)."""


class MemoryGroupState:
    """Nothing is saved: hand-outs go out at once."""

    persistent = False
    broken = False
    sync_rounds = 0
    checkpoints = 0

    def read(self) -> SavedState:
        return SavedState()

    def checkpoint(self, snapshots: Iterable[dict[str, Any]]) -> bool:
        return True

    def checkpoint_due(self) -> bool:
        return False

    def append(self, data: bytes) -> None:
        pass

    def sync_now(self) -> bool:
        return True

    async def sync(self) -> bool:
        return True

    def close(self) -> None:
        pass


class FileGroupState:
    """Generations of an append-only journal in ``state_dir``."""

    persistent = True
    #: The journal starts over with a fresh checkpoint once it is this many
    #: times its last checkpoint (and at least ROTATE_MIN_BYTES): replaying
    #: it at start-up stays proportional to the state it describes.
    ROTATE_FACTOR = 4
    ROTATE_MIN_BYTES = 4 << 20

    def __init__(self, state_dir: Path, logger: Any, ops: FileOps = REAL) -> None:
        self.state_dir = state_dir
        self.logger = logger
        self.ops = ops
        #: The open journal. None while a write or fsync failure has left no
        #: file to trust (``broken``).
        self.journal: Journal | None = None
        self.broken = False
        self._generation = 0
        # Journals a new checkpoint replaced: deleted once it is durable;
        # and files read at start-up, likewise.
        self._retired: list[Journal] = []
        self._superseded: list[Path] = []
        #: Rounds that fsynced the journal, and checkpoints written.
        self.sync_rounds = 0
        self.checkpoints = 0

    def read(self) -> SavedState:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        saved = read_state_dir(self.state_dir)
        self._generation = saved.generation
        self._superseded = saved.superseded  # deleted once the next checkpoint is durable
        return saved

    def checkpoint(self, snapshots: Iterable[dict[str, Any]]) -> bool:
        self._generation += 1
        try:
            journal = Journal.create(self.state_dir, self._generation, encode_checkpoint(snapshots), self.ops)
        except OSError as exc:
            self._failed("write", exc)
            return False
        if self.journal is not None:
            self._retired.append(self.journal)
        self.journal = journal
        self.checkpoints += 1
        if self.broken:
            self.broken = False
            self.logger.info("group journal writable again", file=journal.path.name)
        return True

    def checkpoint_due(self) -> bool:
        journal = self.journal
        return journal is None or journal.size > max(
            self.ROTATE_MIN_BYTES, self.ROTATE_FACTOR * journal.checkpoint_size
        )

    def append(self, data: bytes) -> None:
        """After a failure nothing more goes into that file (the next
        checkpoint covers what would have)."""
        if self.journal is None:
            return  # broken: the checkpoint that mends it is taken from memory
        try:
            self.journal.write(data)
        except OSError as exc:
            self._failed("write", exc)

    def _failed(self, what: str, exc: OSError) -> None:
        """A journal write or fsync failed (a full or failing disk); after a
        failed fsync the file cannot be trusted either."""
        if not self.broken:
            self.logger.error(
                f"group journal {what} failed; group deliveries wait until it can be written",
                error=repr(exc),
            )
        self.broken = True
        if self.journal is not None:
            self._retired.append(self.journal)
            self.journal = None

    def _pending(self) -> tuple[Journal, list[Journal], list[Path]] | None:
        """What a sync has to do, taken: None if nothing."""
        journal = self.journal
        if journal is None or not (journal.unsynced or self._retired or self._superseded):
            return None
        retired, self._retired = self._retired, []
        superseded, self._superseded = self._superseded, []
        journal.unsynced = False  # what is written from now on: the next round
        return journal, retired, superseded

    def sync_now(self) -> bool:
        if self.journal is None:
            return False
        work = self._pending()
        if work is None:
            return True
        try:
            self._make_durable(*work)
        except OSError as exc:
            self._superseded[:0] = work[2]
            self._failed("fsync", exc)
            return False
        return True

    async def sync(self) -> bool:
        if self.journal is None:
            return False
        work = self._pending()
        if work is None:
            return True
        try:
            await trio.to_thread.run_sync(self._make_durable, *work)
        except OSError as exc:
            self._superseded[:0] = work[2]
            self._failed("fsync", exc)
            return False
        self.sync_rounds += 1
        return True

    def _make_durable(self, journal: Journal, retired: list[Journal], superseded: list[Path]) -> None:
        """fsync the journal (and the directory for a new one), then delete
        the files it replaces (in a worker thread, but at start and stop)."""
        journal.fsync()
        if journal.new:
            fsync_dir(self.state_dir, self.ops)
            journal.new = False
        for old in retired:
            try:
                old.discard()
            except OSError:
                pass  # closing a file we no longer use: nothing to save
        for path in superseded:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        journal = self.journal
        if journal is None:
            self.logger.error("group state not saved at shutdown: the journal cannot be written")
            return
        if self.sync_now():
            try:
                journal.close()
            except OSError as exc:
                self.logger.error("group state not saved at shutdown", error=repr(exc))
        else:
            self.logger.error("group state not saved at shutdown: the journal could not be synced")
        self.journal = None
