"""The public names of ``sidecar.db``, loaded on first use (``sidecar._lazy``)."""

from .activity import (
    PRUNE_PAUSE,
    ActivityRecord,
    PreparedActivity,
    insert_activity,
    insert_prepared,
    iso_time,
    parse_iso_time,
    prepare_activity,
    prune_activity,
    read_activity,
    read_trace,
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
    "insert_activity",
    "insert_prepared",
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
    "transaction",
    "write_bundle_state",
]
