"""rules.db: migrations, loading, bad rows, the columns tables, the activity log table."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from sidecar.db import (
    ActivityRecord,
    RowMemo,
    StoreError,
    connect,
    ensure_database,
    insert_activity,
    iso_time,
    load_rule_set,
    migrations,
    parse_iso_time,
    pending_migrations,
    read_activity,
    read_trace,
    rules_version,
    save_policy,
    save_rule,
    transaction,
)
from sidecar.db.activity import TRACE_MAX_BYTES
from sidecar.db.columns import POLICY_COLUMNS, RULE_COLUMNS, decoded
from sidecar.exchange import masked_headers
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, AuthType, InvalidRow, ResponseAction, Rule
from sidecar.rules.secrets import MASK, SECRET_HEADERS
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

# The SHA-256 of each released migration's SQL. A released migration never changes: rules.db
# files in use recorded its name and will not run it again. Change the schema with a new file.
RELEASED = {
    "0001_initial": "2261134734eb140529ae86dc787cf2c901305a77cd327ee620adaa897b4324ec",
    "0002_audit_triggers": "653ece181279f592eeb115313f7c05d9a4dc245780313a2498c783ebb34e92b5",
    "0003_rules_version_token": "58d5e3949a9c03997e95c840ee9aba0f9a5b1fef77a5eda376dbe29450c1bd01",
    "0004_policy_ports_sni_and_policy_source": "bfdf9741d3639398412e061f6fa386401cc989a99a2edbaec4ab55ebc7e9e42e",
    "0005_bundle_state": "8144a94597820afff50e27b3f36b3917afcf22a88c4e5568fd7066b58456388f",
    "0006_policy_mode_and_audit_deny": "73338837ded1aed7d74a6b7461efa7c301f1d7a5a2745cda23cde7f21794f359",
    "0007_traces": "99e94bab74a2ee7dc7732172e9f80fdda262b25ae9c2a88978370b09a7a87fc3",
    "0008_audit_headers_masked": "d3c6a8c7632cf7941a936b3629126b0ed9fde3a39cf05d053820dd3275c00dbb",
    "0009_audit_flush_seeks": "1a8716dde7d94acc16d0553828d1a9b9b3e61b73d233f534a74a559f769d9eac",
    "0010_fleet_activity": "d429138bd1c5a0e51f2836ba5462511f4c9588917495f6f41a3d01c4f6a7f2f3",
}

# sqlite_master of a rules.db migrated by the code that generated the migrations in Python,
# before they were written out as .sql files (see its "source").
SCHEMA_FIXTURE = Path(__file__).parent / "fixtures" / "schema_6734739.json"


def schema(conn: sqlite3.Connection) -> list[list[str | None]]:
    return [list(r) for r in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")]


def test_new_database_gets_every_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    assert ensure_database(path) == [name for name, _ in migrations.MIGRATIONS]
    assert ensure_database(path) == []
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"rules", "policies", "policy_rules", "audit_log", "activity_log", "schema_migrations"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migrations_are_the_released_sql_files_in_order() -> None:
    files = sorted(f.name for f in resources.files("sidecar.db.migrations").iterdir() if f.name.endswith(".sql"))
    assert all(re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", name) for name in files), files
    assert [name for name, _ in migrations.MIGRATIONS] == [name.removesuffix(".sql") for name in files]
    released = {name: hashlib.sha256(sql.encode()).hexdigest() for name, sql in migrations.MIGRATIONS
                if name in RELEASED}
    assert released == RELEASED, "a released migration changed: add a migration instead of editing one"


def test_the_sql_files_make_the_schema_the_python_generated_migrations_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = json.loads(SCHEMA_FIXTURE.read_text(encoding="utf-8"))
    released = migrations.MIGRATIONS[:len(fixture["migrations"])]
    assert [name for name, _ in released] == fixture["migrations"]
    monkeypatch.setattr(migrations, "MIGRATIONS", released)
    ensure_database(tmp_path / "new.db")
    conn = sqlite3.connect(tmp_path / "new.db")
    assert schema(conn) == fixture["schema"]
    conn.close()


def test_a_failing_migration_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.db"
    ensure_database(path)
    broken = (*migrations.MIGRATIONS, ("0999_broken", "CREATE TABLE half (x); CREATE TABLE oops ("))
    monkeypatch.setattr(migrations, "MIGRATIONS", broken)
    with pytest.raises(StoreError):
        ensure_database(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half'").fetchone()[0] == 0
    assert pending_migrations(conn) == ["0999_broken"]


def test_rules_and_policies_round_trip(db: Path) -> None:
    policy = Policy(name="p", hosts=("*.example.com",), path_prefix="/app", methods=("GET",),
                    integration=True, priority=5, rules=("posture",))
    seed(db, [RULE], [policy])
    rule_set = load_rule_set(connect(db, readonly=True))
    assert rule_set.rules == {"posture": RULE}
    assert rule_set.policies == (policy,)


def test_the_columns_tables_cover_every_field_and_column(db: Path) -> None:
    conn = sqlite3.connect(db)
    for table, columns, fields in (("rules", RULE_COLUMNS, list(Rule.model_fields)),
                                   ("policies", POLICY_COLUMNS, [f for f in Policy.model_fields if f != "rules"])):
        assert [c.field for c in columns] == fields, table
        stored = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        assert stored - {c.name for c in columns} == {"id", "created_at", "updated_at"}, table
    conn.close()


def test_the_audit_documents_have_the_columns_tables_fields_in_order(db: Path) -> None:
    # The audit triggers are released SQL: they must keep agreeing with the tables.
    seed(db, [RULE], [Policy(name="p", rules=("posture",))])
    conn = sqlite3.connect(db)
    docs = {kind: json.loads(after) for kind, after in conn.execute("SELECT object_type, after FROM audit_log")}
    conn.close()
    assert list(docs["rule"]) == [c.field for c in RULE_COLUMNS]
    assert list(docs["policy"]) == [c.field for c in POLICY_COLUMNS] + ["rules"]
    assert docs["rule"] == RULE.model_dump(mode="json")  # as exported: RULE holds no clear secret


# Rule headers as plain SQL may store them (the admin script writes only the first shape), each
# holding a secret that must not reach an audit document or the admin script's text.
HEADER_SHAPES = [
    '[["Authorization", "Bearer pairs-S1"], ["X-Api", "visible"]]',
    '{"Authorization": "Bearer object-S2", "X-Api": "visible", "PROXY-AUTHORIZATION": "Basic object-S3"}',
    '[["authorization", "Bearer", "three-S4"], {"Proxy-Authorization": "inner-S5"}, "Authorization: text-S6", []]',
    '[[null, "nameless-S7"], ["solo"]]',
    '[["Authorization", "Bearer broken-S8"]',
    '"Bearer scalar-S9"',
    "Authorization: Bearer text-S10",
    "[]",
    "{}",
]
HEADER_SECRETS = re.compile(r"-S\d+\b")


def _header_rows(db: Path) -> None:
    conn = sqlite3.connect(db)
    with conn:
        for i, headers in enumerate(HEADER_SHAPES):
            conn.execute("INSERT INTO rules (name, url, headers) VALUES (?, 'http://x/', ?)", (f"h{i}", headers))
    conn.close()


def _audited_headers(db: Path) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT object_name, before, after FROM audit_log WHERE object_type = 'rule'").fetchall()
    finally:
        conn.close()
    assert not HEADER_SECRETS.search(json.dumps(rows)), rows
    return {name: json.loads(after)["headers"] for name, _, after in rows}


def test_rule_headers_are_masked_alike_in_audit_documents_and_the_admin_script(db: Path) -> None:
    _header_rows(db)
    audited = _audited_headers(db)
    for i, headers in enumerate(HEADER_SHAPES):
        shown = masked_headers(decoded(headers))
        assert not HEADER_SECRETS.search(json.dumps(shown)), shown
        assert audited[f"h{i}"] == shown, headers
    assert audited["h0"] == [["Authorization", MASK], ["X-Api", "visible"]]
    assert audited["h1"] == {"Authorization": MASK, "X-Api": "visible", "PROXY-AUTHORIZATION": MASK}
    assert audited["h3"] == [[None, MASK], ["solo"]] and audited["h4"] == audited["h6"] == MASK


def test_the_migration_masks_headers_audited_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit rows written by 0002's documents held these values in clear: 0008 masks them in
    place, and the log stays append-only afterwards."""
    path = tmp_path / "old.db"
    released = migrations.MIGRATIONS
    monkeypatch.setattr(migrations, "MIGRATIONS", tuple(m for m in released if m[0] < "0008"))
    ensure_database(path)
    _header_rows(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE rules SET timeout_ms = 5 WHERE name = 'h1'")  # a before and an after
    conn.commit()
    assert HEADER_SECRETS.search(json.dumps(conn.execute("SELECT before, after FROM audit_log").fetchall()))
    conn.close()
    monkeypatch.setattr(migrations, "MIGRATIONS", tuple(m for m in released if m[0] < "0009"))
    assert ensure_database(path) == ["0008_audit_headers_masked"]
    audited = _audited_headers(path)
    assert audited["h1"] == {"Authorization": MASK, "X-Api": "visible", "PROXY-AUTHORIZATION": MASK}
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit_log SET actor = 'x'")
    finally:
        conn.close()


def test_the_header_masking_migration_spells_the_mask_and_names_as_the_code_does() -> None:
    # A released migration never changes: the code must keep these in step with it.
    (sql,) = [sql for name, sql in migrations.MIGRATIONS if name == "0008_audit_headers_masked"]
    assert set(re.findall(r"'(•+)", sql)) == {MASK}
    names = re.findall(r"lower\((?:[^()]|\([^()]*\))*\) (?:NOT )?IN \(([^)]*)\)", sql)
    assert len(names) == sql.count("lower(") and set(names) == {", ".join(f"'{name}'" for name in SECRET_HEADERS)}


def test_policy_naming_a_missing_rule_is_refused(db: Path) -> None:
    with pytest.raises(StoreError, match="names rule 'ghost'"):
        seed(db, [], [Policy(name="p", rules=("ghost",))])
    assert load_rule_set(connect(db, readonly=True)).policies == ()


def test_bad_rows_written_with_plain_sql_are_reported_not_fatal(db: Path) -> None:
    seed(db, [RULE], [Policy(name="good")])
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO rules (name, url, actions) VALUES ('broken-json', 'http://x', '{nope')")
    conn.execute("""INSERT INTO rules (name, url, actions) VALUES ('bad-regex', 'http://x',
                    '[{"type": "regex", "key": "a", "value": "("}]')""")
    conn.execute("INSERT INTO policies (name, hosts) VALUES ('bad-host', '[\"a b\"]')")
    conn.commit()
    rule_set = load_rule_set(connect(db, readonly=True))
    broken, bad_regex = rule_set.rules["broken-json"], rule_set.rules["bad-regex"]
    assert isinstance(broken, InvalidRow) and broken.error.startswith("JSONDecodeError: ")
    assert isinstance(bad_regex, InvalidRow) and "regex" in bad_regex.error
    assert rule_set.rules["posture"] == RULE
    assert [p.name for p in rule_set.policies] == ["good"]
    assert [p.name for p in rule_set.invalid_policies] == ["bad-host"]


def test_rules_version_moves_on_rule_changes_only(db: Path) -> None:
    conn = connect(db)
    before = rules_version(conn)
    insert_activity(conn, [ActivityRecord(
        at=1767225600.0, request_id="r", username="u", source_ip="1.2.3.4", host="h", path="/", method="GET",
        policy=None, allowed=False, code="no_matching_policy", status="x", latency_ms=1.0)])
    assert rules_version(conn) == before
    conn.execute("UPDATE policies SET priority = 1")  # no rows: still no change
    seed(db, [RULE])
    after = rules_version(conn)
    assert after[0] > before[0] and after[1] != before[1]


def test_activity_times_are_written_as_text_and_read_back_as_epoch_seconds(db: Path) -> None:
    at = 1772359200.123  # 2026-03-01T10:00:00.123Z, held by the float a hair below
    record = ActivityRecord(at=at, request_id="r", username="u", source_ip="1.2.3.4", host="h", path="/",
                            method="GET", policy="p", allowed=True, code="allowed", status="ok", latency_ms=2.5)
    conn = connect(db)
    insert_activity(conn, [record])
    assert conn.execute("SELECT at FROM activity_log").fetchone() == ("2026-03-01T10:00:00.123Z",)
    (read,) = read_activity(conn)
    assert read == record
    assert iso_time(read.at) == "2026-03-01T10:00:00.123Z"
    conn.close()


@pytest.mark.parametrize("text", ["1970-01-01T00:00:00.000Z", "2026-03-01T10:00:00.123Z",
                                  "2026-12-31T23:59:59.999Z", "2100-02-28T12:34:56.001Z"])
def test_iso_time_reads_back_to_the_same_text(text: str) -> None:
    assert iso_time(parse_iso_time(text)) == text


def test_an_activity_row_whose_time_is_not_one_fails_the_read(db: Path) -> None:
    conn = connect(db)
    conn.execute("INSERT INTO activity_log (at, request_id, username, source_ip, host, path, method, allowed,"
                 " code, status, latency_ms) VALUES ('yesterday', '', '', '', '', '/', 'GET', 0, 'x', 'x', 1)")
    with pytest.raises(StoreError, match=r"cannot read the activity log: row 1: 'yesterday' is not a time"):
        read_activity(conn)
    conn.close()


def test_a_failed_transaction_is_rolled_back(db: Path) -> None:
    conn = connect(db)
    with pytest.raises(StoreError, match="names rule 'ghost'"):
        with transaction(conn, immediate=True):
            save_rule(conn, RULE)
            save_policy(conn, Policy(name="p", rules=("posture", "ghost")))
    assert conn.execute("SELECT count(*) FROM rules").fetchone() == (0,)
    conn.close()


def test_readonly_connection_never_creates_the_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        connect(tmp_path / "absent.db", readonly=True).execute("SELECT 1")
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize(("before", "after"), [(-1, -2), (-2, -1), (1, 2)])
def test_a_priority_changed_with_plain_sql_is_reloaded(db: Path, before: int, after: int) -> None:
    """The reload memo must tell the old row from the new one, even where Python's hash() does
    not (hash(-1) == hash(-2))."""
    seed(db, [], [Policy(name="p", priority=before)])
    memo = RowMemo()
    conn = connect(db)
    try:
        assert [p.priority for p in load_rule_set(conn, memo).policies] == [before]
        conn.execute("UPDATE policies SET priority = ? WHERE name = 'p'", (after,))
        assert [p.priority for p in load_rule_set(conn, memo).policies] == [after]
    finally:
        conn.close()


def decided(request_id: str, trace: Callable[[], dict[str, Any]] | None = None) -> ActivityRecord:
    return ActivityRecord(at=1772359200.0, request_id=request_id, username="u", source_ip="1.2.3.4", host="h",
                          path="/", method="GET", policy="p", allowed=False, code="value_mismatch",
                          status="x", latency_ms=1.0, trace=trace)


def test_a_trace_whose_summary_alone_is_too_big_is_stored_within_the_bound(db: Path) -> None:
    """A client's path and a reason quoting it, 2,048 control characters each (six bytes each
    as JSON): the trace stored is still at most TRACE_MAX_BYTES, says it was cut, and keeps the
    start of each field."""
    path = "/" + "\x01" * 2048
    reason = "path " + "\x1f" * 2048

    def trace() -> dict[str, Any]:
        return {"request_id": "big", "method": "GET", "host": "h", "path": path, "policy": "p",
                "decision": "deny", "code": "value_mismatch", "reason": reason,
                "rules": [{"rule": "r", "source": "call", "answer": {"status": 200, "body": "b" * 50_000}}]}

    conn = connect(db)
    try:
        insert_activity(conn, [decided("big", trace)])
        (size,) = conn.execute("SELECT length(CAST(doc AS BLOB)) FROM traces").fetchone()
        doc = read_trace(conn, "big")
    finally:
        conn.close()
    assert size <= TRACE_MAX_BYTES
    assert doc is not None and doc["cut"] is True and doc["request_id"] == "big"
    assert doc["path"].startswith("/\x01\x01") and doc["reason"].startswith("path \x1f")
    assert doc["path"].endswith(f"(cut: a trace is kept under {TRACE_MAX_BYTES // 1024} KiB)")


def test_a_lone_surrogate_in_a_trace_is_replaced_not_the_trace_lost(
        db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A request id from a header that was not UTF-8 (the HTTP edge keeps its bytes as lone
    surrogates), which UTF-8 cannot encode: the row keeps its trace, with U+FFFD in place of the
    byte, and nothing is logged."""
    caplog.set_level(logging.DEBUG)
    conn = connect(db)
    try:
        insert_activity(conn, [decided("req-\udcff", lambda: {"request_id": "req-\udcff", "rules": []})])
        doc = read_trace(conn, "req-\ufffd")
    finally:
        conn.close()
    assert doc == {"request_id": "req-\ufffd", "rules": []}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_traces_are_built_without_holding_the_write_lock(db: Path) -> None:
    """Building a trace (dumping, cutting) happens before the activity log's transaction: an
    admin command writing meanwhile does not wait for it."""
    admin = connect(db)
    admin.execute("PRAGMA busy_timeout = 0")
    writes = []

    def trace() -> dict[str, Any]:
        with transaction(admin, immediate=True):  # fails at once if the writer holds the lock
            admin.execute("UPDATE schema_migrations SET applied_at = applied_at")
        writes.append("admin")
        return {"request_id": "r", "rules": []}

    conn = connect(db)
    try:
        insert_activity(conn, [decided("r", trace)])
        assert read_trace(conn, "r") == {"request_id": "r", "rules": []}
    finally:
        conn.close()
        admin.close()
    assert writes == ["admin"]


def test_only_the_newest_traces_are_kept(db: Path) -> None:
    conn = connect(db)
    try:
        for batch in range(3):
            insert_activity(conn, [decided(f"r{batch}-{i}", lambda: {"rules": []}) for i in range(4)],
                            keep_traces=5)
        kept = [request_id for (request_id,) in conn.execute(
            "SELECT a.request_id FROM traces t JOIN activity_log a ON a.id = t.activity_id ORDER BY t.id")]
    finally:
        conn.close()
    assert kept == ["r1-3", "r2-0", "r2-1", "r2-2", "r2-3"]
