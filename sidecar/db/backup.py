"""Backing rules.db up and restoring it with SQLite's online backup API, while a sidecar uses it
(``safous-admin backup`` and ``restore``).

Backup: the whole file copied in one step, that is in one read transaction, so the copy is the
database as of one instant however the sidecar writes meanwhile (WAL: the read waits for no
writer and no writer for it).

Restore: the backup's pages are written *into* the live rules.db, through SQLite, in one write
transaction. The inode stays, the sidecar's connections see one more commit (and reload the
rules), and no file is ever paired with another's ``-wal``, as ``mv`` and ``cp`` would risk.

The backup is checked first (a SQLite database, ``integrity_check`` ok, a rules.db whose
migrations this version knows), copied to a scratch file beside rules.db and brought up to the
current schema there, which must then be exactly the one the migrations make (a backup with the
audit triggers dropped would leave rules.db unaudited); what is written into rules.db is that
copy, with:

- the rules, policies and bundle state of the backup: that is the point;
- the audit log: the backup's rows, then the rows of rules.db that the backup lacks, then one
  row per rule or policy the restore changed (actor: the admin; before: as rules.db had it;
  after: as restored; written by the audit triggers themselves, from ``audit_pending``) and one
  ``restore`` row naming the backup. The audit log is append-only, and a restore is no way
  around that: a change made since the backup stays on record, beside the restore that undid it;
- the activity log and its traces: the rows of both, each once (a row of rules.db whose id the
  backup uses for another decision gets a new id). A restore brings rules back, not decisions:
  those made since the backup stay, and a backup restored onto a new rules.db brings its own.

Everything read from rules.db is read once the restore holds its write lock (from the first
page written until the commit), so nothing committed meanwhile, by the sidecar or an admin, can
fall between what was read and what is written. The rows are added to the copy through the
backup's own source connection, which SQLite carries into the backup under way.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .activity import ACTIVITY_COLUMNS
from .audit import AuditEntry, admin_transaction, flush_audit, read_audit
from .bundle_state import BundleState, read_bundle_state
from .connection import StoreError, connect, file_identity, translated
from .migrations import MIGRATIONS, migrate, pending_migrations

__all__ = ["Contents", "Restored", "backup_database", "restore_database"]


@dataclass(frozen=True, slots=True)
class Contents:
    """How many rules and policies a database holds."""

    rules: int
    policies: int


@dataclass(frozen=True, slots=True)
class Restored:
    """What a restore wrote: rules.db's contents now, the actor it recorded, and the audit rows
    of the rules and policies it changed (``restore``'s own row not among them)."""

    contents: Contents
    actor: str
    changes: list[AuditEntry]


def backup_database(path: Path, out: Path, *, overwrite: bool = False) -> Contents:
    """Copy rules.db at ``path`` to ``out`` (see the module's docstring). The copy is written
    beside ``out``, checked (``integrity_check``) and only then given its name, so ``out`` is
    never half a database; created readable by its owner only (rules.db may hold secrets in
    clear), in rollback-journal mode (one file, no ``-wal`` to carry along). Raises
    ``FileExistsError`` when ``out`` exists (unless ``overwrite``), before copying anything;
    ``StoreError`` otherwise, and when ``out`` is rules.db itself or one of its companions
    (even with ``overwrite``: the copy would replace the live file, or pair it with a journal
    that is not its own)."""
    if _is_the_live_file(path, out):
        raise StoreError(f"{out} is {path} itself, or its -wal, -shm or -journal: back up to another file")
    if not overwrite and os.path.lexists(out):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out))
    try:
        fd, partial = tempfile.mkstemp(dir=out.absolute().parent, prefix=f".{out.name}.", suffix=".partial")
    except OSError as exc:
        raise StoreError(f"cannot write {out}: {exc.strerror}") from None
    os.close(fd)
    try:
        with translated(f"cannot back up {path}"):
            source = connect(path, readonly=True)
            try:
                copy = sqlite3.connect(partial, isolation_level=None)
                try:
                    source.backup(copy)  # one step: one read transaction
                    copy.execute("PRAGMA journal_mode = DELETE")
                    problems = _integrity_problems(copy)
                    contents = _contents(copy, "main")
                finally:
                    copy.close()
            finally:
                source.close()
        if problems:
            raise StoreError(f"the copy of {path} fails SQLite's integrity check ({problems}): {out} not written")
        try:
            if overwrite:
                os.replace(partial, out)
            else:
                os.link(partial, out)  # fails if out exists, even if it appeared meanwhile
        except FileExistsError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return contents


