"""rules.db: schema, migrations, reading the rule set, writing the activity log, and what the
admin script reads and writes (its transactions record the actor that the audit-log triggers
of migration 0002 write down; see "audit log" below).

All SQL of the project lives here. Connections use WAL (readers never block the admin's
writes, and the other way round) and a busy timeout. Every function here blocks: the server
calls them through ``asyncio.to_thread`` or from its own writer thread, never on the event loop.

Exceptions: ``sqlite3.Error`` is translated to ``StoreError`` at this boundary. A row that does
not make a valid rule or policy does not fail the load: it is returned as an ``InvalidRow`` so
the sidecar can fail closed for the policies that depend on it and still serve the others.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import sqlite_utils
from pydantic import ValidationError

from .policies import Policy
from .rules.model import InvalidRow, Rule

BUSY_TIMEOUT_MS = 5000
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

# ------------------------------------------------------------------------ audit log
#
# The audit log is written by triggers, so an edit made with plain SQL is audited like one made
# with the admin script. Design:
#
# - ``audit_rule_doc`` / ``audit_policy_doc``: each object as a JSON document (the export's
#   fields; a policy with its rules in order). ``doc`` has secrets redacted (a clear password or
#   client secret, and Authorization / Proxy-Authorization header values, become the mask;
#   ``env:``/``file:`` references stay as written); ``raw`` is unredacted and only ever
#   compared, never stored past the statement or transaction that produced it.
# - BEFORE triggers on rules, policies and policy_rules keep each touched object's document
#   once in ``audit_pending`` (a link change touches its policy). AFTER triggers "flush": one
#   audit row per pending object whose document changed (create, delete, enable/disable when
#   only ``enabled`` changed, else edit), then empty ``audit_pending``.
# - Plain SQL flushes after each row, with actor ``sql``. The admin script writes its actor in
#   ``admin_context`` at the start of its transaction: while that row exists nothing flushes,
#   and deleting it (just before COMMIT) flushes with that actor — one row per object and
#   command, however many statements the command took. The row never outlives the transaction.
# - A write that changes nothing (an upsert of the same values) writes no audit row.
# - audit_log rows cannot be changed or deleted (triggers abort the statement).
#
# The mask and the secret header names are spelt out (not taken from sidecar.rules.secrets) because a
# released migration never changes; tests keep them equal to the Python side.

_AUDIT_MASK = "••••••"
_AUDIT_SECRET_HEADERS = ("authorization", "proxy-authorization")


def _json_or_text(column: str) -> str:
    # A row written with plain SQL may hold broken JSON: kept as a string, never an error that
    # would abort the user's statement.
    return f"CASE WHEN json_valid({column}) THEN json({column}) ELSE {column} END"


def _bool(column: str) -> str:
    return f"json(CASE WHEN {column} THEN 'true' ELSE 'false' END)"


def _secret(column: str) -> str:
    return (f"CASE WHEN {column} IS NULL THEN NULL "
            f"WHEN substr({column}, 1, 4) = 'env:' OR substr({column}, 1, 5) = 'file:' THEN {column} "
            f"ELSE '{_AUDIT_MASK}' END")


def _redacted_headers(column: str) -> str:
    names = ", ".join(f"'{n}'" for n in _AUDIT_SECRET_HEADERS)
    return (
        f"CASE WHEN json_valid({column}) AND json_type({column}) = 'array' THEN "
        f"(SELECT json_group_array(CASE "
        f"WHEN type = 'array' AND lower(json_extract(value, '$[0]')) IN ({names}) "
        f"THEN json_array(json_extract(value, '$[0]'), '{_AUDIT_MASK}') "
        f"WHEN type IN ('array', 'object') THEN json(value) ELSE value END) "
        f"FROM json_each({column})) "
        f"ELSE {column} END"
    )


def _rule_doc(redact: bool) -> str:
    password = _secret("auth_password") if redact else "auth_password"
    client_secret = _secret("oauth_client_secret") if redact else "oauth_client_secret"
    headers = _redacted_headers("headers") if redact else _json_or_text("headers")
    return (
        "json_object("
        f"'name', name, 'enabled', {_bool('enabled')}, 'method', method, 'url', url, "
        f"'headers', {headers}, 'body', body, 'auth', auth_type, "
        f"'username', auth_username, 'password', {password}, "
        "'token_url', oauth_token_url, 'client_id', oauth_client_id, "
        f"'client_secret', {client_secret}, 'verification', verification, "
        f"'actions', {_json_or_text('actions')}, 'timeout_ms', timeout_ms, 'cache_ttl', cache_ttl)"
    )


_POLICY_DOC = (
    "json_object("
    f"'name', p.name, 'enabled', {_bool('p.enabled')}, 'hosts', {_json_or_text('p.hosts')}, "
    f"'path_prefix', p.path_prefix, 'methods', {_json_or_text('p.methods')}, "
    f"'integration', {_bool('p.integration')}, 'priority', p.priority, "
    "'rules', (SELECT json_group_array(name) FROM (SELECT r.name FROM policy_rules pr "
    "JOIN rules r ON r.id = pr.rule_id WHERE pr.policy_id = p.id ORDER BY pr.position)))"
)


_PLAIN_SQL = "NOT EXISTS (SELECT 1 FROM admin_context)"


def _flush(actor: str, condition: str = "1") -> str:
    """Statements turning audit_pending into audit_log rows, when ``condition`` holds."""
    def changed_secret(field: str) -> str:
        # A clear secret is masked before and after: say that it changed.
        return (
            f"'$.{field}', CASE WHEN json_extract(before_raw, '$.{field}') IS NOT "
            f"json_extract(after_raw, '$.{field}') AND json_extract(before, '$.{field}') IS "
            f"json_extract(after, '$.{field}') AND json_extract(after, '$.{field}') IS NOT NULL "
            f"THEN '{_AUDIT_MASK} (changed)' ELSE json_extract(after, '$.{field}') END"
        )

    return f"""
        INSERT INTO audit_log (actor, action, object_type, object_name, before, after)
        SELECT {actor},
               CASE WHEN before_raw IS NULL THEN 'create'
                    WHEN after_raw IS NULL THEN 'delete'
                    WHEN json_remove(before_raw, '$.enabled') IS json_remove(after_raw, '$.enabled')
                         THEN CASE WHEN json_extract(after_raw, '$.enabled') THEN 'enable' ELSE 'disable' END
                    ELSE 'edit' END,
               object_type,
               COALESCE(json_extract(after_raw, '$.name'), json_extract(before_raw, '$.name')),
               before,
               CASE WHEN object_type = 'rule' AND before_raw IS NOT NULL AND after_raw IS NOT NULL
                    THEN json_set(after, {changed_secret('password')}, {changed_secret('client_secret')})
                    ELSE after END
        FROM (SELECT seq, object_type, before, before_raw,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT doc FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT doc FROM audit_policy_doc d WHERE d.id = object_id) END AS after,
                     CASE object_type
                          WHEN 'rule' THEN (SELECT raw FROM audit_rule_doc d WHERE d.id = object_id)
                          ELSE (SELECT raw FROM audit_policy_doc d WHERE d.id = object_id) END AS after_raw
              FROM audit_pending WHERE {condition})
        WHERE before_raw IS NOT after_raw
        ORDER BY seq;
        DELETE FROM audit_pending WHERE {condition};"""


def _keep(kind: str, object_id: str, *, by_name: bool = False) -> str:
    """Keep the document of the object ``object_id`` (or named ``object_id``) as it is now, unless
    this transaction already kept it. NOT EXISTS rather than OR IGNORE: the conflict policy of
    the statement firing the trigger (an upsert, OR REPLACE) would override ours."""
    view = "audit_rule_doc" if kind == "rule" else "audit_policy_doc"
    match = "name" if by_name else "id"
    return (f"INSERT INTO audit_pending (object_type, object_id, before, before_raw) "
            f"SELECT '{kind}', id, doc, raw FROM {view} d WHERE d.{match} = {object_id} "
            f"AND NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = '{kind}' "
            f"AND k.object_id = d.id);")


def _created(kind: str) -> str:
    return (f"INSERT INTO audit_pending (object_type, object_id) SELECT '{kind}', NEW.id "
            f"WHERE NOT EXISTS (SELECT 1 FROM audit_pending k WHERE k.object_type = '{kind}' "
            f"AND k.object_id = NEW.id);")


def _audit_triggers() -> str:
    # One trigger per table and event and time: SQLite does not define the order in which
    # several triggers of the same event fire.
    flush = _flush("'sql'", _PLAIN_SQL)
    out = []
    for table, kind in (("rules", "rule"), ("policies", "policy")):
        out += [
            # An upsert fires BEFORE INSERT, then the UPDATE triggers: keep an existing row by name.
            f"CREATE TRIGGER audit_{table}_before_insert BEFORE INSERT ON {table} BEGIN "
            f"{_keep(kind, 'NEW.name', by_name=True)} END;",
            f"CREATE TRIGGER audit_{table}_before_update BEFORE UPDATE ON {table} BEGIN "
            f"{_keep(kind, 'OLD.id')} END;",
            f"CREATE TRIGGER audit_{table}_before_delete BEFORE DELETE ON {table} BEGIN "
            f"{_keep(kind, 'OLD.id')} END;",
            f"CREATE TRIGGER audit_{table}_after_insert AFTER INSERT ON {table} BEGIN "
            f"{_created(kind)} {flush} END;",
            f"CREATE TRIGGER audit_{table}_after_update AFTER UPDATE ON {table} BEGIN {flush} END;",
            f"CREATE TRIGGER audit_{table}_after_delete AFTER DELETE ON {table} BEGIN {flush} END;",
        ]
    # A link change is an edit of its policy.
    out += [
        "CREATE TRIGGER audit_policy_rules_before_insert BEFORE INSERT ON policy_rules BEGIN "
        f"{_keep('policy', 'NEW.policy_id')} END;",
        "CREATE TRIGGER audit_policy_rules_before_update BEFORE UPDATE ON policy_rules BEGIN "
        f"{_keep('policy', 'OLD.policy_id')} {_keep('policy', 'NEW.policy_id')} END;",
        "CREATE TRIGGER audit_policy_rules_before_delete BEFORE DELETE ON policy_rules BEGIN "
        f"{_keep('policy', 'OLD.policy_id')} END;",
    ]
    out += [f"CREATE TRIGGER audit_policy_rules_after_{event.lower()} AFTER {event} ON policy_rules "
            f"BEGIN {flush} END;" for event in ("INSERT", "UPDATE", "DELETE")]
    out.append("CREATE TRIGGER admin_context_flush AFTER DELETE ON admin_context BEGIN "
               f"{_flush('OLD.actor')} END;")
    return "\n".join(out) + "\n"


_AUDIT_MIGRATION = f"""
    CREATE TABLE admin_context (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        actor TEXT NOT NULL CHECK (actor <> '')
    );
    CREATE TABLE audit_pending (
        seq INTEGER PRIMARY KEY,
        object_type TEXT NOT NULL,
        object_id INTEGER NOT NULL,
        before TEXT,
        before_raw TEXT,
        UNIQUE (object_type, object_id)
    );
    CREATE VIEW audit_rule_doc AS
        SELECT id, name, {_rule_doc(redact=True)} AS doc, {_rule_doc(redact=False)} AS raw FROM rules;
    CREATE VIEW audit_policy_doc AS
        SELECT id, name, doc, doc AS raw FROM (SELECT p.id, p.name, {_POLICY_DOC} AS doc FROM policies p);
    CREATE INDEX audit_log_at ON audit_log(at);
    CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: its rows cannot be changed'); END;
    CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: its rows cannot be deleted'); END;
