"""Opening rules.db: WAL, a busy timeout, transactions, and ``sqlite3.Error`` translated to
``StoreError`` at this boundary."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils

BUSY_TIMEOUT_MS = 5000

# SQL for "now" as every time column holds it: UTC, ISO 8601, milliseconds (see ``iso_time``).
NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


class StoreError(Exception):
    """rules.db could not be opened, migrated, read or written. ``damaged``: SQLite found the
    file corrupt ("database disk image is malformed")."""

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Raise ``StoreError("<what>: <sqlite's reason>")`` for a ``sqlite3.Error`` in the body."""
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
        raise StoreError(f"{what}: {exc}", damaged=code == sqlite3.SQLITE_CORRUPT) from exc


def connect(path: str | os.PathLike[str], *, readonly: bool = False, create: bool = True) -> sqlite3.Connection:
    """Open rules.db. Read-only connections, and those with ``create=False``, never create the
    file: a writer that finds it gone must not leave an empty database in its place.
    Raises ``StoreError``."""
    with translated(f"cannot open {path}"):
        if readonly or not create:
            uri = Path(path).absolute().as_uri() + ("?mode=ro" if readonly else "?mode=rw")
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(device, inode) of the file, or None if absent: tells a replaced rules.db apart."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = False) -> Iterator[sqlite3.Connection]:
    """BEGIN … COMMIT, or ROLLBACK if the body raises. ``sqlite3.Error`` is not translated
    here: the caller words it."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def sqlite_utils_db(conn: sqlite3.Connection) -> sqlite_utils.Database:
    """sqlite-utils over our connection and its transaction: no PRAGMA changes, no plugins."""
    import sqlite_utils  # here: ``names`` (the admin script's shell completion) loads this module without it

    return sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
