"""``safous-admin backup`` and ``restore``: real rules.db files, the admin script in-process, and
a real sidecar serving and writing while they run."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.db import (
    ActivityRecord,
    BundleState,
    admin_transaction,
    connect,
    insert_activity,
    read_trace,
    save_policy,
    transaction,
    write_bundle_state,
)
from sidecar.policies import Policy
from tests.admin_cli import admin, ok, refused
from tests.conftest import check_request, seed
from tests.helpers import activity_paths, code_of, eventually


def open_policy(name: str, host: str | None = None) -> Policy:
    return Policy(name=name, hosts=(host or f"{name}.example.com",), integration=False)


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def audit_rows(path: Path) -> list[tuple[Any, ...]]:
    return query(path, "SELECT actor, action, object_type, object_name FROM audit_log ORDER BY id")


def decision(path: str, *, trace: dict[str, Any] | None = None) -> ActivityRecord:
    return ActivityRecord(at=time.time(), request_id=f"req{path.replace('/', '-')}", username="alice",
                          source_ip="203.0.113.7", host="a.example.com", path=path, method="GET", policy="a",
                          allowed=False, code="webhook_denied", status="no", latency_ms=1.0,
                          trace=(lambda: trace) if trace is not None else None)


def record(db: Path, *paths: str, traced: tuple[str, ...] = ()) -> None:
    conn = connect(db)
    try:
        insert_activity(conn, [decision(p, trace={"path": p} if p in traced else None) for p in paths])
    finally:
        conn.close()


def as_admin(db: Path, actor: str, *policies: Policy, delete: tuple[str, ...] = ()) -> None:
    """One admin command's changes, audited with ``actor``."""
    conn = connect(db)
    try:
        with admin_transaction(conn, actor):
            for policy in policies:
                save_policy(conn, policy)
            for name in delete:
                conn.execute("DELETE FROM policies WHERE name = ?", (name,))
    finally:
        conn.close()


# ----------------------------------------------------------------------------- backup


def test_backup_writes_a_whole_copy_readable_by_its_owner_only(db: Path, tmp_path: Path) -> None:
    seed(db, [], [open_policy("a"), open_policy("b")])
    record(db, "/one", "/two")
    out = tmp_path / "backup.db"

    ok(admin(db, "backup", str(out)), f"backed up {db} to {out}: 0 rules and 2 policies\n")

    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert query(out, "PRAGMA integrity_check") == [("ok",)]
    assert query(out, "PRAGMA journal_mode") == [("delete",)]  # one file, nothing beside it
    assert query(out, "SELECT name FROM policies ORDER BY name") == [("a",), ("b",)]
    assert activity_paths(out) == ["/one", "/two"]
    assert not any(p.name.startswith(("backup.db-", ".backup.db")) for p in tmp_path.iterdir())


