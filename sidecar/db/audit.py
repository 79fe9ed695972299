"""The audit log: written by triggers (migration ``0002_audit_triggers``), so that an edit made
with plain SQL is audited like one made with the admin script; here, the admin script's side of
it, and reading it back.

How the triggers work:

- ``audit_rule_doc`` / ``audit_policy_doc`` (views): each object as a JSON document (the
  export's fields, in the order of ``sidecar.db.columns``; a policy with its rules in order).
  ``doc`` has secrets redacted (a clear password or client secret, and Authorization /
  Proxy-Authorization header values, become the mask; ``env:``/``file:`` references stay as
  written); ``raw`` is unredacted and only ever compared, never stored past the statement or
  transaction that produced it.
- BEFORE triggers on rules, policies and policy_rules keep each touched object's document once
  in ``audit_pending`` (a link change touches its policy). AFTER triggers "flush": one audit row
  per pending object whose document changed (create, delete, enable/disable when only
  ``enabled`` changed, else edit), then empty ``audit_pending``.
- Plain SQL flushes after each row, with actor ``sql``. The admin script writes its actor in
  ``admin_context`` at the start of its transaction (``admin_transaction``): while that row
  exists nothing flushes, and deleting it (just before COMMIT) flushes with that actor — one
  row per object and command, however many statements the command took. The row never
  outlives the transaction.
- A write that changes nothing (an upsert of the same values) writes no audit row.
- audit_log rows cannot be changed or deleted (triggers abort the statement).

The mask and the secret header names are spelt out in the migration's SQL, not taken from
``sidecar.rules.secrets``, because a released migration never changes; tests keep them equal.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .columns import decoded
from .connection import sqlite_utils_db, transaction, translated


@contextmanager
def admin_transaction(conn: sqlite3.Connection, actor: str) -> Iterator[sqlite3.Connection]:
    """One admin command: BEGIN IMMEDIATE (so what the command validated against is what it
    writes over), the actor recorded for the audit triggers, COMMIT — or ROLLBACK if the body
    raises, leaving nothing behind. The audit rows are written just before COMMIT, one per
    object changed. Raises ``StoreError``."""
    with translated("cannot write rules.db"):
        with transaction(conn, immediate=True):
            conn.execute("INSERT INTO admin_context (id, actor) VALUES (1, ?)", (actor,))
            yield conn
            conn.execute("DELETE FROM admin_context")


def flush_audit(conn: sqlite3.Connection) -> None:
    """Inside ``admin_transaction``: write the audit rows of the changes made so far now.

    Needed between deleting an object and creating another in the same command, because SQLite
    may give the new row the id of the deleted one. Raises ``StoreError``."""
    with translated("cannot write the audit log"):
        (actor,) = conn.execute("SELECT actor FROM admin_context WHERE id = 1").fetchone()
        conn.execute("DELETE FROM admin_context")
        conn.execute("INSERT INTO admin_context (id, actor) VALUES (1, ?)", (actor,))


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit log row; ``before``/``after`` are the object's documents (secrets redacted),
    None when it did not exist before (create) or after (delete). ``at``: UTC, ISO 8601, as
    SQLite wrote it."""

    id: int
    at: str
    actor: str
    action: str
    object_type: str
    object_name: str
    before: Any
    after: Any


def read_audit(conn: sqlite3.Connection, *, limit: int | None = None, since: str | None = None) -> list[AuditEntry]:
    """The newest audit rows first; ``since``: a time in the log's format (UTC, ISO 8601).
    Raises ``StoreError``."""
    with translated("cannot read the audit log"):
        rows = sqlite_utils_db(conn).table("audit_log").rows_where(
            "at >= ?" if since else None, [since] if since else None,
            order_by="at DESC, id DESC", limit=limit,
        )
        return [
            AuditEntry(r["id"], r["at"], r["actor"], r["action"], r["object_type"], r["object_name"],
                       decoded(r["before"]) if r["before"] is not None else None,
                       decoded(r["after"]) if r["after"] is not None else None)
            for r in rows
        ]