""" + _audit_triggers()

# Named migrations, applied in order, each in one transaction together with its record in
# schema_migrations. Never edit a released migration: add a new one.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    (
        "0001_initial",
        f"""
        CREATE TABLE rules (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            method TEXT NOT NULL DEFAULT 'GET',
            url TEXT NOT NULL,
            headers TEXT NOT NULL DEFAULT '[]',      -- JSON [[key, value], ...], in order
            body TEXT,                               -- POST body template
            auth_type TEXT NOT NULL DEFAULT 'none',  -- none | basic | oauth
            auth_username TEXT,
            auth_password TEXT,                      -- clear, or env:NAME / file:PATH
            oauth_token_url TEXT,
            oauth_client_id TEXT,
            oauth_client_secret TEXT,                -- clear, or env:NAME / file:PATH
            verification TEXT NOT NULL DEFAULT 'json', -- json | jsonp
            actions TEXT NOT NULL DEFAULT '[]',      -- JSON [{{"type","key","value"}}, ...]
            timeout_ms INTEGER NOT NULL DEFAULT 1000,
            cache_ttl REAL NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL DEFAULT ({_NOW}),
            updated_at TEXT NOT NULL DEFAULT ({_NOW})
        );
        CREATE TABLE policies (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            hosts TEXT NOT NULL DEFAULT '[]',        -- JSON ["app.example.com", "*.example.com"]
            path_prefix TEXT NOT NULL DEFAULT '/',
            methods TEXT NOT NULL DEFAULT '[]',      -- JSON ["GET", ...]; [] = any
            integration INTEGER NOT NULL DEFAULT 1 CHECK (integration IN (0, 1)),
            priority INTEGER NOT NULL DEFAULT 100,
            created_at TEXT NOT NULL DEFAULT ({_NOW}),
            updated_at TEXT NOT NULL DEFAULT ({_NOW})
        );
        CREATE TABLE policy_rules (
            policy_id INTEGER NOT NULL REFERENCES policies(id) ON DELETE CASCADE,
            rule_id INTEGER NOT NULL REFERENCES rules(id) ON DELETE RESTRICT,
            position INTEGER NOT NULL,
            PRIMARY KEY (policy_id, rule_id),
            UNIQUE (policy_id, position)
        );
        CREATE INDEX policy_rules_rule ON policy_rules(rule_id);
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL DEFAULT ({_NOW}),
            actor TEXT NOT NULL,
            action TEXT NOT NULL,                    -- create | edit | enable | disable | delete
            object_type TEXT NOT NULL,               -- rule | policy
            object_name TEXT NOT NULL,
            before TEXT,                             -- JSON, secrets redacted
            after TEXT
        );
        CREATE TABLE activity_log (
            id INTEGER PRIMARY KEY,
            at TEXT NOT NULL,
            request_id TEXT NOT NULL,
            username TEXT NOT NULL,
            source_ip TEXT NOT NULL,
            host TEXT NOT NULL,
            path TEXT NOT NULL,
            method TEXT NOT NULL,
            policy TEXT,
            allowed INTEGER NOT NULL,
            code TEXT NOT NULL,
            status TEXT NOT NULL,                    -- the denial reason, or why it was allowed
            latency_ms REAL NOT NULL
        );
        CREATE INDEX activity_log_at ON activity_log(at);
        -- Bumped by triggers on every change to rules, policies or their links, including
        -- plain-SQL edits, so the server reloads on those and not on activity-log writes.
        CREATE TABLE rules_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
        INSERT INTO rules_version (id, version) VALUES (1, 0);
        """
        + "".join(
            f"CREATE TRIGGER {table}_{event.lower()}_bumps_version AFTER {event} ON {table} "
            "BEGIN UPDATE rules_version SET version = version + 1 WHERE id = 1; END;\n"
            for table in ("rules", "policies", "policy_rules")
            for event in ("INSERT", "UPDATE", "DELETE")
        ),
    ),
    ("0002_audit_triggers", _AUDIT_MIGRATION),
    (
        # A counter alone cannot tell two databases apart that saw the same number of edits
        # (a restore of another copy): every change also draws a random token.
        "0003_rules_version_token",
        "ALTER TABLE rules_version ADD COLUMN token BLOB;\n"
        "UPDATE rules_version SET token = randomblob(8);\n"
        + "".join(
            f"DROP TRIGGER {table}_{event.lower()}_bumps_version;\n"
            f"CREATE TRIGGER {table}_{event.lower()}_bumps_version AFTER {event} ON {table} "
            "BEGIN UPDATE rules_version SET version = version + 1, token = randomblob(8) WHERE id = 1; END;\n"
            for table in ("rules", "policies", "policy_rules")
            for event in ("INSERT", "UPDATE", "DELETE")
        ),
    ),
)


class StoreError(Exception):
    """rules.db could not be opened, migrated, read or written."""


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything the request path needs from rules.db, read in one transaction."""

    rules: dict[str, Rule | InvalidRow]
    policies: tuple[Policy, ...]
    invalid_policies: tuple[InvalidRow, ...]