def test_backup_keeps_an_existing_file_unless_told(db: Path, tmp_path: Path) -> None:
    seed(db, [], [open_policy("a")])
    out = tmp_path / "backup.db"
    out.write_text("last week's\n")

    refused(admin(db, "backup", str(out)), f"{out} exists: choose another name, or give --overwrite", 2)
    assert out.read_text() == "last week's\n"
    ok(admin(db, "backup", str(out), "--overwrite"), f"backed up {db} to {out}: 0 rules and 1 policy\n")
    assert query(out, "SELECT name FROM policies") == [("a",)]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_backup_never_replaces_the_live_rules_db_or_its_companions(db: Path, tmp_path: Path) -> None:
    """OUT is rules.db (by its name, another path to it, a link) or a file SQLite keeps beside
    it: even --overwrite is refused, and rules.db is as it was."""
    seed(db, [], [open_policy("a")])
    record(db, "/kept")
    (tmp_path / "link.db").symlink_to(db)
    os.link(db, tmp_path / "hard.db")
    (tmp_path / "sub").mkdir()
    for out in (db, tmp_path / "sub" / ".." / db.name, tmp_path / "link.db", tmp_path / "hard.db",
                *(Path(f"{db}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
        for overwrite in ((), ("--overwrite",)):
            refused(admin(db, "backup", str(out), *overwrite),
                    f"{out} is {db} itself, or its -wal, -shm or -journal: back up to another file")
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    assert query(db, "SELECT name FROM policies") == [("a",)] and activity_paths(db) == ["/kept"]
    assert not any(p.name.endswith(".partial") or p.name.endswith("-journal") for p in tmp_path.iterdir())


def test_backup_of_a_missing_rules_db_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "typo.db"
    refused(admin(db, "backup", str(tmp_path / "out.db")), f"rules.db {db} does not exist: nothing to back up", 2)
    assert not db.exists() and not (tmp_path / "out.db").exists()


async def test_a_backup_taken_while_the_sidecar_writes_is_one_instant_of_it(
        db: Path, start_sidecar: Callable[..., Any], authz: Callable[[int], Any], tmp_path: Path) -> None:
    """The sidecar decides and writes its activity log all along: each backup is whole, and
    holds exactly the decisions written up to one instant (the first N rows, as rules.db has
    them), not some of a batch."""
    seed(db, [], [open_policy("a")])
    sidecar = await start_sidecar(reload_interval=0.05)
    stub = authz(sidecar.port)
    deciding = True
    made = 0

    async def decide_all_along() -> None:
        nonlocal made
        while deciding:
            response = await stub.Check(check_request(f"/d-{made}", host="a.example.com"), timeout=5)
            assert code_of(response) == "allowed"
            made += 1

    decider = asyncio.create_task(decide_all_along())
    backups = []
    try:
        for i in range(4):
            target = sidecar.activity.written + 20  # each backup after more batches were written
            await eventually(lambda target=target: sidecar.activity.written >= target, what="decisions written")
            out = tmp_path / f"backup-{i}.db"
            result = await asyncio.to_thread(admin, db, "backup", str(out))
            ok(result, f"backed up {db} to {out}: 0 rules and 1 policy\n")
            backups.append(out)
    finally:
        deciding = False
        await decider
    await sidecar.stop(grace=1)

    live = query(db, "SELECT id, at, request_id, path FROM activity_log ORDER BY id")
    assert len(live) == made and sidecar.activity.dropped == 0
    sizes = []
    for out in backups:
        assert query(out, "PRAGMA integrity_check") == [("ok",)]
        rows = query(out, "SELECT id, at, request_id, path FROM activity_log ORDER BY id")
        assert rows == live[:len(rows)]
        sizes.append(len(rows))
    assert sizes == sorted(set(sizes)) and sizes[0] >= 20 and sizes[-1] < made
    print(f"\nbackups while deciding: {sizes} of {made} decisions")


# ------------------------------------------------------------------- restore: the checks


@pytest.fixture
def untouched(db: Path) -> Callable[[], None]:
    """Asserts that rules.db is as it was when the test took this fixture."""
    seed(db, [], [open_policy("a")])
    before = (query(db, "SELECT name FROM policies"), audit_rows(db))

    def check() -> None:
        assert (query(db, "SELECT name FROM policies"), audit_rows(db)) == before

    return check


def test_restore_refuses_a_file_that_is_not_a_database(db: Path, tmp_path: Path, untouched: Any) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    refused(admin(db, "restore", str(garbage)),
            f"{garbage} is not a rules.db backup this version can restore: file is not a database")
    untouched()


def damage(path: Path, btree: str) -> None:
    """Zero the right-child page number of ``btree``'s root (an interior page: many rows), as a
    write over a live file can: SQLite then finds the file malformed."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (root,), (page_size,) = conn.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = ?", (btree,)).fetchone(), conn.execute(
        "PRAGMA page_size").fetchone()
    conn.close()
    with open(path, "r+b") as file:
        file.seek((root - 1) * page_size)
        assert file.read(1) == b"\x05"  # an interior table page
        file.seek((root - 1) * page_size + 8)
        file.write(bytes(4))


def many_policies() -> list[Policy]:
    return [open_policy(f"p{i:03d}-{'x' * 60}") for i in range(300)]


def test_restore_refuses_a_damaged_backup(db: Path, tmp_path: Path, untouched: Any) -> None:
    damaged = tmp_path / "damaged.db"
    seed(damaged, [], many_policies())
    damage(damaged, "policies")

    refused(admin(db, "restore", str(damaged)),
            f"{damaged} fails SQLite's integrity check: database disk image is malformed")
    untouched()


def test_restore_refuses_a_database_that_is_no_rules_db(db: Path, tmp_path: Path, untouched: Any) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    refused(admin(db, "restore", str(other)),
            f"{other} is not a rules.db backup this version can restore: it holds no schema_migrations table")
    untouched()


def test_restore_refuses_a_rules_db_of_a_newer_version(db: Path, tmp_path: Path, untouched: Any) -> None:
    newer = tmp_path / "newer.db"
    seed(newer, [], [open_policy("b")])
    conn = sqlite3.connect(newer)
    conn.execute("INSERT INTO schema_migrations (name) VALUES ('9999_from_the_future')")
    conn.commit()
    conn.close()
    refused(admin(db, "restore", str(newer)),
            f"{newer} is not a rules.db backup this version can restore: it was written by a newer version "
            "(migration 9999_from_the_future is unknown here)")
    untouched()


def test_restore_refuses_a_backup_whose_audit_log_is_not_kept(db: Path, tmp_path: Path, untouched: Any) -> None:
    """A backup with the audit triggers dropped would leave rules.db unaudited once restored."""
    unaudited = tmp_path / "unaudited.db"
    seed(unaudited, [], [open_policy("b")])
    conn = sqlite3.connect(unaudited)
    for (trigger,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'audit%'"
                                   ).fetchall():
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.close()

    refused(admin(db, "restore", str(unaudited)),
            f"{unaudited} is not a rules.db backup this version can restore: its schema is not the one its "
            "migrations make (trigger audit_log_no_delete is missing)")
    untouched()


def test_restore_refuses_a_bundle_managed_rules_db_unless_forced(db: Path, tmp_path: Path) -> None:
    seed(db, [], [open_policy("a")])
    backup = tmp_path / "backup.db"
    seed(backup, [], [open_policy("b")])
    conn = connect(db)
    with transaction(conn, immediate=True):
        write_bundle_state(conn, BundleState("17-abc", 17, "abc", None, "https://bundles.example.com/app.jws"))
    conn.close()

    refused(admin(db, "restore", str(backup)),
            f"rules.db {db} is managed by the bundle https://bundles.example.com/app.jws (revision 17-abc): change "
            "the rules where the bundle is built and publish a new one, or give --force to change this copy "
            "anyway (audited; the next bundle undoes it)", 2)
    assert query(db, "SELECT name FROM policies") == [("a",)]

    actor = "alice (--force over bundle 17-abc)"
    ok(admin(db, "--force", "restore", str(backup)),
       f'deleted policy "a"\ncreated policy "b"\nrestored {db} from {backup}: 0 rules and 1 policy, '
       f'2 changes audited as "{actor}"\n')
    assert audit_rows(db)[-3:] == [(actor, "delete", "policy", "a"), (actor, "create", "policy", "b"),
                                   (actor, "restore", "database", str(backup))]
    assert query(db, "SELECT count(*) FROM bundle_state") == [(0,)]  # the backup's: none


def test_restore_brings_an_older_backup_up_to_date_and_takes_another_page_size(db: Path, tmp_path: Path) -> None:
    seed(db, [], [open_policy("a")])
    backup = tmp_path / "backup.db"
    conn = sqlite3.connect(backup)
    conn.execute("PRAGMA page_size = 1024")
    conn.close()
    seed(backup, [], [open_policy("b")])
    conn = sqlite3.connect(backup)  # as a version without the last migration left it
    conn.execute("DROP TABLE traces")
    conn.execute("DROP TRIGGER activity_log_delete_drops_trace")
    conn.execute("DELETE FROM schema_migrations WHERE name = '0007_traces'")
    conn.commit()
    conn.close()

    result = admin(db, "restore", str(backup))
    assert result.exit_code == 0, result.output
    assert query(db, "SELECT name FROM policies") == [("b",)]
    assert ("0007_traces",) in query(db, "SELECT name FROM schema_migrations")
    assert query(db, "PRAGMA page_size") == [(4096,)] and query(db, "PRAGMA integrity_check") == [("ok",)]


def test_restore_onto_no_rules_db_creates_it(tmp_path: Path) -> None:
    db = tmp_path / "rules.db"
    backup = tmp_path / "backup.db"
    seed(backup, [], [open_policy("b")])
    record(backup, "/from-the-backup")

    ok(admin(db, "restore", str(backup)),
       f'created policy "b"\nrestored {db} from {backup}: 0 rules and 1 policy, 1 change audited as "alice"\n')
    assert query(db, "SELECT name FROM policies") == [("b",)]
    assert activity_paths(db) == ["/from-the-backup"]
    assert query(db, "PRAGMA journal_mode") == [("wal",)]


def test_restore_waits_for_the_wal_of_a_file_moved_away(db: Path, tmp_path: Path) -> None:
    """rules.db moved away while something still has it open leaves its -wal behind: a new
    rules.db made beside it would be paired with it. The sidecar removes it when it follows
    the move; until then restore refuses."""
    seed(db, [], [open_policy("a")])
    holder = sqlite3.connect(db)  # a sidecar that has not followed the move yet
    holder.execute("SELECT count(*) FROM policies").fetchone()
    try:
        db.rename(tmp_path / "aside.db")
        backup = tmp_path / "backup.db"
        seed(backup, [], [open_policy("b")])
        refused(admin(db, "restore", str(backup)),
                f"{db} is absent but its -wal or -shm is still there: they belong to the rules.db that was moved "
                "away, which a running sidecar still has open and removes within its reload interval; restore "
                "again then (if no sidecar runs, they are left from a crash: remove them)")
        assert not db.exists()
    finally:
        holder.close()


def test_restore_refuses_a_damaged_rules_db_and_says_what_to_do(db: Path, tmp_path: Path) -> None:
    seed(db, [], many_policies())
    damage(db, "policies")
    damaged = db.read_bytes()
    backup = tmp_path / "backup.db"
    seed(backup, [], [open_policy("b")])

    refused(admin(db, "restore", str(backup)),
            f"cannot read {db}: database disk image is malformed: nothing restored. Its logs cannot be carried "
            "over: move it aside (mv; a running sidecar follows within its reload interval) and restore again, "
            "onto no rules.db")
    assert db.read_bytes() == damaged
    db.rename(tmp_path / "damaged.db")
    ok(admin(db, "restore", str(backup)),
       f'created policy "b"\nrestored {db} from {backup}: 0 rules and 1 policy, 1 change audited as "alice"\n')


# -------------------------------------------------------------- restore: what it keeps


def test_restore_is_audited_and_no_audit_row_is_lost(db: Path, tmp_path: Path) -> None:
    """The restore's changes are audited like an admin command's, with the actor; the changes
    made since the backup stay on record beside the restore that undid them; a backup of
    another rules.db brings its own history along."""
    seed(db, [], [])
    as_admin(db, "alice", open_policy("a"))
    backup = tmp_path / "backup.db"
    ok(admin(db, "backup", str(backup)), f"backed up {db} to {backup}: 0 rules and 1 policy\n")
    as_admin(db, "bob", open_policy("a", "changed.example.com"), open_policy("c"))

    ok(admin(db, "restore", str(backup), actor="carol"),
       f'updated policy "a"\ndeleted policy "c"\nrestored {db} from {backup}: 0 rules and 1 policy, '
       '2 changes audited as "carol"\n')

    assert audit_rows(db) == [
        ("alice", "create", "policy", "a"),
        ("bob", "edit", "policy", "a"), ("bob", "create", "policy", "c"),
        ("carol", "edit", "policy", "a"), ("carol", "delete", "policy", "c"),
        ("carol", "restore", "database", str(backup)),
    ]
    before, after = query(db, "SELECT before, after FROM audit_log WHERE actor = 'carol' AND action = 'edit'")[0]
    assert (json.loads(before)["hosts"], json.loads(after)["hosts"]) == (["changed.example.com"], ["a.example.com"])
    restore_row = query(db, "SELECT before, after FROM audit_log WHERE action = 'restore'")[0]
    assert [json.loads(d) for d in restore_row] == [{"rules": 0, "policies": 2, "bundle": None},
                                                    {"rules": 0, "policies": 1, "bundle": None}]

    other = tmp_path / "other.db"  # another rules.db, with a history of its own
    seed(other, [], [])
    as_admin(other, "dave", open_policy("x"))
    result = admin(db, "restore", str(other), actor="erin")
    assert result.exit_code == 0, result.output
    rows = audit_rows(db)
    assert rows[0] == ("dave", "create", "policy", "x")  # the backup's own history first
    assert rows[1:7] == [("alice", "create", "policy", "a"), ("bob", "edit", "policy", "a"),
                         ("bob", "create", "policy", "c"), ("carol", "edit", "policy", "a"),
                         ("carol", "delete", "policy", "c"), ("carol", "restore", "database", str(backup))]
    assert rows[7:] == [("erin", "delete", "policy", "a"), ("erin", "create", "policy", "x"),
                        ("erin", "restore", "database", str(other))]


def test_restore_keeps_the_decisions_of_both_files(db: Path, tmp_path: Path) -> None:
    """A restore brings rules back, not decisions: those made since the backup stay (with their
    traces), each once, and a row whose id the backup uses for another decision moves."""
    seed(db, [], [open_policy("a")])
    record(db, "/1", "/2")
    backup = tmp_path / "backup.db"
    ok(admin(db, "backup", str(backup)), f"backed up {db} to {backup}: 0 rules and 1 policy\n")
    record(db, "/3", "/4", traced=("/4",))

    ok(admin(db, "restore", str(backup)),
       f'restored {db} from {backup}: 0 rules and 1 policy, 0 changes audited as "alice"\n')
    assert query(db, "SELECT id, path FROM activity_log ORDER BY id") == [(1, "/1"), (2, "/2"), (3, "/3"), (4, "/4")]
    conn = connect(db, readonly=True)
    assert read_trace(conn, "req-4") == {"path": "/4"}
    conn.close()

    other = tmp_path / "other.db"  # another sidecar's rules.db: its ids 1-2 are other decisions
    seed(other, [], [open_policy("a")])
    record(other, "/elsewhere-1", "/elsewhere-2", traced=("/elsewhere-2",))
    ok(admin(db, "restore", str(other)),
       f'restored {db} from {other}: 0 rules and 1 policy, 0 changes audited as "alice"\n')
    assert query(db, "SELECT id, path FROM activity_log ORDER BY id") == [
        (1, "/elsewhere-1"), (2, "/elsewhere-2"), (3, "/3"), (4, "/4"), (5, "/1"), (6, "/2")]
    conn = connect(db, readonly=True)
    assert read_trace(conn, "req-4") == {"path": "/4"}
    assert read_trace(conn, "req-elsewhere-2") == {"path": "/elsewhere-2"}
    conn.close()


async def test_restore_while_the_sidecar_serves_loses_no_decision(
        db: Path, start_sidecar: Callable[..., Any], authz: Callable[[int], Any], tmp_path: Path) -> None:
    """The sidecar decides all along: the backup's rules are served within the reload
    interval, rules.db stays whole, and every decision is in its activity log once."""
    seed(db, [], [open_policy("a")])
    backup = tmp_path / "backup.db"
    seed(backup, [], [open_policy("b"), *(open_policy(f"p{i:03d}-{'x' * 60}") for i in range(200))])
    sidecar = await start_sidecar(reload_interval=0.05)
    stub = authz(sidecar.port)
    deciding = True
    made = 0

    async def decide(host: str, path: str) -> str:
        return code_of(await stub.Check(check_request(path, host=host), timeout=5))

    async def decide_all_along() -> None:
        nonlocal made
        while deciding:
            await decide("a.example.com", f"/d-{made}")
            made += 1

    decider = asyncio.create_task(decide_all_along())
    try:
        await eventually(lambda: sidecar.activity.written > 20)
        result = await asyncio.to_thread(admin, db, "restore", str(backup))
        restored = time.monotonic()
        assert result.exit_code == 0, result.output
        assert result.stdout.endswith(f'restored {db} from {backup}: 0 rules and 201 policies, '
                                      '202 changes audited as "alice"\n')

        async def backup_rules_served() -> bool:
            return (await decide("b.example.com", "/probe-b"), await decide("a.example.com", "/probe-a")) == (
                "allowed", "no_matching_policy")

        await eventually(backup_rules_served, timeout=3)
        pickup = time.monotonic() - restored
    finally:
        deciding = False
        await decider
    await sidecar.stop(grace=1)

    assert sidecar.activity.dropped == 0
    paths = activity_paths(db)
    assert [p for p in paths if p.startswith("/d-")] == [f"/d-{i}" for i in range(made)]
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    print(f"\nrestore while deciding: {made} decisions, none lost; the backup's rules served "
          f"{pickup * 1000:.0f} ms after the restore returned")
