"""rules.db: schema, migrations, reading the rule set, writing the activity log.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .policies import Policy
from .rules import Rule

BUSY_TIMEOUT_MS = 5000
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

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
)


class StoreError(Exception):
    """rules.db could not be opened, migrated, read or written."""


@dataclass(frozen=True, slots=True)
class InvalidRow:
    """A rules or policies row that does not validate; ``error`` says why in one line."""

    kind: str
    name: str
    error: str


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Everything the request path needs from rules.db, read in one transaction."""

    rules: dict[str, Rule | InvalidRow]
    policies: tuple[Policy, ...]
    invalid_policies: tuple[InvalidRow, ...]


@dataclass(frozen=True, slots=True)
class ActivityRecord:
    at: str
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


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"{what}: {exc}") from exc


def connect(path: str | os.PathLike[str], *, readonly: bool = False) -> sqlite3.Connection:
    """Open rules.db. Read-only connections never create the file."""
    with _translated(f"cannot open {path}"):
        if readonly:
            uri = Path(path).absolute().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn


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


def _rule_from_row(row: sqlite3.Row) -> Rule:
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


def _policy_from_row(row: sqlite3.Row, rule_names: tuple[str, ...]) -> Policy:
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


def _row_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return f"{type(exc).__name__}: {exc}"


def load_rule_set(conn: sqlite3.Connection) -> RuleSet:
    """Read every rule and policy in one read transaction (a consistent snapshot)."""
    with _translated("cannot read rules.db"):
        conn.row_factory = sqlite3.Row
        try:
            with transaction(conn):
                rule_rows = conn.execute("SELECT * FROM rules ORDER BY id").fetchall()
                policy_rows = conn.execute("SELECT * FROM policies ORDER BY id").fetchall()
                links = conn.execute(
                    "SELECT pr.policy_id, r.name FROM policy_rules pr "
                    "JOIN rules r ON r.id = pr.rule_id ORDER BY pr.policy_id, pr.position"
                ).fetchall()
        finally:
            conn.row_factory = None
    rules: dict[str, Rule | InvalidRow] = {}
    for row in rule_rows:
        try:
            rules[row["name"]] = _rule_from_row(row)
        except (ValueError, TypeError, ValidationError) as exc:
            rules[row["name"]] = InvalidRow("rule", row["name"], _row_error(exc))
    by_policy: dict[int, list[str]] = {}
    for policy_id, rule_name in links:
        by_policy.setdefault(policy_id, []).append(rule_name)
    policies: list[Policy] = []
    invalid: list[InvalidRow] = []
    for row in policy_rows:
        try:
            policies.append(_policy_from_row(row, tuple(by_policy.get(row["id"], ()))))
        except (ValueError, TypeError, ValidationError) as exc:
            invalid.append(InvalidRow("policy", row["name"], _row_error(exc)))
    return RuleSet(rules, tuple(policies), tuple(invalid))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when another connection commits anything to the database (cheap to poll)."""
    with _translated("cannot poll rules.db"):
        return int(conn.execute("PRAGMA data_version").fetchone()[0])


def rules_version(conn: sqlite3.Connection) -> int:
    """Changes when rules, policies or their links change (maintained by triggers)."""
    with _translated("cannot read rules.db"):
        return int(conn.execute("SELECT version FROM rules_version WHERE id = 1").fetchone()[0])


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
                    (r.at, r.request_id, r.username, r.source_ip, r.host, r.path, r.method,
                     r.policy, int(r.allowed), r.code, r.status, r.latency_ms)
                    for r in records
                ],
            )