def _is_the_live_file(path: Path, out: Path) -> bool:
    """Whether ``out`` names rules.db at ``path`` or a file SQLite keeps beside it, by name
    (symbolic links followed) or as the same file under another name (a hard link)."""
    names = [f"{os.path.realpath(path)}{suffix}" for suffix in ("", "-wal", "-shm", "-journal")]
    if os.path.realpath(out) in names:
        return True
    identity = file_identity(out)
    return identity is not None and identity in {file_identity(name) for name in names}


def restore_database(path: Path, backup: Path, actor: Callable[[BundleState | None], str]) -> Restored:
    """Write the backup ``backup`` into rules.db at ``path`` (see the module's docstring),
    creating rules.db if absent. ``actor`` is given rules.db's bundle state as the restore
    finds it, holding the write lock, and returns the actor to record, or raises to refuse:
    then, as on any error, rules.db is left as it was. Raises ``StoreError``."""
    if file_identity(path) is None and any(file_identity(f"{path}{s}") is not None for s in ("-wal", "-shm")):
        raise StoreError(f"{path} is absent but its -wal or -shm is still there: they belong to the rules.db that "
                         "was moved away, which a running sidecar still has open and removes within its reload "
                         "interval; restore again then (if no sidecar runs, they are left from a crash: remove them)")
    with tempfile.TemporaryDirectory(dir=path.absolute().parent, prefix=".restore-") as scratch:
        copy = _checked_copy(backup, Path(scratch) / "rules.db")
        try:
            with _unreadable(path):
                live = connect(path)
            try:
                return _restore(copy, live, path, backup, actor)
            finally:
                live.close()
        finally:
            copy.close()


def _restore(copy: sqlite3.Connection, live: sqlite3.Connection, path: Path, backup: Path,
             actor: Callable[[BundleState | None], str]) -> Restored:
    with _unreadable(path):
        if pending_migrations(live):  # a write lock otherwise taken for nothing
            migrate(live)
        (page_size,) = live.execute("PRAGMA page_size").fetchone()
    with translated(f"cannot restore {backup}"):
        # SQLite writes a backup into a WAL database only page for page, at its page size.
        if copy.execute("PRAGMA page_size").fetchone()[0] != page_size:
            copy.execute(f"PRAGMA page_size = {int(page_size)}")
            copy.execute("VACUUM")
        copy.execute("ATTACH DATABASE ? AS live", (path.absolute().as_uri() + "?mode=ro",))
        recorded: list[tuple[str, int, int]] = []

        def under_the_lock(status: int, remaining: int, total: int) -> None:
            # Called after each step; after the first that succeeds, the restore holds
            # rules.db's write lock (one page per step: there is always a second).
            if not recorded and status == sqlite3.SQLITE_OK:
                recorded.append(_merge(copy, path, backup, actor))

        try:
            copy.backup(live, pages=1, progress=under_the_lock)
        finally:
            # So that rules.db's own connection closes last: SQLite then checkpoints its WAL.
            copy.execute("DETACH DATABASE live")
        if not recorded:
            raise StoreError(f"cannot restore {backup}: it was written without the logs of {path}")
        recorded_actor, first, last = recorded[0]
        # Only the restore's rows, not the whole log: those written since the first of them.
        (since,) = copy.execute("SELECT min(at) FROM main.audit_log WHERE id BETWEEN ? AND ?", (first, last)
                                ).fetchone()
        changes = [e for e in read_audit(copy, since=since) if first <= e.id <= last][::-1] if since else []
        return Restored(_contents(copy, "main"), recorded_actor, changes)


def _merge(copy: sqlite3.Connection, path: Path, backup: Path,
           actor: Callable[[BundleState | None], str]) -> tuple[str, int, int]:
    """Into the copy: rules.db's logs and the restore's audit rows. The actor recorded, and the
    ids of the first and last audit rows of the rules and policies it changed (``restore``'s
    own row comes after them)."""
    with _unreadable(path):
        reader = connect(path, readonly=True)
        try:
            state = read_bundle_state(reader)
        finally:
            reader.close()
    name = actor(state)
    with admin_transaction(copy, name), _unreadable(path):
        copy.execute(_CARRY_AUDIT)
        (first,) = copy.execute("SELECT coalesce(max(id), 0) + 1 FROM main.audit_log").fetchone()
        for kind, table, view in (("rule", "rules", "audit_rule_doc"), ("policy", "policies", "audit_policy_doc")):
            copy.execute(_PENDING.format(table=table, view=view), {"kind": kind})
        for statement in _CARRY_ACTIVITY:
            copy.execute(statement)
        flush_audit(copy)  # the triggers write one row per object changed, before the restore's own
        (last,) = copy.execute("SELECT coalesce(max(id), 0) FROM main.audit_log").fetchone()
        copy.execute(_RESTORE_ROW, {"actor": name, "backup": str(backup)})
    return name, first, last


