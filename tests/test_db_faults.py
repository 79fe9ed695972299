"""Database faults, through a real sidecar on port 0 and a real rules.db.

Whatever happens to rules.db while the sidecar runs — a long admin transaction, the file
deleted, replaced or overwritten with garbage, broken rows written with plain SQL, an activity
log that cannot be written — the sidecar keeps answering from its last good rules, says so on
/readyz and in its logs, recovers when the database is back, and loses no committed admin
change. Each test asserts what a user sees: check results, /readyz, log records, activity rows.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import resource
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import activity as activity_module
from sidecar import db as rules_db
from sidecar import logs
from sidecar._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from sidecar.activity import ActivityLog
from sidecar.db import ActivityRecord, DatabaseFile, admin_transaction, connect, connection, save_policy, set_enabled
from sidecar.logs import decision_from_log_line
from sidecar.policies import Policy
from sidecar.rules.model import ActionType, ResponseAction, Rule
from tests.admin_cli import admin
from tests.conftest import answer, check_request, denial_reason, seed
from tests.helpers import (
    FRESH,
    OK,
    PERMISSION_DENIED,
    activity_paths,
    code_of,
    eventually,
    free_port,
    metric,
    ops_get,
    start_server,
)


def open_policy(name: str, host: str) -> Policy:
    """A policy that allows its host without rules: what a check says reveals the rules in use."""
    return Policy(name=name, hosts=(host,), integration=False)


A = open_policy("a", "a.example.com")
B = open_policy("b", "b.example.com")


async def decide(stub: pb_grpc.AuthorizationStub, host: str, path: str = "/") -> str:
    """``allowed``, or the deny's code, as the client would read it from the answer."""
    response = await stub.Check(check_request(path, host=host), timeout=5)
    if response.status.code != OK:
        assert response.status.code == PERMISSION_DENIED and response.HasField("denied_response")
    return code_of(response)


async def readyz(sidecar: Any) -> tuple[int, str]:
    return await ops_get(sidecar.ops.port, "/readyz")


async def scraped(sidecar: Any, name: str) -> float:
    return metric((await ops_get(sidecar.ops.port, "/metrics"))[1], name)


async def timed_wait(predicate: Callable[[], Any], timeout: float = 5.0) -> float:
    """Seconds it took for ``predicate`` to hold (``eventually``)."""
    started = time.monotonic()
    await eventually(predicate, timeout=timeout)
    return time.monotonic() - started


def logged(caplog: pytest.LogCaptureFixture, level: int, text: str) -> bool:
    return any(r.levelno == level and text in r.getMessage() for r in caplog.records)


def rules_version(db: Path) -> tuple[int, bytes]:
    conn = connect(db, readonly=True)
    try:
        return rules_db.rules_version(conn)
    finally:
        conn.close()


