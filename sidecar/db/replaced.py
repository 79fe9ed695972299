"""rules.db replaced under a running process (``mv new.db rules.db``): every long-lived connection
of the process follows the file the name refers to, and none ever reaches the new file through
the old one's ``-wal`` and ``-shm``.

Why reopening is not enough: SQLite names a database's WAL and shared-memory index after the
path, not after the file. Once ``mv`` gives the name a new inode, ``rules.db-wal`` and
``rules.db-shm`` are still the old file's for as long as a connection to it is open, and they
stay there after it closes (SQLite checkpoints and removes them on the last close only while
the file is still under its name). A connection opened on the new file then reads the old
file's WAL frames as its own pages, and a checkpoint writes them into it: "database disk image
is malformed" (SQLite's "How To Corrupt An SQLite Database File": mispairing database files and
journals). Within one process it is worse: POSIX locks belong to the process, so a new file's
connection and an old file's would not even exclude each other on the shared ``-shm``.

So every long-lived connection of the process to a path is a ``FileConnection`` of the one
``DatabaseFile`` for that path, which knows the file they are on: (``st_dev``, ``st_ino``). Each
use (a reload, a batch of activity rows, a batch of pruning) starts with one ``os.stat`` of the
path. When the name refers to another file, or to none, the first use that notices switches the
whole process, while no connection is in use:

1. the old file's WAL is checkpointed into the old file (TRUNCATE), through a connection that
   can write kept for this, so that what was committed to it stays in it (a file moved aside
   is whole);
2. every connection to the old file is closed;
3. ``rules.db-wal`` and ``rules.db-shm`` are removed if they are still the old file's, so that
   the new file gets its own (connections to the old file in other processes keep theirs,
   unlinked, and can no longer reach the new file);
4. then, and only then, the new file is opened.

Steps 1-3 hold an ``flock`` on the directory, so that sidecar processes sharing the file
(``--workers``) switch one at a time and none removes a ``-wal`` that another already made for
the new file.

What this cannot do: a process that opens the new file before the sidecar has switched (an
admin command run within the reload interval of the ``mv``) still pairs it with the old
``-wal``. ``safous-admin restore`` changes the content in place, through SQLite's own locking,
with no such window. ``cp`` over the file keeps the inode, so nothing here sees it
(docs/platform/backup-and-upgrades.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from .connection import StoreError, connect, file_identity, translated

log = logging.getLogger(__name__)

_COMPANIONS = ("-wal", "-shm")


class _SharedExclusive:
    """Many uses at once, or one switch: a switch waits for the uses in progress to end, and
    uses that come after it wait for the switch."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._users = 0
        self._switching = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            while self._switching:
                self._changed.wait()
            self._users += 1
        try:
            yield
        finally:
            with self._changed:
                self._users -= 1
                if not self._users:
                    self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            while self._switching:
                self._changed.wait()
            self._switching = True
            while self._users:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._switching = False
                self._changed.notify_all()


