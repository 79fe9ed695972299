"""Schema migrations: the ``NNNN_name.sql`` files in this package, applied in name order, each
in one transaction together with its record (its name) in ``schema_migrations``.

A released migration never changes: rules.db files in use recorded its name and will not run
it again, so a schema change is a new file. The files are plain SQL, written out once; nothing
in them comes from Python, so no later change to the code can change what an old migration
does (a test holds each file to its released SHA-256). The files themselves are the list of
migrations; a few choices they made, which the code relies on:

- ``rules_version`` is bumped by triggers on every change to rules, policies or links (also by
  plain SQL), so the server reloads on those and not on activity-log writes; every change also
  draws a random token, since a counter alone cannot tell apart two databases that saw the same
  number of edits (a restore of another copy).
- The audit log is written by triggers (design in ``sidecar.db.audit``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from importlib import resources

from ..connection import NOW, connect, transaction, translated


def _released() -> tuple[tuple[str, str], ...]:
    files = sorted((f for f in resources.files(__name__).iterdir() if f.name.endswith(".sql")),
                   key=lambda f: f.name)
    # Bytes decoded as they are: the statements' text is what sqlite_master keeps.
    return tuple((f.name.removesuffix(".sql"), f.read_bytes().decode("utf-8")) for f in files)


# (name, SQL) of every migration, in the order they apply.
MIGRATIONS: tuple[tuple[str, str], ...] = _released()


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply pending migrations, each atomically with its record; return the names applied.
    Raises ``StoreError``; the migrations applied before the failing one stay applied."""
    applied: list[str] = []
    with translated("cannot migrate rules.db"):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            f"(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT ({NOW}))"
        )
        for name, sql in MIGRATIONS:
            with transaction(conn, immediate=True):
                if conn.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone():
                    continue
                # executescript would COMMIT our transaction; run statement by statement instead.
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations (name) VALUES (?)", (name,))
                applied.append(name)
    return applied


def _statements(script: str) -> Iterator[str]:
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        yield buffer.strip()


def ensure_database(path: str | os.PathLike[str]) -> list[str]:
    """Create rules.db with the current schema if absent, or bring an older one up to date;
    return the names of the migrations applied. Raises ``StoreError``."""
    conn = connect(path)
    try:
        return migrate(conn)
    finally:
        conn.close()


def pending_migrations(conn: sqlite3.Connection) -> list[str]:
    """The names of the migrations not applied yet to the database (all, for an empty one)."""
    with translated("cannot read schema_migrations"):
        try:
            done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
        except sqlite3.OperationalError:
            done = set()
    return [name for name, _ in MIGRATIONS if name not in done]
