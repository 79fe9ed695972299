"""Rules and policies as the admin script reads and writes them.

Writes are single statements (or, for a policy, its row and its links) inside the caller's
transaction: the admin script's ``admin_transaction``, which records the actor for the audit
triggers. Reads give every row, valid or not, so that a broken one can be shown and repaired.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Literal

from ..policies import Policy
from ..rules.model import Rule
from .columns import (
    BROKEN_ROW,
    policy_fields,
    policy_from_row,
    policy_row,
    row_error,
    rule_fields,
    rule_from_row,
    rule_row,
)
from .connection import NOW, StoreError, sqlite_utils_db, translated

ObjectKind = Literal["rule", "policy"]

_TABLES: dict[ObjectKind, str] = {"rule": "rules", "policy": "policies"}


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


def read_rules(conn: sqlite3.Connection, name: str | None = None) -> list[StoredRule]:
    """Every rule (or the one named ``name``: a list of at most one), in name order.
    Raises ``StoreError``."""
    db = sqlite_utils_db(conn)
    with translated("cannot read rules.db"):
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
            rule = rule_from_row(row)
        except BROKEN_ROW as exc:
            error = row_error(exc)
        out.append(StoredRule(row["name"], rule_fields(row), rule, error, tuple(used.get(row["name"], ()))))
    return out


def read_policies(conn: sqlite3.Connection, name: str | None = None) -> list[StoredPolicy]:
    """Every policy (or the one named ``name``), in name order, with its rules in order.
    Raises ``StoreError``."""
    db = sqlite_utils_db(conn)
    with translated("cannot read rules.db"):
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
        policy: Policy | None = None
        error: str | None = None
        try:
            policy = policy_from_row(row, rules)
        except BROKEN_ROW as exc:
            error = row_error(exc)
        out.append(StoredPolicy(row["name"], policy_fields(row, rules), policy, error))
    return out


def _upsert(table: str, row: dict[str, Any]) -> str:
    """An insert of ``row`` into ``table`` that updates the row of the same name instead."""
    names = ", ".join(row)
    marks = ", ".join(f":{c}" for c in row)
    updates = ", ".join(f"{c} = excluded.{c}" for c in row if c != "name")
    return (f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT(name) DO UPDATE SET "
            f"{updates}, updated_at = {NOW}")


def save_rule(conn: sqlite3.Connection, rule: Rule) -> None:
    """Insert or update a rule by name (one statement; the caller owns the transaction).
    Raises ``StoreError``."""
    row = rule_row(rule)
    with translated(f"cannot save rule {rule.name!r}"):
        conn.execute(_upsert("rules", row), row)


def save_policy(conn: sqlite3.Connection, policy: Policy) -> None:
    """Insert or update a policy by name and replace its rule links, in the caller's
    transaction. Raises ``StoreError``, also when a linked rule does not exist."""
    row = policy_row(policy)
    with translated(f"cannot save policy {policy.name!r}"):
        conn.execute(_upsert("policies", row), row)
        (policy_id,) = conn.execute("SELECT id FROM policies WHERE name = ?", (policy.name,)).fetchone()
        linked = conn.execute(
            "SELECT r.name FROM policy_rules pr JOIN rules r ON r.id = pr.rule_id "
            "WHERE pr.policy_id = ? ORDER BY pr.position", (policy_id,)).fetchall()
        if tuple(name for (name,) in linked) == policy.rules:
            return  # untouched links: no audit row, no reload for nothing
        conn.execute("DELETE FROM policy_rules WHERE policy_id = ?", (policy_id,))
        for position, rule_name in enumerate(policy.rules):
            found = conn.execute("SELECT id FROM rules WHERE name = ?", (rule_name,)).fetchone()
            if found is None:
                raise StoreError(f"policy {policy.name!r} names rule {rule_name!r}, which does not exist")
            conn.execute(
                "INSERT INTO policy_rules (policy_id, rule_id, position) VALUES (?, ?, ?)",
                (policy_id, found[0], position),
            )


def delete_rule(conn: sqlite3.Connection, name: str) -> bool:
    """Delete a rule; False if there is none. A rule still used by a policy is not deleted
    (``StoreError``: the admin script checks first and names the policies)."""
    with translated(f"cannot delete rule {name!r}"):
        return conn.execute("DELETE FROM rules WHERE name = ?", (name,)).rowcount > 0


def delete_policy(conn: sqlite3.Connection, name: str) -> bool:
    """Delete a policy and its rule links; False if there is none. Raises ``StoreError``."""
    with translated(f"cannot delete policy {name!r}"):
        return conn.execute("DELETE FROM policies WHERE name = ?", (name,)).rowcount > 0


def set_enabled(conn: sqlite3.Connection, kind: ObjectKind, name: str, enabled: bool) -> bool | None:
    """Enable or disable the rule or policy (``kind``) ``name``, valid or not (a broken rule can
    always be disabled). True if that changed it, False if it already was, None if there is none.
    Raises ``StoreError``."""
    table = _TABLES[kind]
    with translated(f"cannot update {kind} {name!r}"):
        row = conn.execute(f"SELECT enabled FROM {table} WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        if bool(row[0]) == enabled:
            return False
        conn.execute(f"UPDATE {table} SET enabled = ?, updated_at = {NOW} WHERE name = ?",
                     (int(enabled), name))
        return True