class ActivityRecord(NamedTuple):
    """One decision in the activity log. ``at`` is epoch seconds when the check path records
    it (formatting is left to the batch writer) and ISO-8601 UTC text when read back."""

    at: float | str
    request_id: str
    username: str
    source_ip: str
    host: str
    path: str
    method: str
    policy: str | None
    allowed: bool
    code: str
    status: str
    latency_ms: float


def iso_time(epoch: float) -> str:
    """Epoch seconds as the database writes times: ``2026-11-28T14:00:00.123Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"{what}: {exc}") from exc


def connect(path: str | os.PathLike[str], *, readonly: bool = False, create: bool = True) -> sqlite3.Connection:
    """Open rules.db. Read-only connections, and those with ``create=False``, never create the
    file: a writer that finds it gone must not leave an empty database in its place."""
    with _translated(f"cannot open {path}"):
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
    """BEGIN … COMMIT, or ROLLBACK if the body raises."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply pending migrations, each atomically with its record; return the names applied."""
    applied: list[str] = []
    with _translated("cannot migrate rules.db"):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            f"(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT ({_NOW}))"
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
    """Create rules.db with the current schema if absent, or bring an older one up to date."""
    conn = connect(path)
    try:
        return migrate(conn)
    finally:
        conn.close()


def pending_migrations(conn: sqlite3.Connection) -> list[str]:
    with _translated("cannot read schema_migrations"):
        try:
            done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
        except sqlite3.OperationalError:
            done = set()
    return [name for name, _ in MIGRATIONS if name not in done]


