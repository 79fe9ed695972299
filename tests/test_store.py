"""rules.db: migrations, loading, bad rows, the activity log table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sidecar import store
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, AuthType, InvalidRow, ResponseAction, Rule
from tests.conftest import seed

RULE = Rule(
    name="posture",
    method="POST",
    url="https://api.example.com/check?u=%username%",
    headers=(("X-Api-Key", "k"), ("X-Device", "%device_id%")),
    body='{"user": "%username%"}',
    auth=AuthType.OAUTH,
    token_url="https://idp.example.com/token",
    client_id="cid",
    client_secret="env:POSTURE_SECRET",
    verification="jsonp",
    actions=(ResponseAction(type=ActionType.STRING, key="data.status", value="active"),
             ResponseAction(type=ActionType.REGEX, key="data.role", value="^(admin|ops)$"),
             ResponseAction(type=ActionType.STORE, key="data.tier", value="tier")),
    timeout_ms=750,
    cache_ttl=30,
)


def test_new_database_gets_every_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    assert store.ensure_database(path) == [name for name, _ in store.MIGRATIONS]
    assert store.ensure_database(path) == []
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"rules", "policies", "policy_rules", "audit_log", "activity_log", "schema_migrations"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failing_migration_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.db"
    store.ensure_database(path)
    broken = store.MIGRATIONS + (("0999_broken", "CREATE TABLE half (x); CREATE TABLE oops ("),)
    monkeypatch.setattr(store, "MIGRATIONS", broken)
    with pytest.raises(store.StoreError):
        store.ensure_database(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half'").fetchone()[0] == 0
    assert store.pending_migrations(conn) == ["0999_broken"]


def test_rules_and_policies_round_trip(db: Path) -> None:
    policy = Policy(name="p", hosts=("*.example.com",), path_prefix="/app", methods=("GET",),
                    integration=True, priority=5, rules=("posture",))
    seed(db, [RULE], [policy])
    rule_set = store.load_rule_set(store.connect(db, readonly=True))
    assert rule_set.rules == {"posture": RULE}
    assert rule_set.policies == (policy,)


def test_policy_naming_a_missing_rule_is_refused(db: Path) -> None:
    with pytest.raises(store.StoreError, match="names rule 'ghost'"):
        seed(db, [], [Policy(name="p", rules=("ghost",))])
    assert store.load_rule_set(store.connect(db, readonly=True)).policies == ()


def test_bad_rows_written_with_plain_sql_are_reported_not_fatal(db: Path) -> None:
    seed(db, [RULE], [Policy(name="good")])
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO rules (name, url, actions) VALUES ('broken-json', 'http://x', '{nope')")
    conn.execute("""INSERT INTO rules (name, url, actions) VALUES ('bad-regex', 'http://x',
                    '[{"type": "regex", "key": "a", "value": "("}]')""")
    conn.execute("INSERT INTO policies (name, hosts) VALUES ('bad-host', '[\"a b\"]')")
    conn.commit()
    rule_set = store.load_rule_set(store.connect(db, readonly=True))
    assert isinstance(rule_set.rules["broken-json"], InvalidRow)
    assert "regex" in rule_set.rules["bad-regex"].error
    assert rule_set.rules["posture"] == RULE
    assert [p.name for p in rule_set.policies] == ["good"]
    assert [p.name for p in rule_set.invalid_policies] == ["bad-host"]


def test_rules_version_moves_on_rule_changes_only(db: Path) -> None:
    conn = store.connect(db)
    before = store.rules_version(conn)
    store.insert_activity(conn, [store.ActivityRecord("2026-01-01T00:00:00Z", "r", "u", "1.2.3.4", "h",
                                                      "/", "GET", None, False, "no_matching_policy", "x", 1.0)])
    assert store.rules_version(conn) == before
    conn.execute("UPDATE policies SET priority = 1")  # no rows: still no change
    seed(db, [RULE])
    after = store.rules_version(conn)
    assert after[0] > before[0] and after[1] != before[1]


def test_readonly_connection_never_creates_the_file(tmp_path: Path) -> None:
    with pytest.raises(store.StoreError):
        store.connect(tmp_path / "absent.db", readonly=True).execute("SELECT 1")
    assert not (tmp_path / "absent.db").exists()