def remove_database(db: Path) -> None:
    """``rm rules.db*``: the file and its WAL companions."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


# --- a long admin transaction ---------------------------------------------------------------


async def test_a_long_admin_transaction_neither_stalls_checks_nor_loses_its_change(
        db: Path, start_sidecar, authz, caplog: pytest.LogCaptureFixture) -> None:
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)

    async def timed(host: str, path: str) -> tuple[str, float]:
        started = time.perf_counter()
        result = await decide(stub, host, path)
        return result, time.perf_counter() - started

    baseline = [(await timed("a.example.com", f"/base-{i}"))[1] for i in range(50)]

    locked, release = threading.Event(), threading.Event()

    def admin() -> None:
        # One admin command that takes long: it holds rules.db's write lock all along.
        conn = connect(db)
        try:
            with admin_transaction(conn, "alice"):
                save_policy(conn, B)
                set_enabled(conn, "policy", "a", False)
                locked.set()
                release.wait(10)
        finally:
            conn.close()

    holder = asyncio.create_task(asyncio.to_thread(admin))
    await eventually(locked.is_set)
    during: list[tuple[str, str, float]] = []
    ready_during: set[int] = set()
    lock_started = time.monotonic()
    while time.monotonic() - lock_started < 2.0:
        a, latency = await timed("a.example.com", f"/during-{len(during)}")
        b, _ = await timed("b.example.com", f"/during-{len(during)}")
        during.append((a, b, latency))
        if len(during) % 10 == 0:
            ready_during.add((await readyz(sidecar))[0])
        await asyncio.sleep(0.01)  # pacing: checks all along the 2 s the lock is held
    release.set()
    await holder

    # While the transaction was open: the last snapshot, answered at normal speed, still ready.
    assert len(during) > 50
    assert {(a, b) for a, b, _ in during} == {("allowed", "no_matching_policy")}
    worst = max(latency for _, _, latency in during)
    assert worst < 0.25, f"a check waited {worst:.3f} s for the lock"
    assert ready_during == {200}

    async def committed_change_served() -> bool:
        return (await decide(stub, "a.example.com"), await decide(stub, "b.example.com")) == (
            "no_matching_policy", "allowed")

    pickup = await timed_wait(committed_change_served, timeout=3)
    # The activity writer waited for the lock (within its busy timeout) and lost nothing.
    await sidecar.stop(grace=1)
    assert sidecar.activity.dropped == 0
    paths = activity_paths(db)
    assert len(paths) == sidecar.activity.written
    assert [p for p in paths if p.startswith("/during-")] == [
        f"/during-{i}" for i in range(len(during)) for _ in "ab"]
    assert not logged(caplog, logging.ERROR, "activity log write failed")
    print(f"\nlock 2.0 s: {len(during)} check pairs, baseline p50 "
          f"{sorted(baseline)[len(baseline) // 2] * 1000:.2f} ms, max during lock {worst * 1000:.2f} ms, "
          f"change served {pickup * 1000:.0f} ms after commit")


# --- rules.db deleted, replaced, garbage ------------------------------------------------------


async def test_deleted_rules_db_keeps_the_last_rules_until_it_is_restored(
        db: Path, start_sidecar, authz, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seed(db, [], [A])
    backup = tmp_path / "backup.db"
    seed(backup, [], [A, B])  # last night's backup also holds policy b
    caplog.set_level(logging.INFO, logger="sidecar")
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    assert await readyz(sidecar) == (200, "ready\n")
    assert await decide(stub, "a.example.com", "/before") == "allowed"
    await eventually(lambda: sidecar.activity.written == 1)  # it has been serving

    remove_database(db)

    async def unready() -> bool:
        return (await readyz(sidecar))[0] == 503

    await eventually(unready)
    status, body = await readyz(sidecar)
    assert status == 503 and "rules.db reload failed" in body and "does not exist" in body
    assert logged(caplog, logging.ERROR, "rules.db reload failed, serving the last good rules")
    for _ in range(10):  # the last good rules, for as long as it takes
        assert await decide(stub, "a.example.com") == "allowed"
        assert await decide(stub, "b.example.com") == "no_matching_policy"
        await asyncio.sleep(0.02)  # pacing: several reload attempts fail meanwhile
    assert (await readyz(sidecar))[0] == 503
    assert await scraped(sidecar, "safous_rules_last_reload_ok") == 0

    shutil.copyfile(backup, tmp_path / "restoring.db")
    os.replace(tmp_path / "restoring.db", db)

    async def ready() -> bool:
        return (await readyz(sidecar))[0] == 200

    await eventually(ready)
    assert await decide(stub, "b.example.com") == "allowed"
    assert await decide(stub, "a.example.com") == "allowed"
    assert logged(caplog, logging.INFO, "rules.db readable again")


async def test_decisions_after_a_restore_reach_the_restored_activity_log(
        db: Path, start_sidecar, authz, tmp_path: Path) -> None:
    seed(db, [], [A])
    backup = tmp_path / "backup.db"
    seed(backup, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    assert await decide(stub, "a.example.com", "/before") == "allowed"
    await eventually(lambda: sidecar.activity.written == 1)

    remove_database(db)
    await eventually(lambda: sidecar.watcher.last_error is not None)
    shutil.copyfile(backup, tmp_path / "restoring.db")
    os.replace(tmp_path / "restoring.db", db)
    await eventually(lambda: sidecar.watcher.last_error is None)
    for i in range(10):
        assert await decide(stub, "a.example.com", f"/after-restore-{i}") == "allowed"
    await sidecar.stop(grace=1)

    # What `safous-admin logs activity` shows: the decisions made since the restore.
    assert [p for p in activity_paths(db) if p.startswith("/after-restore")] == [
        f"/after-restore-{i}" for i in range(10)]


async def test_the_sidecar_never_recreates_a_deleted_rules_db(
        db: Path, start_sidecar, authz, caplog: pytest.LogCaptureFixture) -> None:
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    remove_database(db)  # before the first decision is written
    for i in range(5):
        assert await decide(stub, "a.example.com", f"/gone-{i}") == "allowed"
    await eventually(lambda: logged(caplog, logging.ERROR, "activity log write failed"))
    assert sidecar.activity.depth == 5  # kept for when rules.db is back
    assert not db.exists()
    status, body = await readyz(sidecar)
    assert status == 503 and "does not exist" in body, body


def restore(source_path: Path, target_path: Path) -> None:
    """What `sqlite3 rules.db ".restore new.db"` does: SQLite's backup into the live file."""
    source, target = sqlite3.connect(source_path), sqlite3.connect(target_path)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def many_policies(count: int) -> list[Policy]:
    return [open_policy(f"p{i:03d}-{'x' * 60}", f"h{i}.example.com") for i in range(count)]