# ---------------------------------------------------------------------------- rule set


def _rule_from_row(row: Mapping[str, Any]) -> Rule:
    return Rule(
        name=row["name"],
        enabled=bool(row["enabled"]),
        method=row["method"],
        url=row["url"],
        headers=tuple(tuple(pair) for pair in json.loads(row["headers"])),
        body=row["body"],
        auth=row["auth_type"],
        username=row["auth_username"],
        password=row["auth_password"],
        token_url=row["oauth_token_url"],
        client_id=row["oauth_client_id"],
        client_secret=row["oauth_client_secret"],
        verification=row["verification"],
        actions=tuple(json.loads(row["actions"])),
        timeout_ms=row["timeout_ms"],
        cache_ttl=row["cache_ttl"],
    )


def _policy_from_row(row: Mapping[str, Any], rule_names: tuple[str, ...]) -> Policy:
    return Policy(
        name=row["name"],
        enabled=bool(row["enabled"]),
        hosts=tuple(json.loads(row["hosts"])),
        path_prefix=row["path_prefix"],
        methods=tuple(json.loads(row["methods"])),
        integration=bool(row["integration"]),
        priority=row["priority"],
        rules=rule_names,
    )


def _fallback_policy(row: Mapping[str, Any]) -> Policy | None:
    """What a policy row that does not validate must still match, so that it denies instead of
    vanishing: were it left out, its requests would fall through to a broader policy (say, a
    public one with the integration off) and be allowed. Every field that does not parse is
    widened — any host, any method, path ``/``, first priority — so the broken policy denies at
    least everything it covered, and possibly more (fail closed). None for a disabled row."""
    if row["enabled"] == 0:
        return None

    def parsed(column: str, validate: Any) -> Any:
        try:
            value = validate(json.loads(row[column]))
            Policy(name="fallback", **{column: value})
            return value
        except (ValueError, TypeError, ValidationError):
            return ()

    path = row["path_prefix"]
    priority = row["priority"]
    return Policy(
        name=str(row["name"]),
        hosts=parsed("hosts", tuple),
        methods=parsed("methods", tuple),
        path_prefix=path if isinstance(path, str) and path.startswith("/") else "/",
        priority=priority if isinstance(priority, int) else -(2**31),
    )