# rules.db's audit rows that the backup lacks, in their order; the backup's come first.
_CARRY_AUDIT = """
INSERT INTO main.audit_log (at, actor, action, object_type, object_name, before, after)
SELECT l.at, l.actor, l.action, l.object_type, l.object_name, l.before, l.after FROM live.audit_log l
WHERE NOT EXISTS (SELECT 1 FROM main.audit_log m WHERE m.id = l.id AND m.at IS l.at AND m.actor IS l.actor
                  AND m.action IS l.action AND m.object_type IS l.object_type AND m.object_name IS l.object_name
                  AND m.before IS l.before AND m.after IS l.after)
ORDER BY l.id
"""

# Each object's "before" as rules.db has it, as the BEFORE triggers would have kept it, under
# the copy's id for that name (a negative one, which no row has, for an object the restore
# deletes); an object only the backup has is pending with no "before" (a create). The flush
# (``admin_context_flush``, migration 0002) then audits what changed, as for any admin command.
_PENDING = """
INSERT INTO main.audit_pending (object_type, object_id, before, before_raw)
SELECT :kind, object_id, before, before_raw FROM (
    SELECT l.name, coalesce(m.id, -l.id) AS object_id, l.doc AS before, l.raw AS before_raw
    FROM live.{view} l LEFT JOIN main.{table} m ON m.name = l.name
    UNION ALL
    SELECT m.name, m.id, NULL, NULL FROM main.{table} m
    WHERE NOT EXISTS (SELECT 1 FROM live.{table} l WHERE l.name = m.name))
ORDER BY name
"""

# With the pod and record id of a fleet's activity log (both NULL in a pod's rules.db).
_CARRIED_COLUMNS = (*ACTIVITY_COLUMNS, "pod", "record_id")
_ACTIVITY = ", ".join(_CARRIED_COLUMNS)
# rules.db's decisions that the backup lacks, and their traces. A row keeps its id unless the
# backup gives that id to another decision; those get ids past both files'. A shipped decision
# the backup holds under another id (its record id) is not carried: it would be there twice.
_CARRY_ACTIVITY = (
    "CREATE TEMP TABLE restore_carried (old_id INTEGER PRIMARY KEY, new_id INTEGER)",
    """INSERT INTO temp.restore_carried (old_id, new_id)
       SELECT l.id, CASE WHEN m.id IS NULL THEN l.id END
       FROM live.activity_log l LEFT JOIN main.activity_log m ON m.id = l.id
       WHERE (m.id IS NULL OR m.at IS NOT l.at OR m.request_id IS NOT l.request_id)
         AND (l.record_id IS NULL OR NOT EXISTS (SELECT 1 FROM main.activity_log x WHERE x.record_id = l.record_id))""",
    """UPDATE temp.restore_carried SET new_id = n.base + n.seq
       FROM (SELECT old_id, row_number() OVER (ORDER BY old_id) AS seq,
                    max(coalesce((SELECT max(id) FROM main.activity_log), 0),
                        (SELECT max(old_id) FROM temp.restore_carried)) AS base
             FROM temp.restore_carried WHERE new_id IS NULL) AS n
       WHERE restore_carried.old_id = n.old_id""",
    f"""INSERT INTO main.activity_log (id, {_ACTIVITY})
        SELECT c.new_id, {', '.join(f'l.{c}' for c in _CARRIED_COLUMNS)}
        FROM temp.restore_carried c JOIN live.activity_log l ON l.id = c.old_id ORDER BY c.new_id""",
    """INSERT INTO main.traces (activity_id, doc)
       SELECT c.new_id, t.doc FROM live.traces t JOIN temp.restore_carried c ON c.old_id = t.activity_id
       ORDER BY t.id""",
    "DROP TABLE temp.restore_carried",
)

_CONTENTS = """json_object('rules', (SELECT count(*) FROM {schema}.rules),
                           'policies', (SELECT count(*) FROM {schema}.policies),
                           'bundle', (SELECT revision FROM {schema}.bundle_state))"""
