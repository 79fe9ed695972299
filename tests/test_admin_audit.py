"""The audit log: written by triggers in rules.db, whoever makes the change and however."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
import sqlite_utils

from sidecar.db import (
    StoreError,
    admin_transaction,
    connect,
    migrations,
    pending_migrations,
    save_policy,
    save_rule,
)
from sidecar.policies import Policy
from sidecar.rules.model import Rule
from sidecar.rules.secrets import MASK, SECRET_HEADERS
from tests.conftest import seed
from tests.helpers import needed_program


def audit(db: Path) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(
            "SELECT actor, action, object_type, object_name, before, after FROM audit_log ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


def doc(text: str | None) -> dict | None:
    return None if text is None else json.loads(text)


def rule_doc(**fields: object) -> dict:
    base = {"name": "r", "enabled": True, "method": "GET", "url": "http://x/", "headers": [], "body": None,
            "auth": "none", "username": None, "password": None, "token_url": None, "client_id": None,
            "client_secret": None, "verification": "json", "actions": [], "timeout_ms": 1000,
            "cache_ttl": 0.0}
    return {**base, **fields}


def test_the_migration_spells_the_mask_and_secret_headers_as_the_code_does() -> None:
    # A released migration never changes (test_store holds it to its released SQL): the code
    # must keep these in step with it.
    (sql,) = [sql for name, sql in migrations.MIGRATIONS if name == "0002_audit_triggers"]
    assert set(re.findall(r"'(•+)", sql)) == {MASK}
    header_lists = re.findall(r"lower\(json_extract\(value, '\$\[0\]'\)\) IN \(([^)]*)\)", sql)
    assert set(header_lists) == {", ".join(f"'{name}'" for name in SECRET_HEADERS)}


def test_plain_sql_edits_are_audited_with_actor_sql(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO rules (name, url) VALUES ('r', 'http://x/')")
    conn.execute("UPDATE rules SET timeout_ms = 500 WHERE name = 'r'")
    conn.execute("UPDATE rules SET enabled = 0 WHERE name = 'r'")
    conn.execute("INSERT INTO policies (name) VALUES ('p')")
    conn.execute("INSERT INTO policy_rules (policy_id, rule_id, position) VALUES (1, 1, 0)")
    conn.execute("DELETE FROM policy_rules")
    conn.execute("DELETE FROM policies")
    conn.execute("DELETE FROM rules")
    conn.commit()
    conn.close()
    policy = {"name": "p", "enabled": True, "hosts": [], "path_prefix": "/", "methods": [],
              "integration": True, "priority": 100, "ports": [], "sni": [], "mode": "enforce", "rules": []}
    assert [(a, act, t, n, doc(b), doc(af)) for a, act, t, n, b, af in audit(db)] == [
        ("sql", "create", "rule", "r", None, rule_doc()),
        ("sql", "edit", "rule", "r", rule_doc(), rule_doc(timeout_ms=500)),
        ("sql", "disable", "rule", "r", rule_doc(timeout_ms=500), rule_doc(timeout_ms=500, enabled=False)),
        ("sql", "create", "policy", "p", None, policy),
        ("sql", "edit", "policy", "p", policy, {**policy, "rules": ["r"]}),  # a link is a policy edit
        ("sql", "edit", "policy", "p", {**policy, "rules": ["r"]}, policy),
        ("sql", "delete", "policy", "p", policy, None),
        ("sql", "delete", "rule", "r", rule_doc(timeout_ms=500, enabled=False), None),
    ]


def test_sqlite_utils_edits_are_audited(db: Path) -> None:
    seed(db, [Rule(name="r", url="http://x/")])
    before = len(audit(db))
    # sqlite-utils turns recursive triggers on: the audit triggers must not recurse.
    database = sqlite_utils.Database(db)
    database["rules"].update(1, {"url": "http://y/"})
    database["policies"].insert({"name": "p", "priority": 5})
    database.close()
    rows = audit(db)[before:]
    assert [(a, act, t, n) for a, act, t, n, _, _ in rows] == [
        ("sql", "edit", "rule", "r"), ("sql", "create", "policy", "p")]
    assert doc(rows[0][5])["url"] == "http://y/"


def test_the_sqlite3_shell_is_audited(db: Path) -> None:
    shell = needed_program("sqlite3", "sqlite3")
    seed(db, [Rule(name="r", url="http://x/")], [Policy(name="p", rules=("r",))])
    before = len(audit(db))
    subprocess.run([shell, str(db), "UPDATE policies SET priority = 1 WHERE name = 'p';"],
                   check=True, capture_output=True, timeout=10)
    rows = audit(db)[before:]
    assert [(a, act, t, n) for a, act, t, n, _, _ in rows] == [("sql", "edit", "policy", "p")]
    assert (doc(rows[0][4])["priority"], doc(rows[0][5])["priority"]) == (100, 1)


def test_audit_rows_cannot_be_changed_or_deleted(db: Path) -> None:
    seed(db, [Rule(name="r", url="http://x/")])
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError, match="append-only: its rows cannot be changed"):
        conn.execute("UPDATE audit_log SET actor = 'nobody'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only: its rows cannot be deleted"):
        conn.execute("DELETE FROM audit_log")
    conn.close()
    assert [r[0] for r in audit(db)] == ["sql"]


def test_secrets_are_redacted_and_a_changed_clear_secret_says_so(db: Path) -> None:
    rule = Rule(name="r", url="http://x/", auth="basic", username="svc", password="hunter2",
                headers=(("Authorization", "Bearer static-token"), ("X-Api", "visible")))
    seed(db, [rule])
    seed(db, [rule.model_copy(update={"password": "hunter3"})])
    seed(db, [rule.model_copy(update={"password": "env:PW"})])
    rows = audit(db)
    text = json.dumps(rows)
    assert "hunter" not in text and "static-token" not in text
    (_, _, _, _, _, created), (_, edit1, _, _, before1, after1), (_, _, _, _, _, after2) = rows
    assert doc(created)["password"] == MASK
    assert doc(created)["headers"] == [["Authorization", MASK], ["X-Api", "visible"]]
    assert (edit1, doc(before1)["password"], doc(after1)["password"]) == ("edit", MASK, f"{MASK} (changed)")
    assert doc(after2)["password"] == "env:PW"  # a reference is not a secret


def test_a_write_that_changes_nothing_is_not_audited(db: Path) -> None:
    rule = Rule(name="r", url="http://x/")
    seed(db, [rule], [Policy(name="p", rules=("r",))])
    before = audit(db)
    seed(db, [rule], [Policy(name="p", rules=("r",))])  # upserts and relinks the same values
    assert audit(db) == before


def test_an_admin_transaction_writes_one_row_per_object_with_its_actor(db: Path) -> None:
    conn = connect(db)
    with admin_transaction(conn, "alice"):
        save_rule(conn, Rule(name="r", url="http://x/"))
        save_rule(conn, Rule(name="r", url="http://y/"))
        save_policy(conn, Policy(name="p", rules=("r",)))
    assert [(a, act, t, n, doc(af)["url"] if t == "rule" else doc(af)["rules"])
            for a, act, t, n, _, af in audit(db)] == [
        ("alice", "create", "rule", "r", "http://y/"), ("alice", "create", "policy", "p", ["r"])]
    assert conn.execute("SELECT count(*) FROM admin_context").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM audit_pending").fetchone() == (0,)
    conn.close()


def test_a_failed_admin_transaction_leaves_nothing(db: Path) -> None:
    conn = connect(db)
    with pytest.raises(StoreError, match="names rule 'ghost'"):
        with admin_transaction(conn, "alice"):
            save_rule(conn, Rule(name="r", url="http://x/"))
            save_policy(conn, Policy(name="p", rules=("r", "ghost")))
    for table in ("rules", "policies", "audit_log", "admin_context", "audit_pending"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table
    conn.close()


def test_a_broken_row_written_with_sql_is_audited_not_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO rules (name, url, headers, actions) VALUES ('b', 'http://x', '[', '{nope')")
    conn.commit()
    conn.close()
    ((actor, action, _, name, _, after),) = audit(db)
    assert (actor, action, name) == ("sql", "create", "b")
    # Headers that are not JSON may still hold a credential: masked whole.
    assert (doc(after)["headers"], doc(after)["actions"]) == (MASK, "{nope")


def test_a_replaced_row_is_a_delete_and_a_create(db: Path) -> None:
    seed(db, [Rule(name="r", url="http://x/")])
    conn = sqlite3.connect(db)
    conn.execute("REPLACE INTO rules (name, url) VALUES ('r', 'http://y/')")
    conn.commit()
    conn.close()
    assert [(act, n) for _, act, _, n, _, _ in audit(db)] == [("create", "r"), ("delete", "r"), ("create", "r")]


def test_an_older_rules_db_gets_the_audit_triggers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.admin_cli import admin

    path = tmp_path / "old.db"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
    seed(path, [Rule(name="r", url="http://x/")])
    monkeypatch.undo()
    assert audit(path) == []  # written before the audit triggers existed
    assert admin(path, "rule", "edit", "r", "--timeout-ms", "5").stdout == 'rule "r" updated\n'
    ((actor, action, _, name, before, after),) = audit(path)
    assert (actor, action, name, doc(before)["timeout_ms"], doc(after)["timeout_ms"]) == ("alice", "edit", "r", 1000, 5)
    assert pending_migrations(sqlite3.connect(path)) == []