def _row_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return f"{type(exc).__name__}: {exc}"


class RowMemo:
    """The models made by the previous ``load_rule_set``, by row: a reload validates only the
    rows that changed and hands back the very same objects for the others, so a reload of
    10,000 rules after one edit costs one rule's validation (and compilation, downstream).

    Rows are remembered by the hash of their values, not by the values, which would keep a
    second copy of every rule's text in memory (13 MB for 10,000 rules); two different rows
    with equal 64-bit hashes are not a practical concern."""

    def __init__(self) -> None:
        self.rules: dict[int, Rule | InvalidRow] = {}
        self.policies: dict[int, Policy | InvalidRow] = {}


def load_rule_set(conn: sqlite3.Connection, memo: RowMemo | None = None) -> RuleSet:
    """Read every rule and policy in one read transaction (a consistent snapshot)."""
    old = memo or RowMemo()
    new = RowMemo()
    rules: dict[str, Rule | InvalidRow] = {}
    policies: list[Policy] = []
    invalid: list[InvalidRow] = []
    with _translated("cannot read rules.db"):
        conn.row_factory = sqlite3.Row
        try:
            with transaction(conn):
                # Rows are turned into models as they are read, never all held at once.
                for row in conn.execute("SELECT * FROM rules ORDER BY id"):
                    key = hash(tuple(row))
                    rule = old.rules.get(key)
                    if rule is None:
                        try:
                            rule = _rule_from_row(row)
                        except (ValueError, TypeError, ValidationError) as exc:
                            rule = InvalidRow("rule", row["name"], _row_error(exc))
                    rules[row["name"]] = new.rules[key] = rule
                by_policy: dict[int, list[str]] = {}
                for policy_id, rule_name in conn.execute(
                    "SELECT pr.policy_id, r.name FROM policy_rules pr "
                    "JOIN rules r ON r.id = pr.rule_id ORDER BY pr.policy_id, pr.position"
                ):
                    by_policy.setdefault(policy_id, []).append(rule_name)
                for row in conn.execute("SELECT * FROM policies ORDER BY id"):
                    linked = tuple(by_policy.get(row["id"], ()))
                    key = hash((*row, linked))
                    policy = old.policies.get(key)
                    if policy is None:
                        try:
                            policy = _policy_from_row(row, linked)
                        except (ValueError, TypeError, ValidationError) as exc:
                            policy = InvalidRow("policy", row["name"], _row_error(exc), _fallback_policy(row))
                    new.policies[key] = policy
                    (invalid if isinstance(policy, InvalidRow) else policies).append(policy)
        finally:
            conn.row_factory = None
    if memo is not None:
        memo.rules, memo.policies = new.rules, new.policies
    return RuleSet(rules, tuple(policies), tuple(invalid))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when another connection commits anything to the database (cheap to poll)."""
    with _translated("cannot poll rules.db"):
        return int(conn.execute("PRAGMA data_version").fetchone()[0])


def rules_version(conn: sqlite3.Connection) -> tuple[int, bytes]:
    """Changes when rules, policies or their links change (maintained by triggers): a counter
    and a random token drawn at each change."""
    with _translated("cannot read rules.db"):
        version, token = conn.execute("SELECT version, token FROM rules_version WHERE id = 1").fetchone()
        return int(version), token


# ------------------------------------------------------------------------- writing


def _rule_columns(rule: Rule) -> dict[str, Any]:
    return {
        "name": rule.name,
        "enabled": int(rule.enabled),
        "method": rule.method,
        "url": rule.url,
        "headers": json.dumps([list(h) for h in rule.headers]),
        "body": rule.body,
        "auth_type": rule.auth.value,
        "auth_username": rule.username,
        "auth_password": rule.password,
        "oauth_token_url": rule.token_url,
        "oauth_client_id": rule.client_id,
        "oauth_client_secret": rule.client_secret,
        "verification": rule.verification.value,
        "actions": json.dumps([a.model_dump(mode="json") for a in rule.actions]),
        "timeout_ms": rule.timeout_ms,
        "cache_ttl": rule.cache_ttl,
    }


def save_rule(conn: sqlite3.Connection, rule: Rule) -> None:
    """Insert or update a rule by name (one statement; the caller owns the transaction)."""
    cols = _rule_columns(rule)
    names = ", ".join(cols)
    marks = ", ".join(f":{c}" for c in cols)
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "name")
    with _translated(f"cannot save rule {rule.name!r}"):
        conn.execute(
            f"INSERT INTO rules ({names}) VALUES ({marks}) ON CONFLICT(name) DO UPDATE SET "
            f"{updates}, updated_at = {_NOW}",
            cols,
        )


def save_policy(conn: sqlite3.Connection, policy: Policy) -> None:
    """Insert or update a policy by name and replace its rule links, in one transaction."""
    cols = {
        "name": policy.name,
        "enabled": int(policy.enabled),
        "hosts": json.dumps(list(policy.hosts)),
        "path_prefix": policy.path_prefix,
        "methods": json.dumps(list(policy.methods)),
        "integration": int(policy.integration),
        "priority": policy.priority,
    }
    names = ", ".join(cols)
    marks = ", ".join(f":{c}" for c in cols)
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c != "name")
    with _translated(f"cannot save policy {policy.name!r}"):
        conn.execute(
            f"INSERT INTO policies ({names}) VALUES ({marks}) ON CONFLICT(name) DO UPDATE SET "
            f"{updates}, updated_at = {_NOW}",
            cols,
        )
        (policy_id,) = conn.execute("SELECT id FROM policies WHERE name = ?", (policy.name,)).fetchone()
        linked = conn.execute(
            "SELECT r.name FROM policy_rules pr JOIN rules r ON r.id = pr.rule_id "
            "WHERE pr.policy_id = ? ORDER BY pr.position", (policy_id,)).fetchall()
        if tuple(name for (name,) in linked) == policy.rules:
            return  # untouched links: no audit row, no reload for nothing
        conn.execute("DELETE FROM policy_rules WHERE policy_id = ?", (policy_id,))
        for position, rule_name in enumerate(policy.rules):
            row = conn.execute("SELECT id FROM rules WHERE name = ?", (rule_name,)).fetchone()
            if row is None:
                raise StoreError(f"policy {policy.name!r} names rule {rule_name!r}, which does not exist")
            conn.execute(
                "INSERT INTO policy_rules (policy_id, rule_id, position) VALUES (?, ?, ?)",
                (policy_id, row[0], position),
            )


def insert_activity(conn: sqlite3.Connection, records: Sequence[ActivityRecord]) -> None:
    """Append decisions to the activity log in one transaction."""
    if not records:
        return
    with _translated("cannot write the activity log"):
        with transaction(conn, immediate=True):
            conn.executemany(
                "INSERT INTO activity_log (at, request_id, username, source_ip, host, path, method,"
                " policy, allowed, code, status, latency_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (iso_time(r.at) if isinstance(r.at, float) else r.at, r.request_id, r.username,
                     r.source_ip, r.host, r.path, r.method, r.policy, int(r.allowed), r.code, r.status,
                     r.latency_ms)
                    for r in records
                ],
            )


# SQLite has one writer at a time, and a connection waiting for the lock does not queue: its
# busy handler sleeps and retries, at most 100 ms apart. A pruner that took the lock again as
# soon as it released it could make the activity writer or an admin command miss every free
# moment until its busy timeout. So pruning deletes in short batches, each in its own
# transaction, and pauses between them for longer than that longest retry sleep: a waiting
# writer gets the lock in the pause, and waits at most about one batch.
PRUNE_PAUSE = 0.15


def prune_activity(conn: sqlite3.Connection, *, older_than: str | None, keep_rows: int | None,
                   batch: int = 5000, pause: float = PRUNE_PAUSE,
                   stop: threading.Event | None = None) -> int:
    """Delete the activity log rows older than ``older_than`` (a time in the log's format: UTC,
    ISO 8601), then those beyond the newest ``keep_rows`` (by id); None skips that limit. Return
    how many rows were deleted.

    At most ``batch`` rows per BEGIN IMMEDIATE transaction, ``pause`` seconds between
    transactions (see above). ``stop``, set from another thread, ends the pruning between two
    batches. Raises ``StoreError``; the batches committed before the error stay deleted."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    if keep_rows is not None and keep_rows < 0:
        raise ValueError("keep_rows must not be negative")
    deleted = 0
    need_pause = False  # none before the first transaction

    def delete(select: str, args: tuple[Any, ...]) -> bool:
        """Delete in batches the rows whose ids ``select`` gives; False if stopped."""
        nonlocal deleted, need_pause
        while True:
            if need_pause:
                if stop is not None:
                    if stop.wait(pause):
                        return False
                else:
                    time.sleep(pause)
            if stop is not None and stop.is_set():
                return False
            with transaction(conn, immediate=True):
                count = conn.execute(f"DELETE FROM activity_log WHERE id IN ({select})",
                                     (*args, batch)).rowcount
            deleted += count
            need_pause = True
            if count < batch:
                return True

    with _translated("cannot prune the activity log"):
        # Walks the index on ``at`` from the oldest entry.
        if older_than is not None and not delete(
                "SELECT id FROM activity_log WHERE at < ? LIMIT ?", (older_than,)):
            return deleted  # stopped
        if keep_rows is not None:
            # The id of the oldest row to keep, read once: rows written meanwhile are newer.
            if keep_rows == 0:
                row = conn.execute("SELECT max(id) + 1 FROM activity_log").fetchone()
            else:
                row = conn.execute("SELECT id FROM activity_log ORDER BY id DESC LIMIT 1 OFFSET ?",
                                   (keep_rows - 1,)).fetchone()
            if row is not None and row[0] is not None:
                delete("SELECT id FROM activity_log WHERE id < ? ORDER BY id LIMIT ?", (row[0],))
    return deleted