_RESTORE_ROW = f"""
INSERT INTO main.audit_log (actor, action, object_type, object_name, before, after)
VALUES (:actor, 'restore', 'database', :backup, {_CONTENTS.format(schema='live')}, {_CONTENTS.format(schema='main')})
"""


def _checked_copy(backup: Path, scratch: Path) -> sqlite3.Connection:
    """The backup, checked and copied to ``scratch``, brought up to the current schema; a
    connection to the copy. Raises ``StoreError`` saying what is wrong with the backup."""
    refused = f"{backup} is not a rules.db backup this version can restore"
    with translated(refused):
        source = sqlite3.connect(backup.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            problems = _integrity_problems(source)
            if problems:
                raise StoreError(f"{backup} fails SQLite's integrity check: {problems}")
            if source.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
                              ).fetchone() is None:
                raise StoreError(f"{refused}: it holds no schema_migrations table")
            known = {name for name, _ in MIGRATIONS}
            unknown = sorted(name for (name,) in source.execute("SELECT name FROM schema_migrations")
                             if name not in known)
            if unknown:
                raise StoreError(f"{refused}: it was written by a newer version (migration {unknown[0]} is unknown "
                                 "here)")
            copy = sqlite3.connect(scratch.as_uri(), uri=True, isolation_level=None)
            try:
                source.backup(copy)
            except BaseException:
                copy.close()
                raise
        finally:
            source.close()
    try:
        with translated(refused):
            copy.execute("PRAGMA journal_mode = DELETE")  # a scratch file: no -wal to mind
            copy.execute("PRAGMA foreign_keys = ON")
        try:
            migrate(copy)
        except StoreError as exc:
            raise StoreError(f"{refused}: {exc}") from None
        with translated(refused):
            difference = _schema_difference(_schema(copy), _current_schema())
            broken = copy.execute("PRAGMA foreign_key_check").fetchone()
        if difference:
            raise StoreError(f"{refused}: its schema is not the one its migrations make ({difference})")
        if broken is not None:
            raise StoreError(f"{refused}: a row of {broken[0]} refers to a row of {broken[2]} that does not exist")
    except BaseException:
        copy.close()
        raise
    return copy


_Schema = dict[tuple[str, str], str | None]


def _schema(conn: sqlite3.Connection) -> _Schema:
    """Every table, index, view and trigger: (type, name) -> its SQL, as SQLite keeps it."""
    return {(kind, name): sql for kind, name, sql in conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")}


@functools.cache
def _current_schema() -> _Schema:
    """The schema the migrations make. A backup brought up to date must have exactly this one:
    a trigger dropped from it (the audit log's, say) would leave rules.db unaudited."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        migrate(conn)
        return _schema(conn)
    finally:
        conn.close()


def _schema_difference(found: _Schema, expected: _Schema) -> str:
    """The first difference between two schemas, in words; "" when they are the same."""
    for kind, name in sorted(found.keys() | expected.keys()):
        if (kind, name) not in found:
            return f"{kind} {name} is missing"
        if (kind, name) not in expected:
            return f"{kind} {name} is not part of it"
        if found[kind, name] != expected[kind, name]:
            return f"{kind} {name} is not as they create it"
    return ""


def _integrity_problems(conn: sqlite3.Connection) -> str:
    """What ``PRAGMA integrity_check`` finds (its first line, or the error a page too damaged
    to walk raises); "" when it says ok."""
    try:
        result = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_CORRUPT:
            raise
        return str(exc)
    return "" if result == [("ok",)] else str(result[0][0]).splitlines()[0]


def _contents(conn: sqlite3.Connection, schema: str) -> Contents:
    rules, policies = conn.execute(
        f"SELECT (SELECT count(*) FROM {schema}.rules), (SELECT count(*) FROM {schema}.policies)").fetchone()
    return Contents(rules, policies)


@contextlib.contextmanager
def _unreadable(path: Path) -> Iterator[None]:
    """A rules.db that cannot be read (damaged, not a database) has logs that cannot be kept:
    the admin moves it aside, and a restore onto no file is one that keeps nothing."""
    try:
        with translated(f"cannot read {path}"):
            yield
    except StoreError as exc:
        raise StoreError(f"{exc}: nothing restored. Its logs cannot be carried over: move it aside (mv; a running "
                         "sidecar follows within its reload interval) and restore again, onto no rules.db") from None