class DatabaseFile:
    """The file under one rules.db path, as this process's connections see it. One per path
    and process (``at``): the connections that follow a replaced file must all switch
    together."""

    _files: ClassVar[weakref.WeakValueDictionary[str, DatabaseFile]] = weakref.WeakValueDictionary()
    _files_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = _SharedExclusive()
        self._identity: tuple[int, int] | None = None
        # The -wal and -shm of that file as seen beside it since its connections last opened:
        # only those are removed.
        self._companions: dict[str, tuple[int, int]] = {}
        self._connections: set[FileConnection] = set()
        # A connection that can write, kept beside the others while any is open: through it
        # the switch checkpoints the old file, whichever of them were open then.
        self._writer: sqlite3.Connection | None = None
        self._members = threading.Lock()  # _connections and _writer, changed under the shared lock

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> DatabaseFile:
        """This process's ``DatabaseFile`` for ``path`` (kept while a connection of it is)."""
        key = os.path.abspath(path)
        with cls._files_lock:
            found = cls._files.get(key)
            if found is None:
                found = cls._files[key] = cls(Path(key))
            return found

    @property
    def identity(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file this process's connections are on (None: none yet)."""
        return self._identity

    def connection(self, *, readonly: bool = False) -> FileConnection:
        """A connection that follows the file (opened at its first use)."""
        return FileConnection(self, readonly)

    @contextlib.contextmanager
    def opened(self, *, readonly: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection for the body only, on the file the name refers to now. Raises
        ``StoreError``."""
        connection = self.connection(readonly=readonly)
        try:
            with connection.use() as conn:
                yield conn
        finally:
            connection.close()

    def _switch(self, identity: tuple[int, int] | None) -> None:
        """Holding the exclusive lock: leave the file the connections are on (see the module's
        docstring) and make ``identity`` the one they open next."""
        if self._identity is not None:
            with _directory_lock(self.path.parent):
                self._checkpoint()
                for connection in list(self._connections):
                    connection.discard()
                self._remove_companions()
            log.warning("rules.db is another file now: its connections follow it" if identity is not None
                        else "rules.db is gone: its connections are closed",
                        extra={"path": str(self.path), "old_inode": self._identity[1],
                               "new_inode": identity[1] if identity else None})
        self._identity = identity
        self._companions = {}

    def _checkpoint(self) -> None:
        writer = self._writer
        if writer is None:
            return  # the file could not be opened to write: nothing of ours is in its WAL
        try:
            busy, _, _ = writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            busy, reason = 1, str(exc)
        else:
            reason = "a reader of the old file held it back"
        if busy:
            log.warning("the old rules.db's last writes may not all have reached it", extra={
                "path": str(self.path), "error": reason})

    def _remove_companions(self) -> None:
        for suffix, seen in self._companions.items():
            name = f"{self.path}{suffix}"
            if file_identity(name) == seen:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)

    def _joined(self, connection: FileConnection) -> None:
        """Holding the exclusive lock: ``connection`` is open on the file; so is the writer."""
        with self._members:
            if not self._connections:
                # The first since all closed: SQLite removed -wal and -shm at the last close,
                # and this opening made new ones (other inodes) that step 3 must remove.
                self._companions = {}
            self._connections.add(connection)
            if self._writer is None:
                with contextlib.suppress(StoreError):
                    writer = connect(self.path, create=False)
                    if file_identity(self.path) == self._identity:
                        self._writer = writer
                    else:
                        writer.close()
        self._note_companions()

    def _left(self, connection: FileConnection) -> None:
        with self._members:
            self._connections.discard(connection)
            if not self._connections and self._writer is not None:
                self._writer.close()
                self._writer = None

    def _note_companions(self) -> None:
        for suffix in _COMPANIONS:
            if suffix not in self._companions:
                found = file_identity(f"{self.path}{suffix}")
                if found is not None:
                    self._companions[suffix] = found


class FileConnection:
    """One long-lived connection of this process to rules.db, always on the file the name
    refers to (``use``). ``opened`` counts its openings: a user that read something from the
    file before (a version, an id) tells by it that this is another file."""

    def __init__(self, file: DatabaseFile, readonly: bool) -> None:
        self._file = file
        self.readonly = readonly
        self.conn: sqlite3.Connection | None = None
        self.opened = 0

    @contextlib.contextmanager
    def use(self) -> Iterator[sqlite3.Connection]:
        """The connection, for the body: first reopened on the file the name refers to now if
        rules.db was replaced or deleted (the whole process switches then), or opened if it was
        closed. No switch closes it while the body runs. Raises ``StoreError`` when rules.db
        does not exist or cannot be opened (nothing is created)."""
        file = self._file
        while True:
            identity = file_identity(file.path)
            with file._lock.shared():
                if self.conn is not None and identity == file._identity:
                    yield self.conn
                    return
            with file._lock.exclusive():
                identity = file_identity(file.path)
                if identity != file._identity:
                    file._switch(identity)
                if identity is None:
                    raise StoreError(f"{file.path} does not exist")
                if self.conn is None:
                    self._open(identity)

    def _open(self, identity: tuple[int, int]) -> None:
        file = self._file
        conn = connect(file.path, readonly=self.readonly, create=False)
        try:
            # Reads the header and the schema, and opens -wal and -shm beside the file.
            with translated(f"cannot open {file.path}"):
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except BaseException:
            conn.close()
            raise
        if file_identity(file.path) != identity:
            conn.close()  # replaced while it opened: the caller's next round switches
            return
        self.conn = conn
        self.opened += 1
        file._joined(self)

    def discard(self) -> None:
        """Close the connection; for its ``DatabaseFile``, which holds the exclusive lock."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self._file._left(self)

    def close(self) -> None:
        """Close the connection (the next use opens it again). Not while the body of a ``use``
        of it runs in another thread."""
        with self._file._lock.shared():
            self.discard()


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An flock on ``directory`` (not on rules.db: closing any descriptor of the database file
    would drop the POSIX locks SQLite holds on it in this process). Without one (a filesystem
    that refuses it), processes switch unsynchronised, as the single process does."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)