def paths_in(path: Path) -> list[str]:
    """The activity log's paths in a rules.db that is not (or no longer) under its name."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [p for (p,) in conn.execute("SELECT path FROM activity_log ORDER BY id")]
    finally:
        conn.close()


def integrity(path: Path) -> list[tuple[str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


async def test_rules_db_replaced_by_another_file_is_picked_up(
        db: Path, start_sidecar, authz, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``mv new.db rules.db`` while the sidecar runs and decides: the new rules are served, the
    new file stays whole, and every decision is in exactly one file — those written before in
    the old one (kept here by a second link, as ``mv rules.db old.db`` first would), the others
    in the new one."""
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    for i in range(10):
        assert await decide(stub, "a.example.com", f"/old-{i}") == "allowed"
    await eventually(lambda: sidecar.activity.written == 10)  # in the old file's WAL
    old = tmp_path / "old.db"
    os.link(db, old)

    new = tmp_path / "new.db"
    seed(new, [], [B, *many_policies(200)])  # another rules.db, built elsewhere
    os.replace(new, db)  # mv new.db rules.db: a new inode under the same name
    during = 0

    async def new_rules_served() -> bool:
        nonlocal during
        during += 1  # decisions all along the switch
        return (await decide(stub, "b.example.com", f"/during-{during}"),
                await decide(stub, "a.example.com", f"/during-{during}")) == ("allowed", "no_matching_policy")

    try:
        pickup = await timed_wait(new_rules_served, timeout=3)
    except AssertionError:
        raise AssertionError(f"new rules not served; /readyz: {await readyz(sidecar)}") from None
    for i in range(5):
        assert await decide(stub, "h199.example.com", f"/new-{i}") == "allowed"
    assert (await readyz(sidecar))[0] == 200
    await sidecar.stop(grace=1)

    assert integrity(db) == [("ok",)] and integrity(old) == [("ok",)]
    conn = sqlite3.connect(db)
    try:  # the admin's new file is intact
        assert conn.execute("SELECT count(*) FROM policies").fetchone() == (201,)
    finally:
        conn.close()
    in_old, in_new = paths_in(old), activity_paths(db)
    assert in_old[:10] == [f"/old-{i}" for i in range(10)]  # checkpointed into the old file
    assert not any(p.startswith("/old-") for p in in_new)
    assert sorted(in_old + in_new) == sorted([f"/old-{i}" for i in range(10)] + [f"/new-{i}" for i in range(5)]
                                            + [f"/during-{i}" for i in range(1, during + 1) for _ in "ab"])
    assert sidecar.activity.dropped == 0
    assert logged(caplog, logging.WARNING, "rules.db is another file now: its connections follow it")
    print(f"\nmv over rules.db: new rules served {pickup * 1000:.0f} ms after (reload interval 50 ms), "
          f"{len(in_old) - 10} decisions of the switch in the old file, {len(in_new)} in the new")