# --------------------------------------------------------------------------- admin
#
# What the admin script reads and writes. Its writes happen inside ``admin_transaction``, which
# records the actor for the audit triggers (see "audit log" above).


@contextmanager
def admin_transaction(conn: sqlite3.Connection, actor: str) -> Iterator[sqlite3.Connection]:
    """One admin command: BEGIN IMMEDIATE (so what the command validated against is what it
    writes over), the actor recorded for the audit triggers, COMMIT — or ROLLBACK if the body
    raises, leaving nothing behind. The audit rows are written just before COMMIT, one per
    object changed. Raises ``StoreError``."""
    with _translated("cannot write rules.db"):
        with transaction(conn, immediate=True):
            conn.execute("INSERT INTO admin_context (id, actor) VALUES (1, ?)", (actor,))
            yield conn
            conn.execute("DELETE FROM admin_context")


def flush_audit(conn: sqlite3.Connection) -> None:
    """Inside ``admin_transaction``: write the audit rows of the changes made so far now.

    Needed between deleting an object and creating another in the same command, because SQLite
    may give the new row the id of the deleted one."""
    with _translated("cannot write the audit log"):
        (actor,) = conn.execute("SELECT actor FROM admin_context WHERE id = 1").fetchone()
        conn.execute("DELETE FROM admin_context")
        conn.execute("INSERT INTO admin_context (id, actor) VALUES (1, ?)", (actor,))


