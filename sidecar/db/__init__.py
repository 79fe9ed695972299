"""rules.db: all SQL of the project.

Where things are:

- ``connection``: opening rules.db (WAL, busy timeout), transactions, ``StoreError``.
- ``migrations``: the schema, as released ``.sql`` files applied in order.
- ``columns``: which column holds which rule and policy field; every row ↔ model direction.
- ``rule_set``: what the request path reads (``load_rule_set``) and how it notices changes.
- ``objects``: rules and policies as the admin script reads and writes them.
- ``audit``: the audit log (written by triggers) and the admin script's transaction.
- ``activity``: the activity log: appending (a pod's decisions, or those its sidecars ship to
  a fleet's collector), pruning, reading, and the portal's full-text index of denial reasons
  (kept in a database of the portal's own).
- ``bundle_state``: which signed bundle a rules.db holds (``safous-sidecar serve --bundle``).
- ``backup``: ``safous-admin backup`` and ``restore``, over SQLite's online backup API.
- ``replaced``: the sidecar's long-lived connections, which follow rules.db when another file
  takes its name (``mv``) without ever pairing the new file with the old one's ``-wal``.

Connections use WAL (readers never block the admin's writes, and the other way round) and a
busy timeout. Every function here blocks: the server calls them through ``asyncio.to_thread``
or from its own writer thread, never on the event loop.

Exceptions::

    StoreError        rules.db could not be opened, migrated, read or written
                      (``sqlite3.Error`` is translated to it at this boundary)

A row that does not make a valid rule or policy is not an error: loading returns it as an
``InvalidRow`` (``sidecar.rules.model``) so the sidecar can fail closed for the policies that
depend on it and still serve the others; the admin reads return it with ``error`` set.
"""

from .activity import (
    PRUNE_PAUSE,
    ActivityRecord,
    PreparedActivity,
    holds_pods,
    insert_activity,
    insert_prepared,
    insert_shipped,
    iso_time,
    parse_iso_time,
    prepare_activity,
    prune_activity,
    read_activity,
    read_trace,
    traced_pods,
)
from .audit import AuditEntry, admin_transaction, flush_audit, read_audit
from .backup import Contents, Restored, backup_database, restore_database
from .bundle_state import BundleState, read_bundle_state, write_bundle_state
from .connection import BUSY_TIMEOUT_MS, StoreError, connect, file_identity, transaction
from .migrations import ensure_database, migrate, pending_migrations
from .objects import (
    ObjectKind,
    StoredPolicy,
    StoredRule,
    delete_policy,
    delete_rule,
    read_policies,
    read_rules,
    save_policy,
    save_rule,
    set_enabled,
)
from .replaced import DatabaseFile, FileConnection
from .rule_set import RowMemo, RuleSet, data_version, load_rule_set, rules_version

__all__ = [
    "BUSY_TIMEOUT_MS",
    "PRUNE_PAUSE",
    "ActivityRecord",
    "AuditEntry",
    "BundleState",
    "Contents",
    "DatabaseFile",
    "FileConnection",
    "ObjectKind",
    "PreparedActivity",
    "Restored",
    "RowMemo",
    "RuleSet",
    "StoreError",
    "StoredPolicy",
    "StoredRule",
    "admin_transaction",
    "backup_database",
    "connect",
    "data_version",
    "delete_policy",
    "delete_rule",
    "ensure_database",
    "file_identity",
    "flush_audit",
    "holds_pods",
    "insert_activity",
    "insert_prepared",
    "insert_shipped",
    "iso_time",
    "load_rule_set",
    "migrate",
    "parse_iso_time",
    "pending_migrations",
    "prepare_activity",
    "prune_activity",
    "read_activity",
    "read_audit",
    "read_bundle_state",
    "read_policies",
    "read_rules",
    "read_trace",
    "restore_database",
    "rules_version",
    "save_policy",
    "save_rule",
    "set_enabled",
    "traced_pods",
    "transaction",
    "write_bundle_state",
]
