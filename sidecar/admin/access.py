"""How a command reaches rules.db: readers never create or change it, writers do it whole.

- A reading command (``show``, ``list``, ``logs``, ``export``, ``test``) opens rules.db
  read-only. A missing file is refused (exit 2): a mistyped ``--db`` must not leave an empty
  database behind and report "no rules". An older schema is not migrated: it is read as it is,
  with a warning, and if it cannot be, the error says how to bring it up to date.
- A writing command migrates an older schema, then makes all its changes in one admin
  transaction (the audit triggers record its actor), or none. Only the commands that add
  (``rule add``, ``policy add``, ``import``) create a missing rules.db; the others refuse it as
  the readers do, since there is nothing in it for them to change.
- A rules.db that a sidecar's ``--bundle`` manages (``bundle_state`` has a row) is not changed:
  the next bundle would undo the change, and one sidecar would answer differently from the
  fleet until then. ``--force`` writes anyway, and the audit log's actor says so.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar import db

from .validation import AdminError, not_found

if TYPE_CHECKING:  # names only: every command builds an Admin, `completion` and a Tab included
    from sidecar.db import BundleState, StoredPolicy, StoredRule
    from sidecar.rules.secrets import SecretPolicy

__all__ = ["Admin", "one_policy", "one_rule"]


@dataclass(frozen=True, slots=True)
class Admin:
    """What every command is given (click's ``ctx.obj``): rules.db, the actor the audit log
    records, the sidecar's secret policy."""

    db: Path
    actor: str
    secrets: SecretPolicy
    force: bool = False

    def _missing(self) -> AdminError:
        return AdminError(f"rules.db {self.db} does not exist (`rule add`, `policy add` and `import` "
                          "create one; other commands never do)", 2)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """rules.db, read-only, in one read transaction. Raises ``AdminError`` (exit 2) if it
        does not exist, or if it has an older schema that cannot be read as it is."""
        if not self.db.exists():  # checked first for the message: mode=ro would not create it either
            raise self._missing()
        conn = db.connect(self.db, readonly=True)
        try:
            pending = ", ".join(db.pending_migrations(conn))
            with db.transaction(conn):
                try:
                    yield conn
                except db.StoreError as exc:
                    if not pending:
                        raise
                    raise AdminError(f"rules.db {self.db} cannot be read without {pending} ({exc}): start "
                                     "the sidecar of this version, or run a writing command, to bring it "
                                     "up to date", 2) from None
        finally:
            conn.close()
        if pending:
            from .display import warn

            warn(f"rules.db {self.db} has an older schema ({pending} not applied): shown as it is; the "
                 "sidecar or a writing command of this version brings it up to date")

    @contextmanager
    def write(self, *, create: bool = False) -> Iterator[sqlite3.Connection]:
        """rules.db, brought up to date, in one admin transaction: all of the command's writes,
        or none. ``create``: a missing rules.db is created (else ``AdminError``, exit 2)."""
        if not create and not self.db.exists():
            raise self._missing()
        conn = db.connect(self.db, create=create)
        try:
            if db.pending_migrations(conn):
                db.migrate(conn)
            with db.admin_transaction(conn, self.actor_over(db.read_bundle_state(conn))):
                yield conn
        finally:
            conn.close()

    def actor_over(self, bundle: BundleState | None) -> str:
        """The actor to record for a change of a rules.db holding ``bundle``; ``AdminError``
        (exit 2) for a bundle-managed one without ``--force``."""
        if bundle is None:
            return self.actor
        if not self.force:
            raise AdminError(f"rules.db {self.db} is managed by the bundle {bundle.source} (revision "
                             f"{bundle.revision}): change the rules where the bundle is built and publish "
                             "a new one, or give --force to change this copy anyway (audited; the next "
                             "bundle undoes it)", 2)
        return f"{self.actor} (--force over bundle {bundle.revision})"


def one_rule(conn: sqlite3.Connection, name: str, exit_code: int = 1) -> StoredRule:
    """The rule ``name``; ``AdminError`` with a suggestion if there is none."""
    found = db.read_rules(conn, name)
    if not found:
        not_found("rule", name, [r.name for r in db.read_rules(conn)], exit_code)
    return found[0]


def one_policy(conn: sqlite3.Connection, name: str) -> StoredPolicy:
    """The policy ``name``; ``AdminError`` with a suggestion if there is none."""
    found = db.read_policies(conn, name)
    if not found:
        not_found("policy", name, [p.name for p in db.read_policies(conn)])
    return found[0]