def _sqlite_utils(conn: sqlite3.Connection) -> sqlite_utils.Database:
    # Our connection and its transaction; no PRAGMA changes, no plugins.
    return sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)


@dataclass(frozen=True, slots=True)
class StoredRule:
    """A rules row as the admin sees it.

    ``fields`` are the Rule model's fields as stored (JSON columns decoded when they decode,
    the text otherwise), so that a row that does not validate can still be shown and repaired;
    ``rule`` is the validated model, or None and ``error`` says why (as the sidecar says it);
    ``policies``: the names of the policies that use the rule, in name order.
    """

    name: str
    fields: dict[str, Any]
    rule: Rule | None
    error: str | None
    policies: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """A policies row as the admin sees it (see ``StoredRule``)."""

    name: str
    fields: dict[str, Any]
    policy: Policy | None
    error: str | None


def _decoded(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _rule_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"],
        "enabled": bool(row["enabled"]),
        "method": row["method"],
        "url": row["url"],
        "headers": _decoded(row["headers"]),
        "body": row["body"],
        "auth": row["auth_type"],
        "username": row["auth_username"],
        "password": row["auth_password"],
        "token_url": row["oauth_token_url"],
        "client_id": row["oauth_client_id"],
        "client_secret": row["oauth_client_secret"],
        "verification": row["verification"],
        "actions": _decoded(row["actions"]),
        "timeout_ms": row["timeout_ms"],
        "cache_ttl": row["cache_ttl"],
    }


def read_rules(conn: sqlite3.Connection, name: str | None = None) -> list[StoredRule]:
    """Every rule (or the one named ``name``: a list of at most one), in name order."""
    db = _sqlite_utils(conn)
    with _translated("cannot read rules.db"):
        where, args = ("name = ?", [name]) if name is not None else (None, None)
        rows = list(db.table("rules").rows_where(where, args, order_by="name"))
        used: dict[str, list[str]] = {}
        for link in db.query(
            "SELECT r.name AS rule, p.name AS policy FROM policy_rules pr "
            "JOIN rules r ON r.id = pr.rule_id JOIN policies p ON p.id = pr.policy_id ORDER BY p.name"
        ):
            used.setdefault(link["rule"], []).append(link["policy"])
    out = []
    for row in rows:
        rule: Rule | None = None
        error: str | None = None
        try:
            rule = _rule_from_row(row)
        except (ValueError, TypeError, ValidationError) as exc:
            error = _row_error(exc)
        out.append(StoredRule(row["name"], _rule_fields(row), rule, error, tuple(used.get(row["name"], ()))))
    return out