async def test_decisions_pending_when_rules_db_is_replaced_go_to_the_new_file_once(
        db: Path, start_sidecar, authz, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Decisions the old file's write lock held back are pending when the file is replaced:
    they are written to the new one, the file the name holds (the old one is usually gone),
    each once."""
    monkeypatch.setattr(connection, "BUSY_TIMEOUT_MS", 100)
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05)
    stub = authz(sidecar.port)
    assert await decide(stub, "a.example.com", "/before") == "allowed"
    await eventually(lambda: sidecar.activity.written == 1)
    old = tmp_path / "old.db"
    os.link(db, old)

    holder = hold_write_lock(db)
    try:
        for i in range(5):
            assert await decide(stub, "a.example.com", f"/pending-{i}") == "allowed"
        await eventually(lambda: logged(caplog, logging.ERROR, "activity log write failed"))
        assert sidecar.activity.depth == 5
        new = tmp_path / "new.db"
        seed(new, [], [B])
        os.replace(new, db)

        async def new_rules_served() -> bool:
            return await decide(stub, "b.example.com", "/probe") == "allowed"

        await eventually(new_rules_served)
    finally:
        holder.execute("COMMIT")
        holder.close()
    await eventually(lambda: sidecar.activity.depth == 0, what="the pending decisions written")
    await sidecar.stop(grace=1)

    assert sidecar.activity.dropped == 0
    assert paths_in(old) == ["/before"]
    in_new = activity_paths(db)
    assert [p for p in in_new if p.startswith("/pending-")] == [f"/pending-{i}" for i in range(5)]
    assert integrity(db) == [("ok",)] and integrity(old) == [("ok",)]


async def test_rules_db_replaced_under_workers_is_followed_by_each(tmp_path: Path) -> None:
    """``--workers 2``: two processes hold rules.db, each with its own connections. Each
    follows the new file (one at a time, under the directory's flock), neither pairs it with
    the old -wal, and the decisions made after go to it."""
    db = tmp_path / "rules.db"
    seed(db, [], [A])
    port = free_port()  # --workers needs a fixed port
    log, _ = await asyncio.to_thread(start_server, db, "--listen", f"127.0.0.1:{port}", "--workers", "2",
                                     "--reload-interval", "0.05")
    try:
        await asyncio.to_thread(log.wait_for, "listening", 2)

        async def fresh_decision(host: str, path: str) -> str:
            # A new connection each time: each lands on one worker, and both get some.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FRESH) as channel:
                return await decide(pb_grpc.AuthorizationStub(channel), host, path)

        for i in range(40):
            assert await fresh_decision("a.example.com", f"/old-{i}") == "allowed"
        await eventually(lambda: len(activity_paths(db)) == 40, what="both workers' decisions written")
        assert {e["worker"] for e in log.records() if e.get("logger") == "sidecar.decision"} == {0, 1}
        new = tmp_path / "new.db"
        seed(new, [], [B, *many_policies(200)])
        os.replace(new, db)

        async def both_follow() -> bool:
            for _ in range(10):
                if (await fresh_decision("b.example.com", "/probe"), await fresh_decision("a.example.com", "/probe")
                        ) != ("allowed", "no_matching_policy"):
                    return False
            return True

        await eventually(both_follow, timeout=5)
        for i in range(40):
            assert await fresh_decision("h199.example.com", f"/new-{i}") == "allowed"
        log.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(log.proc.wait, 15) == 0, log.tail(60)
    finally:
        await asyncio.to_thread(log.close)
    followed = {e["worker"] for e in log.records() if e.get("message") == "rules.db is another file now: its "
                "connections follow it"}
    assert followed == {0, 1}
    assert integrity(db) == [("ok",)]
    assert query_one(db, "SELECT count(*) FROM policies") == 201
    in_new = activity_paths(db)
    # Each worker writes its own batches: the order is the workers' flushes, not the checks'.
    assert sorted(p for p in in_new if p.startswith("/new-")) == sorted(f"/new-{i}" for i in range(40))
    assert not any(p.startswith("/old-") for p in in_new)


def test_rules_db_replaced_after_its_connections_all_closed_once_stays_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's connections all close once (a reload error, the activity writer
    reconnecting, start-up with --bundle): SQLite removes -wal and -shm, and the next opening
    makes new ones. When rules.db is replaced after that, with another reader keeping the old
    file's writes in its WAL, the new file is still opened with a WAL of its own."""
    monkeypatch.setattr(connection, "BUSY_TIMEOUT_MS", 100)  # the checkpoint the reader stops
    db = tmp_path / "rules.db"
    seed(db, [], [A])
    rules = DatabaseFile.at(db).connection()
    try:
        with rules.use():
            pass
        rules.close()  # the last connection: -wal and -shm are removed
        # ext4 gives the inodes just freed to the next files made: these take them, so that
        # the new -wal and -shm get others, as they do on a filesystem in use.
        for name in ("taken-1", "taken-2"):
            (tmp_path / name).touch()
        with rules.use():
            pass
        reader = sqlite3.connect(db, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM policies").fetchone()  # the checkpoint stops short
            with rules.use() as conn, admin_transaction(conn, "test"):
                for policy in many_policies(50):
                    save_policy(conn, policy)
            new = tmp_path / "new.db"
            seed(new, [], [B])
            os.replace(new, db)
            with rules.use() as conn:
                assert [n for (n,) in conn.execute("SELECT name FROM policies")] == ["b"]
        finally:
            reader.close()
    finally:
        rules.close()
    assert integrity(db) == [("ok",)]
    assert query_one(db, "SELECT group_concat(name) FROM policies") == "b"


async def test_cp_over_a_live_rules_db_is_reported_and_restore_repairs_it(
        db: Path, start_sidecar, authz, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``cp new.db rules.db`` while the sidecar runs: the same inode, rewritten behind SQLite's
    back while its -wal still holds pages of the old content, which SQLite reads and
    checkpoints as the new file's (SQLite's "How To Corrupt An SQLite Database File": a file
    overwritten while in use). Nothing can tell such a copy from SQLite's own writes, and the
    file is damaged. What a user sees: the last good rules, /readyz and the log saying rules.db
    is damaged and what to do; and doing it (mv aside, safous-admin restore) serves the new
    rules from a whole file."""
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    for i in range(10):
        assert await decide(stub, "a.example.com", f"/old-{i}") == "allowed"
    await eventually(lambda: sidecar.activity.written == 10)  # in the WAL
    new = tmp_path / "new.db"
    seed(new, [], [B, *many_policies(200)])

    shutil.copyfile(new, db)  # cp new.db rules.db

    async def reported_damaged() -> bool:
        await decide(stub, "a.example.com", "/after-cp")  # a commit: the watcher reads rules.db again
        return "rules.db is damaged" in (await readyz(sidecar))[1]

    await eventually(reported_damaged, timeout=3)
    status, body = await readyz(sidecar)
    assert status == 503 and body.endswith(
        "database disk image is malformed (rules.db is damaged: was a file copied over it while in use? Move it "
        "aside and restore a backup with safous-admin restore)\n"), body
    assert logged(caplog, logging.ERROR, "rules.db reload failed, serving the last good rules")
    assert await decide(stub, "a.example.com") == "allowed"  # the last good rules
    assert await decide(stub, "b.example.com") == "no_matching_policy"

    os.replace(db, tmp_path / "damaged.db")  # mv rules.db damaged.db: the sidecar follows

    def restored() -> bool:
        result = admin(db, "restore", str(new))
        return result.exit_code == 0 and result.stdout.endswith(
            f'restored {db} from {new}: 0 rules and 201 policies, 201 changes audited as "alice"\n')

    await eventually(lambda: asyncio.to_thread(restored), what="restore once the sidecar has followed the mv")

    async def new_rules_served() -> bool:
        return (await decide(stub, "b.example.com"), await decide(stub, "a.example.com")) == (
            "allowed", "no_matching_policy")

    await eventually(new_rules_served, timeout=3)
    assert (await readyz(sidecar))[0] == 200
    await sidecar.stop(grace=1)
    assert integrity(db) == [("ok",)]
    assert query_one(db, "SELECT count(*) FROM policies") == 201


def query_one(path: Path, sql: str) -> Any:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


async def test_rules_db_restored_in_place_with_sqlites_backup_api_is_picked_up(
        db: Path, start_sidecar, authz, tmp_path: Path) -> None:
    """The safe way to replace a live rules.db (``sqlite3 rules.db ".restore new.db"``): same
    file, one transaction. The new rules are served, nothing is corrupted, the activity log
    goes on in the restored file."""
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    for i in range(10):
        assert await decide(stub, "a.example.com", f"/old-{i}") == "allowed"
    new = tmp_path / "new.db"
    seed(new, [], [B, *many_policies(200)])

    await asyncio.to_thread(restore, new, db)

    async def new_rules_served() -> bool:
        return (await decide(stub, "b.example.com"), await decide(stub, "a.example.com")) == (
            "allowed", "no_matching_policy")

    await eventually(new_rules_served, timeout=3)
    assert await decide(stub, "h199.example.com", "/after") == "allowed"
    assert (await readyz(sidecar))[0] == 200
    await sidecar.stop(grace=1)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM policies").fetchone() == (201,)
    finally:
        conn.close()
    assert "/after" in activity_paths(db)


async def test_a_restore_with_the_same_edit_count_is_picked_up(
        db: Path, start_sidecar, authz, tmp_path: Path) -> None:
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05)
    stub = authz(sidecar.port)
    assert await decide(stub, "a.example.com") == "allowed"
    new = tmp_path / "new.db"
    seed(new, [], [B])  # one policy created, like rules.db: the counters are equal
    assert rules_version(new)[0] == rules_version(db)[0]

    await asyncio.to_thread(restore, new, db)

    async def new_rules_served() -> bool:
        return await decide(stub, "b.example.com") == "allowed"

    await eventually(new_rules_served, timeout=2)


async def test_garbage_in_place_of_rules_db_keeps_the_last_good_rules(
        db: Path, start_sidecar, authz, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    assert await readyz(sidecar) == (200, "ready\n")
    assert await decide(stub, "a.example.com", "/before") == "allowed"
    await eventually(lambda: sidecar.activity.written == 1)  # it has been serving

    aside = tmp_path / "aside.db"
    db.rename(aside)  # the real file is kept to be put back (same inode as its -wal and -shm)
    db.write_bytes(os.urandom(64 * 1024))

    async def unready() -> bool:
        return (await readyz(sidecar))[0] == 503

    await eventually(unready)
    status, body = await readyz(sidecar)
    assert status == 503 and "file is not a database" in body, body
    assert logged(caplog, logging.ERROR, "rules.db reload failed, serving the last good rules")
    for _ in range(10):
        assert await decide(stub, "a.example.com") == "allowed"
        assert await decide(stub, "b.example.com") == "no_matching_policy"
    assert (await readyz(sidecar))[0] == 503

    os.replace(aside, db)

    async def ready() -> bool:
        return (await readyz(sidecar))[0] == 200

    await eventually(ready)
    seed(db, [], [B])  # and the next admin change is picked up as usual

    async def change_served() -> bool:
        return await decide(stub, "b.example.com") == "allowed"

    await eventually(change_served)
    assert await decide(stub, "a.example.com") == "allowed"


# --- broken rows written with plain SQL -------------------------------------------------------


async def test_rows_broken_with_plain_sql_deny_only_their_policies(
        db: Path, start_sidecar, authz, webhook, caplog: pytest.LogCaptureFixture) -> None:
    webhook.routes["/posture"] = answer({"status": "active"})
    active = (ResponseAction(type=ActionType.STRING, key="status", value="active"),)
    rules = [Rule(name=name, url=webhook.url + "/posture", actions=active) for name in ("good", "json", "regex")]
    seed(db, rules, [
        Policy(name="p-good", path_prefix="/good", rules=("good",)),
        Policy(name="p-json", path_prefix="/json", rules=("json",)),
        Policy(name="p-regex", path_prefix="/regex", rules=("regex",)),
        Policy(name="p-open", path_prefix="/open", integration=False),
    ])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    for path in ("/good", "/json", "/regex", "/open"):
        assert await decide(stub, "app.example.com", path) == "allowed", path

    conn = sqlite3.connect(db)  # plain SQL, as with the sqlite3 shell
    conn.execute("""UPDATE rules SET headers = '[["x-a", "1"' WHERE name = 'json'""")
    conn.execute("""UPDATE rules SET actions = '[{"type": "regex", "key": "status", "value": "(["}]'
                    WHERE name = 'regex'""")
    conn.commit()
    conn.close()

    async def broken_rules_deny() -> bool:
        return await decide(stub, "app.example.com", "/json") == "rule_invalid"

    await eventually(broken_rules_deny)
    for path, rule in (("/json", "json"), ("/regex", "regex")):
        response = await stub.Check(check_request(path), timeout=5)
        assert response.status.code == PERMISSION_DENIED
        assert json.loads(response.denied_response.body)["code"] == "rule_invalid"
        assert denial_reason(response).startswith(f'rule "{rule}" is invalid'), denial_reason(response)
    calls_before = len(webhook.seen("/posture"))
    assert await decide(stub, "app.example.com", "/good/x") == "allowed"
    assert len(webhook.seen("/posture")) == calls_before + 1  # the good rule still really runs
    assert await decide(stub, "app.example.com", "/open") == "allowed"
    assert (await readyz(sidecar))[0] == 200  # the database itself is fine
    assert await scraped(sidecar, "safous_rules_unusable") == 2
    assert logged(caplog, logging.WARNING, "unusable rule 'json'")
    assert logged(caplog, logging.WARNING, "unusable rule 'regex'")
    await sidecar.stop(grace=1)
    conn = sqlite3.connect(db)
    denied = conn.execute("SELECT path, code FROM activity_log WHERE allowed = 0").fetchall()
    conn.close()
    assert ("/regex", "rule_invalid") in denied and ("/json", "rule_invalid") in denied


async def test_a_policy_broken_with_plain_sql_never_lets_its_requests_through_another(
        db: Path, start_sidecar, authz) -> None:
    rule = Rule(name="posture", url="http://127.0.0.1:9/check")  # nothing listens: always denies
    seed(db, [rule], [
        Policy(name="admin", path_prefix="/admin", methods=("GET",), rules=("posture",), priority=10),
        Policy(name="public", path_prefix="/", integration=False),
    ])
    sidecar = await start_sidecar(reload_interval=0.05)
    stub = authz(sidecar.port)
    assert await decide(stub, "app.example.com", "/admin/users") == "webhook_unreachable"
    assert await decide(stub, "app.example.com", "/home") == "allowed"
    version = sidecar.checker.snapshot.version

    conn = sqlite3.connect(db)
    conn.execute("""UPDATE policies SET methods = '["GET"' WHERE name = 'admin'""")  # a typo
    conn.commit()
    conn.close()
    await eventually(lambda: sidecar.checker.snapshot.version > version)

    assert await decide(stub, "app.example.com", "/admin/users") == "rule_invalid"


# --- the activity log cannot be written -------------------------------------------------------


def decision(path: str) -> ActivityRecord:
    return ActivityRecord(at=time.time(), request_id=f"req{path.replace('/', '-')}", username="alice",
                          source_ip="203.0.113.7", host="a.example.com", path=path, method="GET", policy="a",
                          allowed=True, code="rules_passed", status="", latency_ms=1.0)


def hold_write_lock(db: Path) -> sqlite3.Connection:
    """Another process's long write transaction (an admin command that takes long): rules.db's
    write lock, held until the returned connection commits."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE schema_migrations SET applied_at = applied_at")  # a write, no rule change
    return conn


@pytest.fixture
def decision_lines(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Any:
    """The JSON decision log lines the process writes on stderr, as a list of strings."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    monkeypatch.setattr(logs, "_format", "json")
    monkeypatch.setattr(logs, "_worker", None)
    monkeypatch.setattr(root, "handlers", [handler, *root.handlers])  # write_decisions uses the first
    caplog.set_level(logging.INFO)
    return lambda: stream.getvalue().splitlines()


async def test_decisions_the_locked_rules_db_refused_are_all_written_once_it_is_free(
        db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, decision_lines: Any) -> None:
    """The write lock held past the writer's busy timeout, several times over: every decision
    reaches the activity log once the lock is released, in order, and each has one decision
    log line, not one per try."""
    monkeypatch.setattr(connection, "BUSY_TIMEOUT_MS", 100)  # tries that fail fast, the same way

    def refused() -> int:
        return sum("activity log write failed" in r.getMessage() for r in caplog.records)

    activity = ActivityLog(db, flush_interval=0.02, on_batch=logs.write_decisions)
    activity.start()
    try:
        activity.record(decision("/before"))
        await eventually(lambda: activity.written == 1)
        holder = hold_write_lock(db)
        try:
            for round_ in range(3):
                before = refused()
                for i in range(10):
                    activity.record(decision(f"/locked-{round_}-{i}"))
                await eventually(lambda before=before: refused() > before, what="a refused write")
        finally:
            holder.execute("COMMIT")
            holder.close()
        activity.record(decision("/after"))
        await eventually(lambda: activity.written == 32, what="every decision written")
    finally:
        await activity.close()

    expected = ["/before", *(f"/locked-{r}-{i}" for r in range(3) for i in range(10)), "/after"]
    assert activity_paths(db) == expected
    assert activity.dropped == 0
    logged_paths = [record.path for line in decision_lines() if (record := decision_from_log_line(line))]
    assert logged_paths == expected  # each line once, none written again on a retry
    refused = [r for r in caplog.records if "activity log write failed" in r.getMessage()]
    assert all(r.levelno == logging.ERROR and "kept for the next try" in r.getMessage() for r in refused)


async def test_a_backlog_is_written_in_few_slices_each_decision_once_with_its_log_line(
        db: Path, monkeypatch: pytest.MonkeyPatch, decision_lines: Any) -> None:
    """The writer hands the interpreter back between slices of a flush, but in MAX_SLICES
    slices at most: a loaded process's backlog of thousands is written in larger slices, not
    hundreds of pauses (each costs more than itself when the event loop is busy: 16-decision
    slices wrote ~8,000 decisions a second behind an HTTP endpoint answering 16,000)."""
    pauses: list[float] = []
    monkeypatch.setattr(activity_module, "time", SimpleNamespace(sleep=pauses.append))
    activity = ActivityLog(db, flush_interval=60, on_batch=logs.write_decisions)
    activity.start()
    paths = [f"/backlog-{i}" for i in range(5000)]
    for path in paths:
        activity.record(decision(path))
    await activity.close()  # one flush of the 5,000

    assert (activity.written, activity.dropped) == (5000, 0)
    assert len(pauses) == activity_module.MAX_SLICES - 1
    assert activity_paths(db) == paths
    assert [record.path for line in decision_lines() if (record := decision_from_log_line(line))] == paths


async def test_a_batch_kept_for_a_retry_stays_within_the_queue_bound(
        db: Path, monkeypatch: pytest.MonkeyPatch, decision_lines: Any) -> None:
    """While the lock is held the queue fills: past ``max_queue`` only the overflow is dropped
    (the oldest, whose log lines are out), and every decision still has its log line."""
    monkeypatch.setattr(connection, "BUSY_TIMEOUT_MS", 200)
    activity = ActivityLog(db, max_queue=10, flush_interval=0.02, on_batch=logs.write_decisions)
    activity.start()
    holder = hold_write_lock(db)
    try:
        for i in range(8):
            activity.record(decision(f"/first-{i}"))
        await eventually(lambda: activity.depth == 0, what="the batch taken by the writer")
        for i in range(8):  # while the writer waits for the lock
            activity.record(decision(f"/second-{i}"))
        await eventually(lambda: activity.dropped > 0, what="the overflow dropped")
    finally:
        holder.execute("COMMIT")
        holder.close()
    await eventually(lambda: activity.depth == 0)
    await activity.close()

    assert (activity.written, activity.dropped) == (10, 6)
    assert activity_paths(db) == [*(f"/first-{i}" for i in range(6, 8)), *(f"/second-{i}" for i in range(8))]
    logged_paths = [record.path for line in decision_lines() if (record := decision_from_log_line(line))]
    assert logged_paths == [*(f"/first-{i}" for i in range(8)), *(f"/second-{i}" for i in range(8))]


async def test_a_bug_in_a_write_costs_its_batch_not_the_activity_log(
        db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Not a database error but a bug: the batch is dropped, counted and logged, and the writer
    goes on writing the decisions that follow; stopping does not raise it."""
    real = rules_db.insert_prepared
    calls = 0

    def buggy_once(conn: sqlite3.Connection, batch: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        real(conn, batch)

    monkeypatch.setattr(rules_db, "insert_prepared", buggy_once)
    activity = ActivityLog(db, flush_interval=0.02)
    activity.start()
    activity.record(decision("/lost"))
    await eventually(lambda: activity.dropped == 1)
    activity.record(decision("/next"))
    await eventually(lambda: activity.written == 1, what="the writer still writing")
    await activity.close()
    assert activity_paths(db) == ["/next"]
    assert logged(caplog, logging.ERROR, "activity log write failed; 1 decisions dropped")


async def test_activity_log_locked_past_the_busy_timeout_loses_nothing(
        db: Path, start_sidecar, authz, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds rules.db's write lock longer than the writer's busy timeout: the
    failed writes are logged, checks go on at normal speed, and once the lock is released every
    decision made meanwhile is in the activity log, none dropped."""
    monkeypatch.setattr(connection, "BUSY_TIMEOUT_MS", 300)  # the server's writes give up sooner
    seed(db, [], [A])
    sidecar = await start_sidecar(reload_interval=0.05, http="127.0.0.1:0")
    stub = authz(sidecar.port)
    assert await decide(stub, "a.example.com", "/before") == "allowed"
    await eventually(lambda: sidecar.activity.written == 1)

    holder = hold_write_lock(db)
    try:
        worst = 0.0
        for i in range(20):
            started = time.perf_counter()
            assert await decide(stub, "a.example.com", f"/locked-{i}") == "allowed"
            worst = max(worst, time.perf_counter() - started)
            await asyncio.sleep(0.01)  # pacing: the decisions fall into several writer batches
        waited = await timed_wait(lambda: logged(caplog, logging.ERROR, "activity log write failed"))
        assert await scraped(sidecar, "safous_activity_queue_depth") == 20  # waiting, not dropped
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert worst < 0.25

    for i in range(5):
        assert await decide(stub, "a.example.com", f"/after-{i}") == "allowed"
    await eventually(lambda: sidecar.activity.written == 26, what="every decision written")
    assert await scraped(sidecar, "safous_activity_dropped_total") == 0
    await sidecar.stop(grace=1)
    assert activity_paths(db) == ["/before", *(f"/locked-{i}" for i in range(20)), *(f"/after-{i}" for i in range(5))]
    print(f"\nlock past busy timeout: first refused write logged {waited:.2f} s after the checks, "
          f"worst check {worst * 1000:.2f} ms")


async def test_activity_log_on_a_full_disk_keeps_the_decisions_until_there_is_space(tmp_path: Path) -> None:
    """The real server process, its file-size limit lowered to 0 while it runs (what a full
    disk looks like to it: writes fail with EFBIG, reads still work). chmod would not do: this
    process may be root, and an open connection keeps writing to a file made read-only."""
    db = tmp_path / "rules.db"
    seed(db, [], [A])
    log, port = await asyncio.to_thread(start_server, db, "--reload-interval", "0.05")
    proc = log.proc
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AuthorizationStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            assert await decide(stub, "a.example.com", "/before") == "allowed"

            await eventually(lambda: activity_paths(db) == ["/before"], what="the first decision written")
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, hard))  # the disk is full
            try:
                for i in range(20):
                    assert await decide(stub, "a.example.com", f"/full-{i}") == "allowed"
                    assert await decide(stub, "b.example.com", f"/full-{i}") == "no_matching_policy"
                    await asyncio.sleep(0.02)  # pacing: the decisions fall into several batches

                def kept_so_far() -> int:
                    return max((int(e["message"].split("; ")[1].split()[0]) for e in log.records()
                                if e.get("message", "").startswith("activity log write failed")), default=0)

                await eventually(lambda: kept_so_far() == 40, timeout=10, what="40 decisions kept")
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING  # rules still readable
            finally:
                resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space again
            for i in range(5):
                assert await decide(stub, "a.example.com", f"/after-{i}") == "allowed"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        await asyncio.to_thread(log.close)
    records = log.records()
    failures = [e for e in records if e.get("message", "").startswith("activity log write failed")]
    assert failures and all(e["level"] == "error" and e.get("error") for e in failures)
    # Tries come further apart while they fail: not an error line per flush.
    assert len(failures) < 20
    stopped = next(e for e in records if e.get("message") == "stopped")
    assert stopped["activity_dropped"] == 0 and stopped["activity_written"] == 46
    assert activity_paths(db) == ["/before", *(f"/full-{i}" for i in range(20) for _ in "ab"),
                                  *(f"/after-{i}" for i in range(5))]
    print(f"\ndisk full: {len(failures)} failed writes logged, error: {failures[0]['error']!r}")


# --- restart ----------------------------------------------------------------------------------


async def test_no_committed_admin_change_is_lost_across_a_restart(db: Path, start_sidecar, authz) -> None:
    seed(db, [], [A])
    first = await start_sidecar(reload_interval=0.05)
    stub = authz(first.port)
    hosts = [f"new{i}.example.com" for i in range(20)]

    def admin() -> None:
        # Twenty admin commands, one transaction each, while the sidecar is busy writing activity.
        conn = connect(db)
        try:
            for i, host in enumerate(hosts):
                with admin_transaction(conn, "alice"):
                    save_policy(conn, open_policy(f"new{i}", host))
        finally:
            conn.close()

    checks = 0
    admin_done = asyncio.create_task(asyncio.to_thread(admin))
    while not admin_done.done() or checks < 20:
        assert await decide(stub, "a.example.com", f"/first-{checks}") == "allowed"
        checks += 1
    await admin_done
    await first.stop()  # at once: the last changes may not even have been loaded yet

    second = await start_sidecar(reload_interval=0.05)
    stub = authz(second.port)
    for host in ["a.example.com", *hosts]:
        assert await decide(stub, host) == "allowed", host
    paths = activity_paths(db)
    assert [p for p in paths if p.startswith("/first-")] == [f"/first-{i}" for i in range(checks)]
    conn = sqlite3.connect(db)
    audited = conn.execute("SELECT count(*) FROM audit_log WHERE actor = 'alice' AND action = 'create'").fetchone()
    conn.close()
    assert audited == (20,)
