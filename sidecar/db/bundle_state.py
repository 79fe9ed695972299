"""Which signed bundle a rules.db holds (migration ``0005_bundle_state``): written by the
sidecar's bundle applier in the transaction that applies the bundle, read by the applier (only a
newer revision is applied), the admin script (a bundle-managed rules.db is not edited by hand)
and ``safous-admin bundle status``."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from .connection import NOW, translated


@dataclass(frozen=True, slots=True)
class BundleState:
    """The bundle applied last. ``key_id`` None: applied without signature verification.
    ``applied_at``: UTC, ISO 8601, as SQLite wrote it ("" before it is written)."""

    revision: str
    sequence: int
    content_sha256: str
    key_id: str | None
    source: str
    applied_at: str = ""


def read_bundle_state(conn: sqlite3.Connection) -> BundleState | None:
    """The bundle applied last, or None for a rules.db no bundle was applied to (or one whose
    schema predates bundles). Raises ``StoreError``."""
    with translated("cannot read the bundle state"):
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'bundle_state'").fetchone() \
                is None:
            return None
        row = conn.execute("SELECT revision, sequence, content_sha256, key_id, source, applied_at "
                           "FROM bundle_state WHERE id = 1").fetchone()
    return BundleState(*row) if row else None


def write_bundle_state(conn: sqlite3.Connection, state: BundleState) -> None:
    """Record ``state`` as applied now, inside the caller's transaction. Raises ``StoreError``."""
    with translated("cannot write the bundle state"):
        conn.execute(
            "INSERT INTO bundle_state (id, revision, sequence, content_sha256, key_id, source) "
            "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET revision = excluded.revision, "
            "sequence = excluded.sequence, content_sha256 = excluded.content_sha256, key_id = excluded.key_id, "
            f"source = excluded.source, applied_at = {NOW}",
            (state.revision, state.sequence, state.content_sha256, state.key_id, state.source))