def read_policies(conn: sqlite3.Connection, name: str | None = None) -> list[StoredPolicy]:
    """Every policy (or the one named ``name``), in name order, with its rules in order."""
    db = _sqlite_utils(conn)
    with _translated("cannot read rules.db"):
        where, args = ("name = ?", [name]) if name is not None else (None, None)
        rows = list(db.table("policies").rows_where(where, args, order_by="name"))
        links: dict[int, list[str]] = {}
        for link in db.query(
            "SELECT pr.policy_id, r.name FROM policy_rules pr JOIN rules r ON r.id = pr.rule_id "
            "ORDER BY pr.policy_id, pr.position"
        ):
            links.setdefault(link["policy_id"], []).append(link["name"])
    out = []
    for row in rows:
        rules = tuple(links.get(row["id"], ()))
        fields = {
            "name": row["name"],
            "enabled": bool(row["enabled"]),
            "hosts": _decoded(row["hosts"]),
            "path_prefix": row["path_prefix"],
            "methods": _decoded(row["methods"]),
            "integration": bool(row["integration"]),
            "priority": row["priority"],
            "rules": list(rules),
        }
        policy: Policy | None = None
        error: str | None = None
        try:
            policy = _policy_from_row(row, rules)
        except (ValueError, TypeError, ValidationError) as exc:
            error = _row_error(exc)
        out.append(StoredPolicy(row["name"], fields, policy, error))
    return out


def delete_rule(conn: sqlite3.Connection, name: str) -> bool:
    """Delete a rule; False if there is none. A rule still used by a policy is not deleted
    (``StoreError``: the admin script checks first and names the policies)."""
    with _translated(f"cannot delete rule {name!r}"):
        return conn.execute("DELETE FROM rules WHERE name = ?", (name,)).rowcount > 0


def delete_policy(conn: sqlite3.Connection, name: str) -> bool:
    """Delete a policy and its rule links; False if there is none."""
    with _translated(f"cannot delete policy {name!r}"):
        return conn.execute("DELETE FROM policies WHERE name = ?", (name,)).rowcount > 0


def set_enabled(conn: sqlite3.Connection, kind: str, name: str, enabled: bool) -> bool | None:
    """Enable or disable the rule or policy (``kind``) ``name``, valid or not (a broken rule can
    always be disabled). True if that changed it, False if it already was, None if there is none."""
    table = {"rule": "rules", "policy": "policies"}[kind]
    with _translated(f"cannot update {kind} {name!r}"):
        row = conn.execute(f"SELECT enabled FROM {table} WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        if bool(row[0]) == enabled:
            return False
        conn.execute(f"UPDATE {table} SET enabled = ?, updated_at = {_NOW} WHERE name = ?",
                     (int(enabled), name))
        return True


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit log row; ``before``/``after`` are the object's documents (secrets redacted),
    None when it did not exist before (create) or after (delete)."""

    id: int
    at: str
    actor: str
    action: str
    object_type: str
    object_name: str
    before: Any
    after: Any


def read_audit(conn: sqlite3.Connection, *, limit: int | None = None, since: str | None = None) -> list[AuditEntry]:
    """The newest audit rows first; ``since``: a time in the log's format (UTC, ISO 8601)."""
    with _translated("cannot read the audit log"):
        rows = _sqlite_utils(conn).table("audit_log").rows_where(
            "at >= ?" if since else None, [since] if since else None,
            order_by="at DESC, id DESC", limit=limit,
        )
        return [
            AuditEntry(r["id"], r["at"], r["actor"], r["action"], r["object_type"], r["object_name"],
                       _decoded(r["before"]) if r["before"] is not None else None,
                       _decoded(r["after"]) if r["after"] is not None else None)
            for r in rows
        ]


def read_activity(conn: sqlite3.Connection, *, denied: bool = False, user: str | None = None,
                  limit: int | None = None, since: str | None = None) -> list[ActivityRecord]:
    """The newest activity log rows first, optionally only denials, one user's, or since a time."""
    where, args = [], []
    if denied:
        where.append("allowed = 0")
    if user is not None:
        where.append("username = ?")
        args.append(user)
    if since:
        where.append("at >= ?")
        args.append(since)
    with _translated("cannot read the activity log"):
        rows = _sqlite_utils(conn).table("activity_log").rows_where(
            " AND ".join(where) or None, args, order_by="at DESC, id DESC", limit=limit,
        )
        return [
            ActivityRecord(r["at"], r["request_id"], r["username"], r["source_ip"], r["host"], r["path"],
                           r["method"], r["policy"], bool(r["allowed"]), r["code"], r["status"],
                           r["latency_ms"])
            for r in rows
        ]
